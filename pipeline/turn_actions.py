"""How a conversation carries out turn-taking's decisions (`pipeline.turn_taking`).

`TurnActions` is the half of `pipeline.conversation.Conversation` that acts on what
`TurnTaking` decided: transcribe and score a pause, ask for a quick partial transcript of a
sound over the bot, pause the bot for a possible interruption and resume it when it was
none, prepare a reply early, and stop the bot for a real barge-in.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass

import anyio
import numpy as np

from pipeline.call_control import detect_intent
from pipeline.engines import EngineError, quick_transcriber
from pipeline.events import (
    CallEvent,
)
from pipeline.turn_taking import (
    Action,
    Analyze,
    Discard,
    PauseBot,
    Prepare,
    SpeechBegan,
    Transcribe,
    TurnEnded,
)
from pipeline.turn_timing import TurnTiming

log = logging.getLogger("pipeline.conversation")


@dataclass(slots=True)
class Prepared:
    """A reply started at a pause, before the turn ended: it thinks and synthesizes, but
    speaks only once `gate` is set (the turn ended with this very transcript)."""

    text: str
    turn: int
    task: asyncio.Task[None]
    gate: asyncio.Event
    timing: TurnTiming


class TurnActions:
    """Turn-taking actions for a `Conversation` (a mixin: it uses the conversation's engines,
    sink, bus, listener, turn-taking and tasks)."""

    @property
    def bot_active(self) -> bool:
        return self._sink.busy or (self._reply is not None and not self._reply.done())

    async def _act(self, actions: list[Action]) -> None:
        """Carry out what turn-taking decided (see `pipeline.turn_taking`)."""
        for action in actions:
            if isinstance(action, SpeechBegan):
                self._cancel_prepared()
                await self._interrupt("speech", onset_at=action.onset_at)
            elif isinstance(action, Analyze):
                self._analyze(action)
            elif isinstance(action, Discard):
                self._drop_speculative()
                self._cancel_prepared()
            elif isinstance(action, Transcribe):
                self._spawn(self._partial(action), "partial")
            elif isinstance(action, PauseBot):
                await self._pause_bot(action)
            elif isinstance(action, Prepare):
                self._prepare(action.text)
            elif isinstance(action, TurnEnded):
                self._turn_ended(action)

    def _analyze(self, action: Analyze) -> None:
        """A pause: transcribe what was said so far and ask the end-of-turn model about it."""
        # A sound over the bot: its words only have to tell a backchannel from an
        # interruption, and a paused bot waits on them, so the fast path (no full-window redo).
        self._start_speculative(action.audio, quick=action.during_bot)
        assert self._speculative is not None
        self._spawn(self._deliver_transcript(self._speculative, action.pause_id), "words")
        model = self._engines.turn_model
        if model is not None and self.turns.smart:
            self._spawn(self._deliver_probability(action.audio, action.pause_id), "eou")

    async def _deliver_transcript(self, stt: asyncio.Task[tuple[str, float]], pause_id: int
                                  ) -> None:
        await asyncio.wait({stt})
        if stt.cancelled() or stt.exception() is not None:
            return  # dropped (the caller went on) or failed: the turn's end handles it
        text, _ = stt.result()
        await self._act(self.turns.on_transcript(text, time.monotonic(), pause_id))

    async def _deliver_probability(self, audio: np.ndarray, pause_id: int) -> None:
        model = self._engines.turn_model
        assert model is not None
        try:
            probability = await anyio.to_thread.run_sync(model.predict, audio)
        except Exception as exc:  # an ONNX failure must not end the call: the words decide
            log.warning("end-of-turn model failed call_sid=%s: %s", self.call.call_sid, exc)
            return
        await self._act(self.turns.on_probability(probability, time.monotonic(), pause_id))

    async def _partial(self, action: Transcribe) -> None:
        """A quick transcript of a sound over the bot: words, or a backchannel?"""
        try:
            text = await anyio.to_thread.run_sync(quick_transcriber(self._engines.stt),
                                                  action.audio,
                                                  limiter=self._engines.partial_limiter)
        except EngineError as exc:
            log.warning("partial stt failed call_sid=%s: %s", self.call.call_sid, exc)
            return
        await self._act(self.turns.on_partial(text, time.monotonic(), action.utterance_id))

    async def _pause_bot(self, action: PauseBot) -> None:
        """A possible interruption: stop the sound now (`clear`), keep the reply until its
        words say whether it was one."""
        replying = self._reply is not None and not self._reply.done()
        if await self._sink.pause(replying=replying):
            self.echo_guard.drop_unplayed()
            self._paused = (action.onset_at, time.monotonic())
            log.info("bot paused call_sid=%s clear_after_ms=%.0f voiced_ms=%.0f partial=%r",
                     self.call.call_sid, (self._paused[1] - action.onset_at) * 1000,
                     action.voiced_ms, action.partial)

    def _resume_bot(self, kind: str, last_voice_at: float) -> None:
        """The sound that paused the bot was no words: go on where the caller stopped hearing."""
        paused, self._paused = self._paused, None
        if self._sink.paused is None or paused is None:
            return
        self._sink.resume()
        now = time.monotonic()
        self.barge_ins += 1
        detail = {"cause": "speech", "class": "false_interruption", "heard_as": kind,
                  "clear_ms": round((paused[1] - paused[0]) * 1000, 1),
                  "resume_ms": round((now - last_voice_at) * 1000, 1)}
        log.info("bot resumed call_sid=%s %s", self.call.call_sid, detail)
        self._bus.publish(CallEvent(self.call.call_sid, "barge_in", detail))

    def _turn_ended(self, action: TurnEnded) -> None:
        speech, decision = action.speech, action.decision
        detail: dict[str, object] = {
            "turn": self._turn + 1 if speech.worth_transcribing else None,
            "eou_delay_ms": round((speech.ended_at - speech.last_voice_at) * 1000, 1),
            "reason": decision.reason, "budget_ms": decision.budget_ms,
            "probability": None if decision.probability is None else round(
                decision.probability, 3),
            "cue": decision.cue, "expecting": self.turns.detector.expecting,
            "during_bot": action.during_bot,
        }
        if action.interjection is not None:
            detail["interjection"] = action.interjection
        self._bus.publish(CallEvent(self.call.call_sid, "turn_end", detail))
        if action.interjection is not None:
            # A backchannel or a noise over the bot: it goes on (or resumes); no reply.
            if action.paused_bot:
                self._resume_bot(action.interjection, speech.last_voice_at)
            else:
                self._bus.publish(CallEvent(self.call.call_sid, "backchannel", {
                    "class": action.interjection, "text": decision.transcript}))
            self._on_speech_ended(speech, may_reply=False, during_bot=True)
            return
        self._on_speech_ended(speech, during_bot=action.during_bot)

    def _prepare(self, text: str) -> None:
        """Start the reply to `text` now; it speaks only if the turn ends with these words."""
        if self._ending or self.bot_active or (not self.config.llm_tools and detect_intent(text)):
            return
        self._cancel_prepared()
        memory = copy.deepcopy(self.memory)
        memory.add_user(text)
        timing = TurnTiming(last_voice_at=0.0, ended_at=0.0)
        gate = asyncio.Event()
        turn = self._turn + 1
        task = self._spawn(self._respond(timing, turn, messages=memory.messages(), gate=gate),
                           "prepared")
        self._prepared = Prepared(text, turn, task, gate, timing)  # type: ignore[arg-type]

    def _cancel_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None and not prepared.gate.is_set():
            prepared.task.cancel()

    async def _interrupt(self, cause: str, onset_at: float) -> None:
        """Stop the bot: `clear` what is playing, cancel the reply being made."""
        reply, self._reply = self._reply, None
        paused, self._paused = self._paused, None
        cleared = await self._sink.clear()
        if cleared:
            self.echo_guard.drop_unplayed()
        latency_ms = (time.monotonic() - onset_at) * 1000
        if paused is not None:
            # The bot was paused when this sound began: that `clear` was the barge-in.
            cause, latency_ms = "speech", (paused[1] - paused[0]) * 1000
        if reply is not None and not reply.done():
            reply.cancel()
            # `wait`, not `await reply`: the reply's cancellation must not be mistaken for
            # ours. If this task is cancelled meanwhile (hang-up), that propagates.
            await asyncio.wait({reply})
        if cleared or paused is not None:  # paused between two sentences: nothing to clear
            self.barge_ins += 1
            log.info("barge-in call_sid=%s cause=%s clear_after_ms=%.0f",
                     self.call.call_sid, cause, latency_ms)
            self._bus.publish(
                CallEvent(self.call.call_sid, "barge_in",
                          {"cause": cause, "clear_ms": round(latency_ms, 1),
                           "class": "interruption"})
            )

