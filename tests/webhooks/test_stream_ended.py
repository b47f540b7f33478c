"""`POST /twilio/stream-ended` on its own: the answers that need no running call
(tests/test_admission.py runs it against real refused and finished streams)."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.testclient import TestClient

from webhooks.stream_ended import stream_ended_routes

CALL_SID = "CA" + "3" * 32


class _Calls:
    def __init__(self, started: bool | Exception) -> None:
        self.started = started
        self.asked: list[str] = []

    async def stream_started(self, call_sid: str) -> bool:
        self.asked.append(call_sid)
        if isinstance(self.started, Exception):
            raise self.started
        return self.started


class _Bus:
    def __init__(self) -> None:
        self.published: list[object] = []

    def publish(self, event: object) -> None:
        self.published.append(event)


def _client(calls: _Calls | None) -> tuple[TestClient, _Bus]:
    app = Starlette(routes=stream_ended_routes())
    bus = _Bus()
    if calls is not None:
        app.state.calls = calls
    app.state.services = SimpleNamespace(bus=bus)
    app.state.on_stream_refused = lambda request: bus.publish(("refused", request.url.path))
    app.state.settings = SimpleNamespace(busy_message="No line is free. Goodbye.")
    return TestClient(app), bus


def test_a_stream_that_never_started_gets_the_configured_busy_message() -> None:
    client, bus = _client(_Calls(False))
    response = client.post("/twilio/stream-ended",
                           data={"CallSid": CALL_SID, "CallStatus": "in-progress"})
    assert response.status_code == 200
    assert "<Say>No line is free. Goodbye.</Say>" in response.text
    assert "<Hangup" in response.text
    assert bus.published == [("refused", "/twilio/stream-ended")]


def test_an_unreadable_database_hangs_up_and_stores_nothing() -> None:
    client, bus = _client(_Calls(OperationalError("select", {}, Exception("down"))))
    response = client.post("/twilio/stream-ended",
                           data={"CallSid": CALL_SID, "CallStatus": "in-progress"})
    assert response.status_code == 200
    assert "<Hangup" in response.text and "<Say>" not in response.text
    assert bus.published == []


def test_a_call_already_over_is_not_looked_up() -> None:
    calls = _Calls(False)
    client, bus = _client(calls)
    response = client.post("/twilio/stream-ended",
                           data={"CallSid": CALL_SID, "CallStatus": "completed"})
    assert "<Hangup" in response.text and "<Say>" not in response.text
    assert calls.asked == [] and bus.published == []


def test_before_the_database_is_set_up_the_answer_is_a_hang_up() -> None:
    client, _ = _client(None)
    response = client.post("/twilio/stream-ended",
                           data={"CallSid": CALL_SID, "CallStatus": "in-progress"})
    assert "<Hangup" in response.text and "<Say>" not in response.text


def test_bad_requests_are_refused() -> None:
    client, _ = _client(_Calls(False))
    assert client.post("/twilio/stream-ended", data={"CallSid": "CA1"}).status_code == 400
    assert client.post("/twilio/stream-ended",
                       content=b"CallSid=" + b"a" * 20000).status_code == 413
