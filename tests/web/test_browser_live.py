"""The call page in headless Chromium across SSE reconnects: nothing missed, nothing doubled,
and what the reader opened stays open. Scripted events, no models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

import web.sse
from tests.web.viewerkit import (
    CHROMIUM_ARGS,
    call_free_settings,
    chromium_path,
    idle_engines,
    scripted_call,
    viewer_app,
)
from voicebot.local_server import running_server

pytestmark = pytest.mark.browser


async def test_the_call_page_stays_in_step_across_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web.sse, "MAX_STREAM_S", 0.5)  # the server ends each stream quickly
    monkeypatch.setattr(web.sse, "RETRY_MS", 100)  # and the browser comes straight back
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    events = scripted_call("CA1")
    async with running_server(app) as base, async_playwright() as playwright:
        bus = app.state.services.bus
        for event in events[:4]:  # started, greeting, caller turn 1, turn 1 metrics
            bus.publish(event)
        await bus.drain()
        browser = await playwright.chromium.launch(executable_path=chromium_path(),
                                                   args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            connects = asyncio.Queue[None]()
            page.on("request", lambda r: r.url.endswith("/calls/CA1/events")
                    and connects.put_nowait(None))
            await page.goto(f"{base}/calls/CA1")
            await page.wait_for_selector("#timeline [data-key='p:1'] .waterfall")
            await page.click("#timeline [data-key='p:1'] .waterfall summary")  # open it
            for event in events[4:8]:  # the cut reply, barge-in, caller turn 2, metrics
                bus.publish(event)
            await page.wait_for_selector("#timeline .utt.bot.interrupted")
            # A live event gets its detail line; one without a detail shows no empty line.
            barge_in = page.locator("#timeline .ev[data-type='barge_in'] .f-detail")
            await barge_in.wait_for(state="visible")
            assert await barge_in.text_content() == "the reply was cut short"
            for _ in range(3):  # published while the page reconnects: picked up by resync
                await connects.get()
            for event in events[8:]:
                bus.publish(event)
            await page.wait_for_selector("#call-status .status-completed")
            await connects.get()
            await connects.get()  # one more resync after the end: still no duplicates
            await page.wait_for_selector("#timeline .ev.error")
            assert await page.locator("#timeline .ev[data-type='dtmf'] .f-detail").is_hidden()
            keys = await page.eval_on_selector_all("#timeline > li", "els => els.map(e => e.dataset.key)")
            opened = await page.eval_on_selector_all(
                "#timeline .utt.bot.interrupted .waterfall[open]", "els => els.length")
        finally:
            await browser.close()
    assert len(keys) == len(set(keys)) == 8  # 5 utterances, 3 events; the pending turn is gone
    assert not any(key.startswith("p:") for key in keys)
    assert opened == 1  # the waterfall opened while pending moved into the reply, still open
