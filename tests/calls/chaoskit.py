"""A chaos run: many simulated calls, a few at a time, while faults are injected, then an
audit of what was stored. Shared by `tests/calls/test_chaos.py` and `bench/fault_run.py`.

Calls run in waves of `per_wave` at once; each wave has one fault kind:

- call faults (the first call of the wave): `hangup` (the caller hangs up mid-reply) and
  `drop` (the TCP connection is cut without a close frame, mid-reply);
- engine faults (every call of the wave): `llm_500`, `llm_timeout`, `llm_slow`, `llm_empty`
  (the scripted OpenAI-compatible server), `tts_error`, `stt_error` (`FaultSwitch`);
- infrastructure faults: `redis_restart` and `pg_restart` (a `TcpProxy` goes down mid-wave
  and comes back a second later), `spool_full` (PostgreSQL down while the spool's tmpfs is
  full, so events have nowhere on disk to wait).

The audit: every call finalized in the database with the end reason its fault implies; every
utterance the pipeline reported (`UtteranceDone`) stored; every caller turn answered within
the latency budget (the apology when a stage failed); no crash (a traceback, an unretrieved
task exception, a call ended by `error`); no task left with a call's SID in its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from db.migrate import upgrade_to_head_async
from db.repository import CallNotFound
from pipeline.conversation import Engines
from pipeline.engines import SpeechToText, TextToSpeech
from pipeline.events import CallEnded, UtteranceDone
from pipeline.factory import build_vad_factory
from pipeline.llm_openai import OpenAiLlm
from telephony.simulator import CallerTurn, SimulatedCaller, SimulationResult
from tests.callkit import Served, serving
from tests.conftest_db import create_pg_database, drop_pg_database, pg_url
from tests.fakes.engines import FaultSwitch, FaultyStt, FaultyTts
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.fakes.tcp_proxy import TcpProxy
from voicebot.settings import Settings, load_settings

log = logging.getLogger(__name__)

CALL_FAULTS = ("hangup", "drop")
LLM_FAULTS = ("llm_500", "llm_timeout", "llm_slow", "llm_empty")
STAGE_FAULTS = ("llm_500", "llm_timeout", "llm_empty", "tts_error", "stt_error")
KINDS = ("none", "hangup", "llm_500", "redis_restart", "tts_error", "drop", "llm_timeout",
         "pg_restart", "stt_error", "llm_slow", "spool_full", "llm_empty")
REPLIES = {"open": "We open at nine tomorrow.", "table": "Sure, a table for two.",
           "prices": "Lunch is fifteen dollars."}
WAVS = ("open_hours.wav", "book_table.wav", "prices.wav")
LLM_TIMEOUT_S = 2.0
CRASH_MARKERS = ("Task exception was never retrieved", "Exception in ASGI application",
                 "stream failed", "event subscriber")


class DroppingCaller(SimulatedCaller):
    """Hangs up mid-reply by cutting the TCP connection: no WebSocket close frame."""

    async def _silence_until_played(self, ms: float, turn: Any) -> None:
        await super()._silence_until_played(ms, turn)
        self._ws.transport.abort()  # type: ignore[attr-defined]


class CrashLog(logging.Handler):
    """Records that mean something crashed: tracebacks and the markers above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.crashes: list[str] = []
        self.errors = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("websockets.client"):
            return  # the simulated callers' own side
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            self.errors += 1
        if record.exc_info or any(marker in message for marker in CRASH_MARKERS):
            self.crashes.append(f"{record.name}: {message[:300]}")


@dataclass
class CallOutcome:
    call_sid: str
    wave: int
    fault: str
    expected_reason: str
    result: SimulationResult | None = None
    client_error: str | None = None


@dataclass
class ChaosReport:
    """What the run did and what it found; `ok` when nothing was lost or broken."""

    calls_run: int = 0
    faults_injected: Counter[str] = field(default_factory=Counter)
    faults_skipped: list[str] = field(default_factory=list)
    calls_finalized: int = 0
    wrong_end_reasons: list[str] = field(default_factory=list)
    utterances_spoken: int = 0
    utterances_stored: int = 0
    utterances_lost: int = 0
    lost: list[str] = field(default_factory=list)
    turns: int = 0
    turns_unanswered: list[str] = field(default_factory=list)
    turns_over_budget: list[str] = field(default_factory=list)
    apologies_missing: list[str] = field(default_factory=list)
    max_turn_latency_ms: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by fault kind
    crashes: list[str] = field(default_factory=list)
    leftover_tasks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.wrong_end_reasons or self.utterances_lost or self.turns_unanswered
                    or self.turns_over_budget or self.apologies_missing or self.crashes
                    or self.leftover_tasks or self.calls_finalized != self.calls_run)

    def as_json(self, details: int = 10) -> dict[str, Any]:
        return {
            "calls_run": self.calls_run,
            "faults_injected": dict(sorted(self.faults_injected.items())),
            "faults_skipped": self.faults_skipped,
            "calls_finalized": self.calls_finalized,
            "utterances_spoken": self.utterances_spoken,
            "utterances_stored": self.utterances_stored,
            "utterances_lost": self.utterances_lost,
            "crashes": len(self.crashes),
            "turns": self.turns,
            "turns_unanswered": len(self.turns_unanswered),
            "turns_over_budget": len(self.turns_over_budget),
            "max_turn_latency_ms": round(self.max_turn_latency_ms),
            "turn_latency_ms_by_fault": {
                kind: {"p50": round(sorted(v)[len(v) // 2]), "max": round(max(v))}
                for kind, v in sorted(self.latencies.items()) if v},
            "wrong_end_reasons": len(self.wrong_end_reasons),
            "leftover_tasks": len(self.leftover_tasks),
            "seconds": round(self.seconds, 1),
            "details": {"wrong_end_reasons": self.wrong_end_reasons[:details],
                        "lost": self.lost[:details],
                        "unanswered": self.turns_unanswered[:details],
                        "over_budget": self.turns_over_budget[:details],
                        "apologies_missing": self.apologies_missing[:details],
                        "crashes": self.crashes[:details],
                        "leftover_tasks": self.leftover_tasks[:details]},
        }


class TinyDisk:
    """A directory on a small tmpfs (root only), which `fill()` makes full."""

    def __init__(self, path: Path, size_kb: int = 512) -> None:
        self.path = path
        self.size_kb = size_kb
        self.mounted = False

    def mount(self) -> bool:
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_kb}k", "tmpfs",
                               str(self.path)], capture_output=True, text=True, check=False)
        self.mounted = done.returncode == 0
        if not self.mounted:
            log.warning("no tmpfs for the spool (%s): spool_full is skipped",
                        done.stderr.strip() or done.returncode)
        return self.mounted

    def fill(self) -> None:
        with contextlib.suppress(OSError), (self.path / "filler").open("wb") as filler:
            while True:
                filler.write(b"\0" * 4096)
                filler.flush()

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
            self.mounted = False


@dataclass
class ChaosEnv:
    """Everything a run needs around the app: databases behind proxies, a spool disk."""

    settings: Settings
    engines: Engines
    switch: FaultSwitch
    fake_openai: FakeOpenAi
    fixtures: Path
    pg: TcpProxy
    redis: TcpProxy
    disk: TinyDisk


@contextlib.asynccontextmanager
async def chaos_env(base: Settings, engines: Engines, switch: FaultSwitch,
                    fake_openai: FakeOpenAi, fixtures: Path, workdir: Path
                    ) -> AsyncIterator[ChaosEnv]:
    """PostgreSQL and Redis behind proxies, the spool on a tiny tmpfs (when mountable)."""
    database = await create_pg_database("voicebot_chaos")
    pg, redis = TcpProxy(), TcpProxy(target_port=6379)
    disk = TinyDisk(workdir / "spool")
    await pg.up()
    await redis.up()
    disk.mount()
    try:
        url = pg_url(database, port=pg.port)
        await upgrade_to_head_async(url)
        settings = load_settings(**{
            **base.model_dump(), "database_url": url,
            "redis_url": f"redis://127.0.0.1:{redis.port}/0",
            "redis_namespace": f"vbchaos-{uuid.uuid4().hex[:8]}",
            "db_spool_dir": str(disk.path), "llm_timeout_s": LLM_TIMEOUT_S,
            # every simulated caller is on loopback and unsigned
            "max_calls_per_address": 100})
        yield ChaosEnv(settings, engines, switch, fake_openai, fixtures, pg, redis, disk)
    finally:
        await pg.down()
        await redis.down()
        disk.unmount()
        await drop_pg_database(database)


def chaos_engines(settings: Settings, stt: SpeechToText, tts: TextToSpeech,
                  switch: FaultSwitch) -> Engines:
    """Real STT/TTS/VAD behind the fault switch, the LLM on the scripted server with the
    run's timeout (a timed-out reply turns into the apology)."""
    llm_settings = settings.model_copy(update={"llm_timeout_s": LLM_TIMEOUT_S})
    return Engines(stt=FaultyStt(stt, switch), llm=OpenAiLlm.from_settings(llm_settings),
                   tts=FaultyTts(tts, switch), vad=build_vad_factory(settings),
                   stt_limiter=anyio.CapacityLimiter(1))


def _script_llm(fake: FakeOpenAi, fault: str) -> None:
    rule: dict[str, Any] = {
        "llm_500": {"status": 500},
        "llm_timeout": {"first_token_delay_s": LLM_TIMEOUT_S + 1.5},
        "llm_slow": {"token_delay_s": 0.15},
        "llm_empty": {"reply": ""},
    }.get(fault, {})
    rules = [Rule(when=word, **({"reply": reply} | rule)) for word, reply in REPLIES.items()]
    fake.script(*rules, default_reply="Okay.")


class ChaosRun:
    """Runs waves of calls with faults against the app and audits the result."""

    def __init__(self, env: ChaosEnv, *, per_wave: int = 3, pace: float = 6.0) -> None:
        self.env = env
        self.per_wave = per_wave
        self.pace = pace
        self.outcomes: list[CallOutcome] = []
        self.report = ChaosReport()
        self.crash_log = CrashLog()

    @property
    def budget_ms(self) -> float:
        """The latency budget for the first audio of an answer (apologies included): the
        LLM timeout (after which the apology plays) plus 4 s for STT, which queues across
        the wave's calls on two cores, and TTS."""
        return LLM_TIMEOUT_S * 1000 + 4000

    async def run(self, kinds: list[str]) -> ChaosReport:
        started = time.monotonic()
        threads_before = {t.name for t in threading.enumerate()}
        logging.getLogger().addHandler(self.crash_log)
        try:
            async with serving(self.env.settings, self.env.engines) as served:
                for index, kind in enumerate(kinds):
                    await self._wave(served, index, kind)
                await self._audit(served)
        finally:
            logging.getLogger().removeHandler(self.crash_log)
        self._check_threads(threads_before)
        self.report.crashes += self.crash_log.crashes
        self.report.seconds = time.monotonic() - started
        return self.report

    # -- one wave ---------------------------------------------------------------------------

    async def _wave(self, served: Served, index: int, kind: str) -> None:
        env = self.env
        if kind == "spool_full" and not env.disk.mounted:
            self.report.faults_skipped.append(kind)
            kind = "none"
        _script_llm(env.fake_openai, kind)
        env.switch.stt = -1 if kind == "stt_error" else 0
        env.switch.tts = -1 if kind == "tts_error" else 0
        if kind == "spool_full":
            env.disk.fill()
            await env.pg.down()
            self.report.faults_injected[kind] += 1
        callers: list[SimulatedCaller] = []
        runs = []
        for n in range(self.per_wave):
            fault = kind if (kind not in CALL_FAULTS or n == 0) else "none"
            cls = DroppingCaller if fault == "drop" else SimulatedCaller
            caller = cls(served.media_url, pace=self.pace, reply_timeout_s=12,
                         from_number=f"+1555{index:03d}{n:04d}")
            callers.append(caller)
            wavs = [WAVS[(index + n) % 3], WAVS[(index + n + 1) % 3]][: 1 if fault in
                                                                         CALL_FAULTS else 2]
            turns = [CallerTurn(wav=str(env.fixtures / wav)) for wav in wavs]
            outcome = CallOutcome(caller.call_sid, index, fault,
                                  "disconnect" if fault in CALL_FAULTS else "stop")
            self.outcomes.append(outcome)
            runs.append(self._place(caller, turns, outcome))
            if fault in CALL_FAULTS or fault in LLM_FAULTS or fault in STAGE_FAULTS:
                self.report.faults_injected[fault] += 1  # calls that met the fault
        restart = None
        if kind in ("redis_restart", "pg_restart"):
            proxy = env.redis if kind == "redis_restart" else env.pg
            restart = asyncio.create_task(self._restart(served, proxy, {c.call_sid
                                                                         for c in callers}))
            self.report.faults_injected[kind] += 1
        try:
            await asyncio.gather(*runs)
            for caller in callers:
                await served.ended(caller.call_sid, wait_s=20)
        finally:
            if restart is not None:
                await restart
            if kind == "spool_full":
                await env.pg.up()
                async with asyncio.timeout(60):
                    await served.app.state.recorder.wait_caught_up()
                env.disk.free()
            env.switch.stt = env.switch.tts = 0
        self.report.calls_run += len(callers)

    async def _place(self, caller: SimulatedCaller, turns: list[CallerTurn],
                     outcome: CallOutcome) -> None:
        hang_up = 700.0 if outcome.fault in CALL_FAULTS else None
        try:
            async with asyncio.timeout(90):
                outcome.result = await caller.run(turns, hang_up_early_ms=hang_up)
        except Exception as exc:
            outcome.result = caller.result
            if outcome.fault != "drop":  # a dropped caller's own close fails, as it should
                outcome.client_error = f"{type(exc).__name__}: {exc}"

    async def _restart(self, served: Served, proxy: TcpProxy, sids: set[str]) -> None:
        """Take the server down once the wave's first caller turn is in, up 1 s later."""
        with contextlib.suppress(TimeoutError):
            await served.wait_for(lambda e: isinstance(e, UtteranceDone) and e.role == "caller"
                                  and e.call_sid in sids, wait_s=30)
        await proxy.down()
        await asyncio.sleep(1.0)
        await proxy.up()

    # -- the audit --------------------------------------------------------------------------

    async def _audit(self, served: Served) -> None:
        report, app = self.report, served.app
        async with asyncio.timeout(90):
            await app.state.services.bus.drain()
            await app.state.recorder.wait_caught_up()
            await app.state.services.bus.drain()
        sids = {o.call_sid for o in self.outcomes}
        async with asyncio.timeout(10):
            while leftovers := [t.get_name() for t in asyncio.all_tasks()  # noqa: ASYNC110
                                if any(sid in t.get_name() for sid in sids)]:
                await asyncio.sleep(0.1)
        report.leftover_tasks = leftovers
        for outcome in self.outcomes:
            await self._audit_call(served, outcome)

    async def _audit_call(self, served: Served, outcome: CallOutcome) -> None:
        report, sid = self.report, outcome.call_sid
        if outcome.client_error:
            report.crashes.append(f"caller {sid} ({outcome.fault}): {outcome.client_error}")
        ended = [e for e in served.events if isinstance(e, CallEnded) and e.call_sid == sid]
        try:
            detail = (await served.app.state.calls.get_call(sid)).as_json()
        except CallNotFound:
            detail = None
        if detail is not None and detail.get("ended_at"):
            report.calls_finalized += 1
        stored_reason = detail.get("end_reason") if detail else None
        if stored_reason != outcome.expected_reason or [e.reason for e in ended] != [
                outcome.expected_reason]:
            report.wrong_end_reasons.append(
                f"{sid} {outcome.fault}: stored {stored_reason}, "
                f"events {[e.reason for e in ended]}, expected {outcome.expected_reason}")
        spoken = Counter((u.role, u.turn, u.text) for u in served.utterances(sid))
        stored = Counter((u["role"], u["turn"], u["text"])
                         for u in (detail or {}).get("utterances", []))
        report.utterances_spoken += sum(spoken.values())
        report.utterances_stored += sum((stored & spoken).values())
        missing = spoken - stored
        report.utterances_lost += sum(missing.values())
        report.lost += [f"{sid} {outcome.fault}: {item}" for item in missing]
        self._audit_turns(served, outcome)

    def _audit_turns(self, served: Served, outcome: CallOutcome) -> None:
        report, result = self.report, outcome.result
        if result is None:
            report.turns_unanswered.append(f"{outcome.call_sid}: never ran")
            return
        # A failed reply is stored as generated-but-unheard, then the apology as heard.
        bot = [u.text for u in served.utterances(outcome.call_sid) if u.role == "bot"]
        for number, turn in enumerate(result.turns, start=1):
            report.turns += 1
            label = f"{outcome.call_sid} {outcome.fault} turn {number} ({turn.label})"
            if turn.latency_ms is None:
                report.turns_unanswered.append(label)
                continue
            report.max_turn_latency_ms = max(report.max_turn_latency_ms, turn.latency_ms)
            report.latencies.setdefault(outcome.fault, []).append(turn.latency_ms)
            if turn.latency_ms > self.budget_ms:
                report.turns_over_budget.append(f"{label}: {turn.latency_ms:.0f} ms")
            if outcome.fault in STAGE_FAULTS:
                apology = self.env.settings.apology
                if apology not in bot:
                    report.apologies_missing.append(f"{label}: heard {bot}")

    def _check_threads(self, before: set[str]) -> None:
        # Worker pools grow and shrink on demand; tqdm's monitor is one per process, started
        # lazily by faster-whisper's progress bars.
        pools = ("AnyIO worker thread", "asyncio_", "ThreadPoolExecutor", "tqdm_monitor")
        after = {t.name for t in threading.enumerate() if t.is_alive()}
        extra = sorted(n for n in after - before if not n.startswith(pools))
        self.report.leftover_tasks += [f"thread {name}" for name in extra]


def fault_kinds(calls: int, per_wave: int) -> list[str]:
    """Wave kinds for about `calls` calls: every fault kind in turn, then again."""
    waves = max(1, round(calls / per_wave))
    return [KINDS[i % len(KINDS)] for i in range(waves)]
