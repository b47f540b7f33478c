"""The small Protocols every speech and language engine implements.

STT, LLM and TTS engines are chosen by settings in one place (`pipeline.factory`); the
conversation only sees these interfaces. Heavy engines load in the app lifespan, never at import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of the conversation as the LLM sees it."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """The model asked to call a tool (function calling) instead of, or after, its text."""

    name: str
    arguments: dict[str, object]


@dataclass(frozen=True, slots=True)
class AudioClip:
    """Mono int16 PCM and its sample rate."""

    samples: np.ndarray
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


class EngineError(Exception):
    """An engine failed (model error, API error, timeout). `stage` is stt, llm or tts."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage} failed: {reason}")


class SpeechToText(Protocol):
    """Transcribes one utterance of 16 kHz float32 mono audio to text.

    `transcribe` is blocking and CPU-bound; the caller runs it in a worker thread.
    """

    name: str

    def transcribe(self, audio: np.ndarray) -> str: ...


def quick_transcriber(stt: SpeechToText) -> Callable[[np.ndarray], str]:
    """The engine's fast path for a sound still going on (`transcribe_partial`: Whisper's
    short window with no full-window redo), or `transcribe` for engines without one."""
    return getattr(stt, "transcribe_partial", stt.transcribe)


class LanguageModel(Protocol):
    """Streams a chat reply as text deltas (and `ToolRequest`s, for models given tools).

    Cancelling the iteration (task cancellation) must stop generation promptly, so a barge-in
    does not leave a model running in the background.
    """

    name: str

    def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str | ToolRequest]: ...

    async def complete(self, messages: Sequence[ChatMessage]) -> str: ...


class TextToSpeech(Protocol):
    """Synthesizes text to audio, yielding clips as they are ready (one or more per call)."""

    name: str

    def synthesize(self, text: str) -> AsyncIterator[AudioClip]: ...
