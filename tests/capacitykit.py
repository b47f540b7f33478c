"""Admission control, metrics and draining on an app from `create_app`, for tests.

`with_capacity(app)` adds what `voicebot.app` wires in (work queues, `app.state.admission`,
`app.state.metrics`, `GET /metrics`, busy TwiML at `/twilio/voice`, leases on `/twilio/media`,
`/readyz` 503 while draining), each only if the app factory does not provide it already, so
these tests run the same with or without that wiring in `create_app`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from pipeline.work_queue import install_work_queues
from voicebot.admission import (
    admit_media_stream,
    build_admission,
    release_media_stream,
    voice_guard,
)
from voicebot.metrics import CallMetrics, metrics_endpoint


def _route_index(app: Starlette, path: str) -> int | None:
    for index, route in enumerate(app.router.routes):
        if getattr(route, "path", None) == path:
            return index
    return None


def with_capacity(app: Starlette) -> Starlette:
    if _route_index(app, "/metrics") is not None:
        return app  # the app factory wires it in itself
    routes = app.router.routes
    routes.append(Route("/metrics", metrics_endpoint))
    voice_at = _route_index(app, "/twilio/voice")
    if voice_at is not None:
        old = routes[voice_at]
        routes[voice_at] = Route(old.path, voice_guard(old.endpoint), methods=["GET", "POST"])
    media_at = _route_index(app, "/twilio/media")
    if media_at is not None:
        inner_media = routes[media_at].endpoint

        async def admitted_media(websocket: WebSocket) -> None:
            admitted, lease = await admit_media_stream(websocket, "inbound")
            if not admitted:
                return
            try:
                await inner_media(websocket)
            finally:
                await release_media_stream(websocket, lease)

        routes[media_at] = WebSocketRoute("/twilio/media", admitted_media)
    ready_at = _route_index(app, "/readyz")
    if ready_at is not None:
        inner_ready = routes[ready_at].endpoint

        async def readyz(request: Request) -> Response:
            admission = getattr(request.app.state, "admission", None)
            if admission is not None and admission.draining:
                return JSONResponse({"ready": False, "checks": {"accepting_calls": False}},
                                    status_code=503)
            return await inner_ready(request)

        routes[ready_at] = Route("/readyz", readyz)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Any]:
        async with inner(app) as state:
            services = app.state.services
            settings = services.settings
            queues = install_work_queues(services.engines, getattr(settings, "tts_concurrency",
                                                                   None))
            admission = build_admission(settings, queues)
            metrics = CallMetrics(admission)
            app.state.admission = admission
            app.state.metrics = metrics
            services.bus.subscribe("metrics", metrics.handle)
            await admission.start()
            await metrics.start()
            try:
                yield state
            finally:
                await metrics.stop()
                await admission.stop()

    app.router.lifespan_context = lifespan
    return app


def create_app_from_env() -> Starlette:
    """`voicebot.workers.create_app_from_env` with the capacity wiring (for subprocess tests)."""
    from voicebot.workers import create_app_from_env as create

    return with_capacity(create())
