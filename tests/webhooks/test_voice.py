import xml.etree.ElementTree as ET

from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from voicebot.settings import load_settings
from webhooks.voice import stream_twiml, voice


class _Services:
    def __init__(self, public_url: str | None) -> None:
        self.settings = load_settings(public_url=public_url)


def _client(public_url: str | None) -> TestClient:
    app = Starlette(routes=[Route("/twilio/voice", voice, methods=["GET", "POST"])])
    app.state.services = _Services(public_url)
    return TestClient(app)


def test_twiml_connects_to_the_media_stream_with_parameters() -> None:
    root = ET.fromstring(stream_twiml("bot.example.com", {"from": "+1555", "to": "+1666"}))
    stream = root.find("./Connect/Stream")
    assert stream is not None
    assert stream.get("url") == "wss://bot.example.com/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"from": "+1555", "to": "+1666"}
    # When the stream ends Twilio asks what next (a hang-up, or the busy message).
    connect = root.find("./Connect")
    assert connect is not None
    assert connect.get("action") == "https://bot.example.com/twilio/stream-ended"
    assert connect.get("method") == "POST"


def test_voice_webhook_uses_public_url_host() -> None:
    response = _client("https://abc.ngrok.app").post(
        "/twilio/voice", data={"From": "+15551112222", "To": "+15553334444",
                               "Direction": "inbound", "CallSid": "CA1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://abc.ngrok.app/twilio/media"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"from": "+15551112222", "to": "+15553334444", "direction": "inbound"}


def test_voice_webhook_falls_back_to_the_request_host() -> None:
    response = _client(None).post("/twilio/voice", data={"From": "+1", "To": "+2"},
                                  headers={"host": "myhost:8000"})
    stream = ET.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://myhost:8000/twilio/media"
