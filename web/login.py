"""`GET/POST /login` and `POST /logout`: the viewer's password form and session cookie.

The form is CSRF-safe three ways: the session cookie is SameSite=Lax, a POST from another
origin (Origin/Referer/Sec-Fetch-Site) is refused, and the form carries a signed token bound to
a short-lived cookie (login) or to the session (logout). Failed passwords count against the
client's address (`FailedLogins`): past the limit the answer is 429 until the window passes.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from web.auth import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    AccessPolicy,
    access_policy,
)
from web.render import page

log = logging.getLogger(__name__)

FORM_COOKIE = "voicebot_login"
FORM_MAX_AGE_S = 3600


def safe_next(target: str | None) -> str:
    """Only a path on this site: never `//evil.example` or an absolute URL."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def _login_page(
    request: Request, policy: AccessPolicy, *, error: str | None = None, status: int = 200,
    target: str | None = None,
) -> Response:
    nonce = secrets.token_urlsafe(16)
    form_token = policy.signer.sign("login-form", {"n": nonce}, FORM_MAX_AGE_S)
    response = page(request, "login.html", {
        "title": "Log in",
        "error": error,
        "form_token": form_token,
        "next": safe_next(target or request.query_params.get("next")),
        "has_password": policy.password is not None,
        "listen_host": policy.listen_host or "127.0.0.1",
    }, status_code=status)
    response.set_cookie(FORM_COOKIE, nonce, max_age=FORM_MAX_AGE_S, httponly=True,
                        samesite="lax", secure=policy.is_https(request), path="/login")
    return response


async def login_form(request: Request) -> Response:
    policy = access_policy(request.app)
    if not policy.login_required:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return _login_page(request, policy)


async def login(request: Request) -> Response:
    policy = access_policy(request.app)
    if not policy.same_origin(request):
        return PlainTextResponse("cross-site form posts are refused", status_code=403)
    form = await request.form()
    target = safe_next(str(form.get("next") or ""))
    address = policy.client_address(request)
    wait = policy.failures.retry_after(address)
    if wait > 0:
        response = _login_page(request, policy, status=429, target=target,
                               error=f"Too many failed attempts. Try again in {wait:.0f} s.")
        response.headers["Retry-After"] = str(max(1, round(wait)))
        return response
    signed = policy.signer.verify("login-form", str(form.get("form_token") or ""))
    cookie = request.cookies.get(FORM_COOKIE, "")
    if signed is None or not hmac.compare_digest(str(signed.get("n", "")), cookie):
        return _login_page(request, policy, status=403, target=target,
                           error="The form expired. Please enter the password again.")
    if policy.password is None:
        return _login_page(request, policy, status=403, target=target)
    if not policy.password_matches(str(form.get("password") or "")):
        policy.failures.record(address)
        log.warning("viewer login failed from %s", address)
        return _login_page(request, policy, status=401, target=target, error="Wrong password.")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, policy.new_session(), max_age=SESSION_MAX_AGE_S,
                        httponly=True, samesite="lax", secure=policy.is_https(request), path="/")
    response.delete_cookie(FORM_COOKIE, path="/login")
    return response


async def logout(request: Request) -> Response:
    policy = access_policy(request.app)
    viewer = policy.viewer_of(request)
    form = await request.form()
    if not policy.same_origin(request) or not policy.check_csrf(
            viewer, str(form.get("csrf") or "")):
        return PlainTextResponse("bad form token", status_code=403)
    response = RedirectResponse("/login" if policy.login_required else "/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="lax",
                           secure=policy.is_https(request))
    return response


def login_routes() -> list[Route]:
    return [
        Route("/login", login_form, methods=["GET"], name="login_form"),
        Route("/login", login, methods=["POST"], name="login"),
        Route("/logout", logout, methods=["POST"], name="logout"),
    ]
