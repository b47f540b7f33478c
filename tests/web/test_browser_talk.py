"""Talking to the bot from a browser: real headless Chromium with a fake microphone that plays a
WAV file, the /talk page speaking the Twilio Media Streams protocol to WS /web/media, and the
real VAD, STT and TTS behind it (scripted LLM replies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from playwright.async_api import Page, async_playwright

from media.audiofile import read_wav, write_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from pipeline.conversation import Engines
from tests.callkit import serving
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.web.viewerkit import (
    CHROMIUM_ARGS,
    call_free_settings,
    chromium_path,
    idle_engines,
    viewer_app,
)
from voicebot.local_server import running_server
from voicebot.settings import Settings

pytestmark = pytest.mark.browser

RATE = 16000


def microphone_wav(speech: Path, out: Path, silence_s: float = 5.0) -> Path:
    """The fake microphone's file (Chromium loops it): silence while the greeting plays, then
    the question, then silence again on the next loop so the endpointing fires."""
    samples = read_wav(speech, RATE)
    write_wav(out, np.concatenate([np.zeros(int(RATE * silence_s), np.int16), samples]), RATE)
    return out


async def transcript_has(page: Page, selector: str, text: str, timeout_s: float = 30) -> None:
    await page.wait_for_function(
        """([selector, text]) => [...document.querySelectorAll(selector)]
               .some((el) => el.textContent.toLowerCase().includes(text.toLowerCase()))""",
        arg=[selector, text], timeout=timeout_s * 1000)


@pytest.mark.slow
async def test_the_bot_answers_a_browser_call_and_the_transcript_shows_it(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir: Path,
    viewer_serving: None, build_dir: Path, tmp_path: Path,
) -> None:
    fake_openai.script(Rule(when="open", reply="We open at nine tomorrow morning."),
                       default_reply="Sure.")
    wav = microphone_wav(fixtures_dir / "open_hours.wav", tmp_path / "mic.wav")
    args = [*CHROMIUM_ARGS, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}"]
    async with serving(settings, engines) as served, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), args=args)
        try:
            page = await browser.new_page(viewport={"width": 1024, "height": 800})
            await page.goto(served.base_url + "/talk")
            await page.click("#talk-button")
            await page.wait_for_selector("#talk-status:has-text('speak now')", timeout=10_000)
            href = await page.get_attribute("#talk-link a", "href")
            assert href is not None
            call_sid = href.rsplit("/", 1)[1]

            # The greeting is only recorded once its marks came back: the page played it.
            await transcript_has(page, "#timeline .utt.bot", "Thanks for calling")
            await transcript_has(page, "#timeline .utt.caller", "open tomorrow", 40)
            await transcript_has(page, "#timeline .utt.bot", "We open at nine tomorrow", 30)
            await page.screenshot(path=str(build_dir / "viewer-talk.png"), full_page=True)

            await page.click("#talk-button")  # hang up
            await page.wait_for_selector("#talk-status:has-text('Call ended')")
            ended = await served.ended(call_sid)
            stored = await served.app.state.calls.get_call(call_sid)
        finally:
            await browser.close()
    assert ended.reason == "stop"
    assert stored.call.direction == "web" and stored.call.from_number is None
    assert any(u.role == "caller" and "open tomorrow" in u.text.lower()
               for u in stored.utterances)


async def test_the_page_codec_is_g711_mu_law_like_the_server(tmp_path: Path) -> None:
    """talk.js encodes the microphone and decodes the bot with the same μ-law as `media`."""
    settings = call_free_settings(tmp_path)
    samples = np.linspace(-32768, 32767, 4001).astype(np.int16)
    ulaw = pcm16_to_ulaw(samples)
    async with running_server(viewer_app(settings, idle_engines(settings))) as base, \
            async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(),
                                                   args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(base + "/talk")
            encoded = await page.evaluate(
                "(s) => Array.from(Mulaw.encode(Int16Array.from(s)))", samples.tolist())
            decoded = await page.evaluate(
                "(u) => Array.from(Mulaw.decodeInt16(Uint8Array.from(u)))", list(ulaw))
        finally:
            await browser.close()
    assert bytes(encoded) == ulaw
    assert decoded == ulaw_to_pcm16(ulaw).tolist()
