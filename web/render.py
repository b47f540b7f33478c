"""Rendering the viewer's pages: one Jinja2 environment and the headers every page carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from web.auth import access_policy, current_viewer
from web.timeline import WATERFALL_PARTS

WEB_DIR = Path(__file__).parent
STATIC_DIR = WEB_DIR / "static"

PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def content_security_policy(request: Request) -> str:
    """Scripts only from our own files (no inline script); inline styles carry the waterfall
    widths; the WebSocket of /talk named explicitly (older browsers' 'self' omits ws:)."""
    host = request.url.netloc
    return (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        f"img-src 'self' data:; connect-src 'self' ws://{host} wss://{host}; "
        "media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )


def _viewer_context(request: Request) -> dict[str, Any]:
    policy = access_policy(request.app)
    viewer = current_viewer(request)
    return {
        "login_required": policy.login_required,
        "logged_in": viewer is not None and viewer.via == "session",
        "csrf": policy.csrf_token(viewer),
    }


templates = Jinja2Templates(directory=WEB_DIR / "templates", context_processors=[_viewer_context])
templates.env.globals["PARTS"] = WATERFALL_PARTS


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    """A rendered template with the viewer's security headers."""
    headers = {**PAGE_HEADERS, "Content-Security-Policy": content_security_policy(request)}
    return templates.TemplateResponse(request, name, context, status_code=status_code,
                                      headers=headers)
