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
    # The call's stream was connected again after a drop (the how-many-th time): the call is
    # in progress once more (webhooks/stream_ended.py).
    resumed: int = 0
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
BatchSubscriber = Callable[[list[PipelineEvent]], Awaitable[None]]
_Queue = asyncio.Queue[PipelineEvent | None]

# Most events a batch subscriber is handed at once (what waited in its queue, up to this).
DEFAULT_MAX_BATCH = 200


@dataclass(frozen=True, slots=True)
class _Subscription:
    name: str
    handler: BatchSubscriber
    max_batch: int
    queue: _Queue
    linger_s: float = 0.0


class EventBus:
    """Fan-out of pipeline events to async subscribers, each behind its own bounded queue.

    A subscriber takes events one at a time (`subscribe`) or in batches (`subscribe_batch`):
    a batch is whatever waits in its queue when it is free again, up to `max_batch` events,
    in publishing order. Unless the subscription asks to `linger`, nothing waits for a batch
    to fill: one event alone is handed over at once. With `linger_s`, the first event of a
    batch waits that long for others to join it (the database writer: a call publishes a few
    events per turn, and a hundred calls' events of a tenth of a second take one transaction,
    not one each).
    """

    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscribers: list[_Subscription] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    def subscribe(self, name: str, handler: Subscriber) -> None:
        """`handler` gets every event on its own."""

        async def one(events: list[PipelineEvent]) -> None:
            await handler(events[0])

        self._add(_Subscription(name, one, 1, asyncio.Queue(self._queue_size)))

    def subscribe_batch(
        self, name: str, handler: BatchSubscriber, max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = 0.0,
    ) -> None:
        """`handler` gets lists of events: all that waited in its queue, up to `max_batch`,
        after the first waited `linger_s` for company (not when the batch is full already)."""
        if max_batch < 1:
            raise ValueError("max_batch starts at 1")
        if linger_s < 0:
            raise ValueError("linger_s must not be negative")
        self._add(_Subscription(name, handler, max_batch, asyncio.Queue(self._queue_size),
                                linger_s))

    def unsubscribe(self, name: str) -> None:
        """Stop handing events to `name`; its pump ends after what it already holds."""
        for subscription in [s for s in self._subscribers if s.name == name]:
            self._subscribers.remove(subscription)
            if self._started:
                subscription.queue.put_nowait(None)

    def publish(self, event: PipelineEvent) -> None:
        for subscription in self._subscribers:
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                log.error("event subscriber %s is full; dropped %s", subscription.name, event.kind)

    async def start(self) -> None:
        self._started = True
        for subscription in self._subscribers:
            self._tasks.append(asyncio.create_task(self._pump(subscription)))

    async def drain(self) -> None:
        """Wait until every subscriber has handled what was published so far."""
        for subscription in self._subscribers:
            await subscription.queue.join()

    async def stop(self) -> None:
        for subscription in self._subscribers:
            subscription.queue.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._started = False

    def _add(self, subscription: _Subscription) -> None:
        self._subscribers.append(subscription)
        if self._started:
            self._tasks.append(asyncio.create_task(self._pump(subscription)))

    @staticmethod
    async def _pump(subscription: _Subscription) -> None:
        queue = subscription.queue
        while True:
            events, stop = await _take(queue, subscription.max_batch, subscription.linger_s)
            try:
                if events:
                    await subscription.handler(events)
            except Exception:
                what = events[0].kind if len(events) == 1 else f"{len(events)} events"
                log.exception("event subscriber %s failed on %s", subscription.name, what)
            finally:
                for _ in range(len(events) + stop):
                    queue.task_done()
            if stop:
                return


async def _take(queue: _Queue, limit: int,
                linger_s: float = 0.0) -> tuple[list[PipelineEvent], bool]:
    """The next event, then those already waiting behind it (up to `limit` in all), after
    `linger_s` for more to arrive; and True when the stop marker came first (nothing after it
    is taken)."""
    events: list[PipelineEvent] = []
    item = await queue.get()
    if linger_s and item is not None and queue.qsize() < limit - 1:
        await asyncio.sleep(linger_s)
    while item is not None:
        events.append(item)
        if len(events) >= limit or queue.empty():
            return events, False
        item = queue.get_nowait()
    return events, True
