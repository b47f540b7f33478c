"""Wiring `voicebot.limits` into an app from `create_app`, for tests, as the app factory does.

Until the factory wires the limits itself, tests call `install_limits`; once it does, every
part below sees that and leaves the app alone, so the same tests keep passing either way.
Limit values come from settings (`max_call_s`, `send_timeout_s`, `max_calls_per_address`,
`max_body_bytes`); tests set them with `settings.model_copy(update={...})`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

import voicebot.media_endpoint as media_endpoint
from telephony.stream import TwilioStream
from tests.callkit import Served
from voicebot.app import create_app
from voicebot.limits import BodyLimit, CallsPerAddress, Limits, signed_by_twilio, stream_limits
from voicebot.ws_protocol import DirectTextProtocol


def install_limits(app: Starlette, settings: Any) -> None:
    """Add the body limit and the per-address call limit when the app lacks them."""
    limits = Limits.from_settings(settings)
    if not any(m.cls is BodyLimit for m in app.user_middleware):
        app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    for index, route in enumerate(app.router.routes):
        if not isinstance(route, WebSocketRoute) or route.path != "/twilio/media":
            continue
        if hasattr(route.endpoint, "calls_per_address"):
            return
        guard = app.state.signature_guard
        per_address = CallsPerAddress(limits.max_calls_per_address, settings.trusted_proxies)
        # The guard's wrapper runs first; the limiter goes around it here, which is the same
        # for a signed upgrade (exempt) and an unsigned one (refused by the guard when it is on).
        limited = per_address.websocket(route.endpoint, exempt=signed_by_twilio(guard))
        app.router.routes[index] = WebSocketRoute(route.path, limited, name=route.name)
        app.state.calls_per_address = per_address


@contextlib.contextmanager
def stream_limits_applied(settings: Any, state: Any) -> Iterator[None]:
    """Build every media stream with the per-call limits (a no-op once the endpoint passes
    them itself: its own keyword arguments win over these defaults)."""
    original = media_endpoint.TwilioStream
    media_endpoint.TwilioStream = functools.partial(  # type: ignore[misc]
        TwilioStream, **stream_limits(settings, state))
    try:
        yield
    finally:
        media_endpoint.TwilioStream = original  # type: ignore[misc]


@contextlib.asynccontextmanager
async def limited_server(settings: Any, engines: Any, *, sock: socket.socket | None = None,
                         ws_max_size: int = 1 << 20) -> AsyncIterator[Served]:
    """The app with its limits, served by uvicorn on loopback in this event loop (on `sock`
    when given: tests shrink its buffers); yields a `Served` that sees every event."""
    app = create_app(settings, engines=engines)
    install_limits(app, settings)
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", ws_max_size=ws_max_size,
                            timeout_graceful_shutdown=2, ws=DirectTextProtocol)
    server = uvicorn.Server(config)
    with stream_limits_applied(settings, app.state):
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("server stopped during startup")
                await asyncio.sleep(0.02)
            served = Served(app, f"http://127.0.0.1:{port}")
            app.state.services.bus.subscribe("test", served.add)
            yield served
        finally:
            server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=15)
