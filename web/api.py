"""JSON API over stored calls: `GET /api/calls` and `GET /api/calls/{call_sid}`.

Reads `request.app.state.calls` (a `db.repository.CallRepository`). Numbers are returned as
stored; masking is the viewer's job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.engine import is_outage
from db.repository import CallNotFound, CallRepository
from telephony.dialer import DialError, dial
from telephony.rest import TwilioRestError, TwilioUnreachable

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


class BadQuery(ValueError):
    """A query parameter that cannot be used; `param` names it."""

    def __init__(self, param: str, reason: str) -> None:
        self.param = param
        super().__init__(f"{param}: {reason}")


def parse_instant(param: str, value: str, *, end_of_day: bool = False) -> datetime:
    """An ISO 8601 date or datetime as an aware UTC datetime (naive means UTC).

    A bare date means the start of that day, or with `end_of_day` the start of the next one,
    so `until=2024-05-01` includes all of May 1st.
    """
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if end_of_day:
                day += timedelta(days=1)
            return datetime.combine(day, time(), tzinfo=UTC)
        # An unencoded '+' in a query string arrives as a space: "10:00:00 02:00".
        if "T" in text and " " in text:
            text = text.replace(" ", "+")
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise BadQuery(param, "expected an ISO 8601 date or datetime") from None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def _positive_int(param: str, value: str | None, default: int, maximum: int | None) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadQuery(param, "expected a whole number") from None
    if number < 1 or (maximum is not None and number > maximum):
        limit = f"between 1 and {maximum}" if maximum else "at least 1"
        raise BadQuery(param, f"must be {limit}")
    return number


def parse_list_query(query: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of `CallRepository.list_calls` from a query string."""
    params: dict[str, Any] = {
        "page": _positive_int("page", query.get("page"), 1, None),
        "page_size": _positive_int(
            "page_size", query.get("page_size"), DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
        ),
        "number": (query.get("number") or "").strip() or None,
        "since": None,
        "until": None,
    }
    if query.get("since"):
        params["since"] = parse_instant("since", query["since"])
    if query.get("until"):
        params["until"] = parse_instant("until", query["until"], end_of_day=True)
    if params["since"] and params["until"] and params["since"] >= params["until"]:
        raise BadQuery("until", "must be after since")
    return params


def _error(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _calls(request: Request) -> CallRepository:
    return request.app.state.calls  # type: ignore[no-any-return]


Endpoint = Callable[[Request], Awaitable[Response]]


def _database_guard(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("database unavailable for %s: %s", request.url.path, exc)
            return _error(503, "database unavailable")

    return guarded


async def list_calls(request: Request) -> Response:
    """`GET /api/calls`: newest first; `page`, `page_size`, `number`, `since`, `until`."""
    try:
        params = parse_list_query(request.query_params)
    except BadQuery as exc:
        return _error(400, str(exc), param=exc.param)
    page = await _calls(request).list_calls(**params)
    return JSONResponse(page.as_json())


async def get_call(request: Request) -> Response:
    """`GET /api/calls/{call_sid}`: the call, its transcript in order, metrics and events."""
    call_sid = request.path_params["call_sid"]
    try:
        detail = await _calls(request).get_call(call_sid)
    except CallNotFound:
        return _error(404, "call not found", call_sid=call_sid)
    return JSONResponse(detail.as_json())


async def place_call(request: Request) -> JSONResponse:
    """`POST /api/calls` {"to", "from"?, "greeting"?, "system_prompt"?, "amd"?}: the bot
    calls `to` through Twilio's REST API (behind the viewer's login, like all of /api)."""
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
    texts = {key: body.get(key) for key in ("to", "from", "greeting", "system_prompt")}
    for key, value in texts.items():
        if value is not None and (not isinstance(value, str) or len(value) > 2000):
            return JSONResponse({"error": f"'{key}' must be a string (≤ 2000 characters)"},
                                status_code=400)
    amd = body.get("amd")
    if amd is not None and not isinstance(amd, bool):
        return JSONResponse({"error": "'amd' must be true or false"}, status_code=400)
    state = request.app.state
    try:
        placed = await dial(state.settings, getattr(state, "twilio_rest", None),
                            texts["to"] or "", from_=texts["from"], greeting=texts["greeting"],
                            system_prompt=texts["system_prompt"], amd=amd,
                            from_what="'from' (or TWILIO_FROM_NUMBER)")
    except DialError as exc:
        return JSONResponse({"error": str(exc), "missing": exc.missing},
                            status_code=503 if exc.missing else 400)
    except (TwilioRestError, TwilioUnreachable, ValueError) as exc:
        log.warning("outbound call failed: %s", exc)
        return JSONResponse({"error": f"Twilio refused the call: {exc}"}, status_code=502)
    return JSONResponse({"call_sid": placed.sid, "status": placed.status, "to": placed.to,
                         "from": placed.from_}, status_code=201)


def api_routes() -> list[Route]:
    """The API's routes, to mount in the app factory."""
    return [
        Route("/api/calls", _database_guard(list_calls), methods=["GET"], name="api_calls"),
        Route("/api/calls", place_call, methods=["POST"], name="api_place_call"),
        Route("/api/calls/{call_sid}", _database_guard(get_call), methods=["GET"], name="api_call"),
    ]
