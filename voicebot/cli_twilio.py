"""`voicebot twilio configure|check` and `voicebot call`: the Twilio side of the command line.

Exit codes: 0 done; 1 Twilio answered with an error, could not be reached, or `check` found a
problem; 2 missing settings or bad arguments (the message names them).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from telephony.dialer import DialError, dial
from telephony.rest import (
    NumberConfig,
    NumberNotFound,
    TwilioNotConfigured,
    TwilioRest,
    TwilioRestError,
    TwilioUnreachable,
)
from voicebot.settings import load_settings

VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
HEALTH_TIMEOUT_S = 5.0
_E164 = re.compile(r"\+[1-9][0-9]{1,14}")  # ITU-T E.164: "+", country code, at most 15 digits


class UsageError(Exception):
    """Missing settings or bad arguments: exit code 2."""


def _setting(settings: Any, name: str) -> Any:
    return getattr(settings, name.lower(), None)


def _require(settings: Any, *names: str) -> None:
    missing = [name for name in names if not _setting(settings, name)]
    if missing:
        raise UsageError(f"missing settings: {', '.join(missing)} (set them in the environment "
                         "or .env; see docs/TWILIO.md)")


def _number(value: str | None, what: str) -> str:
    if not value:
        raise UsageError(f"{what} is required")
    number = value.replace(" ", "").replace("-", "")
    if not _E164.fullmatch(number):
        raise UsageError(f"{what}: {value!r} is not an E.164 phone number such as +14155550100")
    return number


def _run(command: Callable[[Any], Awaitable[int]]) -> int:
    settings = load_settings()
    try:
        return asyncio.run(command(settings))
    except (UsageError, TwilioNotConfigured) as exc:
        print(f"voicebot: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. TwiML longer than Twilio accepts
        print(f"voicebot: {exc}", file=sys.stderr)
        return 2
    except (TwilioRestError, TwilioUnreachable, NumberNotFound) as exc:
        print(f"voicebot: {exc}", file=sys.stderr)
        return 1


def _show(value: str | None) -> str:
    return value if value else "(none)"


def _print_config(config: NumberConfig) -> None:
    print(f"number           {config.phone_number} ({config.sid})")
    print(f"voice URL        {config.voice_method or '-'} {_show(config.voice_url)}")
    print(f"status callback  {config.status_callback_method or '-'} "
          f"{_show(config.status_callback)}")
    if config.voice_application_sid:
        print(f"TwiML App        {config.voice_application_sid} (overrides the voice URL)")
    if config.trunk_sid:
        print(f"SIP trunk        {config.trunk_sid} (calls go to the trunk, not the voice URL)")


# -- twilio configure -------------------------------------------------------------------------------

def cmd_twilio_configure(args: argparse.Namespace) -> int:
    """Point the number's voice URL and status callback at PUBLIC_URL."""

    async def configure(settings: Any) -> int:
        _require(settings, "PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
        number = _number(args.number or _setting(settings, "TWILIO_FROM_NUMBER"),
                         "--number (or TWILIO_FROM_NUMBER)")
        public_url = settings.public_url
        if urlsplit(public_url).scheme != "https":
            print("warning: PUBLIC_URL is not https; Twilio's media stream needs wss:// on the "
                  "same host", file=sys.stderr)
        rest = TwilioRest.from_settings(settings)
        change = await rest.configure_number(
            number, public_url + VOICE_PATH, public_url + STATUS_PATH
        )
        changes = change.changes
        if not changes:
            print(f"{number} already points at {public_url}; nothing changed")
        else:
            print(f"{number} ({change.after.sid}) updated:")
            for name, (before, after) in changes.items():
                print(f"  {name}: {_show(before)} -> {_show(after)}")
        return 0

    return _run(configure)


# -- twilio check -----------------------------------------------------------------------------------

async def _health(public_url: str) -> tuple[bool, str]:
    url = public_url + "/healthz"
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=HEALTH_TIMEOUT_S) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return False, f"GET {url}: no answer ({type(exc).__name__})"
    ms = (time.perf_counter() - started) * 1000
    ok = response.status_code == 200
    return ok, f"GET {url}: {response.status_code} in {ms:.0f} ms"


def cmd_twilio_check(args: argparse.Namespace) -> int:
    """Print the number's configuration and whether PUBLIC_URL answers /healthz."""

    async def check(settings: Any) -> int:
        _require(settings, "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
        number = _number(args.number or _setting(settings, "TWILIO_FROM_NUMBER"),
                         "--number (or TWILIO_FROM_NUMBER)")
        rest = TwilioRest.from_settings(settings)
        config = await rest.describe_number(number)
        _print_config(config)
        public_url = settings.public_url
        problems: list[str] = []
        if config.voice_application_sid or config.trunk_sid:
            problems.append("the voice URL is bypassed (TwiML App or SIP trunk on the number)")
        if not public_url:
            problems.append("PUBLIC_URL is not set")
        else:
            if config.voice_url != public_url + VOICE_PATH:
                problems.append(f"voice URL is not {public_url}{VOICE_PATH} "
                                "(run `voicebot twilio configure`)")
            if (config.voice_method or "POST").upper() != "POST":
                problems.append("voice URL method is not POST")
            healthy, line = await _health(public_url)
            print(f"PUBLIC_URL       {line}")
            if not healthy:
                problems.append(f"{public_url} does not answer /healthz (is the server and "
                                "the tunnel running?)")
        for problem in problems:
            print(f"problem: {problem}")
        if not problems:
            print("ok: calls to this number reach this server")
        return 1 if problems else 0

    return _run(check)


# -- call -------------------------------------------------------------------------------------------

def cmd_call(args: argparse.Namespace) -> int:
    """Place an outbound call whose TwiML connects to our media stream."""

    async def call(settings: Any) -> int:
        try:
            placed = await dial(settings, None, args.to, from_=args.from_,
                                greeting=args.greeting, system_prompt=args.system_prompt,
                                amd=True if args.amd else None,
                                from_what="--from (or TWILIO_FROM_NUMBER)")
        except DialError as exc:
            raise UsageError(str(exc) + (" (set them in the environment or .env; see "
                                         "docs/TWILIO.md)" if exc.missing else "")) from None
        amd = bool(args.amd or settings.amd_enabled)
        print(f"calling {placed.to} from {placed.from_}: call_sid={placed.sid} "
              f"status={placed.status}" + (" (answering-machine detection on)" if amd else ""))
        return 0

    return _run(call)


# -- registration -----------------------------------------------------------------------------------

def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `twilio configure`, `twilio check` and `call` on `voicebot`'s subparsers."""
    twilio = sub.add_parser("twilio", help="Twilio phone number commands")
    twilio_sub = twilio.add_subparsers(dest="twilio_command", required=True)

    configure = twilio_sub.add_parser(
        "configure", help="point the number's voice URL and status callback at PUBLIC_URL")
    configure.add_argument("--number", help="E.164 number, e.g. +14155550100 "
                           "(default: TWILIO_FROM_NUMBER)")
    configure.set_defaults(func=cmd_twilio_configure)

    check = twilio_sub.add_parser(
        "check", help="show the number's configuration and whether PUBLIC_URL answers")
    check.add_argument("--number", help="E.164 number (default: TWILIO_FROM_NUMBER)")
    check.set_defaults(func=cmd_twilio_check)

    call = sub.add_parser("call", help="place an outbound call answered by the bot")
    call.add_argument("to", help="E.164 number to call, e.g. +14155550100")
    call.add_argument("--from", dest="from_", help="our Twilio number (default: "
                      "TWILIO_FROM_NUMBER)")
    call.add_argument("--greeting", help="what the bot says first (default: GREETING)")
    call.add_argument("--system-prompt", dest="system_prompt",
                      help="instructions for this call (default: SYSTEM_PROMPT)")
    call.add_argument("--amd", action="store_true",
                      help="answering-machine detection (default: AMD_ENABLED)")
    call.set_defaults(func=cmd_call)
