"""TwiML for calls we start or hand over: outbound calls, transfers, and "all lines busy".

Outbound calls get the same `<Connect><Stream>` as inbound ones (`webhooks.voice.stream_twiml`),
with `<Parameter>`s that come back in the stream's `start.customParameters`: `direction`
(`outbound`), and, when given, `from` / `to`, `greeting`, `system_prompt` and `amd` (`true`
when Twilio's async answering-machine detection will post its verdict separately).

`POST /twilio/amd` receives that verdict (Twilio's async AMD callback: `CallSid`, `AnsweredBy`,
`MachineDetectionDuration`) and acts on it with the REST client in `app.state.twilio_rest`.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.twiml.voice_response import Dial, VoiceResponse

from telephony.rest import CallNotFound, TwilioRest, TwilioRestError, TwilioUnreachable
from webhooks.voice import stream_twiml

log = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


def outbound_twiml(
    public_host: str,
    greeting: str | None = None,
    system_prompt: str | None = None,
    amd: bool = False,
    *,
    to: str | None = None,
    from_: str | None = None,
) -> str:
    """TwiML connecting an outbound call to `wss://<public_host>/twilio/media`. `to` / `from_`
    become the `to` / `from` parameters, as the voice webhook sets them for inbound calls."""
    parameters = {"direction": "outbound"}
    if from_:
        parameters["from"] = from_
    if to:
        parameters["to"] = to
    if greeting:
        parameters["greeting"] = greeting
    if system_prompt:
        parameters["system_prompt"] = system_prompt
    if amd:
        parameters["amd"] = "true"
    return stream_twiml(public_host, parameters)


def transfer_twiml(number: str, say_text: str | None = None) -> str:
    """TwiML that says `say_text` (if any) then dials `number`; used to redirect a live call."""
    response = VoiceResponse()
    if say_text:
        response.say(say_text)
    dial = Dial()
    dial.number(number)
    response.append(dial)
    return str(response)


def busy_twiml(message: str) -> str:
    """TwiML that says `message` and hangs up: the answer when every line is busy."""
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)


# -- answering-machine detection ------------------------------------------------------------------

AMD_PATH = "/twilio/amd"
# Twilio's AMD `AnsweredBy` values (Answering Machine Detection docs). With
# MachineDetection=DetectMessageEnd the machine verdicts arrive after the greeting's beep or
# silence, the moment to leave a message.
MACHINE_ANSWERS = frozenset(
    {"machine_start", "machine_end_beep", "machine_end_silence", "machine_end_other"}
)
_SID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_BODY_BYTES = 16 * 1024  # an AMD callback is a few hundred bytes


async def amd_callback(request: Request) -> Response:
    """`POST /twilio/amd`: Twilio's async AMD verdict for an outbound call.

    A machine gets `MACHINE_MESSAGE` (then a hang-up) when that setting is set, else a
    hang-up; a fax gets a hang-up; a human (or `unknown`) keeps talking to the bot. The
    verdict also goes to `app.state.on_amd_result(dict)` when the app sets that hook.
    """
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return JSONResponse({"error": "body too large"}, status_code=413)
    form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=50))
    call_sid = form.get("CallSid", "").strip()
    answered_by = form.get("AnsweredBy", "").strip()
    if not _SID.fullmatch(call_sid) or not answered_by:
        log.warning("bad AMD callback: CallSid or AnsweredBy missing")
        return JSONResponse({"error": "CallSid and AnsweredBy are required"}, status_code=400)
    log.info("AMD verdict %s call_sid=%s", answered_by, call_sid)
    state = request.app.state
    hook = getattr(state, "on_amd_result", None)
    if hook is not None:
        result = hook({"call_sid": call_sid, "answered_by": answered_by,
                       "duration_ms": form.get("MachineDetectionDuration") or None})
        if inspect.isawaitable(result):
            await result
    if answered_by not in MACHINE_ANSWERS and answered_by != "fax":
        return Response(status_code=204)
    rest: TwilioRest | None = getattr(state, "twilio_rest", None)
    if rest is None:
        log.warning("AMD says %s but no Twilio REST client is configured call_sid=%s",
                    answered_by, call_sid)
        return Response(status_code=204)
    settings = getattr(state, "settings", None) or state.services.settings
    message = getattr(settings, "machine_message", None)
    try:
        if answered_by in MACHINE_ANSWERS and message:
            await rest.redirect(call_sid, busy_twiml(message))
        else:
            await rest.hang_up(call_sid)
    except CallNotFound:
        pass  # the call ended meanwhile: nothing to do
    except (TwilioRestError, TwilioUnreachable) as exc:
        log.warning("AMD follow-up failed call_sid=%s: %s", call_sid, exc)
        return JSONResponse({"error": "Twilio REST call failed"}, status_code=502)
    return Response(status_code=204)


def amd_routes(wrap: Callable[[Endpoint], Endpoint] | None = None) -> list[Route]:
    """`POST /twilio/amd`; `wrap` is the hook for signature validation."""
    endpoint = wrap(amd_callback) if wrap is not None else amd_callback
    return [Route(AMD_PATH, endpoint, methods=["POST"], name="twilio_amd")]
