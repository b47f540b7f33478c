"""Prometheus metrics, fed by the pipeline's events, served at `GET /metrics`.

`CallMetrics.handle` is an `EventBus` subscriber (off the audio path). Each app owns its
`CollectorRegistry`, so tests can build many apps in one process. Exported:

- latency per turn: `voicebot_v2v_seconds{measured="server"|"heard"}`, one histogram per
  model stage `voicebot_stage_seconds{stage}` (endpoint, stt, stt_wait, llm_first_token,
  llm_first_sentence, tts_first_chunk) and our own `voicebot_overhead_seconds`;
- calls: `voicebot_calls_active`, `voicebot_calls_started_total{direction}`,
  `voicebot_calls_ended_total{reason}` (the outcome), `voicebot_call_duration_seconds`,
  `voicebot_calls_refused_total{where,reason}` (admission control),
  `voicebot_calls_active_cluster` (every worker's leases, with Redis);
- `voicebot_barge_ins_total`, `voicebot_errors_total{stage}`, `voicebot_dtmf_total`,
  `voicebot_utterances_total{role}`;
- load: `voicebot_queue_waiting{queue="stt"|"tts"}`, `voicebot_queue_running{queue}`,
  `voicebot_draining`, `voicebot_event_loop_lag_seconds` (how late a 0.5 s timer fires: what
  every frame of every call on this worker waits on), `voicebot_event_loop_busy_ratio` (the
  share of the last second the event loop's thread ran or waited for a CPU: at 1 it has more
  calls than its core carries; `SHED_LOOP_BUSY` sheds new calls before that), and
  `voicebot_inbound_frame_lag_seconds`
  when the media stream reports it (`observe_frame_lag`).

Several workers (`voicebot serve --workers N`) take connections from one listening socket (the
supervisor hands each to the least loaded), so a scrape lands on any of them. `voicebot.workers` then sets `PROMETHEUS_MULTIPROC_DIR` before the workers start
and every worker writes its values there; `/metrics` on any worker serves the sum (gauges: the
sum over live workers, or the max for cluster-wide values) through prometheus_client's
multiprocess collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)
from voicebot.admission import Admission

# Voice-to-voice: under 1 s feels natural on the phone, over 2 s callers start talking again.
V2V_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0)
# Model stages range from a cache hit (0 ms) to a cold network API (seconds).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                 10.0)
# Our own overhead must stay at a few milliseconds.
FINE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600)

STAGES = {
    "endpoint_ms": "endpoint",
    "stt_ms": "stt",
    "stt_wait_ms": "stt_wait",
    "llm_first_token_ms": "llm_first_token",
    "llm_first_sentence_ms": "llm_first_sentence",
    "tts_first_chunk_ms": "tts_first_chunk",
}


def multiprocess_dir() -> str | None:
    """The directory shared by worker processes, when running several (else None)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class CallMetrics:
    """The app's Prometheus metrics (see module docstring); `handle` is the bus subscriber."""

    def __init__(
        self,
        admission: Admission | None = None,
        registry: CollectorRegistry | None = None,
        tick_s: float = 0.5,
    ) -> None:
        self.admission = admission
        self.registry = r = registry or CollectorRegistry()
        self.tick_s = tick_s
        self._multiprocess = multiprocess_dir() is not None
        if not self._multiprocess:
            ProcessCollector(registry=r)  # this worker's CPU and memory
        self.v2v = Histogram("voicebot_v2v_seconds",
                             "End of caller speech to first bot audio (server: sent; heard: "
                             "played, from mark round trips)", ["measured"],
                             buckets=V2V_BUCKETS, registry=r)
        self.stage = Histogram("voicebot_stage_seconds", "Latency of one stage of a turn",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.overhead = Histogram("voicebot_overhead_seconds",
                                  "V2V minus model and endpointing time (our own cost)",
                                  buckets=FINE_BUCKETS, registry=r)
        self.active = Gauge("voicebot_calls_active", "Calls in progress on this server",
                            registry=r, multiprocess_mode="livesum")
        self.cluster_active = Gauge("voicebot_calls_active_cluster",
                                    "Calls in progress on every server sharing admission "
                                    "(Redis leases)", registry=r, multiprocess_mode="livemax")
        self.started = Counter("voicebot_calls_started", "Calls started", ["direction"],
                               registry=r)
        self.ended = Counter("voicebot_calls_ended", "Calls ended, by reason", ["reason"],
                             registry=r)
        self.duration = Histogram("voicebot_call_duration_seconds", "Call duration",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.refused = Counter("voicebot_calls_refused", "New calls refused by admission control",
                               ["where", "reason"], registry=r)
        self.barge_ins = Counter("voicebot_barge_ins", "Times the caller talked over the bot",
                                 registry=r)
        self.errors = Counter("voicebot_errors", "Engine failures during calls", ["stage"],
                              registry=r)
        self.dtmf = Counter("voicebot_dtmf", "Keypad digits pressed", registry=r)
        self.resumed = Counter("voicebot_streams_resumed",
                               "Calls whose media stream dropped and was connected again",
                               registry=r)
        self.utterances = Counter("voicebot_utterances", "Finished utterances", ["role"],
                                  registry=r)
        self.queue_waiting = Gauge("voicebot_queue_waiting", "Model work waiting for a slot",
                                   ["queue"], registry=r, multiprocess_mode="livesum")
        self.queue_running = Gauge("voicebot_queue_running", "Model work running", ["queue"],
                                   registry=r, multiprocess_mode="livesum")
        self.draining = Gauge("voicebot_draining", "1 while this server drains (SIGTERM)",
                              registry=r, multiprocess_mode="livemax")
        self.loop_lag = Histogram("voicebot_event_loop_lag_seconds",
                                  "How late a timer fires on the event loop", buckets=FINE_BUCKETS,
                                  registry=r)
        self.loop_busy = Gauge("voicebot_event_loop_busy_ratio",
                               "Share of the last second the event loop's thread ran or waited "
                               "for a CPU", registry=r, multiprocess_mode="livemax")
        self.frame_lag = Histogram("voicebot_inbound_frame_lag_seconds",
                                   "Inbound audio frame processed, behind its media timestamp",
                                   buckets=FINE_BUCKETS, registry=r)
        self._started_at: dict[str, float] = {}
        self._refusals_seen: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    # -- events -----------------------------------------------------------------------------
    async def handle(self, event: PipelineEvent) -> None:
        """The `EventBus` subscriber."""
        if isinstance(event, TurnMetrics):
            self._turn(event)
        elif isinstance(event, CallEvent):
            if event.type == "barge_in":
                self.barge_ins.inc()
            elif event.type == "error":
                self.errors.labels(str(event.detail.get("stage", "unknown"))[:20]).inc()
            elif event.type == "dtmf":
                self.dtmf.inc()
        elif isinstance(event, UtteranceDone):
            self.utterances.labels(event.role).inc()
        elif isinstance(event, CallStarted):
            if event.resumed:  # the same call again, on a new stream: not a new call
                self.resumed.inc()
            else:
                self.started.labels(event.direction[:20]).inc()
            self.active.inc()
            self._started_at[event.call_sid] = time.monotonic()
        elif isinstance(event, CallEnded):
            self.ended.labels(event.reason[:40]).inc()
            started = self._started_at.pop(event.call_sid, None)
            if started is not None:
                self.active.dec()
                self.duration.observe(time.monotonic() - started)

    def _turn(self, m: TurnMetrics) -> None:
        for field, stage in STAGES.items():
            value = getattr(m, field)
            if value is not None:
                self.stage.labels(stage).observe(max(0.0, value) / 1000)
        if m.v2v_ms is not None:
            self.v2v.labels("server").observe(m.v2v_ms / 1000)
        if m.heard_v2v_ms is not None:
            self.v2v.labels("heard").observe(m.heard_v2v_ms / 1000)
        if m.overhead_ms is not None:
            self.overhead.observe(max(0.0, m.overhead_ms) / 1000)

    def observe_frame_lag(self, seconds: float) -> None:
        """An inbound frame was processed `seconds` after its media timestamp said it was due."""
        self.frame_lag.observe(max(0.0, seconds))

    # -- sampled state ---------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._tick_loop(), name="metrics-tick")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        counter = 0
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            self.loop_lag.observe(max(0.0, loop.time() - due))
            self.sample()
            counter += 1
            if counter % 4 == 0 and self.admission is not None and self.admission.shared:
                cluster = await self.admission.cluster_active()
                if cluster is not None:
                    self.cluster_active.set(cluster)

    def sample(self) -> None:
        """Copy admission's state (queues, refusals, draining) into the metrics."""
        admission = self.admission
        if admission is None:
            return
        for queue in admission.queues:
            self.queue_waiting.labels(queue.name).set(queue.waiting)
            self.queue_running.labels(queue.name).set(queue.running)
        self.draining.set(1 if admission.draining else 0)
        busy = admission.loop_busy()
        if busy is not None:
            self.loop_busy.set(round(busy, 3))
        if not admission.shared:
            self.cluster_active.set(admission.local_active)
        for key, count in admission.refusals.items():
            seen = self._refusals_seen.get(key, 0)
            if count > seen:
                where, reason = key.split(":", 1)
                self.refused.labels(where, reason).inc(count - seen)
                self._refusals_seen[key] = count

    # -- exposition ------------------------------------------------------------------------
    def render(self, sample: bool = True) -> bytes:
        """The text exposition format (blocking in multiprocess mode: reads the shared files)."""
        if sample:
            self.sample()
        if not self._multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics` in Prometheus' text format."""
    metrics: CallMetrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None:
        return Response("metrics are not available yet\n", status_code=503,
                        media_type="text/plain")
    if multiprocess_dir() is not None:
        metrics.sample()  # on the event loop, which owns the state it reads
        body = await anyio.to_thread.run_sync(metrics.render, False)
    else:
        body = metrics.render()
    return Response(body, media_type=CONTENT_TYPE_LATEST)
