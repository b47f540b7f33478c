"""Remembering callers across calls: after a call ends, the LLM folds its transcript into what
was known about the caller, and the next call from that number starts with it.

`CallerMemory` is an `EventBus` subscriber, so nothing here sits in the audio path: it collects
each call's finished utterances, and on `CallEnded` starts the summary in a task it owns.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime

from pipeline.caller_memory import CallerMemoryStore, redact_number, rememberable
from pipeline.engines import ChatMessage, LanguageModel
from pipeline.events import CallEnded, CallStarted, PipelineEvent, UtteranceDone, utcnow
from pipeline.memory import DEFAULT_SUMMARY_CHARS, clip_text, transcript_lines

log = logging.getLogger(__name__)

MAX_TRANSCRIPT_CHARS = 8000
MAX_OPEN_CALLS = 10_000

CALLER_PROMPT = (
    "You keep the memory a phone assistant has of one caller. Merge what was known from their "
    "earlier calls with the transcript of the call that just ended into an updated memory: "
    "the caller's name if given, what they asked for, bookings, appointments or orders they "
    "mentioned (with dates and times), preferences, and anything left open, most recent "
    "first, with the date of the call. Never include phone numbers. Third person, plain "
    "sentences, no lists, no preamble. At most {max_chars} characters."
)


def remote_number(direction: str, from_number: str | None, to_number: str | None) -> str | None:
    """The other party's number: the caller on inbound calls, the callee on outbound ones."""
    return to_number if direction.startswith("outbound") else from_number


@dataclass(slots=True)
class _CallLog:
    number: str
    started_at: datetime
    lines: list[ChatMessage] = field(default_factory=list)


class CallerMemory:
    """Summarizes each finished call per caller number and serves it to the caller's next call.

    Wire it with `bus.subscribe("memory", caller_memory.handle)` and `await start()`; `stop()`
    at shutdown cancels summaries still running (closing the store is left to its owner).
    `context_for(number)` returns the stored summary (or None) within `lookup_timeout_s`, for
    `ConversationMemory(caller_context=...)`. Calls from withheld or missing numbers are never
    remembered; calls in which the caller said nothing are skipped. Summaries run one at a
    time (the LLM also serves live calls); a failed summary logs a warning and keeps the
    previous one.
    """

    def __init__(
        self,
        store: CallerMemoryStore,
        llm: LanguageModel,
        *,
        max_chars: int = DEFAULT_SUMMARY_CHARS,
        timeout_s: float = 60.0,
        lookup_timeout_s: float = 1.0,
    ) -> None:
        self.store = store
        self.llm = llm
        self.max_chars = max_chars
        self.timeout_s = timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self._calls: dict[str, _CallLog] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()

    async def start(self) -> None:
        """Warm the store up (connect to Redis) before the first call."""
        await self.store.warm_up()

    async def context_for(self, number: str | None) -> str | None:
        """What is remembered about `number`, or None (unknown, withheld, store too slow)."""
        if not rememberable(number):
            return None
        assert number is not None
        try:
            async with asyncio.timeout(self.lookup_timeout_s):
                return await self.store.get_summary(number)
        except Exception as exc:  # the call starts without memory rather than not at all
            log.warning("caller memory lookup failed: %s", type(exc).__name__)
            return None

    async def handle(self, event: PipelineEvent) -> None:
        """The `EventBus` subscriber."""
        if isinstance(event, CallStarted):
            number = remote_number(event.direction, event.from_number, event.to_number)
            if rememberable(number):
                assert number is not None
                if len(self._calls) >= MAX_OPEN_CALLS:  # CallEnded lost: drop the oldest
                    self._calls.pop(next(iter(self._calls)))
                self._calls[event.call_sid] = _CallLog(number, event.started_at)
        elif isinstance(event, UtteranceDone):
            call = self._calls.get(event.call_sid)
            if call is not None and event.text.strip():
                role = "user" if event.role == "caller" else "assistant"
                call.lines.append(ChatMessage(role, event.text.strip()))
        elif isinstance(event, CallEnded):
            call = self._calls.pop(event.call_sid, None)
            if call is not None and any(m.role == "user" for m in call.lines):
                task = asyncio.create_task(
                    self._summarize(event.call_sid, call), name=f"caller-summary:{event.call_sid}"
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Return once every summary started so far has finished (tests, graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Cancel the summaries still running and wait for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._calls.clear()

    async def _summarize(self, call_sid: str, call: _CallLog) -> None:
        async with self._one_at_a_time:  # also orders two calls from one number
            try:
                previous = await self.store.get_summary(call.number)
                async with asyncio.timeout(self.timeout_s):
                    text = await self.llm.complete(self._prompt(previous, call))
                summary = clip_text(redact_number(text, call.number), self.max_chars)
                if not summary:
                    raise ValueError("empty summary")
                await self.store.put_summary(call.number, summary)
            except Exception as exc:  # a task boundary: the previous summary stays
                log.warning("caller summary failed call_sid=%s: %s", call_sid,
                            str(exc) or type(exc).__name__)
                return
        log.info("caller summary stored call_sid=%s chars=%d", call_sid, len(summary))

    def _prompt(self, previous: str | None, call: _CallLog) -> list[ChatMessage]:
        transcript = transcript_lines(call.lines)
        if len(transcript) > MAX_TRANSCRIPT_CHARS:
            # Keep the opening (names, the reason for calling) and the end (what was agreed).
            head = MAX_TRANSCRIPT_CHARS // 4
            transcript = (
                transcript[:head] + "\n[…]\n" + transcript[-(MAX_TRANSCRIPT_CHARS - head) :]
            )
        day = call.started_at.date().isoformat()
        user = (
            f"Known from earlier calls: {previous or '(nothing; this was the first call)'}\n\n"
            f"Transcript of the call on {day}:\n{transcript}\n\nUpdated memory (today is "
            f"{utcnow().date().isoformat()}):"
        )
        return [
            ChatMessage("system", CALLER_PROMPT.format(max_chars=self.max_chars)),
            ChatMessage("user", user),
        ]
