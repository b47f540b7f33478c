"""One phone conversation: listen, transcribe, think, speak, and stop when interrupted.

`Conversation` is driven by the transport (`telephony.stream`): it is fed caller audio frames and
DTMF digits and speaks through an `AudioSink`. It owns every task it starts (speculative STT, the
reply in progress, the greeting) and cancels them all in `close()`, so nothing outlives a call.

A reply is one task: wait for the transcript → stream the LLM → split sentences → synthesize →
queue audio → wait until it has been heard. A barge-in (the caller talks over the bot for longer
than a click) sends `clear` and cancels that task; its `finally` records what was actually heard.

Who has the floor is decided by `pipeline.turn_taking.TurnTaking` (end of turn from the
end-of-turn model and the words, backchannels, interruptions); this class carries out its
actions: speculative STT and the model at a pause, a reply prepared early from a stable
transcript (spoken only when the turn ends, cancelled if the caller goes on), pausing the bot
for a possible interruption and resuming it (`pipeline.resume`) when it was none. Inbound audio
first passes the echo guard (`pipeline.echo_guard`), which removes the bot's own voice. How a
reply is made and spoken (LLM → sentences → TTS → sink, recorded as heard) lives in its
`Speaking` half (`pipeline.speaking`); how turn-taking's decisions are carried out, in its
`TurnActions` half (`pipeline.turn_actions`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timedelta
from typing import Protocol

import anyio
import numpy as np

from media.mulaw import FRAME_BYTES, is_quiet_ulaw, ulaw_to_pcm16
from pipeline.call_control import CallControl, Intent, detect_intent
from pipeline.call_setup import (
    STANDARD_PARAMETERS,
    CallInfo,
    ConversationConfig,
    Engines,
    Resumed,
)
from pipeline.echo_guard import EchoGuard
from pipeline.engines import EngineError, quick_transcriber
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    EventBus,
    UtteranceDone,
    utcnow,
)
from pipeline.listener import Listener, SpeechEnded
from pipeline.memory import ConversationMemory, RollingSummarizer
from pipeline.resume import ResumableSink
from pipeline.speaking import Speaking
from pipeline.speech import AudioSink, PeerGone
from pipeline.turn_actions import Prepared, TurnActions
from pipeline.turn_detector import TurnDetector
from pipeline.turn_taking import Action, TurnTaking, TurnTakingConfig
from pipeline.turn_timing import TurnTiming

log = logging.getLogger(__name__)

QUIET_RUN = 8  # quiet frames (160 ms) before holding: the resampler and VAD have caught up
HOLD_FRAMES = 25  # quiet frames listened to as one block (500 ms), of FRAME_BYTES each
FRAME_MS = FRAME_BYTES / 8.0  # a whole frame's audio time (8 kHz μ-law: a byte a sample)


class QuietHold(Protocol):
    """Where the transport keeps the caller's quiet frames for `hear_held` (the Twilio stream's
    `telephony._fastmedia.QuietHold`): it keeps none once `limit` is 0."""

    limit: int


class Conversation(TurnActions, Speaking):
    """The per-call conversation state machine (see module docstring)."""

    def __init__(
        self,
        call: CallInfo,
        engines: Engines,
        sink: AudioSink,
        bus: EventBus,
        config: ConversationConfig,
        caller_context: str | None = None,
        control: CallControl | None = None,
        resumed: Resumed | None = None,
    ) -> None:
        self.call = call
        self.resumed = resumed
        self._control = control
        self._engines = engines
        # Everything the bot says goes through the resumable wrapper: a barge-in may pause it.
        self._sink = ResumableSink(sink)
        self._bus = bus
        self.config = config
        self.listener = Listener(engines.vad(), config.endpoint)
        self.turns = TurnTaking(self.listener,
                                TurnDetector(uses_model=engines.turn_model is not None),
                                TurnTakingConfig(prepare_lead_ms=config.prepare_lead_ms))
        self.echo_guard = EchoGuard()
        self._held: list[bytes] = []  # frames not listened to yet (see `hear`)
        self._quiet_run = 0  # quiet frames in a row, listened to one by one
        self._deferred = False  # `_held` holds frames waiting for the resampler's block
        # Bot audio sent while frames were held: (frames held before it, what was sent).
        self._held_sends: list[tuple[int, list[tuple[bytes, float]]]] = []
        # The transport's quiet hold, when it has one (`hold_room`): bot audio going out stops
        # it, so that the next frame comes through `hear` and records where the audio fell.
        self.hold: QuietHold | None = None
        self._sink.on_sent = self._stop_hold
        self._prepared: Prepared | None = None
        self._paused: tuple[float, float] | None = None  # (speech onset, clear sent)
        system_prompt = call.parameters.get("system_prompt") or config.system_prompt
        self.memory = ConversationMemory(system_prompt, config.history_turns, caller_context)
        self.summarizer = RollingSummarizer(max_chars=config.summary_max_chars,
                                            call_sid=call.call_sid)
        self._turn = 0
        if resumed is not None:  # the call goes on where its dropped stream left it
            for role, text, interrupted in resumed.transcript:
                if role == "caller":
                    self.memory.add_user(text)
                else:
                    self.memory.add_assistant(text + ("…" if interrupted else ""))
            self._turn = resumed.last_turn
        self._reply: asyncio.Task[None] | None = None
        self._speculative: asyncio.Task[tuple[str, float]] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._mono0 = time.monotonic()
        self._wall0 = utcnow()
        self._closed = False
        # The call's start and end as published (the transport may store them at once).
        self.started: CallStarted | None = None
        self.ended: CallEnded | None = None
        self.barge_ins = 0
        self._idle_ms = 0.0  # caller silence while the bot is quiet, in audio time
        self._reprompted = False
        self._ending = False

    # Lifecycle -----------------------------------------------------------------------------
    def _wall(self, mono: float) -> datetime:
        return self._wall0 + timedelta(seconds=mono - self._mono0)

    def _spawn(self, coro: object, name: str, awaited: bool = False) -> asyncio.Task[object]:
        """Run `coro` as a task this call owns (cancelled on hang-up). `awaited`: its result
        and failure are read by another task, so a failure is not reported here."""
        task = asyncio.create_task(coro, name=f"{name}:{self.call.call_sid}")  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard if awaited else self._reap)
        return task

    def _reap(self, task: asyncio.Task[object]) -> None:
        """A task of this call finished: forget it, and never leave its failure unread."""
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if isinstance(exc, PeerGone):  # the caller is gone: the transport ends the call
            log.info("%s stopped: the caller is gone (%s)", task.get_name(), type(exc).__name__)
        else:
            log.error("%s failed", task.get_name(), exc_info=exc)

    async def begin(self) -> None:
        """The call is connected: announce it and speak the greeting at once (or, on a stream
        connected again after a drop, the resume message)."""
        resumed = self.resumed
        self.started = CallStarted(
            call_sid=self.call.call_sid,
            stream_sid=self.call.stream_sid,
            from_number=self.call.from_number,
            to_number=self.call.to_number,
            direction=self.call.direction,
            started_at=self._wall0,
            resumed=resumed.attempt if resumed is not None else 0,
        )
        self._bus.publish(self.started)
        if resumed is not None:
            self._bus.publish(CallEvent(self.call.call_sid, "resumed", {
                "attempt": resumed.attempt, "utterances": len(resumed.transcript)}))
            self._reply = self._spawn(self._resume(resumed), "resume")  # type: ignore[assignment]
            return
        own = {k: v for k, v in self.call.parameters.items() if k not in STANDARD_PARAMETERS}
        if own:  # kept for a stream connected again (webhooks/stream_ended.py)
            self._bus.publish(CallEvent(self.call.call_sid, "parameters", own))
        greeting = self.call.parameters.get("greeting") or self.config.greeting
        if greeting:
            self._reply = self._spawn(self._say(greeting, turn=0), "greeting")  # type: ignore[assignment]

    async def _resume(self, resumed: Resumed) -> None:
        """A stream connected again after a drop: say `resume_message` instead of the
        greeting. If the caller's last words went unanswered when the stream dropped, answer
        them right after it: the LLM starts at once, on the history before the message, and
        its reply plays once the message has been heard (a barge-in cancels both)."""
        reply: asyncio.Task[object] | None = None
        heard = asyncio.Event()
        if resumed.transcript and resumed.transcript[-1][0] == "caller":
            now = time.monotonic()
            reply = self._spawn(self._respond(TurnTiming(now, now, measured=False), self._turn,
                                              messages=self.memory.messages(), gate=heard),
                                "reply", awaited=True)
        try:
            if self.config.resume_message:
                await self._say(self.config.resume_message, self._turn)
        except asyncio.CancelledError:
            if reply is not None:
                reply.cancel()
            raise
        heard.set()
        if reply is not None:
            await reply

    async def close(self, reason: str) -> None:
        """The call ended: cancel everything this call started, then report the end."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        echo = self.echo_guard.stats
        if echo.delay_ms is not None:
            self._bus.publish(CallEvent(self.call.call_sid, "echo", {
                "delay_ms": round(echo.delay_ms, 1), "cancelled_frames": echo.cancelled_frames,
                "frames": echo.frames}))
        self.ended = CallEnded(self.call.call_sid, utcnow(), reason)
        self._bus.publish(self.ended)

    # Inputs --------------------------------------------------------------------------------
    def hear(self, ulaw: bytes) -> list[Action]:
        """One inbound frame of caller audio (8 kHz μ-law). Synchronous and cheap: it runs for
        every frame where the server parsed it; returns what turn-taking decided, for `act`.

        Frames are held, and listened to later as one block, in two cases: the same audio
        through the same steps (the bot's audio laid on the echo guard's timeline between the
        same frames, its refits on the same frames), at a fraction of the per-frame cost.
        - A quiet frame (a listening caller on a quiet line, most of a call), when the caller
          is not in an utterance and the last `QUIET_RUN` frames were quiet too: `HOLD_FRAMES`
          of them make a block. Any other frame first releases what is held, so a word is
          heard the moment it starts.
        - Any frame that cannot complete the resampler's next block (soxr hands its output
          over about every fifth frame) while nothing is decided between VAD windows
          (`_may_defer`): it could only be held there, so it waits here for the frame that
          completes the block, and the two go through as one."""
        self._track_idle(len(ulaw) / 8.0)
        held = self._held
        if is_quiet_ulaw(ulaw):
            if (self._quiet_run >= QUIET_RUN and len(ulaw) == FRAME_BYTES
                    and not self.listener.in_speech and not self._deferred):
                if self._sink.has_sent:  # bot audio that went out before this frame
                    self._held_sends.append((len(held), self._sink.take_sent()))
                held.append(ulaw)
                return self._release() if len(held) >= HOLD_FRAMES else []
            self._quiet_run += 1
        else:
            self._quiet_run = 0
        if self._may_defer(ulaw):
            held.append(ulaw)
            self._deferred = True
            if self.listener.input_until_output > FRAME_BYTES * len(held):
                return []
            return self._release()
        actions = self._release() if held else []
        # The bot's voice coming back (speakerphone) is removed before anything listens.
        self._lay(self._sink.take_sent())
        actions.extend(self._listen(ulaw_to_pcm16(ulaw)))
        return actions

    def hold_room(self) -> int:
        """How many of the next frames `hear` would only hold, if they are quiet whole frames
        (0 when it would listen to the next one): the transport may keep that many and give
        them to `hear_held` as one block, instead of each to `hear`. Fewer than the block's
        room when the caller's idle time reaches its next limit sooner, so that the reprompt
        or hang-up comes on the same frame."""
        if (self._quiet_run < QUIET_RUN or self.listener.in_speech or self._deferred
                or self._sink.has_sent):
            return 0
        room = HOLD_FRAMES - len(self._held)
        if not (self._ending or self.bot_active):
            limit_s = self.config.idle_hangup_s if self._reprompted else self.config.idle_reprompt_s
            frames = math.ceil((limit_s * 1000 - self._idle_ms) / FRAME_MS)
            room = min(room, max(1, frames))
        return room

    def hear_held(self, ulaw: bytes, frames: int) -> list[Action]:
        """`frames` quiet frames (at most `hold_room()`, asked just before the first of them)
        that the transport kept: held as `hear` would hold each of them, their idle time
        counted at once, and the block listened to when it is whole. The idle timer reads the
        bot's state once for them, not frame by frame: the bot busy only within them (a reply
        begun and ended in under half a second without sending audio, which would have
        stopped the hold) does not restart it."""
        self._track_idle(frames * FRAME_MS)
        held = self._held
        held.extend([ulaw[i:i + FRAME_BYTES] for i in range(0, frames * FRAME_BYTES, FRAME_BYTES)])
        return self._release() if len(held) >= HOLD_FRAMES else []

    def _stop_hold(self) -> None:
        hold = self.hold
        if hold is not None:
            hold.limit = 0

    def _may_defer(self, ulaw: bytes) -> bool:
        """Whether a frame may wait for the resampler's next block (`hear`): a whole frame,
        no bot audio to lay between frames (none went out since the last one was listened
        to, none is recent enough for the echo guard to remove), and turn-taking waiting for
        the VAD's next window. The echo guard then gives every frame back as it came, so
        a block is heard as its frames would have been."""
        return (self.listener.input_until_output > 0 and len(ulaw) == FRAME_BYTES
                and not self._sink.has_sent and not self._held_sends
                and not self.echo_guard.bot_recent
                and self.turns.waits_for_windows(self._sink.audible))

    def _lay(self, sent: list[tuple[bytes, float]]) -> None:
        """Bot audio sent: on the echo guard's timeline, by when it went out."""
        for chunk, sent_at in sent:
            self.echo_guard.far_end(ulaw_to_pcm16(chunk), sent_at - self._mono0)

    def _release(self) -> list[Action]:
        """Listen to the held frames as one block. The echo guard takes it in parts when bot
        audio went out while they were held, each send laid between the frames it came
        between; held frames come out of it as they went in (quiet ones, or any while the bot
        is not recent), so the listener gets the block whole."""
        held = self._held
        frames = len(held)
        block = ulaw_to_pcm16(b"".join(held))
        held.clear()
        self._deferred = False
        done = 0
        for at, sent in self._held_sends:
            if at > done:
                self.echo_guard.process(block[done * FRAME_BYTES:at * FRAME_BYTES], at - done)
                done = at
            self._lay(sent)
        self._held_sends.clear()
        if done < frames:
            self.echo_guard.process(block[done * FRAME_BYTES:], frames - done)
        return self.turns.feed(block, time.monotonic(), self._sink.audible)

    def _listen(self, pcm8k: np.ndarray) -> list[Action]:
        """One frame, one by one: the echo guard's output is what the listener hears."""
        pcm8k = self.echo_guard.process(pcm8k)
        return self.turns.feed(pcm8k, time.monotonic(), self._sink.audible)

    async def act(self, actions: list[Action]) -> None:
        """Carry out what `hear` returned (replies, barge-ins, transcriptions)."""
        await self._act(actions)

    def _track_idle(self, frame_ms: float) -> None:
        """After `idle_reprompt_s` of caller silence ask if they are still there; after
        `idle_hangup_s` more, say goodbye and hang up. Counted in audio time while the bot
        is quiet; any caller speech starts over."""
        if self._ending or self.bot_active or self.listener.in_speech:
            self._idle_ms = 0.0
            return
        self._idle_ms += frame_ms
        if not self._reprompted and self._idle_ms >= self.config.idle_reprompt_s * 1000:
            self._reprompted = True
            self._reply = self._spawn(self._say(self.config.reprompt, self._turn), "reprompt")  # type: ignore[assignment]
        elif self._reprompted and self._idle_ms >= self.config.idle_hangup_s * 1000:
            self._end_call("idle", self.config.goodbye)

    def _end_call(self, reason: str, goodbye: str | None) -> None:
        """Say goodbye (if given), wait until it has been heard, then hang up."""
        if self._ending:
            return
        self._ending = True
        self._bus.publish(CallEvent(self.call.call_sid, "end_call", {"reason": reason}))

        async def run() -> None:
            if goodbye:
                await self._say(goodbye, self._turn)
            await self._hang_up(reason)

        self._spawn(run(), "end")

    async def _hang_up(self, reason: str) -> None:
        log.info("bot hangs up call_sid=%s reason=%s", self.call.call_sid, reason)
        if self._control is not None:
            await self._control.hang_up(f"bot_{reason}")

    async def _transfer(self) -> None:
        number = self.config.transfer_number
        self._bus.publish(CallEvent(self.call.call_sid, "transfer", {"number": number}))
        if not number or self._control is None:
            log.warning("transfer asked but TRANSFER_NUMBER is not set call_sid=%s",
                        self.call.call_sid)
            await self._say("Sorry, I can't transfer you right now.", self._turn)
            return
        self._ending = True
        await self._say(self.config.transfer_message, self._turn)
        if not await self._control.transfer(number):
            self._ending = False
            await self._say("Sorry, the transfer didn't go through.", self._turn)

    async def on_dtmf(self, digit: str) -> None:
        self._bus.publish(CallEvent(self.call.call_sid, "dtmf", {"digit": digit}))
        await self._interrupt("dtmf", onset_at=time.monotonic())
        self._idle_ms = 0.0
        action = self.config.dtmf_menu.get(digit)
        if action is not None:
            if action.kind == "hangup":
                self._end_call("dtmf", self.config.goodbye)
            elif action.kind == "transfer":
                self._reply = self._spawn(self._transfer(), "transfer")  # type: ignore[assignment]
            else:
                self._reply = self._spawn(self._say(action.text, self._turn), "menu")  # type: ignore[assignment]
            return
        self._turn += 1
        self.memory.add_user(f"(The caller pressed {digit} on the keypad.)")
        now = time.monotonic()
        timing = TurnTiming(now, now, stt_ms=0.0, transcript_at=now)
        self._reply = self._spawn(self._respond(timing, self._turn), "reply")  # type: ignore[assignment]

    def _transcribe_task(self, audio: np.ndarray, quick: bool = False
                         ) -> asyncio.Task[tuple[str, float]]:
        stt = self._engines.stt
        transcribe = quick_transcriber(stt) if quick else stt.transcribe

        async def run() -> tuple[str, float]:
            start = time.monotonic()
            text = await anyio.to_thread.run_sync(
                transcribe, audio, limiter=self._engines.stt_limiter
            )
            elapsed = (time.monotonic() - start) * 1000
            log.debug("stt call_sid=%s audio_s=%.2f took_ms=%.0f text=%r",
                      self.call.call_sid, audio.size / 16000, elapsed, text)
            return text, elapsed

        return self._spawn(run(), "stt", awaited=True)  # type: ignore[return-value]

    def _start_speculative(self, audio: np.ndarray, quick: bool = False) -> None:
        self._drop_speculative()
        self._speculative = self._transcribe_task(audio, quick)

    def _drop_speculative(self) -> None:
        if self._speculative is not None:
            self._speculative.cancel()
            self._speculative = None

    def _on_speech_ended(self, event: SpeechEnded, may_reply: bool = True,
                         during_bot: bool = False) -> None:
        speculative, self._speculative = self._speculative, None
        if not event.worth_transcribing:
            if speculative is not None:
                speculative.cancel()
            self._cancel_prepared()
            return
        self._turn += 1
        stt = speculative or self._transcribe_task(event.audio)
        timing = TurnTiming(last_voice_at=event.last_voice_at, ended_at=event.ended_at)
        started = self._wall(event.started_at)
        # Transcription is not part of the reply task: a barge-in cancels the reply, never the
        # caller's words, which always reach the transcript and the history.
        self._spawn(self._transcribe_then_reply(stt, timing, started, self._turn, may_reply,
                                                during_bot), "listen")

    async def _transcribe_then_reply(
        self, stt: asyncio.Task[tuple[str, float]], timing: TurnTiming, started: datetime, turn: int,
        may_reply: bool = True, during_bot: bool = False,
    ) -> None:
        try:
            with anyio.fail_after(self.config.stt_timeout_s):
                text, timing.stt_ms = await stt
        except (EngineError, TimeoutError) as exc:
            stt.cancel()
            await self._fail(turn, "stt", exc)
            return
        timing.transcript_at = time.monotonic()
        # Said over the bot and no words for it to answer ("mm-hmm", a cough): the bot goes
        # on (or resumes), and the history keeps only what the conversation is made of.
        kind = self.turns.interjection(text) if during_bot else "words"
        interjection = kind != "words"
        if interjection and may_reply:
            may_reply = False
            if self._paused is not None:
                self._resume_bot(kind, timing.last_voice_at)
        if not text.strip() or kind in ("noise", "echo"):
            log.info("no words in utterance call_sid=%s turn=%d", self.call.call_sid, turn)
            return
        if self._paused is not None and not interjection and may_reply:
            # The sound that paused the bot was words: that reply is over. Its heard part goes
            # into the history before the caller's words, in the order they were spoken.
            await self._interrupt("speech", onset_at=time.monotonic())
        log.info("caller call_sid=%s turn=%d text=%r", self.call.call_sid, turn, text)
        self._bus.publish(
            UtteranceDone(self.call.call_sid, turn, "caller", text, started,
                          self._wall(timing.last_voice_at))
        )
        if not interjection:
            self.memory.add_user(text)
        if not may_reply:
            log.info("kept without reply (bot was speaking) call_sid=%s turn=%d",
                     self.call.call_sid, turn)
            return
        if turn != self._turn or self.listener.confirmed:
            # The caller has gone on talking: answer once, after their next pause, with this
            # utterance and the next one together in the history.
            return
        self._idle_ms = 0.0
        self._reprompted = False
        prepared, self._prepared = self._prepared, None
        await self._interrupt("new_turn", onset_at=time.monotonic())
        if prepared is not None and prepared.text == text and prepared.turn == turn \
                and not prepared.task.done():
            # The reply started at the pause is for exactly these words: let it speak.
            prepared.timing.last_voice_at = timing.last_voice_at
            prepared.timing.ended_at = timing.ended_at
            prepared.timing.stt_ms = timing.stt_ms
            prepared.timing.transcript_at = timing.transcript_at
            self._reply = prepared.task
            prepared.gate.set()
            return
        if prepared is not None:
            prepared.task.cancel()
        intent: Intent | None = None if self.config.llm_tools else detect_intent(text)
        if intent == "transfer":
            self._reply = self._spawn(self._transfer(), "transfer")  # type: ignore[assignment]
            return
        self._reply = self._spawn(self._respond(timing, turn, then=intent), "reply")  # type: ignore[assignment]
