"""How a conversation speaks: a reply streamed from the LLM through TTS to the caller,
recorded as it is heard; fixed phrases; the apology when a stage fails.

`Speaking` is the half of `pipeline.conversation.Conversation` that produces bot audio; the
other half listens and decides when to talk (`Conversation`, `pipeline.turn_taking`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from pipeline.call_control import Intent
from pipeline.engines import ChatMessage, EngineError, ToolRequest
from pipeline.events import CallEvent, UtteranceDone
from pipeline.sentences import SentenceSplitter
from pipeline.speech import SpokenSegment, heard_text
from pipeline.turn_timing import TurnTiming

log = logging.getLogger("pipeline.conversation")

FIRST_SEGMENT_SOFT_CHARS = 12
FIRST_SEGMENT_MAX_CHARS = 90


class Speaking:
    """Speaking for a `Conversation` (a mixin: it uses the conversation's engines, sink, bus,
    memory and tasks)."""

    async def _respond(self, timing: TurnTiming, turn: int, then: Intent | None = None,
                       messages: list[ChatMessage] | None = None,
                       gate: asyncio.Event | None = None) -> None:
        messages = messages if messages is not None else self.memory.messages()
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        generated: list[str] = []
        tools: list[ToolRequest] = []

        async def think() -> None:
            # The first segment is cut short (at a comma, or a long clause at a word break):
            # it is what the caller waits for, and TTS time grows with its length.
            splitter = SentenceSplitter(soft_chars=FIRST_SEGMENT_SOFT_CHARS,
                                        max_chars=FIRST_SEGMENT_MAX_CHARS)
            timing.llm_start = time.monotonic()
            try:
                async for delta in self._engines.llm.stream(messages):
                    if isinstance(delta, ToolRequest):
                        tools.append(delta)
                        continue
                    if timing.first_token_at is None:
                        timing.first_token_at = time.monotonic()
                    generated.append(delta)
                    for sentence in splitter.feed(delta):
                        if timing.first_sentence_at is None:
                            timing.first_sentence_at = time.monotonic()
                            splitter.soft_chars, splitter.max_chars = 60, 220
                        sentences.put_nowait(sentence)
                rest = splitter.flush()
                if rest:
                    if timing.first_sentence_at is None:
                        timing.first_sentence_at = time.monotonic()
                    sentences.put_nowait(rest)
            finally:
                sentences.put_nowait(None)

        thinker = self._spawn(think(), "llm", awaited=True)
        spoke = await self._speak_stream(sentences, thinker, timing, turn, generated,
                                         allow_silent=True, gate=gate)
        for request in tools:
            log.info("llm tool call call_sid=%s %s %s", self.call.call_sid, request.name,
                     request.arguments)
            if request.name == "end_call":
                goodbye = str(request.arguments.get("goodbye") or self.config.goodbye)
                self._end_call("llm", None if spoke else goodbye)
                return
            if request.name == "transfer_call":
                await self._transfer()
                return
        if not spoke and not tools:
            await self._fail(turn, "llm", EngineError("llm", "empty reply"))
            return
        if then == "end":
            self._end_call("caller_goodbye", None)

    async def _speak_stream(
        self,
        sentences: asyncio.Queue[str | None],
        thinker: asyncio.Task[object],
        timing: TurnTiming,
        turn: int,
        generated: list[str],
        allow_silent: bool = False,
        gate: asyncio.Event | None = None,
    ) -> bool:
        """Speak the sentences as they come; True when anything was said.

        With a `gate` (a reply prepared before the turn ended), nothing is played until it is
        set; a reply cancelled before that leaves no trace in the transcript or the history.
        """
        segments: list[SpokenSegment] = []
        started = time.monotonic()
        interrupted = False
        failed = False
        try:
            while (sentence := await sentences.get()) is not None:
                audio, first_ms = await self._engines.speak_ulaw(sentence, self.config.tts_timeout_s)
                if timing.tts_first_ms is None:
                    timing.tts_first_ms = first_ms
                if gate is not None and not gate.is_set():
                    await gate.wait()
                    self._count_from_release(timing)
                segment = SpokenSegment(sentence, audio, turn)
                self.turns.bot_says(sentence)
                self._sink.play(segment)
                if not segments:
                    started = time.monotonic()
                    await segment.first_sent.wait()
                    self._publish_metrics(turn, timing, segment)
                segments.append(segment)
            await thinker  # surfaces an LLM error raised after the last sentence
            if not segments and not allow_silent:
                raise EngineError("llm", "empty reply")
            await asyncio.gather(*(s.finished.wait() for s in segments))
            return bool(segments)
        except asyncio.CancelledError:
            interrupted = True
            raise
        except (EngineError, TimeoutError) as exc:
            failed = True
            stage = exc.stage if isinstance(exc, EngineError) else (
                "tts" if thinker.done() else "llm")
            await self._fail(turn, stage, exc)
            return True
        finally:
            thinker.cancel()
            interrupted = interrupted or any(s.cleared for s in segments)
            if gate is None or gate.is_set():
                self._record_bot(turn, segments, "".join(generated), started, interrupted,
                                 failed)

    def _record_bot(
        self,
        turn: int,
        segments: list[SpokenSegment],
        generated: str,
        started: float,
        interrupted: bool,
        failed: bool,
    ) -> None:
        heard = heard_text(segments)
        self.turns.detector.expect_after(generated or heard)
        if heard:
            self.memory.add_assistant(heard + ("…" if interrupted else ""))
            # Fold turns that left the window into a summary, off the audio path. Not while
            # closing: a task started now would escape the call's cancellation.
            if not self._closed and self.summarizer.due(self.memory):
                self._spawn(self.summarizer.maybe_summarize(self.memory, self._engines.llm),
                            "summary")
        if not segments and not generated:
            return
        self._bus.publish(
            UtteranceDone(
                self.call.call_sid, turn, "bot", heard, self._wall(started),
                self._wall(time.monotonic()), generated_text=generated.strip() or None,
                interrupted=interrupted and not failed,
            )
        )
        log.info("bot call_sid=%s turn=%d heard=%r interrupted=%s",
                 self.call.call_sid, turn, heard, interrupted)

    @staticmethod
    def _count_from_release(timing: TurnTiming) -> None:
        """A prepared reply was released at the end of the turn: the caller waited only for
        what was still left to do, so its stages count from now."""
        released = time.monotonic()
        for name in ("llm_start", "first_token_at", "first_sentence_at"):
            value = getattr(timing, name)
            if value is not None and value < released:
                setattr(timing, name, released)
        timing.tts_first_ms = 0.0

    def _publish_metrics(self, turn: int, timing: TurnTiming, first: SpokenSegment) -> None:
        """The turn's latency parts, once the caller has heard the start of the reply (the
        first mark echo, usually a chunk's length later) so V2V as heard is among them."""
        if not timing.measured:
            return
        metrics = timing.metrics(self.call.call_sid, turn, first.first_sent_at)

        async def when_heard() -> None:
            try:
                await first.first_heard.wait()
            finally:  # also when the call ends first: the other parts are known already
                heard = None
                if first.first_played_at is not None and timing.last_voice_at is not None:
                    heard = round((first.first_played_at - timing.last_voice_at) * 1000, 1)
                self._bus.publish(replace(metrics, heard_v2v_ms=heard))

        self._spawn(when_heard(), "metrics")

    async def _say(self, text: str, turn: int) -> None:
        """Speak a fixed phrase (greeting, apology) and wait until it has been heard."""
        segments: list[SpokenSegment] = []
        started = time.monotonic()
        interrupted = False
        try:
            audio, _ = await self._engines.speak_ulaw(text, self.config.tts_timeout_s)
            segment = SpokenSegment(text, audio, turn)
            segments.append(segment)
            self.turns.bot_says(text)
            self._sink.play(segment)
            await segment.finished.wait()
        except asyncio.CancelledError:
            interrupted = True
            raise
        except (EngineError, TimeoutError) as exc:
            log.error("could not speak call_sid=%s text=%r: %s", self.call.call_sid, text, exc)
            self._bus.publish(CallEvent(self.call.call_sid, "error", {"stage": "tts",
                                                                      "reason": str(exc)}))
        finally:
            interrupted = interrupted or any(s.cleared for s in segments)
            self._record_bot(turn, segments, text, started, interrupted, failed=False)

    async def _fail(self, turn: int, stage: str, exc: BaseException) -> None:
        """A stage failed: log it, record it, and apologise so the caller never hears dead air."""
        reason = str(exc) or type(exc).__name__
        log.error("%s failed call_sid=%s turn=%d: %s", stage, self.call.call_sid, turn, reason)
        self._bus.publish(
            CallEvent(self.call.call_sid, "error", {"stage": stage, "reason": reason[:500]})
        )
        await self._say(self.config.apology, turn)
