"""Serving one Media Streams WebSocket: admission, then a `TwilioStream` until it ends.

Shared by `/twilio/media` (phone calls) and `/web/media` (the browser talk page).
"""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

from pipeline.conversation import CallInfo, Conversation
from telephony.playout import TwilioPlayout
from telephony.stream import ConversationFactory, EndStream, TwilioStream
from voicebot.admission import Admission, Lease, admit_media_stream, release_media_stream
from voicebot.limits import stream_limits
from voicebot.services import Services

log = logging.getLogger(__name__)


async def serve_media_stream(
    websocket: WebSocket,
    factory: ConversationFactory | None = None,
    *,
    default_direction: str = "inbound",
) -> None:
    # MAX_CONCURRENT_CALLS across every worker (Redis leases); also refused while the models
    # load, while draining and while the STT/TTS queues are deep (`voicebot.admission`).
    # 1013 before `accept`.
    services: Services | None = getattr(websocket.app.state, "services", None)
    ready = services is not None and services.ready
    admitted, lease = await admit_media_stream(websocket, default_direction, ready)
    if not admitted:
        return
    assert services is not None
    make = factory or services.new_conversation
    if lease is not None:
        make = _binding(websocket, lease, make)
    try:
        await _serve_media_stream(websocket, services, make, default_direction)
    finally:
        await release_media_stream(websocket, lease)


def _binding(websocket: WebSocket, lease: Lease, make: ConversationFactory
             ) -> ConversationFactory:
    """`make`, then the lease noted as the call's (`Admission.bind`) once `start` has named
    it: if this stream drops with its server, `/twilio/stream-ended` gives the line back
    before connecting the call again."""
    admission: Admission | None = getattr(websocket.app.state, "admission", None)

    async def make_and_bind(info: CallInfo, playout: TwilioPlayout, end: EndStream
                            ) -> Conversation:
        conversation = await make(info, playout, end)
        if admission is not None:
            await admission.bind(lease, info.call_sid)
        return conversation

    return make_and_bind


async def _serve_media_stream(
    websocket: WebSocket,
    services: Services,
    factory: ConversationFactory,
    default_direction: str,
) -> None:
    settings = services.settings
    await websocket.accept()
    services.active_calls += 1
    try:
        stream = TwilioStream(
            websocket,
            factory,
            lead_ms=settings.playout_lead_ms,
            chunk_ms=settings.playout_chunk_ms,
            max_message_bytes=settings.max_message_bytes,
            default_direction=default_direction,
            **stream_limits(settings, websocket.app.state),
        )
        metrics = getattr(websocket.app.state, "metrics", None)
        if metrics is not None:
            stream.on_frame_lag = metrics.observe_frame_lag  # /metrics: inbound frame lag
        await stream.run()
    finally:
        services.active_calls -= 1
