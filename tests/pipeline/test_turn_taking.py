"""Turn-taking on the evaluation set, offline: `TurnTaking` with real Silero, Whisper and Smart
Turn, driven in audio time by the benchmark's harness (bench/turn_taking.py) with fixed virtual
compute times, so the outcome does not depend on how busy the machine is."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.vad import SileroSession
from pipeline.turn_detector import SmartTurnModel, smart_turn_model_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LATENCY_MS = (100.0, 50.0)  # STT of < 1 s of audio, end-of-turn model, on an idle 2-core box


def _bench():
    spec = importlib.util.spec_from_file_location("turn_bench", ROOT / "bench" / "turn_taking.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["turn_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness(stt_model):
    bench = _bench()
    turn = SmartTurnModel() if smart_turn_model_path() is not None else None
    models = bench.Models(SileroSession(), stt_model, turn)
    manifest = json.loads((bench.FIXTURES / "manifest.json").read_text())
    fixtures = {f["name"]: f for f in manifest["fixtures"]}
    bot = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(bench.FIXTURES / "bot_reply.wav", 8000)))

    def run(name: str, mode: str = "smart", prepare_lead_ms: int | None = None) -> dict:
        if mode == "smart" and turn is None:
            pytest.skip("Smart Turn (pipecat-ai) not installed")
        fixture = fixtures[name]
        audio = bot if fixture["kind"] == "barge" else None
        return bench.OfflineCall(fixture, models, mode, audio, LATENCY_MS,
                                 bot_text=manifest["bot_reply"]["text"],
                                 prepare_lead_ms=prepare_lead_ms).run()

    return run


@pytest.fixture(scope="module")
def stt_model():
    from pipeline.stt import WhisperStt

    return WhisperStt()


@pytest.mark.parametrize("name", ["pause_wondering_if", "hesitate_could_i", "digits_phone_212"])
def test_a_turn_with_pauses_inside_is_one_turn_where_silence_alone_cuts_it(harness, name) -> None:
    assert harness(name, "silence")["cut_off"]
    smart = harness(name, "smart")
    assert not smart["cut_off"], smart
    assert len(smart["ended_at"]) == 1
    assert smart["eou_delay_ms"] is not None and smart["eou_delay_ms"] <= 2100


def test_a_finished_question_ends_the_turn_sooner_than_silence_alone(harness) -> None:
    smart = harness("complete_open_hours", "smart")
    baseline = harness("complete_open_hours", "silence")
    assert not smart["cut_off"] and smart["eou_delay_ms"] < baseline["eou_delay_ms"]
    assert smart["eou_delay_ms"] <= 400
    assert smart["prepared"] == 1 and smart["prepared_used"] == 1  # replied early, once


@pytest.mark.parametrize("name", ["pause_because", "hesitate_maybe"])
def test_a_long_wait_for_more_that_runs_out_has_its_reply_ready(harness, name) -> None:
    # The model hears an unfinished turn, so the turn waits ~1.5 s; the caller says no more.
    # The reply starts 700 ms before that wait runs out instead of after it.
    smart = harness(name, "smart")
    assert not smart["cut_off"] and smart["reasons"] == ["model_incomplete"], smart
    assert smart["prepared"] == 1 and smart["prepared_used"] == 1
    assert 600 <= smart["head_start_ms"][0] <= 760, smart
    unprepared = harness(name, "smart", prepare_lead_ms=0)
    assert unprepared["prepared"] == 0 and unprepared["ended_at"] == smart["ended_at"]


def test_without_the_model_transcript_cues_still_hold_a_hesitation(harness) -> None:
    cues = harness("pause_because", "cues")
    assert not cues["cut_off"] and len(cues["ended_at"]) == 1


@pytest.mark.parametrize("name", ["backchannel_yeah", "backchannel_okay", "backchannel_got_it"])
def test_a_backchannel_does_not_stop_the_bot(harness, name) -> None:
    row = harness(name)
    assert not row["paused"], row
    assert row["interjections"] == ["backchannel"]
    assert harness(name, "silence")["paused"]  # the baseline stops for it


@pytest.mark.parametrize("name", ["echo_10db_120ms", "echo_25db_150ms", "echo_18db_400ms"])
def test_the_bots_own_echo_does_not_stop_it(harness, name) -> None:
    assert not harness(name)["paused"]


@pytest.mark.parametrize("name", ["noise_cough", "noise_knock", "noise_burst"])
def test_a_noise_does_not_stop_the_bot(harness, name) -> None:
    assert not harness(name)["paused"]


@pytest.mark.parametrize("name", ["interrupt_actually", "interrupt_hold_on", "interrupt_over_echo"])
def test_a_real_interruption_stops_the_bot_within_half_a_second(harness, name) -> None:
    row = harness(name)
    assert row["paused"] and row["dropped"] and not row["resumed"]
    assert row["clear_ms"] <= 500, row
