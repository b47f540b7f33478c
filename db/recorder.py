"""Writes pipeline events to the database as they happen, and never loses what was said.

`CallRecorder.handle` is an `EventBus` subscriber: it runs in the bus's own task, behind its
own queue, so the audio loop never waits on it. Each event is written (and committed) on its
own. When the database is unreachable the write is retried a few times with backoff; then the
event goes to an on-disk spool (`db.spool.EventSpool`) and every later event follows it there,
so the order of a call's events is kept. A background loop replays the spool, in order, once
the database answers again (and at start-up, for what a previous run left behind).

If the spool's disk refuses a write too (full, read-only), events wait in memory instead
(bounded by `max_memory_events`), after what waits on disk and in the same order; they are
replayed the same way, but do not survive a restart of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path

from db.engine import is_outage
from db.repository import CallRepository
from db.spool import DEFAULT_MAX_BYTES, EventSpool
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = Path("data/spool")


class CallRecorder:
    """Stores each pipeline event; spools to disk while the database is down."""

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
    ) -> None:
        self.repository = repository
        self.spool = EventSpool(spool_dir, max_spool_bytes)
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._write_timeout_s = write_timeout_s
        self._replay_interval_s = replay_interval_s
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
        while self._memory:
            try:
                await asyncio.to_thread(self.spool.append, self._memory[0])
            except OSError as exc:
                log.error("%d events lost: the database and the spool's disk refused them (%s)",
                          len(self._memory), exc)
                self._memory.clear()
                break
            self._memory.popleft()

    async def handle(self, event: PipelineEvent) -> None:
        """Store one event (the `EventBus` subscriber)."""
        async with self._order:
            if self._spooling:
                await self._to_spool(event)
                return
        try:
            await self._write_with_retries(event)
        except Exception as exc:
            if not is_outage(exc):
                await self._reject(event, exc)
                return
            log.warning(
                "database unreachable (%s); spooling events, call_sid=%s",
                type(exc).__name__,
                event.call_sid,
            )
            async with self._order:
                self._set_spooling(True)
                await self._to_spool(event)

    async def replay(self) -> bool:
        """Write spooled events in order; True once the spool is empty, False on an outage."""
        async with self._replay_lock:
            while True:
                batch = await asyncio.to_thread(self.spool.peek, 100)
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
                done = 0
                try:
                    for offset, event in batch:
                        if event is not None:
                            try:
                                await self._write(event)
                            except Exception as exc:
                                if is_outage(exc):
                                    raise
                                await self._reject(event, exc)
                        done = offset
                except Exception:
                    return False
                finally:
                    if done:
                        try:
                            await asyncio.to_thread(self.spool.consume, done)
                        except OSError as exc:  # replayed again later: writes are idempotent
                            log.error("spool: could not record replay progress: %s", exc)

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

    async def _to_spool(self, event: PipelineEvent) -> None:
        # Once an event waits in memory, the ones after it wait there too: order is kept.
        if not self._memory:
            try:
                await asyncio.to_thread(self.spool.append, event)
                return
            except OSError as exc:
                log.error("spool disk refused a write (%s); events wait in memory until the "
                          "database is back, call_sid=%s", exc, event.call_sid)
        if len(self._memory) >= self._max_memory_events:
            self.dropped += 1
            log.error("in-memory spool full: dropped %s call_sid=%s", event.kind, event.call_sid)
            return
        self._memory.append(event)

    async def _replay_memory(self) -> bool:
        """Write the events waiting in memory, in order; False on an outage."""
        while self._memory:
            event = self._memory[0]
            try:
                await self._write(event)
            except Exception as exc:
                if is_outage(exc):
                    return False
                await self._reject(event, exc)
            self._memory.popleft()
        return True

    async def _reject(self, event: PipelineEvent, exc: Exception) -> None:
        log.error(
            "database refused %s call_sid=%s: %s", event.kind, event.call_sid, exc, exc_info=exc
        )
        try:
            await asyncio.to_thread(self.spool.reject, event, f"{type(exc).__name__}: {exc}")
        except OSError as disk:
            log.error("could not keep the refused %s either: %s", event.kind, disk)

    async def _write_with_retries(self, event: PipelineEvent) -> None:
        for attempt in range(self._attempts):
            try:
                await self._write(event)
                return
            except Exception as exc:
                if not is_outage(exc) or attempt == self._attempts - 1:
                    raise
                await asyncio.sleep(self._backoff_s * 2**attempt)

    async def _write(self, event: PipelineEvent) -> None:
        async with asyncio.timeout(self._write_timeout_s):
            await self._dispatch(event)

    async def _dispatch(self, event: PipelineEvent) -> None:
        repo = self.repository
        match event:
            case CallStarted():
                await repo.start_call(
                    event.call_sid,
                    started_at=event.started_at,
                    stream_sid=event.stream_sid,
                    from_number=event.from_number,
                    to_number=event.to_number,
                    direction=event.direction,
                )
            case UtteranceDone():
                await repo.add_utterance(
                    event.call_sid,
                    turn=event.turn,
                    role=event.role,
                    text=event.text,
                    started_at=event.started_at,
                    ended_at=event.ended_at,
                    generated_text=event.generated_text,
                    interrupted=event.interrupted,
                )
            case TurnMetrics():
                parts = {
                    name: getattr(event, name)
                    for name in event.__dataclass_fields__
                    if name.endswith("_ms")
                }
                await repo.add_metrics(event.call_sid, event.turn, parts)
            case CallEvent():
                await repo.add_event(event.call_sid, event.type, event.detail, event.at)
            case CallEnded():
                await repo.finalize_call(
                    event.call_sid, ended_at=event.ended_at, reason=event.reason
                )
