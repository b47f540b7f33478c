"""Bounded queues for model work (STT, TTS), so overload is visible and can be shed.

Each kind of model work runs behind an `anyio.CapacityLimiter` sized to the machine: one
embedded Whisper or Piper at a time (each already uses the cores it is given; a second one in
parallel only makes both slower), more for network engines that wait on I/O. Work beyond the
limiter's size waits in line; `WorkQueue.waiting` is that line's length, which admission
control (`voicebot.admission`) watches to refuse new calls before the calls in progress slow
down, and `/metrics` exports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio

from pipeline.engines import AudioClip, TextToSpeech


@dataclass(slots=True)
class WorkQueue:
    """One kind of model work: `limiter` runs it, `waiting` counts what stands in line."""

    name: str
    limiter: anyio.CapacityLimiter

    @property
    def waiting(self) -> int:
        return self.limiter.statistics().tasks_waiting

    @property
    def running(self) -> int:
        return int(self.limiter.borrowed_tokens)

    @property
    def size(self) -> int:
        return int(self.limiter.total_tokens)


class QueuedTts:
    """A `TextToSpeech` whose synthesis waits its turn in a `WorkQueue`."""

    def __init__(self, inner: TextToSpeech, queue: WorkQueue) -> None:
        self.inner = inner
        self.queue = queue

    @property
    def name(self) -> str:
        return self.inner.name

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        async with self.queue.limiter:
            async for clip in self.inner.synthesize(text):
                yield clip

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)  # sample_rate, aclose... of the wrapped engine


def default_concurrency(engine_name: str) -> int:
    """How many requests of one engine run at once: 1 for CPU-bound embedded models, 8 for
    engines behind a network API."""
    return 1 if engine_name in ("faster-whisper", "piper", "scripted", "tone") else 8


def _engine_name(engine: object) -> str:
    try:
        return str(engine.name)  # type: ignore[attr-defined]
    except Exception:  # a test double that refuses every use
        return ""


def install_work_queues(engines: object, tts_concurrency: int | None = None) -> list[WorkQueue]:
    """Put `engines`' STT (its existing `stt_limiter`) and TTS (wrapped in `QueuedTts`) behind
    work queues; returns them. Idempotent."""
    stt_queue = WorkQueue("stt", engines.stt_limiter)  # type: ignore[attr-defined]
    tts = engines.tts  # type: ignore[attr-defined]
    if not isinstance(tts, QueuedTts):
        size = tts_concurrency or default_concurrency(_engine_name(tts))
        tts = QueuedTts(tts, WorkQueue("tts", anyio.CapacityLimiter(size)))
        engines.tts = tts  # type: ignore[attr-defined]
    return [stt_queue, tts.queue]
