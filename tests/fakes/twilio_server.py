"""A fake of Twilio's REST API on loopback: just the endpoints `telephony.rest` uses.

Real paths, form-encoded request bodies and JSON answers shaped like Twilio's (API version
2010-04-01), HTTP Basic auth checked against the account SID and auth token, and every request
recorded (method, path, query, form) so tests assert what would have gone to Twilio:

- `GET  /2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers.json?PhoneNumber=…` (a pattern:
  partial numbers match, as on Twilio)
- `POST /2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers/{Sid}.json`
- `POST /2010-04-01/Accounts/{AccountSid}/Calls.json`
- `GET|POST /2010-04-01/Accounts/{AccountSid}/Calls/{Sid}.json` (unknown SID: 404, code 20404;
  updating a call that has ended: 400, code 21220)

Usage::

    with FakeTwilio() as fake:
        fake.add_number("+15550001111")
        rest = TwilioRest(fake.account_sid, fake.auth_token, api_base=fake.url)
        ...
        assert fake.requests[-1].form["VoiceUrl"] == "https://bot.example/twilio/voice"
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Self

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.loopback import LoopbackServer

API = "/2010-04-01/Accounts/{account_sid}"
ENDED = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
# Form fields of IncomingPhoneNumber updates → JSON fields of the resource.
NUMBER_FIELDS = {
    "VoiceUrl": "voice_url",
    "VoiceMethod": "voice_method",
    "StatusCallback": "status_callback",
    "StatusCallbackMethod": "status_callback_method",
    "VoiceApplicationSid": "voice_application_sid",
    "FriendlyName": "friendly_name",
}


@dataclass
class RecordedRequest:
    """One request as Twilio would have received it. `form` maps each field to its value, or
    to the list of values when the field repeats (e.g. `StatusCallbackEvent`)."""

    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str | list[str]]
    auth_user: str | None


@dataclass
class ScriptedError:
    """The next request answers with this Twilio error instead."""

    status: int
    code: int
    message: str = "scripted failure"


class FakeTwilio:
    """The fake API; a context manager. `url` is what `TWILIO_API_BASE` takes."""

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "fake-auth-token-0123456789",
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.numbers: dict[str, dict[str, Any]] = {}
        self.calls: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self.next_error: ScriptedError | None = None
        api = API.replace("{account_sid}", "{account_sid:str}")
        routes = [
            Route(f"{api}/IncomingPhoneNumbers.json", self._list_numbers, methods=["GET"]),
            Route(f"{api}/IncomingPhoneNumbers/{{sid:str}}.json", self._update_number,
                  methods=["POST"]),
            Route(f"{api}/Calls.json", self._create_call, methods=["POST"]),
            Route(f"{api}/Calls/{{sid:str}}.json", self._call, methods=["GET", "POST"]),
        ]
        self._server = LoopbackServer(Starlette(routes=routes))
        self.url = self._server.url

    # -- lifecycle and state --------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def reset(self) -> None:
        self.numbers.clear()
        self.calls.clear()
        self.requests.clear()
        self.next_error = None

    def add_number(self, phone_number: str, **fields: Any) -> str:
        """An IncomingPhoneNumber of the account; returns its SID (PN…)."""
        sid = "PN" + uuid.uuid4().hex
        self.numbers[sid] = {
            "sid": sid,
            "account_sid": self.account_sid,
            "phone_number": phone_number,
            "friendly_name": phone_number,
            "voice_url": None,
            "voice_method": "POST",
            "status_callback": None,
            "status_callback_method": "POST",
            "voice_application_sid": None,
            "trunk_sid": None,
            "uri": f"{API.format(account_sid=self.account_sid)}/IncomingPhoneNumbers/{sid}.json",
            **fields,
        }
        return sid

    def add_call(self, status: str = "in-progress", **fields: Any) -> str:
        """A call the account has (e.g. a live inbound one); returns its SID (CA…)."""
        sid = "CA" + uuid.uuid4().hex
        self.calls[sid] = {
            "sid": sid,
            "account_sid": self.account_sid,
            "to": "+15550002222",
            "from": "+15550001111",
            "status": status,
            "direction": "inbound",
            "uri": f"{API.format(account_sid=self.account_sid)}/Calls/{sid}.json",
            **fields,
        }
        return sid

    def of(self, method: str, suffix: str) -> list[RecordedRequest]:
        """The recorded requests with this method whose path ends with `suffix`."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    # -- plumbing ---------------------------------------------------------------------------------

    async def _admit(self, request: Request) -> tuple[RecordedRequest, Response | None]:
        form: dict[str, str | list[str]] = {}
        if request.method == "POST":
            for key, value in (await request.form()).multi_items():
                assert isinstance(value, str), "Twilio's API takes no file uploads"
                previous = form.get(key)
                if previous is None:
                    form[key] = value
                elif isinstance(previous, list):
                    previous.append(value)
                else:
                    form[key] = [previous, value]
        user, password = _basic_auth(request)
        recorded = RecordedRequest(request.method, request.url.path,
                                   dict(request.query_params), form, user)
        self.requests.append(recorded)
        if (user, password) != (self.account_sid, self.auth_token) or (
            request.path_params["account_sid"] != self.account_sid
        ):
            return recorded, _error(401, 20003, "Authenticate")
        if self.next_error is not None:
            scripted, self.next_error = self.next_error, None
            return recorded, _error(scripted.status, scripted.code, scripted.message)
        return recorded, None

    # -- endpoints --------------------------------------------------------------------------------

    async def _list_numbers(self, request: Request) -> Response:
        recorded, refusal = await self._admit(request)
        if refusal:
            return refusal
        pattern = recorded.query.get("PhoneNumber", "")
        found = [n for n in self.numbers.values() if pattern in n["phone_number"]]
        uri = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return JSONResponse({
            "incoming_phone_numbers": found,
            "start": 0, "end": max(len(found) - 1, 0), "page": 0, "page_size": 50,
            "first_page_uri": uri, "next_page_uri": None, "previous_page_uri": None, "uri": uri,
        })

    async def _update_number(self, request: Request) -> Response:
        recorded, refusal = await self._admit(request)
        if refusal:
            return refusal
        number = self.numbers.get(request.path_params["sid"])
        if number is None:
            return _not_found(request)
        for form_name, json_name in NUMBER_FIELDS.items():
            if form_name in recorded.form:
                number[json_name] = recorded.form[form_name] or None
        return JSONResponse(number)

    async def _create_call(self, request: Request) -> Response:
        recorded, refusal = await self._admit(request)
        if refusal:
            return refusal
        form = recorded.form
        # Twilio's error codes: 21201 no To, 21213 no From, 21210 From is not ours,
        # 21205 no Url / Twiml / ApplicationSid.
        if not form.get("To"):
            return _error(400, 21201, "No 'To' number is specified")
        if not form.get("From"):
            return _error(400, 21213, "No 'From' number is specified")
        if not any(n["phone_number"] == form["From"] for n in self.numbers.values()):
            return _error(400, 21210, "'From' phone number not verified")
        if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
            return _error(400, 21205, "Url parameter is required")
        sid = self.add_call(status="queued", to=form["To"], **{"from": form["From"]},
                            direction="outbound-api")
        return JSONResponse(self.calls[sid], status_code=201)

    async def _call(self, request: Request) -> Response:
        recorded, refusal = await self._admit(request)
        if refusal:
            return refusal
        call = self.calls.get(request.path_params["sid"])
        if call is None:
            return _not_found(request)
        if request.method == "GET":
            return JSONResponse(call)
        if call["status"] in ENDED:
            return _error(400, 21220, "Call is not in-progress. Cannot redirect.")
        status = recorded.form.get("Status")
        if status in ("completed", "canceled"):
            call["status"] = status
        elif recorded.form.get("Twiml") or recorded.form.get("Url"):
            call["twiml"] = recorded.form.get("Twiml")
        return JSONResponse(call)


def _basic_auth(request: Request) -> tuple[str | None, str | None]:
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except ValueError:
        return None, None
    return user, password


def _error(status: int, code: int, message: str) -> JSONResponse:
    # Twilio's legacy error body (what the 2010-04-01 API answers).
    return JSONResponse(
        {"code": code, "message": message, "status": status,
         "more_info": f"https://www.twilio.com/docs/errors/{code}"},
        status_code=status,
    )


def _not_found(request: Request) -> JSONResponse:
    return _error(404, 20404, f"The requested resource {request.url.path} was not found")
