"""The Starlette app factory and its lifespan: the composition root.

Heavy things (models, DB engine, Redis) are built once here and injected through
`app.state.services`; nothing loads at import time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from db.engine import create_db_engine
from db.migrate import upgrade_to_head_async
from db.recorder import CallRecorder
from db.repository import CallRepository
from pipeline.call_summary import CallerMemory
from pipeline.caller_memory import build_caller_store
from pipeline.conversation import Engines
from pipeline.events import CallEvent
from pipeline.work_queue import install_work_queues
from telephony.rest import TwilioRest
from voicebot.admission import Admission, build_admission, record_refusal, voice_guard
from voicebot.limits import BodyLimit, CallsPerAddress, signed_by_twilio
from voicebot.media_endpoint import serve_media_stream
from voicebot.metrics import CallMetrics, metrics_endpoint
from voicebot.services import Services, load_engines
from voicebot.settings import Settings, load_settings
from web.api import api_routes
from web.live import LiveFeed
from web.routes import web_middleware, web_routes
from webhooks.outbound import amd_routes
from webhooks.security import SignatureGuard
from webhooks.status import status_routes
from webhooks.stream_ended import stream_ended_routes
from webhooks.stream_status import stream_status_routes
from webhooks.voice import voice

log = logging.getLogger(__name__)
# How long the database writer lets an event wait for others to share its transaction. The
# viewer's live page does not read the database; what is stored is a tenth of a second later.
DB_LINGER_S = 0.1

EngineLoader = Callable[[Settings], Engines]


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> JSONResponse:
    services: Services | None = getattr(request.app.state, "services", None)
    checks = {"models": services is not None and services.ready, "database": False}
    calls: CallRepository | None = getattr(request.app.state, "calls", None)
    if calls is not None:
        try:
            with anyio.fail_after(2):
                await calls.ping()
            checks["database"] = True
        except Exception as exc:
            log.warning("readyz: database not reachable: %s", type(exc).__name__)
    admission: Admission | None = getattr(request.app.state, "admission", None)
    if admission is not None:
        checks["accepting_calls"] = not admission.draining  # 503 while draining (SIGTERM)
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def media_stream(websocket: WebSocket) -> None:
    await serve_media_stream(websocket)


async def _close_engines(engines: Engines) -> None:
    aclose = getattr(engines.llm, "aclose", None)
    if aclose is not None:
        await aclose()
    close = getattr(engines.llm, "close", None)
    if close is not None:
        await anyio.to_thread.run_sync(close)


def create_app(
    settings: Settings | None = None,
    *,
    engines: Engines | None = None,
    loader: EngineLoader = load_engines,
) -> Starlette:
    """Build the app. Tests pass `engines` (already loaded, or doubles) to skip loading."""
    settings = settings or load_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db_engine = create_db_engine(settings.database_url)
        if settings.sqlite_path is not None:
            # The embedded default migrates itself; PostgreSQL deployments run
            # `voicebot db upgrade` as a release step.
            await upgrade_to_head_async(settings.database_url)
        calls = CallRepository(db_engine)
        app.state.calls = calls
        recorder = CallRecorder(calls, spool_dir=settings.db_spool_dir)
        app.state.recorder = recorder
        loaded = engines or await anyio.to_thread.run_sync(loader, settings)
        services = Services(settings=settings, engines=loaded,
                            twilio_rest=getattr(app.state, "twilio_rest", None), calls=calls)
        app.state.services = services
        # STT/TTS behind bounded work queues; admission control watches their depth.
        queues = install_work_queues(loaded, settings.tts_concurrency)
        admission = build_admission(settings, queues)
        app.state.admission = admission
        metrics = CallMetrics(admission)
        app.state.metrics = metrics
        services.bus.subscribe("metrics", metrics.handle)
        await admission.start()
        await metrics.start()
        # A tenth of a second's events of every call in one transaction (pipeline/events.py).
        services.bus.subscribe_batch("db", recorder.handle_batch, linger_s=DB_LINGER_S)
        # Twilio's callbacks about a call become call events (stored, shown in the viewer).
        app.state.on_amd_result = lambda d: services.bus.publish(
            CallEvent(d["call_sid"], "amd", d))
        app.state.on_stream_status = lambda d: services.bus.publish(
            CallEvent(d["call_sid"], "stream_status", d))
        await recorder.start()
        caller_store = build_caller_store(settings)
        caller_memory = CallerMemory(caller_store, loaded.llm,
                                     max_chars=settings.summary_max_chars)
        services.caller_memory = caller_memory
        services.bus.subscribe("memory", caller_memory.handle)
        await caller_memory.start()
        live = LiveFeed(settings.redis_url, namespace=settings.redis_namespace)
        app.state.live = live
        services.bus.subscribe("live", live.handle)
        await live.start()
        await services.warm_up()
        await services.bus.start()
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # collector, whose full passes over it stopped the event loop for 60-90 ms (every
        # call's frames late at once); only what calls allocate is scanned from here on.
        gc.collect()
        gc.freeze()
        services.ready = True
        log.info("voicebot ready")
        try:
            yield
        finally:
            services.ready = False
            gc.unfreeze()  # an app built again in this process (tests) collects the old one
            await services.bus.stop()
            await metrics.stop()
            await admission.stop()
            await live.stop()
            with anyio.move_on_after(5):
                await caller_memory.wait_idle()
            await caller_memory.stop()
            await caller_store.aclose()
            await recorder.stop()
            await db_engine.dispose()
            if engines is None:
                await _close_engines(loaded)

    guard = SignatureGuard.from_settings(settings)
    per_address = CallsPerAddress(settings.max_calls_per_address, settings.trusted_proxies)
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/twilio/voice", guard.http(voice_guard(voice)), methods=["GET", "POST"]),
        WebSocketRoute("/twilio/media", guard.websocket(
            per_address.websocket(media_stream, exempt=signed_by_twilio(guard)))),
        *status_routes(wrap=guard.http),
        *stream_status_routes(wrap=guard.http),
        *stream_ended_routes(wrap=guard.http),
        *amd_routes(wrap=guard.http),
        *api_routes(),
        *web_routes(),
    ]
    middleware = [Middleware(BodyLimit, max_bytes=settings.max_body_bytes), *web_middleware()]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.calls_per_address = per_address
    # A stream refused before `accept` is stored when Twilio asks /twilio/stream-ended.
    app.state.on_stream_refused = lambda request: record_refusal(request, "stream", "media")
    app.state.settings = settings
    app.state.signature_guard = guard
    if settings.twilio_account_sid and settings.twilio_auth_token:
        app.state.twilio_rest = TwilioRest.from_settings(settings)
    return app
