"""`POST /twilio/stream-status`: Twilio's status callbacks for a `<Stream>`.

When `<Stream statusCallback="…">` is set, Twilio posts form-encoded `AccountSid`, `CallSid`,
`StreamSid`, `StreamName`, `StreamEvent` (`stream-started`, `stream-stopped`, `stream-error`),
`StreamError` (the reason, on `stream-error`) and `Timestamp` (Twilio's `<Stream>` TwiML docs,
"statusCallback"). This module parses them and hands a plain dict to the app's hook
`app.state.on_stream_status` (sync or async) when one is set; signature validation wraps the
endpoint from outside (`stream_status_routes(wrap=guard.http)`).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

PATH = "/twilio/stream-status"
STREAM_EVENTS = frozenset({"stream-started", "stream-stopped", "stream-error"})
MAX_BODY_BYTES = 16 * 1024
_SID = re.compile(r"[A-Za-z0-9_\-]{1,64}")

Endpoint = Callable[[Request], Awaitable[Response]]
StreamStatusHook = Callable[[dict[str, str | None]], object]


class BadStreamStatus(ValueError):
    """A stream status callback that cannot be used; `field` names the offending parameter."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(f"{field}: {reason}")


def parse_stream_status(form: Mapping[str, str]) -> dict[str, str | None]:
    """The callback as `{call_sid, stream_sid, stream_name, event, error, timestamp}`."""
    for field in ("CallSid", "StreamSid"):
        if not _SID.fullmatch(form.get(field, "").strip()):
            raise BadStreamStatus(field, "missing or malformed")
    event = form.get("StreamEvent", "").strip()
    if event not in STREAM_EVENTS:
        raise BadStreamStatus("StreamEvent", f"must be one of {', '.join(sorted(STREAM_EVENTS))}")
    return {
        "call_sid": form["CallSid"].strip(),
        "stream_sid": form["StreamSid"].strip(),
        "stream_name": form.get("StreamName") or None,
        "event": event,
        "error": form.get("StreamError") or None,
        "timestamp": form.get("Timestamp") or None,
    }


async def _read_form(request: Request) -> dict[str, str]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadStreamStatus("body", f"larger than {MAX_BODY_BYTES} bytes")
    body = await request.body()  # cached: the signature check may have read it already
    if len(body) > MAX_BODY_BYTES:
        raise BadStreamStatus("body", f"larger than {MAX_BODY_BYTES} bytes")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50))
    except (UnicodeDecodeError, ValueError):
        raise BadStreamStatus("body", "not a url-encoded form") from None


async def stream_status(request: Request) -> Response:
    """Record a stream status callback; 204 on success, 400 on bad input."""
    try:
        status = parse_stream_status(await _read_form(request))
    except BadStreamStatus as exc:
        log.warning("bad stream status callback: %s", exc)
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
    if status["event"] == "stream-error":
        log.warning("stream error call_sid=%s stream_sid=%s: %s",
                    status["call_sid"], status["stream_sid"], status["error"])
    else:
        log.info("stream %s call_sid=%s stream_sid=%s",
                 status["event"], status["call_sid"], status["stream_sid"])
    hook: StreamStatusHook | None = getattr(request.app.state, "on_stream_status", None)
    if hook is not None:
        result = hook(status)
        if inspect.isawaitable(result):
            await result
    return Response(status_code=204)


def stream_status_routes(wrap: Callable[[Endpoint], Endpoint] | None = None) -> list[Route]:
    """`POST /twilio/stream-status`; `wrap` is the hook for signature validation."""
    endpoint = wrap(stream_status) if wrap is not None else stream_status
    return [Route(PATH, endpoint, methods=["POST"], name="twilio_stream_status")]
