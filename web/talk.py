"""`WS /web/media`: a browser call, spoken in the Twilio Media Streams protocol.

The `/talk` page captures the microphone, encodes 20 ms μ-law frames and talks to this
endpoint exactly as Twilio would (connected, start, media, mark echoes, stop), so the call runs
through the same `TwilioStream` and `Conversation` as a phone call and is stored like one, with
direction "web". The viewer login guards it (`web.auth.ViewerAuth`), not Twilio signatures;
the browser picks the call SID, so only `WB` + 32 hex digits is accepted and the call is
always recorded as a web call: a browser cannot write into a phone call's transcript.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from starlette.websockets import WebSocket

from pipeline.conversation import CallInfo, Conversation
from telephony.playout import TwilioPlayout
from telephony.stream import ConversationFactory, EndStream
from voicebot.media_endpoint import serve_media_stream
from voicebot.services import Services

log = logging.getLogger(__name__)

WEB_CALL_SID = re.compile(r"WB[0-9a-f]{32}")


class NotAWebCall(Exception):
    """The browser's `start` named a call SID that a browser call may not use."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        super().__init__(f"{call_sid[:40]!r} is not a web call SID (WB + 32 hex digits)")


def web_conversations(services: Services) -> ConversationFactory:
    """A conversation factory for `TwilioStream` that only makes web calls."""

    async def make(info: CallInfo, sink: TwilioPlayout, end_stream: EndStream) -> Conversation:
        if not WEB_CALL_SID.fullmatch(info.call_sid):
            raise NotAWebCall(info.call_sid)
        web = dataclasses.replace(info, direction="web", from_number=None, to_number=None)
        return await services.new_conversation(web, sink, end_stream)

    return make


async def web_media(websocket: WebSocket) -> None:
    services: Services | None = getattr(websocket.app.state, "services", None)
    factory = web_conversations(services) if services is not None else None
    await serve_media_stream(websocket, factory, default_direction="web")
