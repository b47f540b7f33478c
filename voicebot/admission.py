"""Admission control: how many calls the deployment takes at once, and when to say no.

`MAX_CONCURRENT_CALLS` holds across every worker process and machine. Each admitted call holds
a *lease*: with `REDIS_URL`, a member of the sorted set `{REDIS_NAMESPACE}:active` whose score
is its expiry (Redis server time, ms). Taking a lease is one Lua script (drop expired leases,
count, add if below the limit), so two workers racing for the last line cannot both win. A
heartbeat re-asserts this worker's leases every `ttl/3`; a worker that crashes stops refreshing
and its lines come free within `ADMISSION_LEASE_TTL_S`, or at once when its supervisor reaps it
(`free_worker_leases`: a lease's token starts with its worker's host and pid). Without Redis
the leases live in this process (one worker).

If Redis stops answering, calls are admitted against this worker's own count (a phone bot that
refuses every call because its coordinator is down is worse than one briefly over its limit);
the heartbeat writes those leases to Redis once it answers again.

Overload: STT and TTS work goes through bounded queues (`pipeline.work_queue`). When a queue
stays deep (its backlog at or above `SHED_QUEUE_DEPTH` for every sample of the last second),
`should_shed()` turns true and new calls are refused while calls in progress keep the model
time. The worker's event loop is the other thing that runs out: every frame of every call's
audio is handled on it, and a loop asked for more than its core gives handles every frame of
every call late. The sampler measures what the loop's thread asks of a CPU (the time it ran
plus the time it waited, runnable, for a core: `/proc/thread-self/schedstat`) and how many
calls it carried meanwhile. When one more call, at the window's cost per call, would take
that share of the last second to `SHED_LOOP_BUSY` or more, new calls are refused the same
way. Counting per call keeps a burst of new calls from slipping in while the window catches
up with them. While the server drains (SIGTERM), every new call is refused.

Refusals: `/twilio/voice` answers busy TwiML (`voice_guard`) and stores the call as refused
(`record_refusal`); the Media Streams WebSocket is closed with 1013 "try again later" before
`accept` (`refuse_websocket`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from pipeline.work_queue import WorkQueue

log = logging.getLogger(__name__)

# RFC 6455 §7.4.1 1013 "Try Again Later". Sent before `accept`, the ASGI server turns it into an
# HTTP 403 answer to the upgrade, which Twilio reports as a stream error (the call then runs
# whatever TwiML follows <Connect>).
WS_TRY_AGAIN_LATER = 1013

RefusalReason = Literal["full", "overloaded", "draining", "loading"]


class LeaseStoreUnavailable(Exception):
    """The shared lease store (Redis) did not answer in time."""

    def __init__(self, operation: str, cause: BaseException) -> None:
        self.operation = operation
        super().__init__(f"lease store unavailable during {operation}: {type(cause).__name__}")


class LeaseStore(Protocol):
    """Where call leases live: this process, or Redis for the whole deployment."""

    async def acquire(self, token: str, limit: int, ttl_s: float) -> bool: ...

    async def refresh(self, tokens: Collection[str], ttl_s: float) -> None: ...

    async def release(self, token: str) -> None: ...

    async def count(self) -> int: ...

    async def bind(self, token: str, call_sid: str) -> None:
        """Note which call the lease `token` carries (its stream's `start` named it)."""
        ...

    async def unbind(self, token: str, call_sid: str) -> None:
        """Forget that note, unless another stream of the call has bound since."""
        ...

    async def free_call(self, call_sid: str) -> bool:
        """Give back the lease bound to `call_sid`, whoever holds it: True if there was one."""
        ...

    async def aclose(self) -> None: ...


class LocalLeases:
    """Leases in this process: the limit holds for one worker."""

    def __init__(self) -> None:
        self.tokens: set[str] = set()

    async def acquire(self, token: str, limit: int, ttl_s: float) -> bool:
        if len(self.tokens) >= limit:
            return False
        self.tokens.add(token)
        return True

    async def refresh(self, tokens: Collection[str], ttl_s: float) -> None:
        return None

    async def release(self, token: str) -> None:
        self.tokens.discard(token)

    async def count(self) -> int:
        return len(self.tokens)

    # Handing a call's line over between servers needs a shared store: `Admission` asks for
    # these only when its store is shared, and in one process a dropped stream's own
    # handler gives its lease back when it ends.
    async def bind(self, token: str, call_sid: str) -> None:
        return None

    async def unbind(self, token: str, call_sid: str) -> None:
        return None

    async def free_call(self, call_sid: str) -> bool:
        return False

    async def aclose(self) -> None:
        self.tokens.clear()


# Redis server time in ms (TIME: seconds, microseconds), so machines' clocks never matter.
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
_ACQUIRE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""
# Re-assert (not only extend) our leases: after a Redis restart or an outage they come back.
_REFRESH = _NOW + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
return #ARGV - 1
"""
# A call's lease, by its CallSid (`{namespace}:call:<CallSid>` holds the token): taken away
# from whoever holds it, only if it is still the call's (compare, then delete).
_FREE_CALL = """
local token = redis.call('GET', KEYS[2])
if not token then return 0 end
redis.call('DEL', KEYS[2])
return redis.call('ZREM', KEYS[1], token)
"""
_UNBIND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# How long the CallSid → token note lives without an `unbind` (its worker died): longer than
# any call, and its lease is gone by then anyway.
CALL_NOTE_TTL_S = 24 * 3600
_COUNT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


def worker_prefix(pid: int) -> str:
    """The start of every lease token the worker process `pid` of this machine takes."""
    return f"{socket.gethostname()}:{pid}:"


def free_worker_leases(url: str, namespace: str, pid: int, timeout_s: float = 1.0) -> int:
    """Give back at once the lines a dead worker process of this machine held, instead of
    after `ADMISSION_LEASE_TTL_S`: its calls' streams dropped with it, and the ones connected
    again (webhooks/stream_ended.py) must not find the deployment full of its leases. For the
    supervisor (no event loop: synchronous, bounded); returns how many it freed, never
    raises."""
    import redis
    from redis.exceptions import RedisError

    key = f"{namespace}:active"
    prefix = worker_prefix(pid).encode()
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        held = [member for member, _ in client.zscan_iter(key) if member.startswith(prefix)]
        if held:
            client.zrem(key, *held)
        return len(held)
    except (RedisError, OSError) as exc:
        log.warning("could not free the leases of dead worker %d: %s (they expire anyway)",
                    pid, type(exc).__name__)
        return 0
    finally:
        client.close()


class RedisLeases:
    """Leases in the Redis sorted set `{namespace}:active` (member: token, score: expiry ms)."""

    def __init__(self, url: str, namespace: str = "voicebot", op_timeout_s: float = 0.5) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.key = f"{namespace}:active"
        self.call_prefix = f"{namespace}:call:"
        self.op_timeout_s = op_timeout_s
        self.redis = Redis.from_url(url, socket_connect_timeout=op_timeout_s,
                                    socket_timeout=op_timeout_s, retry=Retry(NoBackoff(), 1))
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._refresh = self.redis.register_script(_REFRESH)
        self._count = self.redis.register_script(_COUNT)
        self._free_call = self.redis.register_script(_FREE_CALL)
        self._unbind = self.redis.register_script(_UNBIND)

    async def _run(self, operation: str, action: Awaitable[object]) -> object:
        from redis.exceptions import RedisError

        try:
            async with asyncio.timeout(self.op_timeout_s):
                return await action
        except (RedisError, OSError, TimeoutError) as exc:
            raise LeaseStoreUnavailable(operation, exc) from exc

    async def acquire(self, token: str, limit: int, ttl_s: float) -> bool:
        args = [limit, int(ttl_s * 1000), token]
        return bool(await self._run("acquire", self._acquire(keys=[self.key], args=args)))

    async def refresh(self, tokens: Collection[str], ttl_s: float) -> None:
        if tokens:
            args = [int(ttl_s * 1000), *tokens]
            await self._run("refresh", self._refresh(keys=[self.key], args=args))

    async def release(self, token: str) -> None:
        await self._run("release", self.redis.zrem(self.key, token))

    async def count(self) -> int:
        return int(await self._run("count", self._count(keys=[self.key])))  # type: ignore[call-overload]

    async def bind(self, token: str, call_sid: str) -> None:
        await self._run("bind", self.redis.set(self.call_prefix + call_sid, token,
                                               ex=CALL_NOTE_TTL_S))

    async def unbind(self, token: str, call_sid: str) -> None:
        await self._run("unbind", self._unbind(keys=[self.call_prefix + call_sid], args=[token]))

    async def free_call(self, call_sid: str) -> bool:
        freed = await self._run("free_call", self._free_call(
            keys=[self.key, self.call_prefix + call_sid]))
        return bool(freed)

    async def aclose(self) -> None:
        await self.redis.aclose()


@dataclass(frozen=True, slots=True)
class Lease:
    """One admitted call's hold on a line; give it back with `Admission.release`."""

    token: str
    shared: bool  # False when taken against the local count while Redis was out


class Refused(Exception):
    """A new call was not admitted; `reason` says why."""

    def __init__(self, reason: RefusalReason) -> None:
        self.reason = reason
        super().__init__(f"call refused: {reason}")


PER_CALL_FROM = 10  # calls: see `Admission.loop_busy_with_one_more`


class Admission:
    """Decides whether a new call may start, for this worker and (with Redis) the deployment."""

    def __init__(
        self,
        limit: int,
        store: LeaseStore | None = None,
        *,
        ttl_s: float = 30.0,
        queues: Sequence[WorkQueue] = (),
        shed_depth: int = 3,
        shed_loop_busy: float = 0.0,
        shed_window_s: float = 1.0,
        sample_interval_s: float = 0.1,
        loop_demand: Callable[[], float] | None = None,
    ) -> None:
        self.limit = limit
        self.store: LeaseStore = store or LocalLeases()
        self.ttl_s = ttl_s
        self.queues = list(queues)
        self.shed_depth = shed_depth
        self.sample_interval_s = sample_interval_s
        self.shed_loop_busy = shed_loop_busy
        window = max(1, round(shed_window_s / sample_interval_s))
        self._samples: deque[int] = deque(maxlen=window)
        # (loop time, the loop thread's CPU demand so far, calls in progress) at each sample,
        # one more than the window so that the oldest starts it.
        self._demand: deque[tuple[float, float, int]] = deque(maxlen=window + 1)
        self._loop_demand = loop_demand or loop_thread_demand_s
        self._leases: dict[str, Lease] = {}
        self._calls: dict[str, str] = {}  # lease token → the call SID its stream started
        self._prefix = worker_prefix(os.getpid())
        self._tasks: list[asyncio.Task[None]] = []
        self._store_down_until = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self.refusals: Counter[str] = Counter()  # "where:reason" → count, for /metrics

    # -- state ------------------------------------------------------------------------------
    @property
    def shared(self) -> bool:
        return not isinstance(self.store, LocalLeases)

    @property
    def local_active(self) -> int:
        """Calls admitted by this worker and still running."""
        return len(self._leases)

    def queue_depth(self) -> int:
        """Work waiting right now in the deepest STT/TTS queue."""
        return max((q.waiting for q in self.queues), default=0)

    def should_shed(self) -> bool:
        """True while a work queue has stayed deep (`queues_deep`), or one more call would
        saturate the event loop (`loop_saturated`): new calls would only make every call
        slower."""
        return self.queues_deep() or self.loop_saturated()

    def queues_deep(self) -> bool:
        if self.shed_depth <= 0:
            return False
        depth = self.queue_depth()
        if depth >= 2 * self.shed_depth:
            return True  # so deep that waiting for the window would let a burst through
        window = self._samples
        return len(window) == window.maxlen and min(window) >= self.shed_depth

    def loop_busy(self) -> float | None:
        """The share of the last window the event loop's thread ran or waited for a CPU; None
        before a whole window has been sampled."""
        window = self._demand
        if len(window) < window.maxlen:
            return None
        (t0, d0, _), (t1, d1, _) = window[0], window[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def loop_busy_with_one_more(self) -> float | None:
        """`loop_busy` for the calls in progress now and one more, at the window's share per
        call. Below `PER_CALL_FROM` calls in the window, `loop_busy` itself: a call is then too
        large a part of the count (and the loop's other work too large a part of its share)
        for the share per call to mean anything."""
        busy = self.loop_busy()
        if busy is None:
            return None
        carried = sum(active for _, _, active in self._demand) / len(self._demand)
        if carried < PER_CALL_FROM:
            return busy
        return busy * max(1.0, (self.local_active + 1) / carried)

    def loop_saturated(self) -> bool:
        """One more call would take the loop to `shed_loop_busy` of a core or more: it has about
        as many calls as its core carries."""
        if self.shed_loop_busy <= 0:
            return False
        busy = self.loop_busy_with_one_more()
        return busy is not None and busy >= self.shed_loop_busy

    async def cluster_active(self) -> int | None:
        """Calls in progress on every worker sharing the store; None if it does not answer."""
        try:
            return await self.store.count()
        except LeaseStoreUnavailable:
            return None

    def local_refusal(self) -> RefusalReason | None:
        """Why this worker would refuse a new call now on its own account (draining, or
        `should_shed`), before the line count is looked at; None when it would not. Also what
        the supervisor's balancing asks (`voicebot.balancer`)."""
        if self.draining:
            return "draining"
        if self.should_shed():
            return "overloaded"
        return None

    # -- admitting ------------------------------------------------------------------------------
    async def has_room(self, where: str = "voice") -> RefusalReason | None:
        """For the voice webhook: None when a new call would be admitted now, else why not.

        Only a look: the line is taken when the media stream connects (`admit`)."""
        reason = self.local_refusal()
        if reason is None:
            active = await self._count_for_check()
            reason = "full" if active >= self.limit else None
        if reason is not None:
            self.note_refusal(where, reason)
        return reason

    async def admit(self, where: str = "media") -> Lease:
        """Take a line for a new call or raise `Refused`."""
        reason = self.local_refusal()
        if reason is not None:
            self.note_refusal(where, reason)
            raise Refused(reason)
        token = self._prefix + uuid.uuid4().hex[:16]
        lease = await self._acquire(token)
        if lease is None:
            self.note_refusal(where, "full")
            raise Refused("full")
        self._leases[token] = lease
        self._idle.clear()
        return lease

    async def release(self, lease: Lease) -> None:
        """Give a line back (the call ended). Never raises: the lease expires anyway."""
        if self._leases.pop(lease.token, None) is None:
            return
        call_sid = self._calls.pop(lease.token, None)
        if not self._leases:
            self._idle.set()
        if self.shared and not self._store_down():
            try:
                await self.store.release(lease.token)
                if call_sid is not None:
                    await self.store.unbind(lease.token, call_sid)
            except LeaseStoreUnavailable as exc:
                self._mark_store_down(exc)

    async def bind(self, lease: Lease, call_sid: str) -> None:
        """The stream holding `lease` started, for call `call_sid`: note it, so that if the
        stream drops with its server (a machine gone, its leases left to expire), the
        `/twilio/stream-ended` that connects the call again can give the line back first
        (`free_call`). Never raises: without the note the lease only expires later."""
        if lease.token not in self._leases:
            return
        self._calls[lease.token] = call_sid
        if lease.shared and not self._store_down():
            try:
                await self.store.bind(lease.token, call_sid)
            except LeaseStoreUnavailable as exc:
                self._mark_store_down(exc)

    async def free_call(self, call_sid: str) -> bool:
        """Give back the line of a call whose stream dropped, whichever server held it: the
        stream that connects it again must not be refused by its own stale lease when every
        line is taken. True if there was one. Never raises."""
        if not self.shared or self._store_down():
            return False
        try:
            freed = await self.store.free_call(call_sid)
        except LeaseStoreUnavailable as exc:
            self._mark_store_down(exc)
            return False
        if freed:
            log.info("gave back the line of a dropped stream call_sid=%s", call_sid)
        return freed

    async def _acquire(self, token: str) -> Lease | None:
        if self.shared and not self._store_down():
            try:
                if await self.store.acquire(token, self.limit, self.ttl_s):
                    return Lease(token, shared=True)
                return None
            except LeaseStoreUnavailable as exc:
                self._mark_store_down(exc)
        # Local fallback: this worker's own calls against the limit.
        return Lease(token, shared=False) if self.local_active < self.limit else None

    async def _count_for_check(self) -> int:
        if self.shared and not self._store_down():
            try:
                return await self.store.count()
            except LeaseStoreUnavailable as exc:
                self._mark_store_down(exc)
        return self.local_active

    def note_refusal(self, where: str, reason: RefusalReason) -> None:
        """Count (and log the first few of) a refusal, here or decided elsewhere."""
        key = f"{where}:{reason}"
        self.refusals[key] += 1
        count = self.refusals[key]
        # Overload means many refusals: the first ones are logged, then one in a hundred.
        if count <= 10 or count % 100 == 0:
            log.warning("refusing a new call at %s: %s (this worker: %d active, limit %d; "
                        "%d such refusals)", where, reason, self.local_active, self.limit, count)

    def _store_down(self) -> bool:
        return time.monotonic() < self._store_down_until

    def _mark_store_down(self, exc: BaseException, cooldown_s: float = 5.0) -> None:
        if not self._store_down():
            log.warning("%s; admitting against this worker's own count for %.0f s",
                        exc, cooldown_s)
        self._store_down_until = time.monotonic() + cooldown_s

    # -- draining -------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop admitting new calls (SIGTERM); calls in progress go on."""
        if not self.draining:
            log.info("draining: no new calls; %d in progress", self.local_active)
        self.draining = True

    async def wait_idle(self) -> None:
        """Return once this worker has no call in progress."""
        await self._idle.wait()

    # -- background -----------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._sample_loop(), name="admission-sampler")]
        if self.shared:
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(),
                                                   name="admission-heartbeat"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.shared:
            for token in list(self._leases):
                with contextlib.suppress(LeaseStoreUnavailable):
                    await self.store.release(token)
        self._leases.clear()
        self._idle.set()
        await self.store.aclose()

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._samples.append(self.queue_depth())
            self._demand.append((loop.time(), self._loop_demand(), self.local_active))
            await asyncio.sleep(self.sample_interval_s)

    async def _heartbeat_loop(self) -> None:
        interval = self.ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.refresh(list(self._leases), self.ttl_s)
                self._store_down_until = 0.0
            except LeaseStoreUnavailable as exc:
                self._mark_store_down(exc, cooldown_s=interval)


def thread_schedstat_s() -> tuple[float, float] | None:
    """Seconds the calling thread has run, and waited (runnable) for a CPU, from Linux's
    `/proc/thread-self/schedstat` (which the kernel writes from memory: a few microseconds);
    None where there is none."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as file:
            ran_ns, waited_ns = file.read().split()[:2]
        return int(ran_ns) / 1e9, int(waited_ns) / 1e9
    except (OSError, ValueError):
        return None


def loop_thread_demand_s() -> float:
    """Seconds the calling thread has run or waited, runnable, for a CPU
    (`thread_schedstat_s`, read ten times a second); elsewhere its CPU time alone."""
    stat = thread_schedstat_s()
    return sum(stat) if stat is not None else time.thread_time()


def build_admission(settings: object, queues: Sequence[WorkQueue] = ()) -> Admission:
    """The admission the settings ask for: Redis leases with `REDIS_URL`, else in-process.

    Reads `MAX_CONCURRENT_CALLS`, `REDIS_URL`, `REDIS_NAMESPACE`, `ADMISSION_LEASE_TTL_S`,
    `SHED_QUEUE_DEPTH` and `SHED_LOOP_BUSY` (the last three are optional here: 30 s, 3 and 0,
    never; `Settings` has them, with 0.8 for `SHED_LOOP_BUSY`)."""
    url = getattr(settings, "redis_url", None)
    namespace = getattr(settings, "redis_namespace", "voicebot")
    store: LeaseStore = RedisLeases(url, namespace) if url else LocalLeases()
    return Admission(
        int(getattr(settings, "max_concurrent_calls", 20)),
        store,
        ttl_s=float(getattr(settings, "admission_lease_ttl_s", 30.0)),
        queues=queues,
        shed_depth=int(getattr(settings, "shed_queue_depth", 3)),
        shed_loop_busy=float(getattr(settings, "shed_loop_busy", 0.0)),
    )


# -- the two doors a call comes through --------------------------------------------------------

DEFAULT_BUSY_MESSAGE = ("Sorry, all of our lines are busy right now. "
                        "Please call again in a few minutes. Goodbye.")

HttpEndpoint = Callable[[Request], Awaitable[Response]]


def voice_guard(endpoint: HttpEndpoint) -> HttpEndpoint:
    """Wrap `/twilio/voice`: when no line is free, answer a short spoken "all lines are busy"
    and a hang-up (`webhooks.outbound.busy_twiml`) instead of connecting a stream, and store
    the call as ended with reason `refused_<why>` (`record_refusal`)."""
    from webhooks.outbound import busy_twiml

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        admission: Admission | None = getattr(request.app.state, "admission", None)
        reason = await admission.has_room("voice") if admission is not None else None
        if reason is not None:
            await record_refusal(request, reason)
            settings = getattr(request.app.state, "settings", None)
            message = getattr(settings, "busy_message", None) or DEFAULT_BUSY_MESSAGE
            return Response(busy_twiml(message), media_type="application/xml")
        return await endpoint(request)

    return guarded


_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")


async def record_refusal(request: Request, reason: RefusalReason | Literal["stream"],
                         where: str = "voice") -> None:
    """A call refused at the voice webhook (or whose stream was refused, `where` "media":
    `webhooks.stream_ended`) goes on record like any other: a `refused` event
    (why) and its end, reason `refused_<why>`, so the viewer,
    `voicebot stats` and `voicebot_calls_ended_total` show it. Only a Twilio CallSid is
    recorded (the webhook's signature is checked before this, when Twilio's token is set)."""
    from pipeline.events import CallEnded, CallEvent, utcnow

    services = getattr(request.app.state, "services", None)
    form = await request.form() if request.method == "POST" else request.query_params
    call_sid = str(form.get("CallSid") or "")
    if services is None or not _CALL_SID.fullmatch(call_sid):
        return
    now = utcnow()
    # The caller's number stays out of the event: `voicebot forget` scrubs numbers from
    # calls' own columns (Twilio's status callback fills those in, when it is configured).
    services.bus.publish(CallEvent(call_sid, "refused", {"reason": reason, "where": where},
                                   now))
    services.bus.publish(CallEnded(call_sid, now, f"refused_{reason}"))


async def refuse_websocket(websocket: WebSocket, reason: str) -> None:
    """Close a Media Streams upgrade with 1013 before `accept` (the call is not admitted)."""
    await websocket.close(code=WS_TRY_AGAIN_LATER, reason=reason)


async def admit_media_stream(websocket: WebSocket, direction: str, ready: bool = True
                             ) -> tuple[bool, Lease | None]:
    """Take a line for a media stream before it is accepted: (True, lease), or (False, None)
    after refusing it with 1013 (also when the models are not `ready` yet). Without
    `app.state.admission` every stream of a ready server is let through."""
    admission: Admission | None = getattr(websocket.app.state, "admission", None)
    where = "web" if direction == "web" else "media"
    if not ready:
        if admission is not None:
            admission.note_refusal(where, "loading")
        else:
            log.warning("refusing a new call at %s: loading", where)
        await refuse_websocket(websocket, "loading")
        return False, None
    if admission is None:
        return True, None
    try:
        return True, await admission.admit(where)
    except Refused as refused:
        await refuse_websocket(websocket, refused.reason)
        return False, None


async def release_media_stream(websocket: WebSocket, lease: Lease | None) -> None:
    """Give back the line `admit_media_stream` took (the stream ended)."""
    admission: Admission | None = getattr(websocket.app.state, "admission", None)
    if admission is not None and lease is not None:
        await admission.release(lease)
