"""Limits that keep one hostile or broken peer from hurting the server or the other calls.

- `BodyLimit`: ASGI middleware; an HTTP request body over `MAX_BODY_BYTES` gets 413 without
  being read (a declared `Content-Length` is refused up front, a chunked body as soon as it
  passes the limit).
- `CallsPerAddress`: at most `MAX_CALLS_PER_ADDRESS` media streams at once from one source
  address, unless the upgrade carries a valid Twilio signature (Twilio's media servers are few
  and carry every call).
- `stream_limits`: the `TwilioStream` keywords for the per-call limits: `MAX_CALL_S` (the call
  is ended, end reason `max_duration`) and `SEND_TIMEOUT_S` (a peer that stops reading is
  dropped, `send_timeout`); either way the call is also hung up over Twilio's REST API when a
  client is configured (`app.state.twilio_rest`).

The WebSocket message size is bounded twice: uvicorn's `ws_max_size` (the `voicebot serve`
command sets it to `MAX_MESSAGE_BYTES`; a bigger frame closes the socket with 1009) and
`TwilioStream`'s own check (a bigger text frame is logged and ignored).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from pipeline.events import PipelineEvent
from telephony.stream import EndHook, LimitHook
from webhooks.security import SIGNATURE_HEADER, SignatureGuard, TrustedProxies

log = logging.getLogger(__name__)

# RFC 6455 §7.4.1: 1013 "try again later". Sent before `accept`, the client sees HTTP 403.
WS_TRY_AGAIN_LATER = 1013

WebSocketEndpoint = Callable[[WebSocket], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Limits:
    """The limit settings, with their defaults (read from `Settings` when it has them)."""

    max_call_s: float = 1800.0  # 30 minutes
    send_timeout_s: float = 10.0
    max_calls_per_address: int = 5
    max_body_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(**{f.name: getattr(settings, f.name, f.default) for f in fields(cls)})


# -- request bodies ---------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """The request body passed `limit` bytes while the app was reading it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"request body larger than {limit} bytes")


def _too_large(exc: BaseException) -> bool:
    if isinstance(exc, BodyTooLarge):
        return True
    if isinstance(exc, BaseExceptionGroup):  # from a task group between us and the endpoint
        return all(_too_large(inner) for inner in exc.exceptions)
    return False


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: HTTP request bodies over `max_bytes` get 413, unread.

    Webhooks are a few hundred bytes; nothing here accepts uploads. Put it first in the
    middleware list so that it also guards the login and signature checks that read bodies.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = Limits.max_body_bytes) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _plain(send, 400, "bad Content-Length")
                return
            if int(declared) > self.max_bytes:
                self._log(scope, f"declared {declared} bytes")
                await _plain(send, 413, f"request body larger than {self.max_bytes} bytes")
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception as exc:
            if not _too_large(exc):
                raise
            self._log(scope, f"more than {self.max_bytes} bytes sent")
            if not started:
                await _plain(send, 413, f"request body larger than {self.max_bytes} bytes")

    @staticmethod
    def _log(scope: Scope, what: str) -> None:
        client = scope.get("client") or ("?", 0)
        log.warning("refused request body: %s; peer=%s path=%s", what, client[0],
                    scope.get("path", "?"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1").strip())
    return None


# -- calls per source address -----------------------------------------------------------------


def signed_by_twilio(guard: SignatureGuard) -> Callable[[HTTPConnection], bool]:
    """A predicate: the upgrade carries a valid `X-Twilio-Signature` (never true when the
    guard is off, since then nothing proves where a request came from)."""

    def check(conn: HTTPConnection) -> bool:
        return (guard.enabled and bool(conn.headers.get(SIGNATURE_HEADER))
                and guard.verify_websocket(conn))

    return check


class CallsPerAddress:
    """Counts open media streams per source address and refuses those over `limit`.

    The source is the direct peer, or, when that peer is one of `TRUSTED_PROXIES`, the
    address the proxy appended last to `X-Forwarded-For` (behind nginx every peer would
    otherwise be 127.0.0.1 and share one allowance).
    """

    def __init__(self, limit: int = Limits.max_calls_per_address,
                 trusted_proxies: TrustedProxies | str | None = None) -> None:
        self.limit = limit
        self.trusted_proxies = (trusted_proxies if isinstance(trusted_proxies, TrustedProxies)
                                else TrustedProxies(trusted_proxies))
        self.open: dict[str, int] = {}

    def address(self, conn: HTTPConnection) -> str:
        peer = conn.client.host if conn.client else "?"
        if peer in self.trusted_proxies:
            forwarded = conn.headers.get("x-forwarded-for", "")
            last = forwarded.split(",")[-1].strip()
            if last:
                return last[:64]
        return peer

    def acquire(self, address: str) -> bool:
        """Take a slot for `address`; False when it already has `limit` calls open."""
        count = self.open.get(address, 0)
        if count >= self.limit:
            return False
        self.open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self.open.get(address, 0) - 1
        if count > 0:
            self.open[address] = count
        else:
            self.open.pop(address, None)

    def websocket(self, endpoint: WebSocketEndpoint,
                  exempt: Callable[[HTTPConnection], bool] = lambda conn: False,
                  ) -> WebSocketEndpoint:
        """Wrap a WebSocket endpoint (inside the `SignatureGuard`): over the limit, the
        upgrade is refused with 1013 before `accept` (HTTP 403); `exempt` requests pass."""

        @functools.wraps(endpoint)
        async def limited(websocket: WebSocket) -> None:
            if exempt(websocket):
                await endpoint(websocket)
                return
            address = self.address(websocket)
            if not self.acquire(address):
                log.warning("refusing media stream from %s: %d calls open "
                            "(MAX_CALLS_PER_ADDRESS=%d)", address, self.open[address], self.limit)
                await websocket.close(code=WS_TRY_AGAIN_LATER)
                return
            try:
                await endpoint(websocket)
            finally:
                self.release(address)

        limited.calls_per_address = self  # type: ignore[attr-defined]  # marks it as wired
        return limited


# -- per-call limits --------------------------------------------------------------------------


def twilio_hang_up(state: Any) -> LimitHook:
    """The hook that hangs a call up over REST when we end it ourselves (looked up at call
    time: `state.twilio_rest`, absent when Twilio credentials are not configured)."""

    async def hang_up(call_sid: str, reason: str) -> None:
        rest = getattr(state, "twilio_rest", None)
        if rest is None or call_sid.startswith("WB"):  # WB…: a browser call, not Twilio's
            return
        log.info("hanging up call_sid=%s: %s", call_sid, reason)
        await rest.hang_up(call_sid)

    return hang_up


def store_end(state: Any) -> EndHook:
    """The hook that stores a stream's start and end (an end that is not a drop) before its
    socket closes (`TwilioStream`'s `on_end`), so `/twilio/stream-ended` takes it for neither
    a drop nor a refusal. The recorder writes the same events again later: a no-op."""

    async def store(events: Sequence[PipelineEvent]) -> None:
        calls = getattr(state, "calls", None)
        if calls is not None:
            await calls.write_events(events)

    return store


def stream_limits(settings: Any, state: Any) -> dict[str, Any]:
    """Keyword arguments for `TwilioStream`: `max_call_s`, `send_timeout_s`, `on_limit`,
    `on_end`."""
    limits = Limits.from_settings(settings)
    return {"max_call_s": limits.max_call_s, "send_timeout_s": limits.send_timeout_s,
            "on_limit": twilio_hang_up(state), "on_end": store_end(state)}
