"""`GET /metrics`: Prometheus text that parses, and numbers that move when calls happen."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.conversation import Engines
from pipeline.events import CallEnded, CallEvent, CallStarted, TurnMetrics, UtteranceDone
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import Served
from tests.calls.conftest import engines, settings, stt, tts  # noqa: F401  (fixtures)
from tests.capacitykit import with_capacity
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.app import create_app
from voicebot.local_server import running_server
from voicebot.metrics import CallMetrics
from voicebot.settings import Settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_events_become_histograms_and_counters() -> None:
    metrics = CallMetrics()
    now = datetime.now(UTC)
    for event in (
        CallStarted("CA1", "MZ1", "+1555", "+1666", "inbound", now),
        UtteranceDone("CA1", 1, "caller", "hello", now, now),
        TurnMetrics("CA1", 1, endpoint_ms=500, stt_ms=90, stt_wait_ms=3, llm_first_token_ms=120,
                    llm_first_sentence_ms=300, tts_first_chunk_ms=60, v2v_ms=870,
                    overhead_ms=7),
        TurnMetrics("CA1", 1, heard_v2v_ms=1010),  # from the mark round trip, later
        CallEvent("CA1", "barge_in", {"cause": "speech"}),
        CallEvent("CA1", "error", {"stage": "llm", "reason": "timeout"}),
        CallEnded("CA1", now, "stop"),
    ):
        await metrics.handle(event)
    found = samples(metrics.render().decode())
    assert value(found, "voicebot_calls_started_total", direction="inbound") == 1
    assert value(found, "voicebot_calls_ended_total", reason="stop") == 1
    assert value(found, "voicebot_calls_active") == 0
    assert value(found, "voicebot_barge_ins_total") == 1
    assert value(found, "voicebot_errors_total", stage="llm") == 1
    assert value(found, "voicebot_v2v_seconds_count", measured="server") == 1
    assert value(found, "voicebot_v2v_seconds_count", measured="heard") == 1
    assert value(found, "voicebot_v2v_seconds_bucket", measured="server", le="0.75") == 0
    assert value(found, "voicebot_v2v_seconds_bucket", measured="server", le="1.0") == 1
    assert value(found, "voicebot_v2v_seconds_bucket", measured="heard", le="1.0") == 0
    assert value(found, "voicebot_stage_seconds_sum", stage="stt") == pytest.approx(0.09)
    assert value(found, "voicebot_stage_seconds_count", stage="endpoint") == 1
    assert value(found, "voicebot_overhead_seconds_bucket", le="0.01") == 1
    assert value(found, "voicebot_utterances_total", role="caller") == 1


async def test_two_apps_in_one_process_keep_their_own_numbers() -> None:
    first, second = CallMetrics(), CallMetrics()
    await first.handle(CallEvent("CA1", "barge_in"))
    assert value(samples(first.render().decode()), "voicebot_barge_ins_total") == 1
    assert value(samples(second.render().decode()), "voicebot_barge_ins_total") == 0


@contextlib.asynccontextmanager
async def serving_with_metrics(config: Settings, loaded: Engines) -> AsyncIterator[Served]:
    app = with_capacity(create_app(config, engines=loaded))
    async with running_server(app) as base:
        served = Served(app, base)
        app.state.services.bus.subscribe("test", served.add)
        yield served


@pytest.mark.slow
async def test_metrics_move_after_a_simulated_call(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir  # noqa: F811
) -> None:
    fake_openai.script(Rule(when="open", reply="We open at nine tomorrow morning."),
                       default_reply="Okay.")
    async with serving_with_metrics(settings, engines) as served, httpx.AsyncClient(
        base_url=served.base_url
    ) as http:
        before = samples((await http.get("/metrics")).text)
        caller = SimulatedCaller(served.media_url, pace=3.0)
        await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
        await served.ended(caller.call_sid)
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("voicebot_calls_started_total", direction="simulated") == 1
    assert moved("voicebot_calls_ended_total", reason="stop") == 1
    assert value(after, "voicebot_calls_active") == 0
    assert moved("voicebot_v2v_seconds_count", measured="server") == 1
    assert 0 < moved("voicebot_v2v_seconds_sum", measured="server") < 5
    # As the caller heard it (mark round trip): later than sent, by less than a chunk or two.
    assert moved("voicebot_v2v_seconds_count", measured="heard") == 1
    heard_after_sent = (moved("voicebot_v2v_seconds_sum", measured="heard")
                        - moved("voicebot_v2v_seconds_sum", measured="server"))
    assert 0 <= heard_after_sent < 0.5
    for stage in ("endpoint", "stt", "llm_first_token", "llm_first_sentence", "tts_first_chunk"):
        assert moved("voicebot_stage_seconds_count", stage=stage) == 1, stage
    assert moved("voicebot_overhead_seconds_count") == 1
    assert moved("voicebot_utterances_total", role="caller") == 1
    assert moved("voicebot_utterances_total", role="bot") == 2  # greeting and the answer
    assert moved("voicebot_inbound_frame_lag_seconds_count") > 0  # sampled once a second
    assert ("voicebot_queue_waiting", (("queue", "stt"),)) in after
    assert 0 <= value(after, "voicebot_event_loop_busy_ratio") <= 1.05
    assert value(after, "process_cpu_seconds_total") > 0
