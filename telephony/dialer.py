"""Placing an outbound call whose TwiML connects the callee to our media stream.

Shared by `voicebot call` and `POST /api/calls`. The per-call greeting and system prompt travel
as stream `<Parameter>`s; with answering-machine detection on, Twilio posts its verdict to
`/twilio/amd` (a machine gets `MACHINE_MESSAGE`, then a hang-up).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from telephony.rest import PlacedCall, TwilioRest
from voicebot.settings import Settings
from webhooks.outbound import AMD_PATH, outbound_twiml

E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # ITU-T E.164: "+", country code, ≤ 15 digits
STATUS_PATH = "/twilio/status"


class DialError(Exception):
    """The call cannot be placed as asked; `missing` names settings that are not set."""

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        self.missing = missing or []
        super().__init__(message)


def e164(value: str | None, what: str) -> str:
    """A phone number in E.164 form, or `DialError` saying which input is wrong."""
    if not value:
        raise DialError(f"{what} is required")
    number = value.replace(" ", "").replace("-", "")
    if not E164.fullmatch(number):
        raise DialError(f"{what}: {value!r} is not an E.164 phone number such as +14155550100")
    return number


async def dial(
    settings: Settings,
    rest: TwilioRest | None,
    to: str,
    *,
    from_: str | None = None,
    greeting: str | None = None,
    system_prompt: str | None = None,
    amd: bool | None = None,
    from_what: str = "from (or TWILIO_FROM_NUMBER)",
) -> PlacedCall:
    """Call `to`; when answered, the callee talks to the bot (direction "outbound")."""
    missing = [name for name, value in (("PUBLIC_URL", settings.public_url),
                                        ("TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
                                        ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token))
               if not value]
    if missing:
        raise DialError(f"missing settings: {', '.join(missing)}", missing)
    assert settings.public_url is not None
    to = e164(to, "the number to call")
    from_ = e164(from_ or settings.twilio_from_number, from_what)
    amd = settings.amd_enabled if amd is None else amd
    twiml = outbound_twiml(urlsplit(settings.public_url).netloc, greeting=greeting,
                           system_prompt=system_prompt, amd=amd, to=to, from_=from_)
    rest = rest or TwilioRest.from_settings(settings)
    return await rest.place_call(
        to, from_, twiml,
        status_callback=settings.public_url + STATUS_PATH,
        machine_detection=amd,
        amd_callback_url=settings.public_url + AMD_PATH if amd else None,
    )
