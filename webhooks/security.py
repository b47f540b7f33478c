"""`X-Twilio-Signature` validation for Twilio's webhooks and the Media Streams WebSocket upgrade.

Twilio signs every request with HMAC-SHA1 over the full URL it requested (scheme through query
string) followed by the POST parameters sorted by name, keyed by the account's auth token
(Twilio's "Webhooks security" docs); `twilio.request_validator.RequestValidator` does the
arithmetic. The hard part is the URL: behind ngrok or a TLS proxy we see `http://127.0.0.1:8000`
while Twilio signed `https://abc.ngrok.app`. So the URL is `PUBLIC_URL` + path (+ query) when
that is set; otherwise the request's own URL, where `X-Forwarded-Proto` / `X-Forwarded-Host` are
believed only from a peer listed in `TRUSTED_PROXIES`. The WebSocket upgrade carries no
parameters and its URL is always `wss://` (the only scheme `<Stream>` accepts).

Validation is on whenever `TWILIO_AUTH_TOKEN` is set; only `TWILIO_VALIDATE_SIGNATURES=false`
turns it off, with a warning at startup. Neither the token nor a signature is ever logged.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from starlette.applications import Starlette
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.websockets import WebSocket
from twilio.request_validator import RequestValidator

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-twilio-signature"
# Twilio's webhooks are a few hundred bytes; an unauthenticated body is never read past this.
MAX_SIGNED_BODY_BYTES = 64 * 1024
# RFC 6455 §7.4.1: 1008 "policy violation". Closing before `accept` makes the ASGI server
# answer the upgrade with HTTP 403, which is what Twilio sees.
WS_POLICY_VIOLATION = 1008
_FORM = "application/x-www-form-urlencoded"

HttpEndpoint = Callable[[Request], Awaitable[Response]]
WebSocketEndpoint = Callable[[WebSocket], Awaitable[None]]
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The direct peers whose `X-Forwarded-Proto` / `X-Forwarded-Host` we believe.

    Built from `TRUSTED_PROXIES`: comma-separated IP addresses or CIDR blocks
    (`127.0.0.1, 10.0.0.0/8`); `*` trusts every peer (platforms whose proxy addresses vary).
    An entry that is not an address raises `ValueError` naming the setting.
    """

    def __init__(self, spec: str | Iterable[str] | None = None) -> None:
        entries = spec.split(",") if isinstance(spec, str) else list(spec or [])
        self.any = False
        self.networks: list[_Network] = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry == "*":
                self.any = True
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR") from None

    def __bool__(self) -> bool:
        return self.any or bool(self.networks)

    def __contains__(self, host: object) -> bool:
        if self.any:
            return True
        if not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # a unix socket path, or TestClient's "testclient"
            return False
        return any(address in network for network in self.networks)


def _last(value: str | None) -> str | None:
    # Proxies append to these headers; the rightmost value is the one our direct peer wrote.
    if not value:
        return None
    return value.split(",")[-1].strip() or None


def _peer(conn: HTTPConnection) -> str:
    return conn.client.host if conn.client else "?"


def _path_and_query(conn: HTTPConnection) -> str:
    # The path as it came on the request line: Twilio signs the URL's exact characters.
    raw = conn.scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(conn.scope.get("path", "/"))
    query = conn.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


class SignatureGuard:
    """Checks `X-Twilio-Signature` on webhooks and on the media WebSocket upgrade.

    `http(endpoint)` and `websocket(endpoint)` wrap Starlette endpoints: an unsigned or wrongly
    signed request gets 403 (HTTP) or is refused before `accept` with code 1008 (WebSocket),
    and a log line with the peer address and the URL that was checked. With no auth token, or
    with `enabled=False`, every request passes.
    """

    def __init__(
        self,
        auth_token: str | None,
        *,
        public_url: str | None = None,
        trusted_proxies: TrustedProxies | str | Iterable[str] | None = None,
        enabled: bool = True,
    ) -> None:
        self._validator = RequestValidator(auth_token) if auth_token and enabled else None
        self.public_url = public_url.rstrip("/") if public_url else None
        self.trusted_proxies = (
            trusted_proxies
            if isinstance(trusted_proxies, TrustedProxies)
            else TrustedProxies(trusted_proxies)
        )

    @classmethod
    def from_settings(cls, settings: Any) -> SignatureGuard:
        """The guard the settings ask for; logs once when validation is off."""
        token: str | None = getattr(settings, "twilio_auth_token", None)
        enabled = bool(getattr(settings, "twilio_validate_signatures", True))
        if token and not enabled:
            log.warning(
                "TWILIO_VALIDATE_SIGNATURES=false: Twilio signatures are NOT checked; anyone who "
                "can reach this server can post fake calls to /twilio/* and open media streams"
            )
        elif not token:
            log.info("TWILIO_AUTH_TOKEN is not set: Twilio signatures are not checked")
        return cls(
            token,
            public_url=getattr(settings, "public_url", None),
            trusted_proxies=getattr(settings, "trusted_proxies", None),
            enabled=enabled,
        )

    @property
    def enabled(self) -> bool:
        return self._validator is not None

    # -- which URL Twilio signed ------------------------------------------------------------------

    def _forwarded(self, conn: HTTPConnection) -> tuple[str | None, str | None]:
        if conn.client is None or conn.client.host not in self.trusted_proxies:
            return None, None
        return _last(conn.headers.get("x-forwarded-proto")), _last(
            conn.headers.get("x-forwarded-host")
        )

    def _own_host(self, conn: HTTPConnection) -> str:
        _, forwarded_host = self._forwarded(conn)
        return forwarded_host or conn.headers.get("host") or conn.url.netloc

    def http_url(self, conn: HTTPConnection) -> str:
        """The URL Twilio requested for this webhook, as it signed it."""
        if self.public_url:
            return self.public_url + _path_and_query(conn)
        forwarded_proto, _ = self._forwarded(conn)
        scheme = forwarded_proto or conn.url.scheme
        return f"{scheme}://{self._own_host(conn)}{_path_and_query(conn)}"

    def websocket_urls(self, conn: HTTPConnection) -> list[str]:
        """The `wss://` URLs Twilio may have signed for this upgrade (first is the usual one).

        `webhooks.voice.stream_twiml` puts only PUBLIC_URL's host in the stream URL; a
        PUBLIC_URL with a path prefix also gets the prefixed form checked.
        """
        tail = _path_and_query(conn)
        if not self.public_url:
            return [f"wss://{self._own_host(conn)}{tail}"]
        parts = urlsplit(self.public_url)
        urls = [f"wss://{parts.netloc}{tail}"]
        if parts.path.strip("/"):
            urls.append(f"wss://{parts.netloc}{parts.path.rstrip('/')}{tail}")
        return urls

    # -- checks -------------------------------------------------------------------------------------

    async def verify_http(self, request: Request) -> bool:
        """True when the webhook carries a valid signature (or validation is off).

        Reads the body through `request.body()`, which caches it, so the endpoint can still
        read the form afterwards.
        """
        if self._validator is None:
            return True
        url = self.http_url(request)
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            return self._reject(request, url, "missing signature")
        params: Any = {}
        if request.method == "POST":
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_SIGNED_BODY_BYTES:
                return self._reject(request, url, "body too large to check")
            body = await request.body()
            if len(body) > MAX_SIGNED_BODY_BYTES:
                return self._reject(request, url, "body too large to check")
            content_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                return self._reject(request, url, "body is not UTF-8")
            if content_type.lower() == _FORM:
                params = ImmutableMultiDict(parse_qsl(text, keep_blank_values=True))
            elif "bodySHA256" in request.query_params:
                # JSON bodies are signed through a `bodySHA256` query parameter instead.
                params = text
        if self._validator.validate(url, params, signature):
            return True
        return self._reject(request, url, "invalid signature")

    def verify_websocket(self, websocket: HTTPConnection) -> bool:
        """True when the WebSocket upgrade carries a valid signature (or validation is off)."""
        if self._validator is None:
            return True
        urls = self.websocket_urls(websocket)
        signature = websocket.headers.get(SIGNATURE_HEADER)
        if not signature:
            return self._reject(websocket, urls[0], "missing signature")
        if any(self._validator.validate(url, {}, signature) for url in urls):
            return True
        return self._reject(websocket, urls[0], "invalid signature")

    def _reject(self, conn: HTTPConnection, url: str, reason: str) -> bool:
        # The URL is logged because a PUBLIC_URL that differs from Twilio's is the usual cause.
        log.warning(
            "rejected Twilio request: %s; peer=%s path=%s checked_url=%s",
            reason, _peer(conn), conn.url.path, url,
        )
        return False

    # -- endpoint wrappers --------------------------------------------------------------------------

    def http(self, endpoint: HttpEndpoint) -> HttpEndpoint:
        """Wrap a request/response endpoint: 403 unless the request is signed by Twilio."""

        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            if not await self.verify_http(request):
                return PlainTextResponse("invalid Twilio signature", status_code=403)
            return await endpoint(request)

        return guarded

    def websocket(self, endpoint: WebSocketEndpoint) -> WebSocketEndpoint:
        """Wrap a WebSocket endpoint: close with 1008 before `accept` unless signed by Twilio."""

        @functools.wraps(endpoint)
        async def guarded(websocket: WebSocket) -> None:
            if not self.verify_websocket(websocket):
                await websocket.close(code=WS_POLICY_VIOLATION)
                return
            await endpoint(websocket)

        return guarded


def guard_for(app: Starlette) -> SignatureGuard:
    """The app's guard: `app.state.signature_guard`, else one built once from its settings."""
    state = app.state
    guard: SignatureGuard | None = getattr(state, "signature_guard", None)
    if guard is None:
        settings = getattr(state, "settings", None) or state.services.settings
        guard = state.signature_guard = SignatureGuard.from_settings(settings)
    return guard


async def verify_http(request: Request) -> bool:
    """Check a webhook's signature with the app's guard (see `SignatureGuard.verify_http`)."""
    return await guard_for(request.app).verify_http(request)


def verify_websocket(websocket: WebSocket) -> bool:
    """Check a WebSocket upgrade's signature with the app's guard."""
    return guard_for(websocket.app).verify_websocket(websocket)
