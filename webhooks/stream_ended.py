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

- the stream ran and dropped while the call goes on: its worker crashed, or was stopped past
  its drain grace, or the network between Twilio and us failed. The answer is the same
  `<Connect><Stream>` again, with the call's parties and stream parameters and `resume` set
  to the attempt, so the call reaches a server that is up (behind a load balancer, any of
  them) and goes on: the bot says `RESUME_MESSAGE` and carries on with the call's stored
  transcript (`voicebot.services`). At most `STREAM_RESUMES` times a call (the attempts are
  counted in the action's query string); after that, or with 0, a hang-up.

"Started" and how the call ended are what the database says (`CallRepository.stream_end`:
the stream's `start` was stored, by whichever server took it). Any end but a drop (a `stop`,
the bot hanging up, a limit) is stored with the stream's start before our side closes the
socket (`TwilioStream`'s `on_end`); a drop
(`DROPPED_REASONS`) or no end at all (a worker that died stores nothing) is what gets the
stream connected again. When the call cannot be read (the database is down), or is no longer
in progress (the caller hung up: nothing would be played), the answer is `<Hangup/>`.
Signature validation wraps the endpoint from outside, as for the other callbacks.
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

from db.records import StreamEnd
from telephony.stream import is_drop
from webhooks.outbound import busy_twiml
from webhooks.voice import STREAM_ENDED_PATH, public_host, resume_count, stream_twiml

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
        stream = await calls.stream_end(call_sid)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        log.warning("stream-ended: cannot read the call call_sid=%s: %s", call_sid, exc)
        return _twiml(hangup_twiml())
    if stream is not None and stream.started:
        return _twiml(await _after_a_stream(request, call_sid, stream))
    log.warning("stream never started (refused): busy message call_sid=%s", call_sid)
    hook: RefusalHook | None = getattr(state, "on_stream_refused", None)
    if hook is not None:
        result = hook(request)
        if inspect.isawaitable(result):
            await result
    message = getattr(getattr(state, "settings", None), "busy_message", None)
    return _twiml(busy_twiml(message) if message else hangup_twiml())


async def _free_line(request: Request, call_sid: str) -> None:
    """The dropped stream is over, whether or not the call is connected again: its line goes
    back now (`Admission.free_call`), not when its lease expires. This matters when its
    server died with the machine (no supervisor left to free its leases) and every line is
    taken: the call's own stale lease would refuse the stream that resumes it."""
    admission = getattr(request.app.state, "admission", None)
    if admission is not None:
        await admission.free_call(call_sid)


def _resumes(request: Request) -> int | None:
    """The attempts so far, from the action's query string (`webhooks.voice.stream_twiml`);
    None when it is not a small count (not an action we wrote)."""
    return resume_count(request.query_params.get("resumes", "0"))


async def _after_a_stream(request: Request, call_sid: str, stream: StreamEnd) -> str:
    """TwiML for a call whose stream ran: connect it again if it dropped, else hang up."""
    if not is_drop(stream.end_reason):
        log.info("stream ended (%s), hanging up call_sid=%s", stream.end_reason, call_sid)
        return hangup_twiml()
    await _free_line(request, call_sid)
    settings = getattr(request.app.state, "settings", None)
    allowed = int(getattr(settings, "stream_resumes", 0) or 0)
    resumes = _resumes(request)
    if resumes is None or resumes >= allowed:
        log.warning("stream dropped (%s) and is not connected again (%s of %d); hanging up "
                    "call_sid=%s", stream.end_reason or "no end stored", resumes, allowed,
                    call_sid)
        return hangup_twiml()
    parameters = {**stream.parameters, "from": stream.from_number or "",
                  "to": stream.to_number or "", "direction": stream.direction or "",
                  "resume": str(resumes + 1)}
    log.warning("stream dropped (%s); connecting it again call_sid=%s (%d of %d)",
                stream.end_reason or "no end stored", call_sid, resumes + 1, allowed)
    host = public_host(request, getattr(settings, "public_url", None))
    return stream_twiml(host, parameters, resumes=resumes + 1)


def stream_ended_routes(wrap: Callable[[Endpoint], Endpoint] | None = None) -> list[Route]:
    """`POST /twilio/stream-ended`; `wrap` is the hook for signature validation."""
    endpoint = wrap(stream_ended) if wrap is not None else stream_ended
    return [Route(PATH, endpoint, methods=["POST"], name="twilio_stream_ended")]
