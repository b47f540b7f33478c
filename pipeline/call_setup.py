"""What a conversation is set up with: the call, its configuration, the shared engines."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from media.resample import to_ulaw_8k
from media.vad import Vad
from pipeline.call_control import MenuAction
from pipeline.engines import LanguageModel, SpeechToText, TextToSpeech
from pipeline.listener import EndpointConfig
from pipeline.turn_detector import SmartTurnModel, shared_smart_turn


@dataclass(frozen=True, slots=True)
class CallInfo:
    call_sid: str
    stream_sid: str
    from_number: str | None = None
    to_number: str | None = None
    direction: str = "inbound"
    parameters: dict[str, str] = field(default_factory=dict)


# Stream parameters every call has (the parties, a resume's attempt): the rest are the call's
# own (an outbound call's greeting and system prompt), stored with it (`parameters` event) so
# that a stream connected again after a drop gets them back.
STANDARD_PARAMETERS = frozenset({"from", "to", "direction", "resume", "From", "To"})


@dataclass(frozen=True, slots=True)
class Resumed:
    """A call whose stream dropped and was connected again (`resume` stream parameter): the
    how-many-th time, and what was said before, as stored (webhooks/stream_ended.py)."""

    attempt: int
    transcript: tuple[tuple[str, str, bool], ...] = ()  # (role, text heard, interrupted)
    last_turn: int = 0


@dataclass(slots=True)
class ConversationConfig:
    greeting: str
    system_prompt: str
    apology: str
    endpoint: EndpointConfig
    history_turns: int = 8
    summary_max_chars: int = 600
    stt_timeout_s: float = 6.0
    tts_timeout_s: float = 6.0
    llm_timeout_s: float = 8.0
    goodbye: str = "Thanks for calling. Goodbye!"
    resume_message: str = "Sorry, the line dropped for a moment."
    transfer_message: str = "Let me put you through to a person. One moment."
    reprompt: str = "Are you still there?"
    idle_reprompt_s: float = 10.0
    idle_hangup_s: float = 25.0
    transfer_number: str | None = None
    dtmf_menu: dict[str, MenuAction] = field(default_factory=dict)
    llm_tools: bool = False  # the LLM is offered end_call/transfer_call functions
    # Start the reply this long before a long end-of-turn wait runs out (PREPARE_LEAD_MS;
    # pipeline.turn_taking.TurnTakingConfig). 0: only turns that look complete are prepared.
    prepare_lead_ms: int = 700


@dataclass(slots=True)
class Engines:
    """The shared engines a conversation uses (loaded once per process)."""

    stt: SpeechToText
    llm: LanguageModel
    tts: TextToSpeech
    vad: Callable[[], Vad]
    stt_limiter: anyio.CapacityLimiter
    phrase_cache: dict[str, bytes] = field(default_factory=dict)  # text → μ-law 8 kHz
    # Quick partial transcripts (is a sound over the bot words or "uh-huh"?) have their own
    # line: they must not queue behind whole utterances, or a barge-in waits on them.
    partial_limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(1))
    # Smart Turn (the `turn` extra), loaded once per process; None: words and silence decide.
    turn_model: SmartTurnModel | None = field(default_factory=shared_smart_turn)

    async def speak_ulaw(self, text: str, timeout_s: float) -> tuple[bytes, float]:
        """Synthesize `text` to 8 kHz μ-law; returns (audio, ms until the first clip)."""
        cached = self.phrase_cache.get(text)
        if cached is not None:
            return cached, 0.0
        start = time.monotonic()
        first_ms: float | None = None
        parts: list[bytes] = []
        with anyio.fail_after(timeout_s):
            async for clip in self.tts.synthesize(text):
                if first_ms is None:
                    first_ms = (time.monotonic() - start) * 1000
                parts.append(to_ulaw_8k(clip.samples, clip.sample_rate))
        return b"".join(parts), first_ms or 0.0

    async def warm_phrase(self, text: str, timeout_s: float = 30.0) -> None:
        audio, _ = await self.speak_ulaw(text, timeout_s)
        self.phrase_cache[text] = audio
