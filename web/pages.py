"""The viewer's pages: the call list (`/`), one call (`/calls/{sid}`) and `/talk`.

Pages are rendered in full on the server; the static scripts then keep them live from the SSE
streams (`web.sse`) and resync from `/calls/{sid}/timeline` after a reconnect.
"""

from __future__ import annotations

import logging
import math
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from db.engine import is_outage
from db.repository import CallNotFound, CallRepository
from web.render import page
from web.timeline import call_view, timeline

log = logging.getLogger(__name__)

PAGE_SIZE = 25


def _calls(request: Request) -> CallRepository:
    return request.app.state.calls  # type: ignore[no-any-return]


def normalize_number(text: str) -> str:
    """What people type ("+1 (555) 010-0001") as stored digits ("+15550100001")."""
    text = text.strip()
    digits = re.sub(r"\D", "", text)
    return ("+" + digits if text.startswith("+") else digits) if digits else text[:64]


def _page_number(value: str | None) -> int:
    try:
        return max(1, min(int(value or 1), 100_000))
    except ValueError:
        return 1


def _unavailable(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable for %s: %s", request.url.path, exc)
    return page(request, "error.html", {"title": "Database unavailable",
                                        "message": "The database is not reachable right now."},
                status_code=503)


async def calls_page(request: Request) -> Response:
    """`GET /`: calls newest first, searchable by number, paginated, live."""
    number = normalize_number(request.query_params.get("number", ""))
    page_no = _page_number(request.query_params.get("page"))
    repo = _calls(request)
    try:
        found = await repo.list_calls(page=page_no, page_size=PAGE_SIZE, number=number or None)
        # The list needs turns and median V2V per call: one read per call on the page.
        rows = []
        for record in found.calls:
            try:
                rows.append(call_view(await repo.get_call(record.call_sid)))
            except CallNotFound:
                continue  # deleted between the two reads
    except Exception as exc:
        if not is_outage(exc):
            raise
        return _unavailable(request, exc)
    pages = max(1, math.ceil(found.total / PAGE_SIZE))
    return page(request, "calls.html", {
        "title": "Calls",
        "calls": rows,
        "number": number,
        "page_no": page_no,
        "pages": pages,
        "total": found.total,
        # New calls slide in live only where they belong: the first page of the full list.
        "live_inserts": page_no == 1 and not number,
    })


async def call_page(request: Request) -> Response:
    """`GET /calls/{call_sid}`: the transcript as a chat, latency per turn, metadata."""
    call_sid = request.path_params["call_sid"]
    try:
        detail = await _calls(request).get_call(call_sid)
    except CallNotFound:
        return page(request, "error.html", {"title": "Call not found",
                                            "message": f"No call {call_sid} is stored."},
                    status_code=404)
    except Exception as exc:
        if not is_outage(exc):
            raise
        return _unavailable(request, exc)
    call = call_view(detail)
    return page(request, "call.html", {
        "title": f"Call {call['number']}",
        "call": call,
        "items": timeline(detail),
    })


async def call_timeline(request: Request) -> Response:
    """`GET /calls/{call_sid}/timeline`: the page's items as JSON (for a live resync)."""
    call_sid = request.path_params["call_sid"]
    try:
        detail = await _calls(request).get_call(call_sid)
    except CallNotFound:
        return JSONResponse({"error": "call not found", "call_sid": call_sid}, status_code=404)
    except Exception as exc:
        if not is_outage(exc):
            raise
        return JSONResponse({"error": "database unavailable"}, status_code=503)
    return JSONResponse({"call": call_view(detail), "items": timeline(detail)},
                        headers={"Cache-Control": "no-store"})


async def talk_page(request: Request) -> Response:
    """`GET /talk`: call the bot from this browser."""
    return page(request, "talk.html", {"title": "Talk to the bot"})
