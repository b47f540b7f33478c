"""Twilio's REST API, the few operations the bot needs: numbers, outbound calls, hang-up,
transfer.

`TwilioRest` wraps the official `twilio` client. That client is blocking (requests), so every
call runs in a worker thread (`anyio.to_thread`) and never stalls the event loop. Its errors
become small exceptions carrying data (`TwilioRestError(status, code, message)`); the auth token
lives only inside the client and is never logged or put into an exception.

`TWILIO_API_BASE` (tests only) sends every request to another base URL, e.g. a fake on loopback:
the client still builds `https://api.twilio.com/2010-04-01/...` and `_RebasedHttpClient`
swaps the scheme and host just before the request goes out.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio.to_thread
import requests
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.rest import Client

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
# Twilio error 20404: "The requested resource was not found" (an unknown or purged SID).
NOT_FOUND = 20404
# Twilio error 21220: "Invalid call state for this operation" (the call already ended).
INVALID_CALL_STATE = 21220
# Twilio error 32018: TwiML passed in the `Twiml` parameter may be at most 4000 characters.
MAX_TWIML_CHARS = 4000
# Call status callbacks we ask for on outbound calls (Twilio "Call resource", StatusCallbackEvent).
CALL_EVENTS = ("initiated", "ringing", "answered", "completed")


class TwilioNotConfigured(Exception):
    """Settings needed to talk to Twilio are missing; `missing` names them."""

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(f"missing settings: {', '.join(missing)} (set them in the environment "
                         "or in .env)")


class TwilioRestError(Exception):
    """Twilio answered with an error: HTTP `status`, Twilio error `code`, Twilio's `message`."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"Twilio error {code or '-'} (HTTP {status}): {message}")


class CallNotFound(TwilioRestError):
    """The call does not exist (anymore): Twilio error 20404."""

    def __init__(self, call_sid: str, message: str = "call not found") -> None:
        self.call_sid = call_sid
        super().__init__(404, NOT_FOUND, message)


class NumberNotFound(Exception):
    """The account has no incoming phone number `number`."""

    def __init__(self, number: str) -> None:
        self.number = number
        super().__init__(f"{number} is not a phone number of this Twilio account")


class TwilioUnreachable(Exception):
    """No answer from Twilio's API (DNS, connection, timeout); `reason` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot reach Twilio's API: {reason}")


@dataclass(frozen=True, slots=True)
class NumberConfig:
    """How Twilio routes calls to one of our numbers (an IncomingPhoneNumber resource).

    Twilio ignores the voice URL when a `voice_application_sid` (TwiML App) or a `trunk_sid`
    (Elastic SIP Trunk) is set on the number.
    """

    sid: str
    phone_number: str
    friendly_name: str | None
    voice_url: str | None
    voice_method: str | None
    status_callback: str | None
    status_callback_method: str | None
    voice_application_sid: str | None
    trunk_sid: str | None

    @classmethod
    def from_instance(cls, instance: Any) -> NumberConfig:
        return cls(**{f.name: getattr(instance, f.name, None) or None for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class NumberChange:
    """A number's configuration before and after `configure_number`."""

    before: NumberConfig
    after: NumberConfig

    @property
    def changes(self) -> dict[str, tuple[str | None, str | None]]:
        """Field name → (before, after), for the fields that changed."""
        return {
            f.name: (getattr(self.before, f.name), getattr(self.after, f.name))
            for f in fields(NumberConfig)
            if getattr(self.before, f.name) != getattr(self.after, f.name)
        }


@dataclass(frozen=True, slots=True)
class PlacedCall:
    """An outbound call Twilio accepted (usually still `queued`)."""

    sid: str
    status: str | None
    to: str | None
    from_: str | None


class _RebasedHttpClient(TwilioHttpClient):
    """A `TwilioHttpClient` that sends every request to `base` instead of `*.twilio.com`."""

    def __init__(self, base: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self._base = urlsplit(base.rstrip("/"))

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> TwilioResponse:
        parts = urlsplit(url)
        rebased = urlunsplit((self._base.scheme, self._base.netloc,
                              self._base.path + parts.path, parts.query, ""))
        return super().request(method, rebased, *args, **kwargs)


class TwilioRest:
    """The bot's Twilio REST operations, async-friendly, over the official client.

    Build it with `TwilioRest.from_settings(settings)` (raises `TwilioNotConfigured` naming
    the missing settings). Every method raises `TwilioRestError` for Twilio's error answers and
    `TwilioUnreachable` when the API does not answer.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        api_base: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        http = (_RebasedHttpClient(api_base, timeout_s) if api_base
                else TwilioHttpClient(timeout=timeout_s))
        self.account_sid = account_sid
        self._client = Client(account_sid, auth_token, http_client=http)

    @classmethod
    def from_settings(cls, settings: Any) -> TwilioRest:
        sid = getattr(settings, "twilio_account_sid", None)
        token = getattr(settings, "twilio_auth_token", None)
        missing = [name for name, value in
                   (("TWILIO_ACCOUNT_SID", sid), ("TWILIO_AUTH_TOKEN", token)) if not value]
        if missing:
            raise TwilioNotConfigured(missing)
        return cls(sid, token, api_base=getattr(settings, "twilio_api_base", None))

    def __repr__(self) -> str:  # never show the token
        return f"TwilioRest(account_sid={self.account_sid!r})"

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(
            functools.partial(_translated, func, *args, **kwargs)
        )

    # -- phone numbers ------------------------------------------------------------------------------

    def _find_number(self, number: str) -> Any:
        # PhoneNumber filters by pattern (partial numbers match too), so pick the exact one.
        for instance in self._client.incoming_phone_numbers.list(phone_number=number, limit=50):
            if instance.phone_number == number:
                return instance
        raise NumberNotFound(number)

    async def describe_number(self, number: str) -> NumberConfig:
        """The current voice configuration of `number` (E.164); raises `NumberNotFound`."""
        return NumberConfig.from_instance(await self._run(self._find_number, number))

    async def configure_number(
        self, number: str, voice_url: str, status_callback: str
    ) -> NumberChange:
        """Point `number`'s incoming calls at `voice_url` (POST) with call status callbacks to
        `status_callback` (POST). A TwiML App on the number would override the voice URL,
        so it is detached."""

        def configure() -> NumberChange:
            instance = self._find_number(number)
            before = NumberConfig.from_instance(instance)
            update: dict[str, str] = {
                "voice_url": voice_url,
                "voice_method": "POST",
                "status_callback": status_callback,
                "status_callback_method": "POST",
            }
            if before.voice_application_sid:
                update["voice_application_sid"] = ""
            updated = self._client.incoming_phone_numbers(before.sid).update(**update)
            return NumberChange(before, NumberConfig.from_instance(updated))

        change = await self._run(configure)
        log.info("configured %s: %s", number, ", ".join(change.changes) or "no change")
        return change

    # -- calls ----------------------------------------------------------------------------------------

    async def place_call(
        self,
        to: str,
        from_: str,
        twiml_or_url: str,
        status_callback: str | None = None,
        machine_detection: bool = False,
        amd_callback_url: str | None = None,
    ) -> PlacedCall:
        """Call `to` from `from_` (one of our numbers); the call runs `twiml_or_url` (TwiML
        text, or an http(s) URL Twilio fetches TwiML from) when answered. With
        `machine_detection`, Twilio's async AMD posts its verdict to `amd_callback_url`."""
        params: dict[str, Any] = {"to": to, "from_": from_}
        if twiml_or_url.lstrip().startswith("<"):
            if len(twiml_or_url) > MAX_TWIML_CHARS:
                raise ValueError(f"TwiML is {len(twiml_or_url)} characters; Twilio accepts at "
                                 f"most {MAX_TWIML_CHARS} (error 32018)")
            params["twiml"] = twiml_or_url
        elif twiml_or_url.startswith(("https://", "http://")):
            params["url"] = twiml_or_url
            params["method"] = "POST"
        else:
            raise ValueError("twiml_or_url must be TwiML (<Response>…) or an http(s) URL")
        if status_callback:
            params["status_callback"] = status_callback
            params["status_callback_method"] = "POST"
            params["status_callback_event"] = list(CALL_EVENTS)
        if machine_detection:
            if not amd_callback_url:
                raise ValueError("machine_detection needs amd_callback_url (async AMD posts there)")
            # "DetectMessageEnd" waits for the voicemail beep; AsyncAmd keeps the call flowing
            # (our stream starts at once) and posts AnsweredBy later (Twilio's AMD docs).
            params["machine_detection"] = "DetectMessageEnd"
            params["async_amd"] = "true"
            params["async_amd_status_callback"] = amd_callback_url
            params["async_amd_status_callback_method"] = "POST"
        call = await self._run(self._client.calls.create, **params)
        log.info("placed call call_sid=%s status=%s", call.sid, call.status)
        return PlacedCall(sid=call.sid, status=call.status, to=call.to, from_=call._from)

    async def hang_up(self, call_sid: str) -> bool:
        """End the call. False when it had already ended (404 / 20404, or 21220): not an error."""
        try:
            await self._run(self._client.calls(call_sid).update, status="completed")
        except TwilioRestError as exc:
            if exc.status == 404 or exc.code in (NOT_FOUND, INVALID_CALL_STATE):
                log.info("hang-up: call already ended call_sid=%s", call_sid)
                return False
            raise
        log.info("hung up call_sid=%s", call_sid)
        return True

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace the live call's TwiML with `twiml` (e.g. a transfer `<Dial>`); this also ends
        its media stream. Raises `CallNotFound` when the call is gone."""
        if len(twiml) > MAX_TWIML_CHARS:
            raise ValueError(f"TwiML is {len(twiml)} characters; Twilio accepts at most "
                             f"{MAX_TWIML_CHARS} (error 32018)")
        try:
            await self._run(self._client.calls(call_sid).update, twiml=twiml)
        except TwilioRestError as exc:
            if exc.status == 404 or exc.code == NOT_FOUND:
                raise CallNotFound(call_sid, exc.message) from None
            raise
        log.info("redirected call_sid=%s", call_sid)


def _translated(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `func`, turning the twilio library's and requests' errors into ours."""
    try:
        return func(*args, **kwargs)
    except requests.RequestException as exc:
        raise TwilioUnreachable(type(exc).__name__) from None
    except TwilioException as exc:
        raise _rest_error(exc) from None


def _rest_error(exc: TwilioException) -> TwilioRestError:
    status = getattr(exc, "status", None)
    if status is None:
        # List pages fail as TwilioException("Unable to fetch page", response): read the body.
        response = next((a for a in exc.args if hasattr(a, "status_code")), None)
        if response is None:
            return TwilioRestError(0, None, str(exc))
        try:
            body = json.loads(response.text)
        except (TypeError, ValueError):
            body = {}
        body = body if isinstance(body, dict) else {}
        code = body.get("code")
        return TwilioRestError(int(response.status_code), code if isinstance(code, int) else None,
                               str(body.get("message") or exc.args[0]))
    code = getattr(exc, "code", None)
    message = (getattr(exc, "msg", None) or getattr(exc, "detail", None)
               or getattr(exc, "title", None) or "error")
    return TwilioRestError(int(status or 0), code if isinstance(code, int) else None, str(message))
