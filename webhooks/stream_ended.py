"""`POST /twilio/stream-ended`: what the caller hears when our `<Connect><Stream>` ends.

Twilio requests `<Connect action="…">` when the `<Connect>` verb ends and plays the TwiML it
gets back (Twilio's `<Connect>` TwiML docs, "action"); without an action it would go on to the
next verb, and with none left, hang up. A bidirectional stream ends only when the call ends or
the WebSocket closes (Media Streams docs), so by the time this runs, either:

- the stream ran and our side closed it (the bot said goodbye on a server without Twilio REST
  credentials, a call limit): the answer is `<Hangup/>`, as before this endpoint existed;
- the stream never started: the server refused its WebSocket (every line taken, shedding
  load, draining, the models still loading, all with 1013 before `accept`, when Twilio does not
  tell us which call it was). The caller would hear silence, then the line go dead; here they
  hear `BUSY_MESSAGE` and a hang-up, as a call refused at `/twilio/voice` does, and the call
  is stored as ended `refused_stream` (a `refused` event, `where` "media", through the
  app's hook `app.state.on_stream_refused`).

"Started" is what the database says (`CallRepository.stream_started`: the stream's `start`
was stored, by whichever server took it). When that cannot be read (the database is down),
or the call is no longer in progress (the caller hung up: nothing would be played), the answer
is `<Hangup/>`. Signature validation wraps the endpoint from outside, as for the other
callbacks.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.twiml.voice_response import VoiceResponse

from webhooks.outbound import busy_twiml
from webhooks.voice import STREAM_ENDED_PATH

log = logging.getLogger(__name__)

PATH = STREAM_ENDED_PATH
MAX_BODY_BYTES = 16 * 1024  # Twilio's standard request parameters: a few hundred bytes
_CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")

Endpoint = Callable[[Request], Awaitable[Response]]
# Stores the refusal (the app sets `app.state.on_stream_refused`: `voicebot.admission.
# record_refusal`, reason "stream", where "media"); sync or async.
RefusalHook = Callable[[Request], object]


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


def _twiml(body: str) -> Response:
    return Response(body, media_type="application/xml")


async def stream_ended(request: Request) -> Response:
    body = await request.body()  # cached: the signature check may have read it already
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": "body too large"}, status_code=413)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=50))
    call_sid = form.get("CallSid", "").strip()
    if not _CALL_SID.fullmatch(call_sid):
        log.warning("stream-ended callback without a valid CallSid")
        return JSONResponse({"error": "CallSid is required"}, status_code=400)
    if form.get("CallStatus", "in-progress") != "in-progress":
        return _twiml(hangup_twiml())  # the call is over: nothing would be heard
    state = request.app.state
    calls = getattr(state, "calls", None)  # the lifespan sets it; absent while starting up
    if calls is None:
        return _twiml(hangup_twiml())
    try:
        started = await calls.stream_started(call_sid)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        log.warning("stream-ended: cannot read the call call_sid=%s: %s", call_sid, exc)
        return _twiml(hangup_twiml())
    if started:
        log.info("stream ended, hanging up call_sid=%s", call_sid)
        return _twiml(hangup_twiml())
    log.warning("stream never started (refused): busy message call_sid=%s", call_sid)
    hook: RefusalHook | None = getattr(state, "on_stream_refused", None)
    if hook is not None:
        result = hook(request)
        if inspect.isawaitable(result):
            await result
    message = getattr(getattr(state, "settings", None), "busy_message", None)
    return _twiml(busy_twiml(message) if message else hangup_twiml())


def stream_ended_routes(wrap: Callable[[Endpoint], Endpoint] | None = None) -> list[Route]:
    """`POST /twilio/stream-ended`; `wrap` is the hook for signature validation."""
    endpoint = wrap(stream_ended) if wrap is not None else stream_ended
    return [Route(PATH, endpoint, methods=["POST"], name="twilio_stream_ended")]
