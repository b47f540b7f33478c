"""Live events over SSE, through a real server: the bus → LiveFeed → the browser's stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.web.viewerkit import call_free_settings, idle_engines, scripted_call, viewer_app
from voicebot.local_server import running_server


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    kind = ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield kind, json.loads(line[6:])


async def test_a_call_page_stream_carries_that_calls_events_as_views(tmp_path: Path) -> None:
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    async with running_server(app) as base, httpx.AsyncClient(base_url=base, timeout=5) as http:
        bus = app.state.services.bus
        async with http.stream("GET", "/calls/CA1/events") as call_stream, \
                http.stream("GET", "/events") as all_stream:
            assert call_stream.headers["content-type"].startswith("text/event-stream")
            one, every = sse_events(call_stream), sse_events(all_stream)
            assert (await anext(one))[0] == "hello" and (await anext(every))[0] == "hello"
            for event in scripted_call("CAother")[:1] + scripted_call("CA1"):
                bus.publish(event)

            kinds = []
            async for kind, view in one:
                assert view["call_sid"] == "CA1"
                kinds.append(kind)
                if kind == "utterance" and view["interrupted"]:
                    assert view["heard"] == "Our prices depend on the day."
                    assert view["unheard"].startswith("Lunch is fifteen dollars")
                if kind == "call_ended":
                    break
            assert kinds == ["call_started", "utterance", "utterance", "metrics", "utterance",
                             "event", "utterance", "metrics", "utterance", "event", "event",
                             "call_ended"]
            kind, first = await anext(every)
            assert (kind, first["call_sid"]) == ("call_started", "CAother")
            assert first["number"] == "+1 ••• ••• 1234"
            assert "+15550101234" not in json.dumps(first)


async def test_without_a_live_feed_the_stream_says_so(tmp_path: Path) -> None:
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    async with running_server(app) as base, httpx.AsyncClient(base_url=base) as http:
        app.state.live = None
        response = await http.get("/events")
    assert response.status_code == 503
