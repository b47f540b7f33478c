"""The process-wide services, built once in the app lifespan and injected into handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import anyio

from db.repository import CallNotFound, CallRepository
from pipeline.call_control import parse_dtmf_menu
from pipeline.call_setup import Resumed
from pipeline.call_summary import CallerMemory, remote_number
from pipeline.conversation import (
    CallInfo,
    Conversation,
    ConversationConfig,
    Engines,
)
from pipeline.events import EventBus, utcnow
from pipeline.listener import EndpointConfig
from pipeline.speech import AudioSink
from telephony.call_control import TwilioCallControl
from telephony.rest import TwilioRest
from telephony.stream import is_drop
from voicebot.settings import Settings
from webhooks.voice import resume_count

log = logging.getLogger(__name__)

# How long a resumed call may wait for its transcript before it goes on without it.
RESUME_READ_TIMEOUT_S = 2.0
# A stream connected again gets its call's transcript only if the call is on record as in
# progress, or as dropped at most this long ago (Twilio asks at once; a `resume` parameter on
# a call that ended on purpose, or long ago, is not a resume).
RESUME_WINDOW_S = 300.0


def _dropped_lately(end_reason: str | None, ended_at: datetime | None) -> bool:
    if end_reason is None:  # in progress as far as the record goes
        return True
    return (is_drop(end_reason) and ended_at is not None
            and (utcnow() - ended_at).total_seconds() <= RESUME_WINDOW_S)


@dataclass(slots=True)
class Services:
    """Everything a call needs that outlives the call."""

    settings: Settings
    engines: Engines
    bus: EventBus = field(default_factory=EventBus)
    caller_memory: CallerMemory | None = None
    twilio_rest: TwilioRest | None = None
    calls: CallRepository | None = None  # a resumed call's transcript comes from here
    active_calls: int = 0
    ready: bool = False

    def conversation_config(self) -> ConversationConfig:
        s = self.settings
        return ConversationConfig(
            greeting=s.greeting,
            system_prompt=s.system_prompt,
            apology=s.apology,
            endpoint=EndpointConfig(
                threshold=s.vad_threshold,
                silence_ms=s.endpoint_silence_ms,
                speculative_ms=s.speculative_stt_ms,
                confirm_ms=s.barge_in_min_speech_ms,
                resampler=s.vad_resampler,
            ),
            history_turns=s.history_turns,
            summary_max_chars=s.summary_max_chars,
            stt_timeout_s=s.stt_timeout_s,
            tts_timeout_s=s.tts_timeout_s,
            llm_timeout_s=s.llm_timeout_s,
            goodbye=s.goodbye,
            resume_message=s.resume_message,
            transfer_message=s.transfer_message,
            reprompt=s.reprompt,
            idle_reprompt_s=s.idle_reprompt_s,
            idle_hangup_s=s.idle_hangup_s,
            transfer_number=s.transfer_number,
            dtmf_menu=parse_dtmf_menu(s.dtmf_menu),
            llm_tools=bool(getattr(self.engines.llm, "tools", None)),
            prepare_lead_ms=s.prepare_lead_ms,
        )

    async def new_conversation(
        self,
        call: CallInfo,
        sink: AudioSink,
        end_stream: Callable[[str], Awaitable[None]] | None = None,
    ) -> Conversation:
        context = None
        if self.caller_memory is not None:
            # What we remember of this caller from earlier calls (time-bounded, never raises).
            context = await self.caller_memory.context_for(
                remote_number(call.direction, call.from_number, call.to_number))
        control = None
        if end_stream is not None:
            control = TwilioCallControl(call.call_sid, end_stream, self.twilio_rest)
        attempt = resume_count(call.parameters.get("resume", ""))
        resumed = await self.resumed(call.call_sid, attempt) if attempt is not None else None
        return Conversation(call, self.engines, sink, self.bus, self.conversation_config(),
                            caller_context=context, control=control, resumed=resumed)

    async def resumed(self, call_sid: str, attempt: int) -> Resumed:
        """A call whose stream is connected again after a drop, with what was said so far (as
        stored: what a worker that died had not written yet is not there). Bounded: without
        its transcript the call still goes on."""
        transcript: tuple[tuple[str, str, bool], ...] = ()
        last_turn = 0
        if self.calls is not None:
            try:
                async with asyncio.timeout(RESUME_READ_TIMEOUT_S):
                    detail = await self.calls.get_call(call_sid)
            except CallNotFound:
                log.warning("resumed call has no record call_sid=%s", call_sid)
            except Exception as exc:
                log.warning("resumed call without its transcript call_sid=%s: %s", call_sid,
                            exc)
            else:
                if _dropped_lately(detail.call.end_reason, detail.call.ended_at):
                    transcript = tuple((u.role, u.text, u.interrupted)
                                       for u in detail.utterances if u.text)
                else:  # only a stream that just dropped gets its call's words back
                    log.warning("resume of a call that did not drop lately call_sid=%s "
                                "(ended %s): its transcript is not used", call_sid,
                                detail.call.end_reason)
                last_turn = max([u.turn for u in detail.utterances]
                                + [m.turn for m in detail.metrics], default=0)
        log.info("call resumed call_sid=%s attempt=%d utterances=%d", call_sid, attempt,
                 len(transcript))
        return Resumed(attempt, transcript, last_turn)

    async def warm_up(self) -> None:
        """Synthesize the fixed phrases once, so the greeting leaves within milliseconds of
        `start` and the apology plays even when TTS is what failed."""
        for phrase in (self.settings.greeting, self.settings.apology):
            if phrase:
                await self.engines.warm_phrase(phrase)


def load_engines(settings: Settings) -> Engines:
    """Load the configured engines (blocking: call from a worker thread)."""
    from pipeline.factory import build_llm, build_stt, build_tts, build_vad_factory, timed

    with timed("stt"):
        stt = build_stt(settings)
    with timed("llm"):
        llm = build_llm(settings)
        warm = getattr(llm, "warm_up", None)
        if warm is not None:
            warm(settings.system_prompt)  # the first reply must not pay llama.cpp's cold start
    with timed("tts"):
        tts = build_tts(settings)
    with timed("vad"):
        vad = build_vad_factory(settings)
    from pipeline.work_queue import default_concurrency

    concurrency = settings.stt_concurrency or default_concurrency(stt.name)
    return Engines(stt=stt, llm=llm, tts=tts, vad=vad,
                   stt_limiter=anyio.CapacityLimiter(concurrency))
