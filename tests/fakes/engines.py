"""Engine test doubles that are honest about being ones, and fault-injecting wrappers.

`ScriptedLlm` and `FixedStt` answer at once (fuzzing and resource tests need a conversation
that costs nothing); `FaultyStt` / `FaultyTts` wrap real engines and raise `EngineError` while
a `FaultSwitch` says so (chaos tests flip it per call or per wave).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import numpy as np

from media.vad import EnergyVad, Vad
from pipeline.conversation import Engines
from pipeline.engines import AudioClip, ChatMessage, EngineError, SpeechToText, TextToSpeech
from pipeline.tts_piper import ToneTts


class ScriptedLlm:
    """Replies `reply` to everything, word by word, at once."""

    name = "scripted"

    def __init__(self, reply: str = "Okay.") -> None:
        self.reply = reply
        self.requests = 0

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.requests += 1
        for index, word in enumerate(self.reply.split()):
            yield word if index == 0 else " " + word

    async def complete(self, messages: Sequence[ChatMessage]) -> str:
        self.requests += 1
        return self.reply


class FixedStt:
    """Transcribes every utterance as `text`."""

    name = "fixed"

    def __init__(self, text: str = "Hello there.") -> None:
        self.text = text
        self.calls = 0

    def transcribe(self, audio: np.ndarray) -> str:
        self.calls += 1
        return self.text


class FaultSwitch:
    """Which stages fail now: `stt` / `tts` are how many more calls raise (-1: all of them)."""

    def __init__(self) -> None:
        self.stt = 0
        self.tts = 0
        self.raised = {"stt": 0, "tts": 0}

    def take(self, stage: str) -> bool:
        left = getattr(self, stage)
        if left == 0:
            return False
        if left > 0:
            setattr(self, stage, left - 1)
        self.raised[stage] += 1
        return True


class FaultyStt:
    """Wraps an STT engine; raises `EngineError("stt")` while the switch says so."""

    def __init__(self, inner: SpeechToText, switch: FaultSwitch) -> None:
        self.inner = inner
        self.switch = switch
        self.name = f"faulty-{inner.name}"

    def transcribe(self, audio: np.ndarray) -> str:
        if self.switch.take("stt"):
            raise EngineError("stt", "injected fault")
        return self.inner.transcribe(audio)


class FaultyTts:
    """Wraps a TTS engine; raises `EngineError("tts")` while the switch says so."""

    def __init__(self, inner: TextToSpeech, switch: FaultSwitch) -> None:
        self.inner = inner
        self.switch = switch
        self.name = f"faulty-{inner.name}"

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        if self.switch.take("tts"):
            raise EngineError("tts", "injected fault")
        async for clip in self.inner.synthesize(text):
            yield clip


def instant_engines(reply: str = "Okay.", transcript: str = "Hello there.",
                    vad: Callable[[], Vad] = EnergyVad) -> Engines:
    """Engines that cost nothing: fixed transcript, scripted reply, tone speech, energy VAD."""
    return Engines(stt=FixedStt(transcript), llm=ScriptedLlm(reply), tts=ToneTts(), vad=vad,
                   stt_limiter=anyio.CapacityLimiter(1))
