"""`POST /twilio/voice`: the TwiML that connects a call to our bidirectional Media Stream.

Twilio's `<Connect><Stream>` requires a `wss://` URL with no query string; custom values go in
`<Parameter>` elements and come back in the stream's `start.customParameters`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from twilio.twiml.voice_response import Connect, VoiceResponse

MEDIA_PATH = "/twilio/media"
STREAM_ENDED_PATH = "/twilio/stream-ended"  # the <Connect>'s action: webhooks.stream_ended


def public_host(request: Request, public_url: str | None) -> str:
    """The host Twilio reaches us on: PUBLIC_URL's, else the request's Host header."""
    if public_url:
        return urlsplit(public_url).netloc
    return request.headers.get("host") or request.url.netloc


def resume_count(value: str) -> int | None:
    """A resume attempt count as `stream_twiml` writes it (the action's `resumes`, the
    stream's `resume` parameter): a small non-negative number, else None."""
    return int(value) if value.isdigit() and len(value) <= 2 else None


def stream_twiml(host: str, parameters: dict[str, str], resumes: int = 0) -> str:
    """TwiML that connects the call to `wss://<host>/twilio/media` with `parameters`; when the
    stream ends Twilio asks `/twilio/stream-ended` what comes next (`webhooks.stream_ended`:
    a hang-up, the busy message for a stream that was refused, or this TwiML again for a
    stream that dropped). `resumes`: how many times the call's stream was connected again
    before this one, counted in the action's query string."""
    response = VoiceResponse()
    action = f"https://{host}{STREAM_ENDED_PATH}" + (f"?resumes={resumes}" if resumes else "")
    connect = Connect(action=action, method="POST")
    # Stream status callbacks (start, stop, error) come back to /twilio/stream-status.
    stream = connect.stream(url=f"wss://{host}{MEDIA_PATH}",
                            status_callback=f"https://{host}/twilio/stream-status",
                            status_callback_method="POST")
    for name, value in parameters.items():
        if value:
            stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


async def voice(request: Request) -> Response:
    settings = request.app.state.services.settings
    form = await request.form() if request.method == "POST" else request.query_params
    direction = str(form.get("Direction") or "inbound")
    parameters = {
        "from": str(form.get("From") or ""),
        "to": str(form.get("To") or ""),
        "direction": "outbound" if direction.startswith("outbound") else "inbound",
    }
    body = stream_twiml(public_host(request, settings.public_url), parameters)
    return Response(body, media_type="application/xml")
