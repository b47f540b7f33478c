"""What a call emits while it runs: the pipeline's events.

Storage (`db/`), the live viewer (`web/`) and metrics subscribe to these through `EventBus`;
none of them sits in the audio path. Publishing never blocks: each subscriber has its own
bounded queue and a slow subscriber loses nothing until its queue is full (then it is logged).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class CallStarted:
    call_sid: str
    stream_sid: str
    from_number: str | None
    to_number: str | None
    direction: str  # inbound, outbound, web, simulated
    started_at: datetime
    kind: Literal["call_started"] = "call_started"


@dataclass(frozen=True, slots=True)
class UtteranceDone:
    """A finished utterance. Caller turns carry the transcript; bot turns carry the text the
    LLM generated and the part the caller actually heard (`interrupted` when cut short)."""

    call_sid: str
    turn: int
    role: Literal["caller", "bot"]
    text: str
    started_at: datetime
    ended_at: datetime
    generated_text: str | None = None
    interrupted: bool = False
    kind: Literal["utterance"] = "utterance"


@dataclass(frozen=True, slots=True)
class TurnMetrics:
    """Latency parts of one bot reply, in milliseconds (None when a part did not happen).

    v2v_ms: end of the caller's speech → first bot audio sent to the caller.
    overhead_ms: v2v minus the model and endpointing parts (our own cost).
    """

    call_sid: str
    turn: int
    endpoint_ms: float | None = None
    stt_ms: float | None = None
    stt_wait_ms: float | None = None
    llm_first_token_ms: float | None = None
    llm_first_sentence_ms: float | None = None
    tts_first_chunk_ms: float | None = None
    v2v_ms: float | None = None
    overhead_ms: float | None = None
    heard_v2v_ms: float | None = None
    kind: Literal["turn_metrics"] = "turn_metrics"


@dataclass(frozen=True, slots=True)
class CallEvent:
    """Something that happened on a call: dtmf, barge_in, error, status, mark timing..."""

    call_sid: str
    type: str
    detail: dict[str, object] = field(default_factory=dict)
    at: datetime = field(default_factory=utcnow)
    kind: Literal["call_event"] = "call_event"


@dataclass(frozen=True, slots=True)
class CallEnded:
    call_sid: str
    ended_at: datetime
    reason: str  # stop, hangup, disconnect, error, max_duration, bot_hangup...
    kind: Literal["call_ended"] = "call_ended"


PipelineEvent = CallStarted | UtteranceDone | TurnMetrics | CallEvent | CallEnded
Subscriber = Callable[[PipelineEvent], Awaitable[None]]


class EventBus:
    """Fan-out of pipeline events to async subscribers, each behind its own bounded queue."""

    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscribers: list[tuple[str, Subscriber, asyncio.Queue[PipelineEvent | None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    def subscribe(self, name: str, handler: Subscriber) -> None:
        queue: asyncio.Queue[PipelineEvent | None] = asyncio.Queue(self._queue_size)
        self._subscribers.append((name, handler, queue))
        if self._started:
            self._tasks.append(asyncio.create_task(self._pump(name, handler, queue)))

    def publish(self, event: PipelineEvent) -> None:
        for name, _, queue in self._subscribers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.error("event subscriber %s is full; dropped %s", name, event.kind)

    async def start(self) -> None:
        self._started = True
        for name, handler, queue in self._subscribers:
            self._tasks.append(asyncio.create_task(self._pump(name, handler, queue)))

    async def drain(self) -> None:
        """Wait until every subscriber has handled what was published so far."""
        for _, _, queue in self._subscribers:
            await queue.join()

    async def stop(self) -> None:
        for _, _, queue in self._subscribers:
            queue.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._started = False

    async def _pump(
        self, name: str, handler: Subscriber, queue: asyncio.Queue[PipelineEvent | None]
    ) -> None:
        while True:
            event = await queue.get()
            try:
                if event is None:
                    return
                await handler(event)
            except Exception:
                log.exception("event subscriber %s failed on %s", name, getattr(event, "kind", "?"))
            finally:
                queue.task_done()
