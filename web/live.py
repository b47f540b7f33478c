"""The live feed: pipeline events fanned out to the viewer's connected browsers.

`LiveFeed.handle` is an `EventBus` subscriber. Each event is serialized once to a JSON-ready
dict and handed to every matching `LiveSubscription` (one per SSE client) through a bounded
queue; a client whose queue is full is dropped (its browser reconnects and resyncs), so a slow
viewer never holds up the bus or the other viewers.

With `REDIS_URL` the events travel through Redis pub/sub (channel `{REDIS_NAMESPACE}:live`):
every worker publishes what its calls emit and delivers what it hears on the channel, so a
viewer connected to one worker sees calls handled by another. While Redis is unreachable (at
start or later) events are delivered in-process only, with a warning, and the feed keeps
trying to reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import fields
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pipeline.events import PipelineEvent

log = logging.getLogger(__name__)

Message = dict[str, Any]


def event_json(event: PipelineEvent) -> Message:
    """A pipeline event as a JSON-ready dict (datetimes in ISO 8601, details made plain)."""
    data: Message = {}
    for f in fields(event):
        value = getattr(event, f.name)
        data[f.name] = value.isoformat() if isinstance(value, datetime) else value
    if "detail" in data:
        data["detail"] = json.loads(json.dumps(data["detail"], default=str))
    return data


class LiveClosed(Exception):
    """The subscription ended: the client was too slow, or the feed stopped."""


class TooManyClients(Exception):
    """The feed already serves its maximum number of clients."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"live feed is at its limit of {limit} clients")


_CLOSED: Message = {}


class LiveSubscription:
    """One client's view of the feed: all calls, or one call (`call_sid`)."""

    def __init__(self, feed: LiveFeed, call_sid: str | None, queue_size: int) -> None:
        self.call_sid = call_sid
        self.dropped = False
        self._feed = feed
        self._queue: asyncio.Queue[Message] = asyncio.Queue(queue_size)
        self._closed = False

    def wants(self, message: Message) -> bool:
        return self.call_sid is None or message.get("call_sid") == self.call_sid

    def offer(self, message: Message) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped = True
            self.close()

    def close(self) -> None:
        """End the subscription; a waiting `get` raises `LiveClosed`."""
        if self._closed:
            return
        self._closed = True
        self._feed._detach(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSED)

    async def get(self, idle_s: float) -> Message | None:
        """The next message, or None after `idle_s` seconds without one."""
        # Not `asyncio.wait_for`: on Python 3.11 it swallows a cancellation that lands as the
        # message arrives, and the SSE stream would outlive its client. A get cut short by the
        # timeout leaves its message in the queue.
        try:
            async with asyncio.timeout(idle_s):
                message = await self._queue.get()
        except TimeoutError:
            if self._closed:
                raise LiveClosed from None
            return None
        if message is _CLOSED:
            raise LiveClosed
        return message

    def __enter__(self) -> LiveSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveFeed:
    """Fan-out of pipeline events to live viewers, through Redis when it is configured."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        namespace: str = "voicebot",
        client_queue_size: int = 256,
        max_clients: int = 500,
    ) -> None:
        self.redis_url = redis_url
        self.channel = f"{namespace}:live"
        self.client_queue_size = client_queue_size
        self.max_clients = max_clients
        self._clients: set[LiveSubscription] = set()
        self._redis: Any = None
        self._relaying = False  # subscribed to the channel: publish instead of delivering
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def mode(self) -> str:
        return "redis" if self._relaying else "local"

    @property
    def client_count(self) -> int:
        return len(self._clients)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.redis_url or self._task is not None:
            return
        self._task = asyncio.create_task(self._relay(), name="live-feed-relay")
        with contextlib.suppress(TimeoutError):  # (not `wait_for`, for the reason in `get`)
            async with asyncio.timeout(5):
                await self._first_attempt.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._relaying = False
        for client in list(self._clients):
            client.close()

    # -- in ---------------------------------------------------------------------------------
    async def handle(self, event: PipelineEvent) -> None:
        """EventBus subscriber: publish the event to every live viewer."""
        message = event_json(event)
        if self._relaying and self._redis is not None:
            try:
                # Bounded: a stalled Redis must not stall this subscriber's queue for long.
                async with asyncio.timeout(2.0):
                    await self._redis.publish(self.channel, json.dumps(message))
                return
            except Exception as exc:
                self._warn(f"publish failed ({type(exc).__name__})")
        self.deliver(message)

    # -- out --------------------------------------------------------------------------------
    def subscribe(self, call_sid: str | None = None) -> LiveSubscription:
        if len(self._clients) >= self.max_clients:
            raise TooManyClients(self.max_clients)
        client = LiveSubscription(self, call_sid, self.client_queue_size)
        self._clients.add(client)
        return client

    def deliver(self, message: Message) -> None:
        for client in list(self._clients):
            if client.wants(message):
                client.offer(message)
                if client.dropped:
                    log.warning("live viewer too slow; dropped (call filter %s)",
                                client.call_sid or "all")

    def _detach(self, client: LiveSubscription) -> None:
        self._clients.discard(client)

    # -- Redis ------------------------------------------------------------------------------
    def _warn(self, reason: str) -> None:
        if not self._warned:
            host = urlsplit(self.redis_url or "").hostname or "?"
            log.warning("live events: Redis at %s unavailable (%s); viewers see only this "
                        "process's calls until it is back", host, reason)
            self._warned = True

    async def _relay(self) -> None:
        """Subscribe to the channel and deliver what arrives; reconnect with backoff."""
        from redis.asyncio import Redis

        backoff = 1.0
        while True:
            redis = Redis.from_url(self.redis_url, socket_connect_timeout=2,
                                   health_check_interval=30)
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._redis = redis
                self._relaying = True
                self._first_attempt.set()
                if self._warned:
                    log.info("live events: Redis is back")
                self._warned = False
                backoff = 1.0
                async for item in pubsub.listen():
                    if item.get("type") == "message":
                        self._on_relayed(item.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._warn(type(exc).__name__)
            finally:
                self._relaying = False
                self._redis = None
                self._first_attempt.set()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await redis.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _on_relayed(self, data: object) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            log.warning("live events: ignored a malformed message on %s", self.channel)
            return
        if isinstance(message, dict):
            self.deliver(message)
