"""Where what the bot remembers about a caller between calls is kept.

A caller is identified by their phone number, which is personal data: stores key everything by
`CallerKeys.hash` (HMAC-SHA256 of the normalized number with a per-deployment secret,
`MEMORY_HASH_KEY`) and never keep the number itself, in keys or in values. Two stores implement
`CallerMemoryStore`: `InProcessCallerStore` (the embedded default; gone on restart) and
`RedisCallerStore` (shared by every worker; falls back to an in-process store while Redis is
unreachable, so a call never fails because of it). Summaries expire after
`CALLER_MEMORY_TTL_DAYS`; per-call working context (`save_context`) after an hour.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from pipeline.engines import ChatMessage

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TTL_DAYS = 90
DEFAULT_CONTEXT_TTL_S = 3600

# Twilio's caller-ID stand-ins for withheld numbers ("ANONYMOUS", "RESTRICTED", "UNKNOWN",
# "BLOCKED" spelled on a keypad). Every such caller shares the value: never remember them.
WITHHELD_NUMBERS = frozenset({"+266696687", "+7378742833", "+8656696", "+2562533"})
_PHONE = re.compile(r"\+?[0-9]{3,15}")
_SEPARATORS = re.compile(r"[\s\-().]")


class InvalidNumber(ValueError):
    """`number` is neither a phone number nor a `client:`/`sip:` identity."""

    def __init__(self, number: str) -> None:
        self.number = number
        super().__init__("not a phone number or client identity")


class CallerMemoryUnavailable(RuntimeError):
    """The durable store could not be reached for an operation that must not fall back."""


def normalize_number(number: str) -> str:
    """`+1 (555) 010-0001` → `+15550100001`; `client:Alice` is kept (lower-cased)."""
    raw = number.strip()
    if raw.lower().startswith(("client:", "sip:")):
        return raw.lower()
    compact = _SEPARATORS.sub("", raw)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if not _PHONE.fullmatch(compact):
        raise InvalidNumber(number)
    return compact


def rememberable(number: str | None) -> bool:
    """True for a caller we may remember: a valid number that is not a withheld stand-in."""
    if not number:
        return False
    try:
        return normalize_number(number) not in WITHHELD_NUMBERS
    except InvalidNumber:
        return False


def redact_number(text: str, number: str) -> str:
    """`text` with the caller's own number (with or without the `+`) masked out."""
    normalized = normalize_number(number)
    for form in sorted({normalized, normalized.lstrip("+")}, key=len, reverse=True):
        if len(form) >= 6:
            text = text.replace(form, "[number]")
    return text


class CallerKeys:
    """Turns numbers into opaque keys: HMAC-SHA256 with the deployment's secret, hex."""

    def __init__(self, secret: str | bytes) -> None:
        self._secret = secret.encode() if isinstance(secret, str) else secret

    @classmethod
    def for_namespace(cls, namespace: str, secret: str | None = None) -> CallerKeys:
        """The configured secret; unset, one derived from the namespace (stable across
        restarts, but guessable: production sets `MEMORY_HASH_KEY`)."""
        if secret:
            return cls(secret)
        return cls(hashlib.sha256(f"voicebot-caller-memory:{namespace}".encode()).digest())

    def hash(self, number: str) -> str:
        return hmac.new(self._secret, normalize_number(number).encode(), hashlib.sha256).hexdigest()


class CallerMemoryStore(Protocol):
    """Caller summaries by number, and per-call working context by call SID.

    `forget` returns whether a summary existed; a store that cannot erase durably raises
    `CallerMemoryUnavailable` rather than pretend. Other operations never raise because the
    backing service is down.
    """

    async def get_summary(self, number: str) -> str | None: ...

    async def put_summary(self, number: str, summary: str) -> None: ...

    async def forget(self, number: str) -> bool: ...

    async def save_context(self, call_sid: str, messages: Sequence[ChatMessage]) -> None: ...

    async def load_context(self, call_sid: str) -> list[ChatMessage] | None: ...

    async def warm_up(self) -> None:
        """Connect ahead of the first call (app start-up); never raises."""
        ...

    async def aclose(self) -> None: ...


def _encode_messages(messages: Sequence[ChatMessage]) -> str:
    return json.dumps([{"role": m.role, "content": m.content} for m in messages])


def _decode_messages(raw: str | bytes) -> list[ChatMessage]:
    return [ChatMessage(m["role"], m["content"]) for m in json.loads(raw)]


class InProcessCallerStore:
    """A `CallerMemoryStore` in this process's memory (the embedded default, and the fallback
    of `RedisCallerStore`). Entries expire like Redis keys; `clock` is injectable for tests."""

    def __init__(
        self,
        keys: CallerKeys,
        *,
        ttl_s: float = DEFAULT_TTL_DAYS * 86400,
        context_ttl_s: float = DEFAULT_CONTEXT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.context_ttl_s = context_ttl_s
        self._clock = clock
        self._entries: dict[str, tuple[float, Any]] = {}

    def _get(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def _set(self, key: str, value: Any, ttl_s: float) -> None:
        self._entries[key] = (self._clock() + ttl_s, value)

    async def get_summary(self, number: str) -> str | None:
        return self._get("caller:" + self.keys.hash(number))

    async def put_summary(self, number: str, summary: str) -> None:
        self._set("caller:" + self.keys.hash(number), summary, self.ttl_s)

    async def forget(self, number: str) -> bool:
        key = "caller:" + self.keys.hash(number)
        found = self._get(key) is not None
        self._entries.pop(key, None)
        return found

    async def save_context(self, call_sid: str, messages: Sequence[ChatMessage]) -> None:
        self._set("context:" + call_sid, list(messages), self.context_ttl_s)

    async def load_context(self, call_sid: str) -> list[ChatMessage] | None:
        messages = self._get("context:" + call_sid)
        return None if messages is None else list(messages)

    async def warm_up(self) -> None:
        return None

    async def aclose(self) -> None:
        self._entries.clear()


class RedisCallerStore:
    """A `CallerMemoryStore` in Redis (`redis.asyncio`), shared by all workers.

    Keys: `{namespace}:caller:{hash}` (JSON `{"summary", "updated_at"}`, expiring after
    `ttl_s`) and `{namespace}:context:{call_sid}` (JSON messages, `context_ttl_s`). When an
    operation fails because Redis is unreachable or takes longer than `op_timeout_s` (it sits
    before the greeting of every call), it logs one warning, serves the call from an
    in-process fallback store, and leaves Redis alone for `cooldown_s`; the first operation
    after that tries Redis again. Reads look in the fallback first (it only holds what was
    written during an outage, so it is the newest); a write that reaches Redis drops the
    fallback's copy. `forget` erases both and raises `CallerMemoryUnavailable` if Redis could
    not be reached, since a silent partial erase is worse than an error.
    """

    def __init__(
        self,
        url: str,
        keys: CallerKeys,
        *,
        namespace: str = "voicebot",
        ttl_s: float = DEFAULT_TTL_DAYS * 86400,
        context_ttl_s: float = DEFAULT_CONTEXT_TTL_S,
        op_timeout_s: float = 0.25,
        cooldown_s: float = 5.0,
    ) -> None:
        self.keys = keys
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.context_ttl_s = context_ttl_s
        self.op_timeout_s = op_timeout_s
        self.cooldown_s = cooldown_s
        # One immediate retry: a pooled connection the server dropped is replaced at once;
        # a server that is down fails fast instead of backing off during a call.
        self.redis = Redis.from_url(
            url,
            socket_connect_timeout=op_timeout_s,
            socket_timeout=op_timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self.fallback = InProcessCallerStore(keys, ttl_s=ttl_s, context_ttl_s=context_ttl_s)
        self._down_until = 0.0
        self.outages = 0

    @property
    def degraded(self) -> bool:
        """True while operations are served by the in-process fallback."""
        return self._down_until > time.monotonic()

    def caller_key(self, number: str) -> str:
        return f"{self.namespace}:caller:{self.keys.hash(number)}"

    def context_key(self, call_sid: str) -> str:
        return f"{self.namespace}:context:{call_sid}"

    async def _call(self, op: str, action: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run a Redis operation: (True, result), or (False, None) when Redis is out."""
        if self.degraded:
            return False, None
        try:
            async with asyncio.timeout(self.op_timeout_s):
                result = await action()
        except (RedisError, TimeoutError, OSError) as exc:  # down, slow, or refusing (OOM…)
            self.outages += 1
            self._down_until = time.monotonic() + self.cooldown_s
            log.warning("redis unreachable (%s during %s); caller memory uses the in-process "
                        "store for %.0f s", type(exc).__name__, op, self.cooldown_s)
            return False, None
        return True, result

    async def get_summary(self, number: str) -> str | None:
        newer = await self.fallback.get_summary(number)
        if newer is not None:
            return newer
        ok, raw = await self._call("get_summary", lambda: self.redis.get(self.caller_key(number)))
        if not ok or raw is None:
            return None
        try:
            return str(json.loads(raw)["summary"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable caller memory in redis; ignoring it")
            return None

    async def put_summary(self, number: str, summary: str) -> None:
        value = json.dumps({"summary": summary, "updated_at": int(time.time())})
        key = self.caller_key(number)
        ok, _ = await self._call(
            "put_summary", lambda: self.redis.set(key, value, ex=max(1, int(self.ttl_s)))
        )
        if ok:
            await self.fallback.forget(number)
        else:
            await self.fallback.put_summary(number, summary)

    async def forget(self, number: str) -> bool:
        found_here = await self.fallback.forget(number)
        self._down_until = 0.0  # an erase always tries Redis
        ok, deleted = await self._call("forget", lambda: self.redis.delete(self.caller_key(number)))
        if not ok:
            raise CallerMemoryUnavailable("redis is unreachable; the caller's memory was not erased")
        return found_here or bool(deleted)

    async def save_context(self, call_sid: str, messages: Sequence[ChatMessage]) -> None:
        value = _encode_messages(messages)
        ok, _ = await self._call(
            "save_context",
            lambda: self.redis.set(
                self.context_key(call_sid), value, ex=max(1, int(self.context_ttl_s))
            ),
        )
        if not ok:
            await self.fallback.save_context(call_sid, messages)

    async def load_context(self, call_sid: str) -> list[ChatMessage] | None:
        newer = await self.fallback.load_context(call_sid)
        if newer is not None:
            return newer
        ok, raw = await self._call("load_context", lambda: self.redis.get(self.context_key(call_sid)))
        return _decode_messages(raw) if ok and raw is not None else None

    async def warm_up(self, timeout_s: float = 5.0) -> None:
        """Open a pooled connection with a start-up's patience (a TLS handshake to a hosted
        Redis can take longer than `op_timeout_s`), so the first call does not pay for it."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.redis.ping()
        except Exception as exc:  # start-up goes on; operations fall back until Redis answers
            log.warning("redis not reachable at start-up (%s); caller memory will fall back "
                        "to the in-process store until it is", type(exc).__name__)

    async def aclose(self) -> None:
        await self.redis.aclose()
        await self.fallback.aclose()


def build_caller_store(settings: Any, *, op_timeout_s: float = 0.25) -> CallerMemoryStore:
    """The store the settings ask for: Redis when `REDIS_URL` is set, else in-process.

    Reads `REDIS_URL`, `REDIS_NAMESPACE`, `MEMORY_HASH_KEY` and `CALLER_MEMORY_TTL_DAYS`.
    `op_timeout_s` bounds each Redis operation (calls wait on it; the CLI can wait longer).
    """
    namespace = getattr(settings, "redis_namespace", "voicebot")
    secret = getattr(settings, "memory_hash_key", None)
    if secret is not None and hasattr(secret, "get_secret_value"):
        secret = secret.get_secret_value()
    keys = CallerKeys.for_namespace(namespace, secret)
    ttl_s = float(getattr(settings, "caller_memory_ttl_days", DEFAULT_TTL_DAYS)) * 86400
    url = getattr(settings, "redis_url", None)
    if not url:
        return InProcessCallerStore(keys, ttl_s=ttl_s)
    if not secret:
        log.warning("MEMORY_HASH_KEY is not set: caller keys in Redis are hashed with a key "
                    "derived from REDIS_NAMESPACE; set a secret MEMORY_HASH_KEY in production")
    return RedisCallerStore(
        url, keys, namespace=namespace, ttl_s=ttl_s, op_timeout_s=op_timeout_s
    )
