"""Call control the conversation can exercise: end the call, transfer it to a person.

The LLM decides through function calling when the provider supports it (`CALL_TOOLS`); models
without tools (the embedded SmolLM2) get a phrase-based fallback on the caller's words
(`detect_intent`). A keypad menu (`DTMF_MENU`) maps digits to the same actions without code.
How an action reaches the phone network is the transport's business (`CallControl`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

Intent = Literal["end", "transfer"]

CALL_TOOLS: list[dict[str, object]] = [
    {
        "type": "function",
        "function": {
            "name": "end_call",
            "description": "Hang up once the caller is done or says goodbye. Say goodbye first.",
            "parameters": {
                "type": "object",
                "properties": {"goodbye": {"type": "string",
                                           "description": "A short goodbye to say."}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "transfer_call",
            "description": "Transfer the caller to a human when they ask for a person.",
            "parameters": {
                "type": "object",
                "properties": {"reason": {"type": "string"}},
            },
        },
    },
]

_END = re.compile(
    r"\b(good ?bye|bye(?: bye)?|that'?s all|that is all|hang up|talk to you later|"
    r"have a (?:good|nice) (?:day|one|night))\b",
    re.IGNORECASE,
)
_TRANSFER = re.compile(
    r"\b(human|real person|a person|someone real|operator|representative|an agent|"
    r"speak (?:to|with) (?:someone|somebody|a manager|staff)|transfer me)\b",
    re.IGNORECASE,
)


def detect_intent(text: str) -> Intent | None:
    """The phrase fallback: does the caller want a person, or to end the call?"""
    if _TRANSFER.search(text):
        return "transfer"
    if _END.search(text):
        return "end"
    return None


class CallControl(Protocol):
    """Acting on the live call."""

    async def hang_up(self, reason: str) -> None:
        """End the call (the stream ends with it)."""
        ...

    async def transfer(self, number: str) -> bool:
        """Move the caller to `number`; False when this transport cannot."""
        ...


@dataclass(frozen=True, slots=True)
class MenuAction:
    kind: Literal["transfer", "hangup", "say"]
    text: str = ""


class MenuError(ValueError):
    """DTMF_MENU is not of the form "0:transfer; 9:hangup; 1:say Our hours are 9 to 5"."""


def parse_dtmf_menu(spec: str | None) -> dict[str, MenuAction]:
    """Parse `DTMF_MENU`: entries "digit:action" separated by ";", action one of `transfer`,
    `hangup` or `say <text>`."""
    menu: dict[str, MenuAction] = {}
    for entry in filter(None, (part.strip() for part in (spec or "").split(";"))):
        digit, _, action = entry.partition(":")
        digit, action = digit.strip(), action.strip()
        if len(digit) != 1 or digit not in "0123456789*#":
            raise MenuError(f"bad digit in DTMF_MENU entry {entry!r}")
        verb, _, text = action.partition(" ")
        if verb == "say" and text.strip():
            menu[digit] = MenuAction("say", text.strip())
        elif verb in ("transfer", "hangup") and not text.strip():
            menu[digit] = MenuAction(verb)  # type: ignore[arg-type]
        else:
            raise MenuError(f"bad action in DTMF_MENU entry {entry!r}")
    return menu
