"""Who may use the viewer: the login in front of pages, live events, /talk, /web/media and /api.

A login is required when the server listens on anything but loopback, or whenever
`UI_PASSWORD` is set (`UI_REQUIRE_LOGIN=always|never` overrides the automatic choice). People
log in with the password and get a signed session cookie; scripts send
`Authorization: Bearer <UI_TOKEN>`. Twilio's endpoints (`/twilio/*`, which carry their own
signatures), health checks, `/metrics`, the login page and static assets stay open.

Cookies are signed with HMAC-SHA256 under `UI_SECRET`, or under a random per-process secret
(sessions then end on restart and are not shared between worker processes). WebSocket
upgrades from another origin are refused even when no login is needed: a page on another site
must not place calls through a viewer's browser.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from webhooks.security import TrustedProxies

SESSION_COOKIE = "voicebot_session"
SESSION_MAX_AGE_S = 12 * 3600
SCOPE_KEY = "voicebot.viewer"  # where the middleware leaves the `Viewer` for handlers
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/logout"})
OPEN_PREFIXES = ("/twilio/", "/static/")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

_PROCESS_SECRET = secrets.token_bytes(32)

LoginMode = Literal["auto", "always", "never"]


def is_loopback(host: str | None) -> bool:
    """Whether `host` (the address the server listens on) only accepts local connections."""
    if not host:
        return True
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signed, expiring tokens (HMAC-SHA256); `purpose` keeps one kind from passing as another."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, purpose: str, body: str) -> str:
        message = f"{purpose}|{body}".encode()
        return _b64(hmac.new(self._secret, message, hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict[str, Any], max_age_s: float) -> str:
        data = {**payload, "exp": int(time.time() + max_age_s)}
        body = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{body}.{self._mac(purpose, body)}"

    def verify(self, purpose: str, token: str | None) -> dict[str, Any] | None:
        """The payload, or None when the token is malformed, forged or expired."""
        if not token or token.count(".") != 1 or len(token) > 4096:
            return None
        body, mac = token.split(".")
        if not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        try:
            data = json.loads(_unb64(body))
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("exp"), int):
            return None
        return data if data["exp"] > time.time() else None

    def digest(self, purpose: str, value: str) -> str:
        return self._mac(purpose, value)


class FailedLogins:
    """Failed attempts per client address in a sliding window; too many and it is blocked."""

    def __init__(self, limit: int = 5, window_s: float = 300.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds until `address` may try again (0 when it may now)."""
        failures = self._failures.get(address)
        if not failures:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if len(failures) < self.limit:
            return 0.0
        return failures[0] + self.window_s - now

    def record(self, address: str) -> None:
        failures = self._failures.setdefault(address, deque(maxlen=self.limit))
        failures.append(time.monotonic())
        self._failures.move_to_end(address)
        while len(self._failures) > self._max_clients:
            self._failures.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Viewer:
    """How this request got in: "open" (no login needed), "session" or "token"."""

    via: Literal["open", "session", "token"]
    session_id: str | None = None


class AccessPolicy:
    """The app's login rules and secrets, read once from settings and `app.state.listen_host`."""

    def __init__(
        self,
        *,
        password: str | None = None,
        token: str | None = None,
        secret: str | None = None,
        mode: LoginMode = "auto",
        listen_host: str | None = None,
        public_url: str | None = None,
        trusted_proxies: str | None = None,
    ) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"UI_REQUIRE_LOGIN must be auto, always or never, not {mode!r}")
        self.password = password or None
        self.token = token or None
        self.mode = mode
        self.listen_host = listen_host
        self.public_url = public_url
        self.trusted = TrustedProxies(trusted_proxies)
        self.signer = Signer(secret.encode() if secret else _PROCESS_SECRET)
        self.failures = FailedLogins()

    @classmethod
    def from_app(cls, app: Any) -> AccessPolicy:
        state = app.state
        settings = getattr(state, "settings", None)
        return cls(
            password=getattr(settings, "ui_password", None),
            token=getattr(settings, "ui_token", None),
            secret=getattr(settings, "ui_secret", None),
            mode=getattr(settings, "ui_require_login", None) or "auto",
            listen_host=getattr(state, "listen_host", None),
            public_url=getattr(settings, "public_url", None),
            trusted_proxies=getattr(settings, "trusted_proxies", None),
        )

    @property
    def login_required(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self.password is not None or not is_loopback(self.listen_host)

    # -- identities ---------------------------------------------------------------------
    def new_session(self) -> str:
        return self.signer.sign("session", {"sid": secrets.token_urlsafe(16)}, SESSION_MAX_AGE_S)

    def csrf_token(self, viewer: Viewer | None) -> str:
        """The form token for POSTs made by this viewer (bound to the session)."""
        session = viewer.session_id if viewer and viewer.session_id else "-"
        return self.signer.digest("csrf", session)

    def check_csrf(self, viewer: Viewer | None, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(viewer))

    def token_matches(self, presented: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            presented.encode(), self.token.encode())

    def password_matches(self, presented: str) -> bool:
        return self.password is not None and hmac.compare_digest(
            presented.encode(), self.password.encode())

    def viewer_of(self, conn: HTTPConnection) -> Viewer | None:
        session = self.signer.verify("session", conn.cookies.get(SESSION_COOKIE))
        if session is not None and isinstance(session.get("sid"), str):
            return Viewer("session", session["sid"])
        return None

    # -- where requests come from -------------------------------------------------------
    def _forwarded(self, conn: HTTPConnection, header: str) -> str | None:
        """A proxy's X-Forwarded-* value, believed only from TRUSTED_PROXIES."""
        if conn.client is None or conn.client.host not in self.trusted:
            return None
        value = conn.headers.get(header)
        if not value:
            return None
        # Proxies append: the rightmost value is the one our direct peer wrote.
        return value.split(",")[-1].strip() or None

    def client_address(self, conn: HTTPConnection) -> str:
        """The browser's address (what failed logins are counted against)."""
        forwarded = self._forwarded(conn, "x-forwarded-for")
        return forwarded or (conn.client.host if conn.client else "-")

    def allowed_hosts(self, conn: HTTPConnection) -> set[str]:
        hosts = {conn.headers.get("host", "").lower(),
                 (self._forwarded(conn, "x-forwarded-host") or "").lower()}
        if self.public_url:
            hosts.add(urlsplit(self.public_url).netloc.lower())
        return hosts - {""}

    def same_origin(self, conn: HTTPConnection) -> bool:
        """False when a browser says the request comes from another site."""
        headers = conn.headers
        if headers.get("sec-fetch-site") == "cross-site":
            return False
        origin = headers.get("origin") or headers.get("referer")
        if not origin or origin == "null":
            return origin is None  # "null" is an opaque origin: never ours
        return urlsplit(origin).netloc.lower() in self.allowed_hosts(conn)

    def is_https(self, conn: HTTPConnection) -> bool:
        if conn.url.scheme in ("https", "wss"):
            return True
        if self._forwarded(conn, "x-forwarded-proto") == "https":
            return True
        # Behind a TLS tunnel (ngrok) we see plain http, but the browser is on PUBLIC_URL.
        public = urlsplit(self.public_url or "")
        host = conn.headers.get("host", "").lower()
        return public.scheme == "https" and host == public.netloc.lower()


def access_policy(app: Any) -> AccessPolicy:
    """The app's `AccessPolicy`, built on first use and kept on `app.state.ui_access`."""
    policy: AccessPolicy | None = getattr(app.state, "ui_access", None)
    if policy is None:
        policy = AccessPolicy.from_app(app)
        app.state.ui_access = policy
    return policy


def current_viewer(conn: HTTPConnection) -> Viewer | None:
    """The viewer the middleware let in (None outside its protected paths)."""
    return conn.scope.get(SCOPE_KEY)


class ViewerAuth:
    """ASGI middleware: lets a request through to the viewer only with a login (when needed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_open_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        policy = access_policy(scope["app"])
        if scope["type"] == "websocket" and not policy.same_origin(conn):
            await send({"type": "websocket.close", "code": 1008, "reason": "cross-origin"})
            return
        if not policy.login_required:
            scope[SCOPE_KEY] = policy.viewer_of(conn) or Viewer("open")
            await self.app(scope, receive, send)
            return
        viewer, denied = self._identify(policy, conn)
        if denied is not None or viewer is None:
            await self._deny(scope, receive, send, denied or self._login_needed(conn))
            return
        scope[SCOPE_KEY] = viewer
        await self.app(scope, receive, send)

    @staticmethod
    def _identify(
        policy: AccessPolicy, conn: HTTPConnection
    ) -> tuple[Viewer | None, Response | None]:
        """Who this is (token or session cookie), or the refusal a wrong token earns."""
        authorization = conn.headers.get("authorization", "")
        if authorization[:7].lower() == "bearer ":
            address = policy.client_address(conn)
            wait = policy.failures.retry_after(address)
            if wait > 0:
                return None, _too_many(wait)
            if policy.token_matches(authorization[7:].strip()):
                return Viewer("token"), None
            policy.failures.record(address)
            return None, _unauthorized("invalid token")
        return policy.viewer_of(conn), None

    @staticmethod
    def _login_needed(conn: HTTPConnection) -> Response:
        wants_page = (
            conn.scope["type"] == "http"
            and conn.scope.get("method") in ("GET", "HEAD")
            and "text/html" in conn.headers.get("accept", "")
            and not conn.url.path.startswith("/api/")
        )
        if wants_page:
            target = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return _unauthorized("login required")

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        if scope["type"] == "websocket":
            # Before `accept`, a close becomes an HTTP 403 for the client.
            await send({"type": "websocket.close", "code": 1008, "reason": "login required"})
            return
        await response(scope, receive, send)


def _unauthorized(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="voicebot"'})


def _too_many(wait_s: float) -> Response:
    return JSONResponse({"error": "too many failed attempts"}, status_code=429,
                        headers={"Retry-After": str(max(1, round(wait_s)))})
