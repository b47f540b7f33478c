"""Chaos: dozens of simulated calls on real models while callers hang up and drop, the LLM
fails every way it can, TTS and STT raise, Redis and PostgreSQL restart and the spool's disk
is full. Afterwards every call is finalized with the right end reason, every utterance that
was spoken is stored, every caller turn was answered in time (with an apology when a stage
failed), and nothing crashed or was left running. See tests/calls/chaoskit.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.stt import WhisperStt
from pipeline.tts_piper import PiperTts
from tests.calls.chaoskit import KINDS, ChaosRun, chaos_engines, chaos_env, fault_kinds
from tests.fakes.engines import FaultSwitch
from tests.fakes.openai_server import FakeOpenAi
from voicebot.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

CALLS = 36
PER_WAVE = 3


async def test_calls_survive_every_fault_and_nothing_is_lost(
    settings: Settings, stt: WhisperStt, tts: PiperTts, fake_openai: FakeOpenAi,
    fixtures_dir: Path, tmp_path: Path,
) -> None:
    switch = FaultSwitch()
    engines = chaos_engines(settings, stt, tts, switch)
    kinds = fault_kinds(CALLS, PER_WAVE)
    assert set(kinds) == set(KINDS)
    async with chaos_env(settings, engines, switch, fake_openai, fixtures_dir,
                         tmp_path) as env:
        report = await ChaosRun(env, per_wave=PER_WAVE, pace=6.0).run(kinds)
    summary = json.dumps(report.as_json(details=40), indent=1)
    assert report.calls_run == CALLS
    assert report.calls_finalized == CALLS, summary
    assert report.utterances_lost == 0, summary
    assert report.utterances_spoken >= CALLS * 2, summary  # greeting + at least one turn
    assert not report.crashes, summary
    assert not report.wrong_end_reasons, summary
    assert not report.turns_unanswered and not report.turns_over_budget, summary
    assert not report.apologies_missing, summary
    assert not report.leftover_tasks, summary
    assert switch.raised["stt"] and switch.raised["tts"]
    assert report.ok
