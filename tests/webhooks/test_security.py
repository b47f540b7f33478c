import logging
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Any

import pytest
import websockets
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator

from db.records import StreamEnd
from tests.fakes.loopback import LoopbackServer
from webhooks.security import SignatureGuard, TrustedProxies, verify_http
from webhooks.stream_ended import stream_ended_routes
from webhooks.stream_status import stream_status_routes
from webhooks.voice import voice

TOKEN = "test-auth-token-abcdef0123456789"
PUBLIC = "https://abc.ngrok.app"
CALL = {"CallSid": "CA" + "1" * 32, "From": "+15551112222", "To": "+15553334444",
        "Direction": "inbound"}


def sign(url: str, params: dict[str, str] | None = None, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params or {})


def settings(**overrides: Any) -> SimpleNamespace:
    values = {"twilio_auth_token": TOKEN, "public_url": PUBLIC, "trusted_proxies": "",
              "twilio_validate_signatures": True}
    return SimpleNamespace(**(values | overrides))


def make_app(guard: SignatureGuard, public_url: str | None = PUBLIC) -> tuple[Starlette, list]:
    """The real voice webhook and stream-status route, and a media socket, all guarded."""
    accepted: list[str] = []

    async def media(websocket: WebSocket) -> None:
        accepted.append(websocket.url.path)  # the guard let the upgrade through
        await websocket.accept()
        await websocket.close()

    routes = [
        Route("/twilio/voice", guard.http(voice), methods=["GET", "POST"]),
        *stream_status_routes(wrap=guard.http),
        *stream_ended_routes(wrap=guard.http),
        WebSocketRoute("/twilio/media", guard.websocket(media)),
    ]
    app = Starlette(routes=routes)
    app.state.services = SimpleNamespace(settings=SimpleNamespace(public_url=public_url))
    return app, accepted


def stream_url(response_text: str) -> str | None:
    stream = ET.fromstring(response_text).find("./Connect/Stream")
    return None if stream is None else stream.get("url")


def test_signed_webhook_reaches_the_endpoint_which_still_reads_the_form() -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    signature = sign(f"{PUBLIC}/twilio/voice", CALL)
    response = TestClient(app).post("/twilio/voice", data=CALL,
                                    headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200
    assert stream_url(response.text) == "wss://abc.ngrok.app/twilio/media"
    params = {p.get("name"): p.get("value")
              for p in ET.fromstring(response.text).iter("Parameter")}
    assert params["from"] == "+15551112222"


def test_wrong_signature_is_refused_with_403_and_logged_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    bad = sign(f"{PUBLIC}/twilio/voice", CALL, token="some-other-token")
    client = TestClient(app, client=("203.0.113.9", 4444))
    with caplog.at_level(logging.WARNING, logger="webhooks.security"):
        response = client.post("/twilio/voice", data=CALL, headers={"X-Twilio-Signature": bad})
    assert response.status_code == 403
    assert "Connect" not in response.text
    assert "203.0.113.9" in caplog.text and "invalid signature" in caplog.text
    assert TOKEN not in caplog.text and bad not in caplog.text


def test_tampered_parameters_fail_the_signature() -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    signature = sign(f"{PUBLIC}/twilio/voice", CALL)
    response = TestClient(app).post("/twilio/voice", data=CALL | {"From": "+19990000000"},
                                    headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403


def test_missing_signature_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    with caplog.at_level(logging.WARNING, logger="webhooks.security"):
        response = TestClient(app).post("/twilio/voice", data=CALL)
    assert response.status_code == 403
    assert "missing signature" in caplog.text


def test_get_webhook_is_signed_over_the_url_with_its_query() -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    query = "CallSid=CA1&From=%2B15551112222"
    signature = sign(f"{PUBLIC}/twilio/voice?{query}")
    client = TestClient(app)
    ok = client.get(f"/twilio/voice?{query}", headers={"X-Twilio-Signature": signature})
    assert ok.status_code == 200
    other = client.get("/twilio/voice?CallSid=CA2&From=%2B15551112222",
                       headers={"X-Twilio-Signature": signature})
    assert other.status_code == 403


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "abc.ngrok.app"}


def test_forwarded_headers_are_honoured_from_a_trusted_proxy() -> None:
    guard = SignatureGuard.from_settings(settings(public_url=None, trusted_proxies="10.0.0.0/8"))
    app, _ = make_app(guard, public_url=None)
    signature = sign("https://abc.ngrok.app/twilio/voice", CALL)
    client = TestClient(app, client=("10.0.0.1", 123))
    response = client.post("/twilio/voice", data=CALL,
                           headers=FORWARDED | {"X-Twilio-Signature": signature})
    assert response.status_code == 200


def test_forwarded_headers_are_ignored_from_an_untrusted_peer() -> None:
    guard = SignatureGuard.from_settings(settings(public_url=None, trusted_proxies="10.0.0.0/8"))
    app, _ = make_app(guard, public_url=None)
    client = TestClient(app, client=("198.51.100.7", 123))
    forged = sign("https://abc.ngrok.app/twilio/voice", CALL)
    response = client.post("/twilio/voice", data=CALL,
                           headers=FORWARDED | {"X-Twilio-Signature": forged})
    assert response.status_code == 403
    # What that peer really reached is the request's own URL.
    own = sign("http://testserver/twilio/voice", CALL)
    response = client.post("/twilio/voice", data=CALL,
                           headers=FORWARDED | {"X-Twilio-Signature": own})
    assert response.status_code == 200


def test_signed_media_websocket_upgrade_is_accepted() -> None:
    app, accepted = make_app(SignatureGuard.from_settings(settings()))
    signature = sign("wss://abc.ngrok.app/twilio/media")
    client = TestClient(app)
    with client.websocket_connect("/twilio/media", headers={"X-Twilio-Signature": signature}) as ws:
        assert ws.receive()["type"] == "websocket.close"  # the endpoint accepted, then closed
    assert accepted == ["/twilio/media"]


@pytest.mark.parametrize("signature", [None, sign("https://abc.ngrok.app/twilio/media")])
def test_unsigned_or_wrongly_signed_media_websocket_is_refused_before_accept(
    signature: str | None,
) -> None:
    app, accepted = make_app(SignatureGuard.from_settings(settings()))
    headers = {"X-Twilio-Signature": signature} if signature else {}
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        TestClient(app).websocket_connect("/twilio/media", headers=headers),
    ):
        pass
    assert refused.value.code == 1008
    assert accepted == []


async def test_through_a_real_server_a_refused_upgrade_is_an_http_403() -> None:
    app, accepted = make_app(SignatureGuard.from_settings(settings()))
    with LoopbackServer(app) as server:
        url = server.url.replace("http://", "ws://") + "/twilio/media"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url):
                pass
        signature = sign("wss://abc.ngrok.app/twilio/media")
        async with websockets.connect(url, additional_headers={"X-Twilio-Signature": signature}):
            pass
    assert refused.value.response.status_code == 403
    assert accepted == ["/twilio/media"]


def test_media_websocket_behind_a_trusted_proxy_is_signed_as_wss() -> None:
    guard = SignatureGuard.from_settings(settings(public_url=None, trusted_proxies="127.0.0.1"))
    app, accepted = make_app(guard, public_url=None)
    signature = sign("wss://abc.ngrok.app/twilio/media")
    client = TestClient(app, client=("127.0.0.1", 5000))
    headers = FORWARDED | {"X-Twilio-Signature": signature}
    with client.websocket_connect("/twilio/media", headers=headers) as ws:
        assert ws.receive()["type"] == "websocket.close"
    assert accepted == ["/twilio/media"]


def test_turning_validation_off_warns_at_startup_and_lets_requests_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="webhooks.security"):
        guard = SignatureGuard.from_settings(settings(twilio_validate_signatures=False))
    assert "TWILIO_VALIDATE_SIGNATURES=false" in caplog.text
    assert not guard.enabled
    app, _ = make_app(guard)
    assert TestClient(app).post("/twilio/voice", data=CALL).status_code == 200


def test_validation_is_on_whenever_the_auth_token_is_set() -> None:
    assert SignatureGuard.from_settings(SimpleNamespace(twilio_auth_token=TOKEN)).enabled
    assert not SignatureGuard.from_settings(SimpleNamespace(twilio_auth_token=None)).enabled


def test_stream_status_callback_is_validated_and_recorded() -> None:
    app, _ = make_app(SignatureGuard.from_settings(settings()))
    recorded: list[dict] = []
    app.state.on_stream_status = recorded.append
    form = {"AccountSid": "AC" + "0" * 32, "CallSid": "CA" + "1" * 32,
            "StreamSid": "MZ" + "2" * 32, "StreamEvent": "stream-error",
            "StreamError": "Connection refused", "Timestamp": "2026-01-01T10:00:00.000Z"}
    client = TestClient(app)
    assert client.post("/twilio/stream-status", data=form).status_code == 403
    assert recorded == []
    signature = sign(f"{PUBLIC}/twilio/stream-status", form)
    response = client.post("/twilio/stream-status", data=form,
                           headers={"X-Twilio-Signature": signature})
    assert response.status_code == 204
    assert recorded == [{"call_sid": "CA" + "1" * 32, "stream_sid": "MZ" + "2" * 32,
                         "stream_name": None, "event": "stream-error",
                         "error": "Connection refused",
                         "timestamp": "2026-01-01T10:00:00.000Z"}]


def test_the_stream_ended_callback_is_validated() -> None:
    """`<Connect action>`: what the caller hears next is only told to Twilio."""
    app, _ = make_app(SignatureGuard.from_settings(settings()))

    class _Calls:
        async def stream_end(self, call_sid: str) -> StreamEnd:
            return StreamEnd(started=True, end_reason="stop", from_number=None,
                             to_number=None, direction="inbound", parameters={})

    app.state.calls = _Calls()
    form = {**CALL, "CallStatus": "in-progress"}
    client = TestClient(app)
    assert client.post("/twilio/stream-ended", data=form).status_code == 403
    signature = sign(f"{PUBLIC}/twilio/stream-ended", form)
    response = client.post("/twilio/stream-ended", data=form,
                           headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200 and "<Hangup" in response.text
    # A resumed stream's action counts its attempts in the query string, which is signed too.
    again = f"{PUBLIC}/twilio/stream-ended?resumes=1"
    assert client.post("/twilio/stream-ended?resumes=1", data=form, headers={
        "X-Twilio-Signature": signature}).status_code == 403
    response = client.post("/twilio/stream-ended?resumes=1", data=form,
                           headers={"X-Twilio-Signature": sign(again, form)})
    assert response.status_code == 200 and "<Hangup" in response.text


def test_stream_status_with_an_unknown_event_is_a_400() -> None:
    app, _ = make_app(SignatureGuard(None))
    response = TestClient(app).post("/twilio/stream-status", data={
        "CallSid": "CA1", "StreamSid": "MZ1", "StreamEvent": "stream-exploded"})
    assert response.status_code == 400
    assert response.json()["field"] == "StreamEvent"


def test_helper_uses_the_guard_built_from_the_apps_settings() -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse("yes" if await verify_http(request) else "no")

    app = Starlette(routes=[Route("/twilio/status", endpoint, methods=["POST"])])
    app.state.settings = settings()
    client = TestClient(app)
    form = {"CallSid": "CA1", "CallStatus": "completed"}
    signed = client.post("/twilio/status", data=form, headers={
        "X-Twilio-Signature": sign(f"{PUBLIC}/twilio/status", form)})
    assert signed.text == "yes"
    assert client.post("/twilio/status", data=form).text == "no"


def test_trusted_proxies_accepts_addresses_cidrs_and_star_and_names_bad_entries() -> None:
    proxies = TrustedProxies("127.0.0.1, 10.0.0.0/8 ,::1")
    assert "10.1.2.3" in proxies and "::1" in proxies and "127.0.0.1" in proxies
    assert "192.168.0.1" not in proxies and "testclient" not in proxies and None not in proxies
    assert "198.51.100.1" in TrustedProxies("*")
    assert not TrustedProxies("")
    with pytest.raises(ValueError, match="TRUSTED_PROXIES"):
        TrustedProxies("10.0.0.0/8, proxy.local")
