"""`POST /twilio/status`: Twilio's call status callbacks, stored on the call's row.

Twilio posts form-encoded parameters (CallSid, CallStatus, CallDuration, From, To, Direction,
Timestamp: see Twilio's "Call status callbacks" docs). This module only parses and stores
them; `X-Twilio-Signature` validation wraps the endpoint from outside (`status_routes(wrap=…)`).
Bad input gets a 400 with the reason, never a 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from db.engine import is_outage
from db.models import CALL_STATUSES
from db.repository import CallRepository

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024  # Twilio's callbacks are a few hundred bytes
_SID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_FORM = "application/x-www-form-urlencoded"

Endpoint = Callable[[Request], Awaitable[Response]]


class BadStatusCallback(ValueError):
    """A status callback that cannot be used; `field` names the offending parameter."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True, slots=True)
class StatusCallback:
    """The parameters of one status callback that we store."""

    call_sid: str
    status: str
    duration_s: int | None
    from_number: str | None
    to_number: str | None
    direction: str | None
    timestamp: datetime | None


def _timestamp(value: str) -> datetime:
    # Twilio sends RFC 2822 ("Tue, 10 Aug 2021 17:36:22 +0000"); accept ISO 8601 as well.
    try:
        instant = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        try:
            instant = datetime.fromisoformat(value)
        except ValueError:
            raise BadStatusCallback("Timestamp", "not an RFC 2822 or ISO 8601 time") from None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def parse_status_callback(form: Mapping[str, str]) -> StatusCallback:
    """Validate a status callback's parameters; raises `BadStatusCallback`."""
    call_sid = form.get("CallSid", "").strip()
    if not _SID.fullmatch(call_sid):
        raise BadStatusCallback("CallSid", "missing or malformed")
    status = form.get("CallStatus", "").strip()
    if status not in CALL_STATUSES:
        raise BadStatusCallback("CallStatus", f"must be one of {', '.join(sorted(CALL_STATUSES))}")
    duration: int | None = None
    if form.get("CallDuration", "").strip():
        try:
            duration = int(form["CallDuration"])
        except ValueError:
            raise BadStatusCallback("CallDuration", "not a whole number of seconds") from None
        if duration < 0:
            raise BadStatusCallback("CallDuration", "negative")
    timestamp = _timestamp(form["Timestamp"].strip()) if form.get("Timestamp") else None
    return StatusCallback(
        call_sid=call_sid,
        status=status,
        duration_s=duration,
        from_number=form.get("From") or None,
        to_number=form.get("To") or None,
        direction=form.get("Direction") or None,
        timestamp=timestamp,
    )


async def read_form(request: Request) -> dict[str, str]:
    """The url-encoded body as a dict; raises `BadStatusCallback` when it is not one."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != _FORM:
        raise BadStatusCallback("Content-Type", f"expected {_FORM}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadStatusCallback("body", f"larger than {MAX_BODY_BYTES} bytes")
    # request.body() is cached on the request, so a signature check may read it first.
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise BadStatusCallback("body", f"larger than {MAX_BODY_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise BadStatusCallback("body", "not a url-encoded form") from None
    return dict(pairs)


async def status_callback(request: Request) -> Response:
    """Store a Twilio status callback; 204 on success, 400 on bad input."""
    try:
        callback = parse_status_callback(await read_form(request))
    except BadStatusCallback as exc:
        log.warning("bad status callback: %s", exc)
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
    calls: CallRepository = request.app.state.calls
    try:
        await calls.update_status(
            callback.call_sid,
            callback.status,
            at=callback.timestamp,
            duration_s=callback.duration_s,
            from_number=callback.from_number,
            to_number=callback.to_number,
            direction=callback.direction,
        )
    except Exception as exc:
        if not is_outage(exc):
            raise
        log.warning("status callback not stored, call_sid=%s: %s", callback.call_sid, exc)
        return JSONResponse({"error": "database unavailable"}, status_code=503)
    log.info("call status %s call_sid=%s", callback.status, callback.call_sid)
    return Response(status_code=204)


def status_routes(wrap: Callable[[Endpoint], Endpoint] | None = None) -> list[Route]:
    """`POST /twilio/status`. `wrap` is the hook for signature validation around the handler."""
    endpoint = wrap(status_callback) if wrap is not None else status_callback
    return [Route("/twilio/status", endpoint, methods=["POST"], name="twilio_status")]
