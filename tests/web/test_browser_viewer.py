"""The viewer in real headless Chromium, following a simulated call live: real VAD, STT and TTS,
scripted LLM replies. Saves screenshots of both pages under build/."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright

from pipeline.conversation import Engines
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import serving
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.web.viewerkit import CHROMIUM_ARGS, chromium_path
from voicebot.settings import Settings

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG_REPLY = (
    "Our prices depend on the day. Lunch is fifteen dollars for two courses. Dinner is "
    "thirty dollars for three courses. Drinks are extra, and there is a special on Sundays."
)


async def transcript_has(page: Page, selector: str, text: str, timeout_s: float = 30) -> None:
    """Wait until an element matching `selector` in the transcript contains `text`."""
    await page.wait_for_function(
        """([selector, text]) => [...document.querySelectorAll(selector)]
               .some((el) => el.textContent.toLowerCase().includes(text.toLowerCase()))""",
        arg=[selector, text], timeout=timeout_s * 1000)


async def test_a_call_shows_up_live_in_the_list_and_on_its_page(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir: Path,
    viewer_serving: None, build_dir: Path,
) -> None:
    fake_openai.script(
        Rule(when="open", reply=LONG_REPLY),
        Rule(when="price", reply="Lunch is fifteen dollars."),
        Rule(when="pressed 1", reply="You chose sales."),
        default_reply="Lunch is fifteen dollars.",
    )
    async with serving(settings, engines) as served, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(),
                                                   args=CHROMIUM_ARGS)
        try:
            listing = await browser.new_page(viewport={"width": 1280, "height": 800})
            await listing.goto(served.base_url + "/")
            await listing.wait_for_selector("#live-note:has-text('live')")

            caller = SimulatedCaller(served.media_url, pace=1.0)  # barge-in needs real time
            call = asyncio.create_task(caller.run([
                CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
                CallerTurn(wav=str(fixtures_dir / "prices.wav"), barge_in_after_ms=1500),
                CallerTurn(digit="1"),
            ]))
            row = f'tr[data-call-sid="{caller.call_sid}"]'
            await listing.wait_for_selector(row, timeout=10_000)  # live: no reload

            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            await page.goto(f"{served.base_url}/calls/{caller.call_sid}")
            await page.wait_for_selector("#live-note:has-text('live')")
            # The greeting is still playing: the caller has not said anything yet.
            assert await page.locator("#timeline .utt.caller").count() == 0

            await transcript_has(page, "#timeline .utt.caller .f-heard", "open tomorrow")
            await transcript_has(page, "#timeline .utt.bot .f-heard", "Our prices depend")
            # The caller barged in: the reply is marked, and the unheard rest struck through.
            await page.wait_for_selector("#timeline .utt.bot.interrupted .f-badge")
            await transcript_has(page, "#timeline .utt.bot.interrupted del.unheard", "Sundays")
            await transcript_has(page, "#timeline .ev", "Caller talked over the bot")
            await transcript_has(page, "#timeline .utt.bot .f-heard", "Lunch is fifteen dollars")
            await transcript_has(page, "#timeline .ev", "Caller pressed 1")
            await transcript_has(page, "#timeline .utt.bot .f-heard", "You chose sales")
            await call
            await served.ended(caller.call_sid)
            await page.wait_for_selector("#call-status .status-completed")
            await listing.wait_for_selector(f"{row} .status-completed")

            assert await page.locator("#timeline .waterfall").count() >= 2
            # Every event the real pipeline published has its own words, not a generic label.
            shown = await page.eval_on_selector_all("#timeline .ev", """els => els.map(
                (e) => [e.dataset.type, e.querySelector(".f-label").textContent])""")
            assert "turn_end" in {kind for kind, _ in shown}
            assert [(kind, label) for kind, label in shown
                    if label == kind.replace("_", " ").capitalize()] == []
            await transcript_has(page, "#timeline .ev[data-type='turn_end']",
                                 "Turn 1 ended")
            turns = await listing.locator(f"{row} .f-turns").text_content()
            median = await listing.locator(f"{row} .f-median").text_content()
            assert turns == "2" and median is not None and median.endswith(" ms")

            await page.locator("#timeline .waterfall summary").first.click()
            await listing.screenshot(path=str(build_dir / "viewer-list.png"), full_page=True)
            await page.screenshot(path=str(build_dir / "viewer-call.png"), full_page=True)
            for shown in (listing, page):
                await shown.set_viewport_size({"width": 375, "height": 812})
            await listing.screenshot(path=str(build_dir / "viewer-list-375.png"), full_page=True)
            await page.screenshot(path=str(build_dir / "viewer-call-375.png"), full_page=True)
            # Nothing overflows sideways on a phone.
            overflow = await page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0
        finally:
            await browser.close()
