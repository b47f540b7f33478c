"""Server-sent events for the viewer: `GET /events` (every call) and `/calls/{sid}/events`.

Each message is one `web.timeline.live_view` dict (`event: <kind>`, `data: <json>`). A comment
line goes out when nothing happened for `HEARTBEAT_S`, so a closed browser is noticed and
proxies keep the stream open. A stream ends after `MAX_STREAM_S` (or when the client was too
slow to keep up): the browser's EventSource reconnects by itself and the page resyncs, and a
server shutting down never waits long for open viewers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from web.live import LiveClosed, LiveFeed, LiveSubscription, TooManyClients
from web.timeline import live_view

HEARTBEAT_S = 15.0
MAX_STREAM_S = 25.0
RETRY_MS = 1000


def format_sse(kind: str, data: object) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _stream(subscription: LiveSubscription) -> AsyncIterator[str]:
    with subscription:
        yield f"retry: {RETRY_MS}\n" + format_sse("hello", {"call_sid": subscription.call_sid})
        deadline = time.monotonic() + MAX_STREAM_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await subscription.get(min(HEARTBEAT_S, left))
            except LiveClosed:
                return
            if message is None:
                yield ": ping\n\n"
                continue
            view = live_view(message)
            if view is not None:
                yield format_sse(view["kind"], view)


def _respond(request: Request, call_sid: str | None) -> Response:
    feed: LiveFeed | None = getattr(request.app.state, "live", None)
    if feed is None:
        return JSONResponse({"error": "live updates are not running"}, status_code=503)
    try:
        subscription = feed.subscribe(call_sid)  # now, so nothing is missed before streaming
    except TooManyClients:
        return JSONResponse({"error": "too many live viewers"}, status_code=503,
                            headers={"Retry-After": "10"})
    return StreamingResponse(
        _stream(subscription),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def all_events(request: Request) -> Response:
    """`GET /events`: live events of every call (the call list)."""
    return _respond(request, None)


async def call_events(request: Request) -> Response:
    """`GET /calls/{call_sid}/events`: live events of one call (its page)."""
    return _respond(request, request.path_params["call_sid"])
