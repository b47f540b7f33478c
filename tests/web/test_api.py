"""The JSON API and the status callback, through Starlette's TestClient, on a real SQLite file."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient

from db.engine import create_db_engine
from db.migrate import upgrade_to_head_async
from db.repository import CallRepository
from web.api import api_routes
from webhooks.status import status_routes

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
FORM = {"content-type": "application/x-www-form-urlencoded"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Api:
    """A TestClient plus a way to seed the database on the app's own event loop."""

    def __init__(self, client: TestClient, calls: CallRepository) -> None:
        self.client = client
        self.calls = calls

    def seed(self, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return self.client.portal.call(functools.partial(method, *args, **kwargs))  # type: ignore[union-attr]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'voicebot.db'}"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # What the app factory does for the default SQLite database.
        await upgrade_to_head_async(url)
        engine = create_db_engine(url)
        app.state.calls = CallRepository(engine)
        yield
        await engine.dispose()

    app = Starlette(routes=[*api_routes(), *status_routes()], lifespan=lifespan)
    with TestClient(app) as client:
        yield Api(client, app.state.calls)


def seed_call(api: Api, sid: str, start: datetime, frm: str = "+15550001") -> None:
    api.seed(
        api.calls.start_call,
        sid,
        started_at=start,
        stream_sid="MZ" + sid,
        from_number=frm,
        to_number="+18005550000",
        direction="inbound",
    )


def test_calls_are_listed_newest_first_with_paging(api: Api) -> None:
    for i in range(3):
        seed_call(api, f"CA{i}", at(i * 60))

    response = api.client.get("/api/calls", params={"page": 1, "page_size": 2})

    assert response.status_code == 200
    body = response.json()
    assert (body["page"], body["page_size"], body["total"]) == (1, 2, 3)
    assert [c["call_sid"] for c in body["calls"]] == ["CA2", "CA1"]
    first = body["calls"][0]
    assert first == {
        "call_sid": "CA2",
        "stream_sid": "MZCA2",
        "from_number": "+15550001",
        "to_number": "+18005550000",
        "direction": "inbound",
        "status": "in-progress",
        "started_at": "2025-03-01T12:02:00+00:00",
        "answered_at": "2025-03-01T12:02:00+00:00",
        "ended_at": None,
        "end_reason": None,
        "duration_s": None,
        "created_at": first["created_at"],
        "utterance_count": 0,
    }
    assert datetime.fromisoformat(first["created_at"]).tzinfo is not None


def test_calls_are_filtered_by_number_and_dates(api: Api) -> None:
    seed_call(api, "CAold", T0 - timedelta(days=2), frm="+15550001")
    seed_call(api, "CAnew", T0, frm="+15550001")
    seed_call(api, "CAother", T0, frm="+447700900000")

    # '+' unencoded in a query string arrives as a space; both spellings must work.
    by_number = api.client.get("/api/calls?number=+15550001").json()
    dated = api.client.get(
        "/api/calls", params={"number": "5550001", "since": "2025-03-01", "until": "2025-03-01"}
    ).json()
    with_time = api.client.get("/api/calls?since=2025-03-01T13:00:00+01:00").json()

    assert {c["call_sid"] for c in by_number["calls"]} == {"CAold", "CAnew"}
    assert [c["call_sid"] for c in dated["calls"]] == ["CAnew"]
    assert {c["call_sid"] for c in with_time["calls"]} == {"CAnew", "CAother"}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"page": "0"}, "page"),
        ({"page": "two"}, "page"),
        ({"page_size": "1000"}, "page_size"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2025-03-02", "until": "2025-03-01"}, "until"),
    ],
)
def test_bad_list_queries_are_400_naming_the_parameter(
    api: Api, query: dict[str, str], param: str
) -> None:
    response = api.client.get("/api/calls", params=query)
    assert response.status_code == 400
    assert response.json()["param"] == param


def test_one_call_has_its_transcript_metrics_and_events(api: Api) -> None:
    seed_call(api, "CA1", at(0))
    api.seed(
        api.calls.add_utterance,
        "CA1",
        turn=1,
        role="caller",
        text="Are you open?",
        started_at=at(1),
        ended_at=at(2),
    )
    api.seed(
        api.calls.add_utterance,
        "CA1",
        turn=1,
        role="bot",
        text="Yes, we",
        generated_text="Yes, we are open until six.",
        interrupted=True,
        started_at=at(3),
        ended_at=at(4),
    )
    api.seed(api.calls.add_metrics, "CA1", 1, {"v2v_ms": 950.0, "stt_ms": 60.0})
    api.seed(api.calls.add_event, "CA1", "barge_in", {"turn": 1}, at(3.9))

    response = api.client.get("/api/calls/CA1")

    assert response.status_code == 200
    body = response.json()
    assert body["call_sid"] == "CA1" and body["utterance_count"] == 2
    assert body["utterances"] == [
        {
            "seq": 1,
            "turn": 1,
            "role": "caller",
            "text": "Are you open?",
            "generated_text": None,
            "interrupted": False,
            "started_at": "2025-03-01T12:00:01+00:00",
            "ended_at": "2025-03-01T12:00:02+00:00",
        },
        {
            "seq": 2,
            "turn": 1,
            "role": "bot",
            "text": "Yes, we",
            "generated_text": "Yes, we are open until six.",
            "interrupted": True,
            "started_at": "2025-03-01T12:00:03+00:00",
            "ended_at": "2025-03-01T12:00:04+00:00",
        },
    ]
    assert body["metrics"] == [
        {
            "turn": 1,
            "endpoint_ms": None,
            "stt_ms": 60.0,
            "stt_wait_ms": None,
            "llm_first_token_ms": None,
            "llm_first_sentence_ms": None,
            "tts_first_chunk_ms": None,
            "v2v_ms": 950.0,
            "overhead_ms": None,
            "heard_v2v_ms": None,
        }
    ]
    assert body["events"] == [
        {"type": "barge_in", "detail": {"turn": 1}, "at": "2025-03-01T12:00:03.900000+00:00"}
    ]


def test_an_unknown_call_is_a_json_404(api: Api) -> None:
    response = api.client.get("/api/calls/CAmissing")
    assert response.status_code == 404
    assert response.json() == {"error": "call not found", "call_sid": "CAmissing"}


def test_status_callbacks_update_the_call(api: Api) -> None:
    seed_call(api, "CA1", at(0))
    response = api.client.post(
        "/twilio/status",
        data={
            "CallSid": "CA1",
            "CallStatus": "completed",
            "CallDuration": "42",
            "From": "+15550001",
            "To": "+18005550000",
            "Direction": "inbound",
            "Timestamp": "Sat, 01 Mar 2025 12:00:42 +0000",
            "AccountSid": "AC123",
        },
    )

    assert response.status_code == 204
    call = api.client.get("/api/calls/CA1").json()
    assert (call["status"], call["duration_s"]) == ("completed", 42.0)
    assert call["ended_at"] == "2025-03-01T12:00:42+00:00"


def test_a_status_callback_for_an_unseen_call_creates_it(api: Api) -> None:
    response = api.client.post(
        "/twilio/status",
        data={"CallSid": "CAbusy", "CallStatus": "busy", "To": "+15550009"},
    )

    assert response.status_code == 204
    call = api.client.get("/api/calls/CAbusy").json()
    assert (call["status"], call["end_reason"], call["to_number"]) == ("busy", "busy", "+15550009")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"CallStatus": "completed"}, "CallSid"),
        ({"CallSid": "CA1"}, "CallStatus"),
        ({"CallSid": "CA1", "CallStatus": "exploded"}, "CallStatus"),
        ({"CallSid": "CA 1;drop", "CallStatus": "ringing"}, "CallSid"),
        ({"CallSid": "CA1", "CallStatus": "completed", "CallDuration": "ten"}, "CallDuration"),
        ({"CallSid": "CA1", "CallStatus": "completed", "CallDuration": "-3"}, "CallDuration"),
        ({"CallSid": "CA1", "CallStatus": "ringing", "Timestamp": "soon"}, "Timestamp"),
    ],
)
def test_bad_status_callbacks_are_400(api: Api, body: dict[str, str], field: str) -> None:
    response = api.client.post("/twilio/status", data=body)
    assert response.status_code == 400
    assert response.json()["field"] == field


@pytest.mark.parametrize(
    ("content", "headers", "field"),
    [
        (b'{"CallSid": "CA1"}', {"content-type": "application/json"}, "Content-Type"),
        (b"CallSid=CA1&CallStatus=\xff", FORM, "body"),
        (b"x=" + b"a" * 20_000, FORM, "body"),
    ],
)
def test_a_status_callback_that_is_not_a_small_form_is_400(
    api: Api, content: bytes, headers: dict[str, str], field: str
) -> None:
    response = api.client.post("/twilio/status", content=content, headers=headers)
    assert response.status_code == 400
    assert response.json()["field"] == field


class _Unreachable:
    """A test double for a repository whose database cannot be reached."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[None]]:
        async def fail(*args: Any, **kwargs: Any) -> None:
            raise ConnectionRefusedError(111, "Connect call failed")

        return fail


def test_an_unreachable_database_is_a_503_not_a_500() -> None:
    app = Starlette(routes=[*api_routes(), *status_routes()])
    app.state.calls = _Unreachable()
    with TestClient(app, raise_server_exceptions=False) as client:
        listing = client.get("/api/calls")
        one = client.get("/api/calls/CA1")
        status = client.post("/twilio/status", data={"CallSid": "CA1", "CallStatus": "ringing"})
    assert [r.status_code for r in (listing, one, status)] == [503, 503, 503]
    assert listing.json() == {"error": "database unavailable"}


class _Recording:
    """A test double for a repository that only records status updates."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, str]] = []

    async def update_status(self, call_sid: str, status: str, **_: object) -> None:
        self.updates.append((call_sid, status))


def test_status_routes_take_a_wrapper_for_signature_checks() -> None:
    def refuse_unsigned(endpoint: Callable[[Request], Awaitable[Response]]) -> Any:
        async def guarded(request: Request) -> Response:
            if "x-twilio-signature" not in request.headers:
                return Response(status_code=403)
            return await endpoint(request)

        return guarded

    app = Starlette(routes=status_routes(wrap=refuse_unsigned))
    app.state.calls = calls = _Recording()
    client = TestClient(app)
    form = {"CallSid": "CAsig", "CallStatus": "ringing"}

    assert client.post("/twilio/status", data=form).status_code == 403
    signed = client.post("/twilio/status", data=form, headers={"X-Twilio-Signature": "sig"})
    assert signed.status_code == 204
    assert calls.updates == [("CAsig", "ringing")]
