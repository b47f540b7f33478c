from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.engines import AudioClip, EngineError
from pipeline.tts_network import OPENAI_PCM_RATE, GttsTts, OpenAiTts
from tests.fakes.gtts_server import TONE_SECONDS, FakeGtts
from tests.fakes.openai_server import FakeOpenAi, tone
from voicebot.settings import SettingsError, load_settings


async def clips_of(tts: GttsTts | OpenAiTts, text: str) -> list[AudioClip]:
    return [clip async for clip in tts.synthesize(text)]


# -- gTTS ---------------------------------------------------------------------------------------


async def test_gtts_yields_decoded_audio_of_plausible_duration(fake_gtts: FakeGtts) -> None:
    text = "Hello there, how are you?"
    (clip,) = await clips_of(GttsTts(), text)
    assert fake_gtts.requests[0].text == text
    assert fake_gtts.requests[0].lang == "en"
    assert clip.samples.dtype == np.int16
    expected = np.ceil(len(text) / fake_gtts.chars_per_clip) * TONE_SECONDS
    assert expected <= clip.duration_s <= expected * 1.25  # MP3 frames pad each copy a little
    assert np.abs(clip.samples).max() > 4000  # the tone, not silence


async def test_gtts_long_text_is_fetched_in_parts_and_joined(fake_gtts: FakeGtts) -> None:
    text = "This sentence is long enough. " * 6  # gTTS sends at most 100 characters a request
    (clip,) = await clips_of(GttsTts(), text)
    assert len(fake_gtts.requests) >= 2
    total = sum(np.ceil(len(r.text) / fake_gtts.chars_per_clip) for r in fake_gtts.requests)
    assert clip.duration_s >= total * TONE_SECONDS


async def test_gtts_language_comes_from_tts_voice(fake_gtts: FakeGtts) -> None:
    tts = GttsTts.from_settings(load_settings(tts_engine="gtts", tts_voice="fr"))
    await clips_of(tts, "Bonjour.")
    assert fake_gtts.requests[0].lang == "fr"


def test_gtts_rejects_an_unknown_language() -> None:
    with pytest.raises(SettingsError) as caught:
        GttsTts("xx-nope")
    assert caught.value.keys == ["TTS_VOICE"]


@pytest.mark.parametrize("failure", ["status", "no_audio"])
async def test_gtts_failure_raises_engine_error(fake_gtts: FakeGtts, failure: str) -> None:
    if failure == "status":
        fake_gtts.status = 500
    else:
        fake_gtts.no_audio = True
    with pytest.raises(EngineError) as caught:
        await clips_of(GttsTts(), "Hello.")
    assert caught.value.stage == "tts"


async def test_gtts_timeout_raises_engine_error_in_time(fake_gtts: FakeGtts) -> None:
    fake_gtts.delay_s = 1.5
    started = time.monotonic()
    with pytest.raises(EngineError, match="within"):
        await clips_of(GttsTts(timeout_s=0.3), "Hello.")
    assert time.monotonic() - started < 1.0


async def test_gtts_blank_text_yields_nothing(fake_gtts: FakeGtts) -> None:
    assert await clips_of(GttsTts(), "  ") == []
    assert fake_gtts.requests == []


# -- OpenAI speech --------------------------------------------------------------------------------


def openai_tts(fake: FakeOpenAi, **overrides: object) -> OpenAiTts:
    settings = {"llm_base_url": fake.base_url, "llm_model": "m", "tts_engine": "openai"}
    return OpenAiTts.from_settings(load_settings(**{**settings, **overrides}))


async def test_openai_tts_yields_the_streamed_pcm_in_clips(fake_openai: FakeOpenAi) -> None:
    audio = tone(1.0)
    fake_openai.speech.audio = audio
    fake_openai.speech.chunk_bytes = 1001  # odd: samples straddle chunk boundaries
    clips = await clips_of(openai_tts(fake_openai), "Hello there.")
    assert all(clip.sample_rate == OPENAI_PCM_RATE for clip in clips)
    assert len(clips) > 5
    assert all(clip.duration_s >= 0.1 for clip in clips[:-1])
    np.testing.assert_array_equal(np.concatenate([c.samples for c in clips]), audio)


async def test_openai_tts_request_asks_for_pcm_with_model_and_voice(
    fake_openai: FakeOpenAi,
) -> None:
    tts = openai_tts(fake_openai, tts_voice="nova", tts_model="tts-test")
    await clips_of(tts, "Hi.")
    (request,) = fake_openai.requests
    assert request.path == "/v1/audio/speech"
    assert request.body == {
        "input": "Hi.",
        "model": "tts-test",
        "voice": "nova",
        "response_format": "pcm",
    }


async def test_openai_tts_first_clip_comes_before_the_stream_ends(fake_openai: FakeOpenAi) -> None:
    fake_openai.speech.audio = tone(1.0)
    fake_openai.speech.chunk_bytes = 4800  # 100 ms
    fake_openai.speech.chunk_delay_s = 0.05
    started = time.monotonic()
    arrivals = [time.monotonic() - started async for _ in openai_tts(fake_openai).synthesize("Hi")]
    assert arrivals[0] < arrivals[-1] / 2


async def test_openai_tts_http_error_raises(fake_openai: FakeOpenAi) -> None:
    fake_openai.speech.status = 500
    with pytest.raises(EngineError, match="500") as caught:
        await clips_of(openai_tts(fake_openai), "Hello.")
    assert caught.value.stage == "tts"


async def test_openai_tts_stalled_stream_raises(fake_openai: FakeOpenAi) -> None:
    fake_openai.speech.chunk_delay_s = 2
    with pytest.raises(EngineError, match="no audio within"):
        await clips_of(openai_tts(fake_openai, tts_timeout_s=0.3), "Hello.")


async def test_openai_tts_blank_text_yields_nothing(fake_openai: FakeOpenAi) -> None:
    assert await clips_of(openai_tts(fake_openai), "") == []
    assert fake_openai.requests == []
