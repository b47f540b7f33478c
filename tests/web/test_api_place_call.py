"""`POST /api/calls`: the bot places an outbound call (fake Twilio REST on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from starlette.testclient import TestClient

from tests.fakes.twilio_server import FakeTwilio
from tests.web.viewerkit import call_free_settings, idle_engines, viewer_app


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        fake.add_number("+15550001111")  # our number: Twilio only calls from numbers we own
        yield fake


def client_for(tmp_path: Path, twilio: FakeTwilio | None, **more: object) -> TestClient:
    settings = call_free_settings(tmp_path, public_url="https://bot.example.com",
                                  twilio_from_number="+15550001111", **more)
    if twilio is not None:
        settings = settings.model_copy(update={
            "twilio_account_sid": twilio.account_sid, "twilio_auth_token": twilio.auth_token,
            "twilio_api_base": twilio.url})
    app = viewer_app(settings, idle_engines(settings))
    if twilio is not None:
        from telephony.rest import TwilioRest

        app.state.twilio_rest = TwilioRest.from_settings(settings)
    return TestClient(app)


def test_an_outbound_call_connects_the_callee_to_our_stream(tmp_path, twilio) -> None:
    with client_for(tmp_path, twilio) as client:
        answer = client.post("/api/calls", json={"to": "+15552223333",
                                                 "greeting": "Hi, this is your reminder."})
    assert answer.status_code == 201, answer.text
    assert answer.json()["call_sid"].startswith("CA")
    created = twilio.of("POST", "/Calls.json")[-1].form
    assert created["To"] == "+15552223333" and created["From"] == "+15550001111"
    assert created["StatusCallback"] == "https://bot.example.com/twilio/status"
    stream = ElementTree.fromstring(str(created["Twiml"])).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://bot.example.com/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params["greeting"] == "Hi, this is your reminder."
    assert params["direction"] == "outbound"


def test_bad_requests_are_4xx_and_missing_settings_are_named(tmp_path, twilio) -> None:
    with client_for(tmp_path, twilio) as client:
        assert client.post("/api/calls", content=b"not json").status_code == 400
        assert client.post("/api/calls", json=["+1555"]).status_code == 400
        assert client.post("/api/calls", json={"to": "5551234"}).status_code == 400
        assert client.post("/api/calls", json={"to": "+15552223333", "amd": "yes"}
                           ).status_code == 400
    with client_for(tmp_path, None) as client:
        answer = client.post("/api/calls", json={"to": "+15552223333"})
    assert answer.status_code == 503
    assert answer.json()["missing"] == ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"]


def test_placing_calls_needs_the_viewer_login(tmp_path, twilio) -> None:
    with client_for(tmp_path, twilio, ui_password="pw", ui_token="tok") as client:
        assert client.post("/api/calls", json={"to": "+15552223333"}).status_code in (401, 403)
        answer = client.post("/api/calls", json={"to": "+15552223333"},
                             headers={"Authorization": "Bearer tok"})
    assert answer.status_code == 201
