"""The viewer's pages, rendered from calls stored through the real event bus and recorder."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from pipeline.events import CallEvent, PipelineEvent
from tests.web.viewerkit import (
    LONG_REPLY,
    T0,
    call_free_settings,
    idle_engines,
    scripted_call,
    viewer_app,
)
from web.timeline import utterance_view

HTML = {"accept": "text/html"}


def visible(html: str) -> str:
    """The page without its <template> markup (what the scripts clone for live items)."""
    return re.sub(r"<template.*?</template>", "", html, flags=re.S)


class Viewer:
    def __init__(self, client: TestClient, app: Starlette) -> None:
        self.client = client
        self.app = app

    def publish(self, events: list[PipelineEvent]) -> None:
        async def run() -> None:
            bus = self.app.state.services.bus
            for event in events:
                bus.publish(event)
            await bus.drain()

        self.client.portal.call(run)  # type: ignore[union-attr]


@pytest.fixture
def viewer(tmp_path: Path) -> Iterator[Viewer]:
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    with TestClient(app) as client:
        yield Viewer(client, app)


def test_the_call_list_shows_masked_numbers_newest_first(viewer: Viewer) -> None:
    viewer.publish(scripted_call("CAold", T0, number="+15550100001"))
    viewer.publish(scripted_call("CAnew", T0 + timedelta(hours=1), number="+15550109999"))

    page = viewer.client.get("/", headers=HTML)

    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    rows = re.findall(r'data-call-sid="(CA\w+)"', visible(page.text))
    assert rows == ["CAnew", "CAold"]
    assert "+1 ••• ••• 9999" in page.text and "+15550109999" not in page.text
    row = page.text.split('data-call-sid="CAnew"')[1].split("</tr>")[0]
    assert "completed" in row and "0:15" in row
    assert re.search(r'f-turns">2<', row)  # two caller turns
    assert "975 ms" in row  # median of 950 and 1,000 ms


def test_the_call_list_searches_by_number_and_pages(viewer: Viewer) -> None:
    for i in range(27):
        viewer.publish(scripted_call(f"CA{i:02d}", T0 + timedelta(minutes=i),
                                     number=f"+1555010{i:04d}")[:1])
    first = visible(viewer.client.get("/", headers=HTML).text)
    second = visible(viewer.client.get("/?page=2", headers=HTML).text)
    found = visible(viewer.client.get("/", params={"number": "+1 (555) 010-0003"},
                                      headers=HTML).text)

    assert len(re.findall(r'data-call-sid="', first)) == 25 and "page 1 of 2" in first
    assert re.findall(r'data-call-sid="(CA\w+)"', second) == ["CA01", "CA00"]
    assert 'data-live-inserts="false"' in second  # live rows only join the first page
    assert re.findall(r'data-call-sid="(CA\w+)"', found) == ["CA03"]


def test_the_call_page_shows_the_transcript_as_a_chat(viewer: Viewer) -> None:
    viewer.publish(scripted_call("CA1"))

    page = viewer.client.get("/calls/CA1", headers=HTML)

    assert page.status_code == 200
    text = visible(page.text)
    said = re.findall(r'class="item utt (caller|bot)[^"]*"', text)
    assert said == ["bot", "caller", "bot", "caller", "bot"]
    # The interrupted reply: what was heard, the cut, and the unheard rest struck through.
    cut = text.split('class="item utt bot interrupted"')[1].split("</li>")[0]
    assert "Our prices depend on the day." in cut and "✂ interrupted" in cut
    assert re.search(r'<del class="unheard f-unheard">Lunch is fifteen dollars for two courses.',
                     cut)
    assert LONG_REPLY.endswith("three courses.") and "three courses." in cut
    # Events inline, in time order; errors say so in words.
    assert "Caller talked over the bot (audio cleared in 42 ms)" in text
    assert "Caller pressed 5" in text
    assert "Error in stt: timed out" in text
    # Per-turn waterfall with every part labelled.
    assert text.count('class="waterfall"') == 2
    for label in ("Endpointing", "STT wait", "LLM first sentence", "TTS first chunk",
                  "Overhead", "Voice to voice"):
        assert label in text
    assert "margin-left:50.0%;width:10.0%" in text.replace(" ", "")  # STT wait, turn 2


def test_turn_taking_events_show_a_label_and_a_detail_line(viewer: Viewer) -> None:
    events = scripted_call("CA1")
    at = T0 + timedelta(seconds=14)
    viewer.publish([*events[:-1],
                    CallEvent("CA1", "turn_end", {
                        "turn": 3, "eou_delay_ms": 310.4, "reason": "model_complete",
                        "budget_ms": 256, "probability": 0.912, "cue": "complete",
                        "expecting": None, "during_bot": False}, at),
                    CallEvent("CA1", "backchannel", {"class": "backchannel", "text": "uh-huh"},
                              at + timedelta(seconds=0.5)),
                    CallEvent("CA1", "barge_in", {
                        "cause": "speech", "class": "false_interruption",
                        "heard_as": "noise", "clear_ms": 180.2, "resume_ms": 240.0},
                              at + timedelta(seconds=0.6)),
                    events[-1]])

    text = visible(viewer.client.get("/calls/CA1", headers=HTML).text)

    def shown(kind: str) -> str:
        return text.split(f'data-type="{kind}"')[1].split("</li>")[0]

    assert "Turn 3 ended 310 ms after the caller stopped (Smart Turn: complete)" in shown(
        "turn_end")
    assert ">silence budget 256 ms · Smart Turn 91% finished · words look complete<" in shown(
        "turn_end")
    assert "Backchannel: “uh-huh” — bot kept talking" in shown("backchannel")
    false_interruption = text.split('data-type="barge_in"')[2].split("</li>")[0]
    assert "False interruption — bot resumed after 240 ms" in false_interruption
    assert ">the sound was noise · paused 180 ms after it began" in false_interruption
    # No detail, no empty line.
    assert re.search(r'class="detail f-detail" hidden>', shown("dtmf"))


def test_a_reply_still_being_spoken_shows_as_pending_with_its_latency(viewer: Viewer) -> None:
    viewer.publish(scripted_call("CA1")[:4])  # up to turn 1's metrics: the bot is speaking
    text = visible(viewer.client.get("/calls/CA1", headers=HTML).text)
    assert 'data-key="p:1"' in text and "speaking…" in text and "950 ms" in text


def test_the_timeline_json_matches_what_the_page_and_live_events_use(viewer: Viewer) -> None:
    events = scripted_call("CA1")
    viewer.publish(events)
    data = viewer.client.get("/calls/CA1/timeline").json()
    keys = [item["key"] for item in data["items"]]
    caller = utterance_view({"role": "caller", "turn": 1,
                             "started_at": events[2].started_at.isoformat()})  # type: ignore[union-attr]
    assert caller["key"] in keys
    assert data["call"]["status"] == "completed" and data["call"]["turns"] == 2


def test_an_unknown_call_is_a_404_page(viewer: Viewer) -> None:
    assert viewer.client.get("/calls/CAnope", headers=HTML).status_code == 404
    assert viewer.client.get("/calls/CAnope/timeline").status_code == 404


def test_the_talk_page_loads_its_scripts(viewer: Viewer) -> None:
    text = viewer.client.get("/talk", headers=HTML).text
    assert 'id="talk-button"' in text
    for script in ("mulaw.js", "live.js", "talk.js"):
        assert f'src="/static/{script}"' in text
        assert viewer.client.get(f"/static/{script}").status_code == 200
