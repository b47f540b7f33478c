"""The viewer's routes and middleware, for the app factory to mount.

    routes = [..., *api_routes(), *web_routes()]
    Starlette(routes=routes, middleware=web_middleware(), lifespan=lifespan)

The lifespan owns the `LiveFeed` (`app.state.live`, subscribed to the event bus as "live").
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles

from web.auth import ViewerAuth
from web.login import login_routes
from web.pages import call_page, call_timeline, calls_page, talk_page
from web.render import STATIC_DIR
from web.sse import all_events, call_events
from web.talk import web_media


def web_routes() -> list[BaseRoute]:
    """Pages, live events, the browser call endpoint, login and static files."""
    return [
        Route("/", calls_page, methods=["GET"], name="calls_page"),
        Route("/calls/{call_sid}", call_page, methods=["GET"], name="call_page"),
        Route("/calls/{call_sid}/timeline", call_timeline, methods=["GET"], name="call_timeline"),
        Route("/calls/{call_sid}/events", call_events, methods=["GET"], name="call_events"),
        Route("/events", all_events, methods=["GET"], name="events"),
        Route("/talk", talk_page, methods=["GET"], name="talk_page"),
        WebSocketRoute("/web/media", web_media, name="web_media"),
        *login_routes(),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def web_middleware() -> list[Middleware]:
    """The viewer login (`ViewerAuth`); it leaves /twilio/*, /healthz and /readyz open."""
    return [Middleware(ViewerAuth)]
