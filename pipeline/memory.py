"""What the LLM sees of the conversation: a system prompt, what we know of the caller, and a
bounded window of recent turns. Turns that leave the window are folded into a rolling summary by
`RollingSummarizer` (the configured LLM, off the audio path); until a summary exists, or for the
turns it has not covered yet, an abridged tail of them stands in. So a 30-minute call never
outgrows the model's context or slows it down."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from pipeline.engines import ChatMessage, LanguageModel

log = logging.getLogger(__name__)

ABRIDGED_MESSAGES = 6
ABRIDGED_CHARS = 600
DEFAULT_SUMMARY_CHARS = 600

RETURNING_CALLER_HINT = (
    "This caller has called before. What you remember from their earlier calls: {context}\n"
    "Greet them as a returning caller when it fits, and use what you remember when it helps; "
    "do not recite it."
)


def clip_text(text: str, max_chars: int) -> str:
    """`text` squeezed to one line of at most `max_chars`, cut at a sentence or word end."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    for end in (". ", "! ", "? "):
        at = cut.rfind(end)
        if at >= max_chars // 2:
            return cut[: at + 1]
    at = cut.rfind(" ")
    return (cut[:at] if at >= max_chars // 2 else cut[: max_chars - 1]) + "…"


def transcript_lines(messages: list[ChatMessage]) -> str:
    """Messages as `Caller: …` / `Assistant: …` lines, for summary prompts."""
    names = {"user": "Caller", "assistant": "Assistant", "system": "Note"}
    return "\n".join(f"{names[m.role]}: {m.content}" for m in messages)


class ConversationMemory:
    """Bounded chat history for one call.

    `messages()` is the system prompt (plus what is remembered of the caller from earlier calls,
    plus `summary` of the turns that left the window, plus an abridged tail of any left turns
    the summary does not cover yet) followed by at most `2 * max_turns` recent messages. `older`
    keeps every turn that left the window; `summarized` counts how many of them `summary`
    covers (set together through `fold`).
    """

    def __init__(self, system_prompt: str, max_turns: int = 8, caller_context: str | None = None):
        self.system_prompt = system_prompt
        self.caller_context = caller_context
        self._window: deque[ChatMessage] = deque()
        self._max_messages = max_turns * 2
        self.older: list[ChatMessage] = []  # turns that left the window, oldest first
        self.summary: str | None = None  # a rolling summary of `older[:summarized]`
        self.summarized = 0

    def add_user(self, text: str) -> None:
        self._append(ChatMessage("user", text))

    def add_assistant(self, text: str) -> None:
        self._append(ChatMessage("assistant", text))

    def _append(self, message: ChatMessage) -> None:
        # Two messages of the same role in a row (the caller went on after an interrupted
        # reply) are merged: chat templates expect roles to alternate.
        if self._window and self._window[-1].role == message.role:
            last = self._window.pop()
            message = ChatMessage(message.role, f"{last.content} {message.content}")
        self._window.append(message)
        while len(self._window) > self._max_messages:
            self.older.append(self._window.popleft())

    def unsummarized(self) -> list[ChatMessage]:
        """Turns that left the window and are not in `summary` yet, oldest first."""
        return self.older[self.summarized :]

    def fold(self, summary: str, covered: int) -> None:
        """Install `summary` as covering the first `covered` messages of `older`."""
        if not 0 <= covered <= len(self.older):
            raise ValueError(f"summary covers {covered} messages; only {len(self.older)} left")
        self.summary = summary
        self.summarized = covered

    def messages(self) -> list[ChatMessage]:
        system = self.system_prompt
        if self.caller_context:
            system += "\n\n" + RETURNING_CALLER_HINT.format(context=self.caller_context)
        if self.summary:
            system += f"\n\nEarlier in this call: {self.summary}"
        rest = self.unsummarized()
        if rest:
            recent = " ".join(f"{m.role}: {m.content}" for m in rest[-ABRIDGED_MESSAGES:])
            label = "Then" if self.summary else "Earlier in this call"
            system += f"\n\n{label} (abridged): {recent[-ABRIDGED_CHARS:]}"
        return [ChatMessage("system", system), *self._window]

    @property
    def turns(self) -> list[ChatMessage]:
        return [*self.older, *self._window]


ROLLING_PROMPT = (
    "You keep short notes on a phone call that is still going on. Merge the notes so far with "
    "the new part of the conversation into updated notes: the caller's name if given, what "
    "they asked for, facts and decisions (dates, times, party sizes, bookings, prices, order "
    "numbers) and what is still open. Third person, plain sentences, no lists, no preamble. "
    "At most {max_chars} characters."
)


class RollingSummarizer:
    """Folds the turns that left a call's window into `ConversationMemory.summary`.

    The conversation calls `maybe_summarize(memory, llm)` after each bot turn, in a task it owns
    (cancelled when the call ends). It does work only once `min_new` messages have left the
    window unsummarized, never runs two summaries at once (a call while one runs returns at
    once), and asks the LLM (`complete`) to merge the previous summary with those messages.
    A failure or timeout logs a warning and leaves the abridged fallback in place; the next
    attempt waits until another `min_new` messages have left the window.
    """

    def __init__(
        self,
        *,
        min_new: int = 6,
        max_chars: int = DEFAULT_SUMMARY_CHARS,
        timeout_s: float = 20.0,
        call_sid: str = "-",
    ) -> None:
        self.min_new = min_new
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self.call_sid = call_sid
        self.running = False
        self.failures = 0
        self._retry_at = 0  # len(memory.older) before which no retry happens after a failure

    def due(self, memory: ConversationMemory) -> bool:
        """True when `maybe_summarize` would do work now (cheap; no I/O)."""
        return (
            not self.running
            and len(memory.unsummarized()) >= self.min_new
            and len(memory.older) >= self._retry_at
        )

    async def maybe_summarize(self, memory: ConversationMemory, llm: LanguageModel) -> bool:
        """Summarize if due; True when `memory.summary` was updated."""
        if not self.due(memory):
            return False
        self.running = True
        covered = len(memory.older)
        pending = memory.older[memory.summarized : covered]
        try:
            async with asyncio.timeout(self.timeout_s):
                text = await llm.complete(self._prompt(memory.summary, pending))
            text = clip_text(text, self.max_chars)
            if not text:
                raise ValueError("empty summary")
        except Exception as exc:  # a task boundary: any failure keeps the abridged fallback
            self.failures += 1
            self._retry_at = covered + self.min_new
            log.warning("rolling summary failed call_sid=%s: %s", self.call_sid,
                        str(exc) or type(exc).__name__)
            return False
        finally:
            self.running = False
        memory.fold(text, covered)
        return True

    def _prompt(self, summary: str | None, pending: list[ChatMessage]) -> list[ChatMessage]:
        user = (
            f"Notes so far: {summary or '(none yet)'}\n\n"
            f"New part of the call:\n{transcript_lines(pending)}\n\nUpdated notes:"
        )
        return [
            ChatMessage("system", ROLLING_PROMPT.format(max_chars=self.max_chars)),
            ChatMessage("user", user),
        ]
