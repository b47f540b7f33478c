"""EventBus: per-event and batched subscribers, drain and stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from pipeline.events import CallEvent, EventBus, PipelineEvent

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def numbered(count: int) -> list[PipelineEvent]:
    return [CallEvent(f"CA{n % 3}", "mark", {"n": n}, T0) for n in range(count)]


class Batches:
    """A batched subscriber that records what it was handed, optionally slowly."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batches: list[list[PipelineEvent]] = []

    async def __call__(self, events: list[PipelineEvent]) -> None:
        self.batches.append(list(events))
        await asyncio.sleep(self.delay_s)


async def publish_all(bus: EventBus, events: list[PipelineEvent], *, drain: bool = True) -> None:
    """Start the bus, publish `events` at once, then drain (or not) and stop it."""
    await bus.start()
    for event in events:
        bus.publish(event)
    if drain:
        await bus.drain()
    await bus.stop()


async def test_what_waits_in_the_queue_is_handed_over_in_one_batch_in_order() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got)
    events = numbered(7)
    await publish_all(bus, events)

    assert got.batches == [events]


async def test_batches_are_bounded_and_keep_the_order() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got, max_batch=3)
    events = numbered(8)
    await publish_all(bus, events)

    assert [len(batch) for batch in got.batches] == [3, 3, 2]
    assert [e for batch in got.batches for e in batch] == events


async def test_one_event_alone_is_handed_over_at_once() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got)
    await bus.start()
    event = numbered(1)[0]
    bus.publish(event)
    for _ in range(3):  # a few loop turns, no timer: nothing waits for a batch to fill
        await asyncio.sleep(0)
    assert got.batches == [[event]]
    await bus.stop()


async def test_events_published_while_a_batch_is_handled_form_the_next_batch() -> None:
    bus, got = EventBus(), Batches(delay_s=0.05)
    bus.subscribe_batch("db", got)
    await bus.start()
    first, *rest = numbered(5)
    bus.publish(first)
    await asyncio.sleep(0.01)  # the subscriber is busy with `first`
    for event in rest:
        bus.publish(event)
    await bus.drain()  # returns only once every event of every batch is handled
    assert got.batches == [[first], rest]
    await bus.stop()


async def test_a_failing_batch_subscriber_keeps_receiving(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[int] = []

    async def flaky(events: list[PipelineEvent]) -> None:
        seen.append(len(events))
        if len(seen) == 1:
            raise RuntimeError("boom")

    bus.subscribe_batch("db", flaky)
    await bus.start()
    for event in numbered(2):
        bus.publish(event)
    await bus.drain()
    bus.publish(numbered(1)[0])
    await bus.drain()
    await bus.stop()

    assert seen == [2, 1]
    assert "event subscriber db failed on 2 events" in caplog.text


async def test_per_event_and_batched_subscribers_see_the_same_events() -> None:
    bus, got = EventBus(), Batches()
    one_by_one: list[PipelineEvent] = []

    async def each(event: PipelineEvent) -> None:
        one_by_one.append(event)

    bus.subscribe("metrics", each)
    bus.subscribe_batch("db", got)
    events = numbered(4)
    await publish_all(bus, events)

    assert one_by_one == events
    assert got.batches == [events]


async def test_stop_hands_over_what_was_published_before_it() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got)
    events = numbered(3)
    await publish_all(bus, events, drain=False)  # the stop marker comes after them

    assert got.batches == [events]


async def test_a_subscriber_added_after_start_is_pumped() -> None:
    bus, got = EventBus(), Batches()
    await bus.start()
    bus.subscribe_batch("late", got)
    event = numbered(1)[0]
    bus.publish(event)
    await bus.drain()
    await bus.stop()

    assert got.batches == [[event]]


def test_a_batch_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        EventBus().subscribe_batch("db", Batches(), max_batch=0)


async def test_an_unsubscribed_handler_gets_nothing_more_and_stop_still_returns() -> None:
    bus, kept, dropped = EventBus(), Batches(), Batches()
    bus.subscribe_batch("live", kept)
    bus.subscribe_batch("db", dropped)
    await bus.start()
    first, second = numbered(2)
    bus.publish(first)
    await bus.drain()
    bus.unsubscribe("db")
    bus.publish(second)
    await bus.drain()
    async with asyncio.timeout(2):
        await bus.stop()
    assert [e for batch in kept.batches for e in batch] == [first, second]
    assert [e for batch in dropped.batches for e in batch] == [first]


async def test_a_lingering_subscriber_takes_events_published_soon_after_in_one_batch() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got, linger_s=0.05)
    await bus.start()
    first, second, third = numbered(3)
    bus.publish(first)
    await asyncio.sleep(0.01)  # the pump holds `first`, waiting for company
    bus.publish(second)
    bus.publish(third)
    await bus.drain()
    await bus.stop()
    assert got.batches == [[first, second, third]]


async def test_a_full_batch_does_not_linger_and_stop_does_not_wait_for_it() -> None:
    bus, got = EventBus(), Batches()
    bus.subscribe_batch("db", got, max_batch=2, linger_s=30.0)
    await bus.start()
    first, second = numbered(2)
    bus.publish(first)
    bus.publish(second)
    async with asyncio.timeout(1):
        await bus.drain()  # already two waiting: handed over without the 30 s linger
    assert got.batches == [[first, second]]
    async with asyncio.timeout(1):
        await bus.stop()
