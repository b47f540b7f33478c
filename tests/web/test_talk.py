"""WS /web/media without a browser: capacity, and only web calls may be placed through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.web.viewerkit import call_free_settings, idle_engines, viewer_app


def start_message(call_sid: str) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                       "start": {"streamSid": "MZ1", "callSid": call_sid, "tracks": ["inbound"],
                                 "customParameters": {"direction": "inbound"},
                                 "mediaFormat": {"encoding": "audio/x-mulaw",
                                                 "sampleRate": 8000, "channels": 1}}})


def test_a_browser_call_is_refused_when_the_server_is_full(tmp_path: Path) -> None:
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    with TestClient(app) as client:
        for _ in range(settings.max_concurrent_calls):  # every line taken
            client.portal.call(app.state.admission.admit)
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/web/media"):
            pass
    assert refused.value.code == 1013


def test_a_browser_cannot_write_into_a_phone_calls_transcript(tmp_path: Path) -> None:
    settings = call_free_settings(tmp_path)
    app = viewer_app(settings, idle_engines(settings))
    with TestClient(app) as client:
        with client.websocket_connect("/web/media") as socket:
            socket.send_text(json.dumps({"event": "connected", "protocol": "Call"}))
            socket.send_text(start_message("CA" + "1" * 32))  # a Twilio call SID: refused
            with pytest.raises(WebSocketDisconnect):
                socket.receive_text()
        assert client.get("/api/calls").json()["total"] == 0
        assert app.state.services.active_calls == 0
