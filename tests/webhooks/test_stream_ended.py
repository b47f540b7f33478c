"""`POST /twilio/stream-ended` on its own: the answers that need no running call
(tests/test_admission.py runs it against real refused and finished streams)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.testclient import TestClient

from db.records import StreamEnd
from webhooks.stream_ended import stream_ended_routes

CALL_SID = "CA" + "3" * 32


class _Calls:
    def __init__(self, started: bool | Exception, end_reason: str | None = None,
                 parameters: dict[str, str] | None = None) -> None:
        self.started = started
        self.end_reason = end_reason
        self.parameters = parameters or {}
        self.asked: list[str] = []

    async def stream_end(self, call_sid: str) -> StreamEnd | None:
        self.asked.append(call_sid)
        if isinstance(self.started, Exception):
            raise self.started
        if not self.started:
            return None
        return StreamEnd(started=True, end_reason=self.end_reason, from_number="+15550001111",
                         to_number="+15550002222", direction="outbound",
                         parameters=self.parameters)


class _Bus:
    def __init__(self) -> None:
        self.published: list[object] = []

    def publish(self, event: object) -> None:
        self.published.append(event)


def _client(calls: _Calls | None, stream_resumes: int = 2) -> tuple[TestClient, _Bus]:
    app = Starlette(routes=stream_ended_routes())
    bus = _Bus()
    if calls is not None:
        app.state.calls = calls
    app.state.services = SimpleNamespace(bus=bus)
    app.state.on_stream_refused = lambda request: bus.publish(("refused", request.url.path))
    app.state.settings = SimpleNamespace(busy_message="No line is free. Goodbye.",
                                         stream_resumes=stream_resumes,
                                         public_url="https://bot.example.com")
    return TestClient(app), bus


def _ended(client: TestClient, query: str = "") -> str:
    response = client.post("/twilio/stream-ended" + query,
                           data={"CallSid": CALL_SID, "CallStatus": "in-progress"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    return response.text


def _connect(twiml: str) -> tuple[str, str, dict[str, str]]:
    """The `<Connect>`'s action, its `<Stream>`'s URL and parameters."""
    connect = ET.fromstring(twiml).find("Connect")
    assert connect is not None, twiml
    stream = connect.find("Stream")
    assert stream is not None
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return connect.get("action", ""), stream.get("url", ""), parameters


@pytest.mark.parametrize("end_reason", [None, "disconnect", "error"])
def test_a_stream_that_dropped_is_connected_again_with_the_calls_parameters(
        end_reason: str | None) -> None:
    """No end stored (its worker died) or a drop: the same stream again, with the parties,
    the call's own parameters (an outbound call's system prompt) and the attempt."""
    calls = _Calls(True, end_reason, {"system_prompt": "You sell tickets.", "greeting": "Hi!"})
    client, bus = _client(calls)
    action, url, parameters = _connect(_ended(client))
    assert url == "wss://bot.example.com/twilio/media"
    assert action == "https://bot.example.com/twilio/stream-ended?resumes=1"
    assert parameters == {"system_prompt": "You sell tickets.", "greeting": "Hi!",
                          "from": "+15550001111", "to": "+15550002222",
                          "direction": "outbound", "resume": "1"}
    assert bus.published == []  # not a refusal
    action, _, parameters = _connect(_ended(client, "?resumes=1"))
    assert action.endswith("/twilio/stream-ended?resumes=2") and parameters["resume"] == "2"


def test_after_the_last_attempt_the_call_hangs_up() -> None:
    client, _ = _client(_Calls(True, "disconnect"))
    twiml = _ended(client, "?resumes=2")
    assert "<Hangup" in twiml and "<Connect" not in twiml


@pytest.mark.parametrize("query", ["?resumes=x", "?resumes=-1", "?resumes=999"])
def test_an_attempt_count_we_did_not_write_hangs_up(query: str) -> None:
    client, _ = _client(_Calls(True, "disconnect"))
    assert "<Connect" not in _ended(client, query)


def test_with_resumes_off_a_dropped_stream_hangs_up() -> None:
    client, _ = _client(_Calls(True, None), stream_resumes=0)
    twiml = _ended(client)
    assert "<Hangup" in twiml and "<Connect" not in twiml


@pytest.mark.parametrize("end_reason", ["stop", "bot_caller_goodbye", "bot_idle", "transfer",
                                        "max_duration", "send_timeout"])
def test_a_stream_that_ended_on_purpose_hangs_up(end_reason: str) -> None:
    """The bot hung up (without REST credentials, by closing the stream), a limit, a `stop`:
    stored before the socket closed, so never taken for a drop."""
    client, _ = _client(_Calls(True, end_reason))
    twiml = _ended(client)
    assert "<Hangup" in twiml and "<Connect" not in twiml and "<Say>" not in twiml


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


class _Admission:
    def __init__(self) -> None:
        self.freed: list[str] = []

    async def free_call(self, call_sid: str) -> bool:
        self.freed.append(call_sid)
        return True


@pytest.mark.parametrize(("end_reason", "resumes", "freed"), [
    (None, "", True), ("disconnect", "", True), ("error", "?resumes=2", True),  # hangs up
    ("stop", "", False), ("bot_hangup", "", False), ("max_duration", "", False),
])
def test_a_dropped_streams_line_is_given_back(end_reason: str | None, resumes: str,
                                              freed: bool) -> None:
    """A drop frees the call's line by its CallSid (its server may be gone with its leases),
    whether the call is connected again or, after the last attempt, hung up; any other end
    was released by the server that ended it."""
    client, _ = _client(_Calls(True, end_reason))
    admission = _Admission()
    client.app.state.admission = admission  # type: ignore[attr-defined]
    _ended(client, resumes)
    assert admission.freed == ([CALL_SID] if freed else [])
