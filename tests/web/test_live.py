"""LiveFeed: fan-out to live viewers, never blocking the bus; across workers through Redis."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from datetime import UTC, datetime

import pytest

from pipeline.events import CallEvent, CallStarted, UtteranceDone
from web.live import LiveClosed, LiveFeed, TooManyClients, event_json

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def started(call_sid: str) -> CallStarted:
    return CallStarted(call_sid, "MZ1", "+15550101234", "+18005550000", "inbound", T)


def test_events_serialize_to_json_with_iso_datetimes() -> None:
    data = event_json(CallEvent("CA1", "error", {"stage": "llm", "when": T}, T))
    assert data == {"call_sid": "CA1", "type": "error",
                    "detail": {"stage": "llm", "when": "2025-03-01 12:00:00+00:00"},
                    "at": "2025-03-01T12:00:00+00:00", "kind": "call_event"}


async def test_each_viewer_gets_the_calls_it_follows() -> None:
    feed = LiveFeed()
    everything = feed.subscribe()
    one_call = feed.subscribe("CA2")
    await feed.handle(started("CA1"))
    await feed.handle(started("CA2"))
    assert [(await everything.get(1))["call_sid"] for _ in range(2)] == ["CA1", "CA2"]  # type: ignore[index]
    message = await one_call.get(1)
    assert message is not None and message["call_sid"] == "CA2"
    assert await one_call.get(0.05) is None  # nothing else for it


async def test_a_slow_viewer_is_dropped_and_the_others_go_on() -> None:
    feed = LiveFeed(client_queue_size=3)
    slow = feed.subscribe()
    fast = feed.subscribe()
    for turn in range(5):
        await feed.handle(UtteranceDone("CA1", turn, "caller", f"t{turn}", T, T))
        assert await fast.get(1) is not None
    assert slow.dropped and feed.client_count == 1
    with pytest.raises(LiveClosed):
        await slow.get(1)


async def test_a_viewer_cancelled_as_a_message_arrives_stays_cancelled() -> None:
    """The SSE task of a browser that went away is cancelled; a message landing in the same
    loop iteration must not swallow that (Python 3.11's `wait_for` did), nor be lost."""
    feed = LiveFeed()
    subscription = feed.subscribe()
    waiting = asyncio.create_task(subscription.get(10))
    await asyncio.sleep(0)  # one loop turn: the task is now waiting in `get`
    await feed.handle(started("CA1"))  # wakes it...
    waiting.cancel()  # ...and cancels it before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiting
    message = await subscription.get(1)
    assert message is not None and message["call_sid"] == "CA1"


async def test_stopping_the_feed_ends_every_subscription() -> None:
    feed = LiveFeed()
    subscription = feed.subscribe()
    await feed.stop()
    with pytest.raises(LiveClosed):
        await subscription.get(1)


async def test_the_feed_refuses_viewers_beyond_its_limit() -> None:
    feed = LiveFeed(max_clients=1)
    with feed.subscribe(), pytest.raises(TooManyClients):
        feed.subscribe()
    feed.subscribe()  # the first one left


async def test_without_redis_events_are_delivered_in_process_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed = LiveFeed("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with caplog.at_level(logging.WARNING, logger="web.live"):
        await feed.start()
    try:
        assert feed.mode == "local"
        assert "Redis at 127.0.0.1 unavailable" in caplog.text
        subscription = feed.subscribe()
        await feed.handle(started("CA1"))
        message = await subscription.get(1)
        assert message is not None and message["kind"] == "call_started"
    finally:
        await feed.stop()


@pytest.mark.redis
async def test_a_viewer_on_one_worker_sees_calls_handled_by_another() -> None:
    url = os.environ.get("VOICEBOT_TEST_REDIS_URL")
    if not url:
        pytest.skip("VOICEBOT_TEST_REDIS_URL is not set (./test.sh sets it)")
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    worker_a, worker_b = LiveFeed(url, namespace=namespace), LiveFeed(url, namespace=namespace)
    await worker_a.start()
    await worker_b.start()
    try:
        assert worker_a.mode == worker_b.mode == "redis"
        on_a, on_b = worker_a.subscribe(), worker_b.subscribe()
        await worker_a.handle(started("CAfromA"))
        for subscription in (on_b, on_a):
            message = await subscription.get(2)
            assert message is not None and message["call_sid"] == "CAfromA"
        assert await on_a.get(0.2) is None  # delivered once, not once per route
    finally:
        await asyncio.gather(worker_a.stop(), worker_b.stop())
