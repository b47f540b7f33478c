"""Writes pipeline events to the database as they happen, and never loses what was said.

`CallRecorder.handle_batch` is a batched `EventBus` subscriber: it runs in the bus's own task,
behind its own queue, so the audio loop never waits on it. Whatever waited in the queue (up to
the bus's bound) is written in order in one transaction; one event alone is written at once.
When the database refuses one event of a batch (bad data, not an outage), the batch is written
again one event at a time, so only that one is refused: it is kept aside in the spool's reject
file. When the database is unreachable the write is retried a few times with backoff; then
the events not written go to an on-disk spool (`db.spool.EventSpool`) and every later event
follows them there, so the order of a call's events is kept. A background loop replays the
spool, in order and in batches the same way, once the database answers again (and at start-up,
for what a previous run left behind).

If the spool's disk refuses a write too (full, read-only), events wait in memory instead
(bounded by `max_memory_events`), after what waits on disk and in the same order; they are
replayed the same way, but do not survive a restart of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from db.engine import is_outage
from db.repository import CallRepository
from db.spool import DEFAULT_MAX_BYTES, EventSpool
from pipeline.events import DEFAULT_MAX_BATCH, PipelineEvent

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = Path("data/spool")


class CallRecorder:
    """Stores pipeline events, in batches; spools to disk while the database is down."""

    def __init__(
        self,
        repository: CallRepository,
        spool_dir: Path | str = DEFAULT_SPOOL_DIR,
        *,
        attempts: int = 3,
        backoff_s: float = 0.2,
        write_timeout_s: float = 5.0,
        replay_interval_s: float = 2.0,
        max_spool_bytes: int = DEFAULT_MAX_BYTES,
        max_memory_events: int = 100_000,
        batch_size: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.repository = repository
        self.spool = EventSpool(spool_dir, max_spool_bytes)
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._write_timeout_s = write_timeout_s
        self._replay_interval_s = replay_interval_s
        self._batch_size = batch_size  # most events a replay writes in one transaction
        self._spooling = False
        self._order = asyncio.Lock()  # guards "spooling?" together with the spool's tail
        self._replay_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._caught_up = asyncio.Event()  # set while nothing waits in the spool
        self._caught_up.set()
        self._task: asyncio.Task[None] | None = None
        # Events the spool's disk refused, oldest first; they come after everything on disk.
        self._memory: deque[PipelineEvent] = deque()
        self._max_memory_events = max_memory_events
        self.dropped = 0

    @property
    def spooling(self) -> bool:
        """True while events go to the spool instead of the database."""
        return self._spooling

    async def wait_caught_up(self) -> None:
        """Return once nothing waits in the spool (at once when the database is healthy)."""
        await self._caught_up.wait()

    async def start(self) -> None:
        """Start the replay loop; replays at once what an earlier run spooled."""
        if await asyncio.to_thread(self.spool.pending):
            self._set_spooling(True)
            self._wake.set()
        self._task = asyncio.create_task(self._replay_loop(), name="call-recorder-replay")

    async def stop(self) -> None:
        """Stop the replay loop. Whatever is still spooled stays on disk for the next start
        (events waiting in memory are moved there, when the disk takes them now)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._memory:
            try:
                await asyncio.to_thread(self.spool.append_many, list(self._memory))
            except OSError as exc:
                log.error("%d events lost: the database and the spool's disk refused them (%s)",
                          len(self._memory), exc)
            self._memory.clear()

    async def handle(self, event: PipelineEvent) -> None:
        """Store one event (a per-event `EventBus` subscriber)."""
        await self.handle_batch([event])

    async def handle_batch(self, events: Sequence[PipelineEvent]) -> None:
        """Store events in order, in one transaction when they can be (the batched
        `EventBus` subscriber)."""
        async with self._order:
            if self._spooling:
                await self._to_spool(events)
                return
        stored, outage = await self._store(events, self._attempts)
        if outage is None:
            return
        rest = events[stored:]
        log.warning(
            "database unreachable (%s); spooling events, call_sid=%s",
            type(outage).__name__,
            rest[0].call_sid,
        )
        async with self._order:
            self._set_spooling(True)
            await self._to_spool(rest)

    async def replay(self) -> bool:
        """Write spooled events in order; True once the spool is empty, False on an outage."""
        async with self._replay_lock:
            while True:
                batch = await asyncio.to_thread(self.spool.peek, self._batch_size)
                if not batch:
                    if not await self._replay_memory():
                        return False
                    async with self._order:
                        if self._memory or await asyncio.to_thread(self.spool.peek, 1):
                            continue  # appended while we looked: replay that too
                        if self._spooling:
                            log.info("spool replayed; writing to the database again")
                        self._set_spooling(False)
                        return True
                events = [event for _, event in batch if event is not None]
                stored, outage = await self._store(events, attempts=1)
                await self._consume(_offset_after(batch, stored))
                if outage is not None:
                    return False

    # -- internals --------------------------------------------------------------------------

    def _set_spooling(self, spooling: bool) -> None:
        self._spooling = spooling
        if spooling:
            self._caught_up.clear()
        else:
            self._caught_up.set()

    async def _replay_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._replay_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if not self._spooling:
                continue
            try:
                await self.replay()
            except Exception:
                log.exception("spool replay failed")

    async def _to_spool(self, events: Sequence[PipelineEvent]) -> None:
        """Spool a batch in one write and one disk sync (not one per event)."""
        if not events:
            return
        # Once an event waits in memory, the ones after it wait there too: order is kept.
        if not self._memory:
            try:
                await asyncio.to_thread(self.spool.append_many, events)
                return
            except OSError as exc:
                log.error("spool disk refused a write (%s); events wait in memory until the "
                          "database is back, call_sid=%s", exc, events[0].call_sid)
        for event in events:
            if len(self._memory) >= self._max_memory_events:
                self.dropped += 1
                log.error("in-memory spool full: dropped %s call_sid=%s", event.kind,
                          event.call_sid)
                continue
            self._memory.append(event)

    async def _consume(self, offset: int) -> None:
        if not offset:
            return
        try:
            await asyncio.to_thread(self.spool.consume, offset)
        except OSError as exc:  # replayed again later: writes are idempotent
            log.error("spool: could not record replay progress: %s", exc)

    async def _replay_memory(self) -> bool:
        """Write the events waiting in memory, in order; False on an outage."""
        while self._memory:
            batch = list(itertools.islice(self._memory, self._batch_size))
            stored, outage = await self._store(batch, attempts=1)
            for _ in range(stored):
                self._memory.popleft()
            if outage is not None:
                return False
        return True

    async def _store(
        self, events: Sequence[PipelineEvent], attempts: int
    ) -> tuple[int, Exception | None]:
        """Write `events` in order: in one transaction, or one by one when the database
        refuses one of them (kept aside, not retried). Returns how many were dealt with and,
        when an outage stopped the rest, the outage."""
        if not events:
            return 0, None
        try:
            await self._write(events, attempts)
            return len(events), None
        except Exception as exc:
            if is_outage(exc):
                return 0, exc
            if len(events) == 1:
                await self._reject(events[0], exc)
                return 1, None
            log.warning("database refused a batch of %d events (%s); writing them one by one",
                        len(events), type(exc).__name__)
        for done, event in enumerate(events):
            _, outage = await self._store([event], attempts)
            if outage is not None:
                return done, outage
        return len(events), None

    async def _reject(self, event: PipelineEvent, exc: Exception) -> None:
        log.error(
            "database refused %s call_sid=%s: %s", event.kind, event.call_sid, exc, exc_info=exc
        )
        try:
            await asyncio.to_thread(self.spool.reject, event, f"{type(exc).__name__}: {exc}")
        except OSError as disk:
            log.error("could not keep the refused %s either: %s", event.kind, disk)

    async def _write(self, events: Sequence[PipelineEvent], attempts: int) -> None:
        """One transaction; tried `attempts` times (with backoff) while the database is out."""
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(self._write_timeout_s):
                    await self.repository.write_events(events)
                return
            except Exception as exc:
                if not is_outage(exc) or attempt == attempts - 1:
                    raise
                await asyncio.sleep(self._backoff_s * 2**attempt)


def _offset_after(batch: Sequence[tuple[int, PipelineEvent | None]], handled: int) -> int:
    """The spool offset just past the first `handled` events of `batch` and the corrupt lines
    that follow them (0: nothing to consume)."""
    offset = 0
    for end, event in batch:
        if event is not None:
            if handled == 0:
                break
            handled -= 1
        offset = end
    return offset
