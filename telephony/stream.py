"""One Twilio Media Streams WebSocket: the per-call session.

An explicit state machine: accepted → connected → started → stopped. Every frame is parsed once
(`telephony.messages`) and dispatched by state; an event that is illegal in the current state
(media before `start`, a second `start`, anything after `stop`) raises `IllegalTransition`,
which is logged and ignored, like malformed JSON, binary frames (Twilio error 31950), a wrong
`streamSid` (31951) and oversized payloads. None of these ends the call or touches another one.
The call ends on `stop` or when the socket closes; then every task it started is cancelled.

Two limits end a call from our side (both optional): `max_call_s` (end reason `max_duration`)
and `send_timeout_s`, for a peer that stops reading (`send_timeout`): the ASGI server's send
waits while its write buffer is full, so without a bound a wedged client would hold the call
forever. Either way the socket is closed and `on_limit(call_sid, reason)` runs (the app hangs
the call up over Twilio's REST API there).

A stream that merely drops (`DROPPED_REASONS`: the socket closed under it, or our own
handling failed) may be connected again while the call goes on (webhooks/stream_ended.py).
Any other end (a `stop`, the bot hanging up, a transfer, a limit) is stored through
`on_end([start, end])` (the conversation's `CallStarted` and `CallEnded`, as published)
*before* the socket closes: Twilio asks `/twilio/stream-ended` what comes next the moment it
does, and must find the started stream and its end there, not take it for a drop or a
refusal, on whichever server it asks (the recorder's batch is a tenth of a second away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from media.mulaw import QUIET_CODES
from pipeline.conversation import CallInfo, Conversation
from pipeline.events import PipelineEvent
from pipeline.speech import PeerGone
from telephony.direct import DIRECT_TEXT, DirectText
from telephony.messages import (
    MAX_PAYLOAD_B64,
    Connected,
    Dtmf,
    InboundMessage,
    Mark,
    Media,
    ProtocolError,
    QuietHold,
    Start,
    Stop,
    inbound_media,
    parse_message,
)
from telephony.playout import DEFAULT_CHUNK_MS, DEFAULT_LEAD_MS, TwilioPlayout

log = logging.getLogger(__name__)


class StreamState(Enum):
    ACCEPTED = "accepted"
    CONNECTED = "connected"
    STARTED = "started"
    STOPPED = "stopped"


class IllegalTransition(Exception):
    """An event arrived that the stream's state does not allow."""

    def __init__(self, state: StreamState, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"'{event}' is not allowed in state {state.value}")


_ALLOWED: dict[StreamState, frozenset[str]] = {
    StreamState.ACCEPTED: frozenset({"connected", "start"}),
    StreamState.CONNECTED: frozenset({"start"}),
    StreamState.STARTED: frozenset({"media", "mark", "dtmf", "stop"}),
    StreamState.STOPPED: frozenset(),
}


@dataclass(slots=True)
class StreamStats:
    frames: int = 0
    bad_messages: int = 0
    dtmf: int = 0
    marks: int = 0


EndStream = Callable[[str], Awaitable[None]]
ConversationFactory = Callable[[CallInfo, TwilioPlayout, EndStream], Awaitable[Conversation]]
LimitHook = Callable[[str, str], Awaitable[object]]  # (call_sid, end reason)
# Stores the call's start and end events now (`on_end`).
EndHook = Callable[[Sequence[PipelineEvent]], Awaitable[object]]
Pending = Coroutine[Any, Any, None]  # a message's async work, left by `_dispatch`

# How long a server-side end may spend on the closing frame and on the `on_limit` hook.
CLOSE_TIMEOUT_S = 5.0
# How long an end that is not a drop may take to be stored before the socket closes (`on_end`).
END_RECORD_TIMEOUT_S = 2.0
# End reasons of the stream's own limits: only these run `on_limit` (a REST hang-up). A call
# that call control ended (`bot_hangup`, `transfer`) must not be hung up again.
LIMIT_REASONS = frozenset({"max_duration", "send_timeout"})
# End reasons of a stream that dropped while its call may go on: the socket closed under us
# (the network, a worker going away past its drain grace), or our own handling failed.
DROPPED_REASONS = frozenset({"disconnect", "error"})


def is_drop(end_reason: str | None) -> bool:
    """Did a stream that ran end by dropping, as stored: a reason in `DROPPED_REASONS`, or no
    end at all (its worker died before storing one)?"""
    return end_reason is None or end_reason in DROPPED_REASONS

# The direct path's backlog (messages waiting behind one that left async work): reading the
# socket pauses at this many and resumes when it is down to the second.
BACKLOG_PAUSE = 100
BACKLOG_RESUME = 20

# Sample the inbound frame lag once a second per call (Twilio sends a frame every 20 ms).
LAG_SAMPLE_EVERY = 50


class SendTimeout(PeerGone):
    """A send to the peer did not complete within `timeout_s`: it has stopped reading."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        super().__init__(f"send did not complete within {timeout_s:g} s")


class PeerDisconnected(WebSocketDisconnect, PeerGone):
    """A send found the socket closed by the peer (what a receive reports as a disconnect)."""


class TwilioStream:
    """Runs one Media Streams WebSocket from accept to close."""

    def __init__(
        self,
        websocket: WebSocket,
        make_conversation: ConversationFactory,
        *,
        lead_ms: int = DEFAULT_LEAD_MS,
        chunk_ms: int = DEFAULT_CHUNK_MS,
        max_message_bytes: int = 64 * 1024,
        default_direction: str = "inbound",
        max_call_s: float | None = None,
        send_timeout_s: float | None = None,
        on_limit: LimitHook | None = None,
        on_end: EndHook | None = None,
    ) -> None:
        self._ws = websocket
        self._make_conversation = make_conversation
        self._lead_ms = lead_ms
        self._chunk_ms = chunk_ms
        self._max_message_bytes = max_message_bytes
        self._default_direction = default_direction
        self.state = StreamState.ACCEPTED
        self.stats = StreamStats()
        self.call_sid = "-"
        self.stream_sid = ""
        self.end_reason = "disconnect"
        self.conversation: Conversation | None = None
        self.playout: TwilioPlayout | None = None
        self._playout_task: asyncio.Task[None] | None = None
        self._max_call_s = max_call_s
        self._send_timeout_s = send_timeout_s
        self._on_limit = on_limit
        self._on_end = on_end
        self._deadline: asyncio.Timeout | None = None
        self._ending: str | None = None  # why we are ending the call ourselves
        # Inbound frame lag: how far behind its media timestamp a frame is when processed,
        # against this call's best frame; reported every `LAG_SAMPLE_EVERY`th frame.
        self.on_frame_lag: Callable[[float], None] | None = None
        self._lag_base: float | None = None
        # The direct path (see `_on_text`).
        self._direct: DirectText | None = None
        self._backlog: deque[str] | None = None  # not None while a message's task runs
        self._stepping: asyncio.Task[None] | None = None
        self._step_first: Pending | None = None
        self._receiving: asyncio.Future[dict[str, object]] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._direct_error: Exception | None = None
        self._broken = False
        # The stream's SID while its media frames may take the hot path in `_take` (started,
        # with a conversation, not stopped); None otherwise.
        self._media_sid: str | None = None
        # The quiet hold (see `_arm`), when the direct path and the C extension offer one.
        self._hold: QuietHold | None = None

    def _transition(self, event: str, to: StreamState | None = None) -> None:
        if event not in _ALLOWED[self.state]:
            raise IllegalTransition(self.state, event)
        if to is not None:
            self.state = to

    def end(self, reason: str) -> None:
        """End the call from our side (a limit, or call control); `run()` returns soon after."""
        if self._ending is not None or self.state is StreamState.STOPPED:
            return
        self._ending = reason
        if self._deadline is not None:
            # Fires the run loop's timeout at once, wherever it is waiting.
            self._deadline.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> str:
        """Serve the socket until `stop`, disconnect or a limit; returns the end reason."""
        loop = asyncio.get_running_loop()
        deadline = None if self._max_call_s is None else loop.time() + self._max_call_s
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                self._deadline = limit
                extensions = self._ws.scope.get("extensions") or {}
                direct: DirectText | None = extensions.get(DIRECT_TEXT)
                if direct is not None:
                    self._direct = direct
                    direct.attach(self._on_text)
                # `expired()` too: a cancellation swallowed somewhere below must not let the
                # call run past its limit.
                while self.state is not StreamState.STOPPED and not limit.expired():
                    message = await self._receive()
                    if message is None:
                        continue  # the direct path woke us: see the state
                    if message["type"] == "websocket.disconnect":
                        # Messages read before the close are handled first, as they were
                        # sent: a `stop` waiting in the backlog still ends the call as `stop`.
                        await self._finish_backlog()
                        if self.state is not StreamState.STOPPED:
                            self.end_reason = "disconnect"
                        break
                    await self._on_frame(message)
        except TimeoutError:
            if not limit.expired():
                log.exception("stream failed call_sid=%s", self.call_sid)
                self.end_reason = "error"
        except SendTimeout:
            pass  # `_send` has called `end("send_timeout")`
        except WebSocketDisconnect:
            self.end_reason = "disconnect"
        except Exception:
            # A bug in our own handling must end this call cleanly, never the server.
            log.exception("stream failed call_sid=%s", self.call_sid)
            self.end_reason = "error"
        finally:
            self._deadline = None
            await self._stop_direct()
            if limit.expired() or self._ending is not None:
                self._ending = self.end_reason = self._ending or "max_duration"
                log.log(logging.WARNING if self.end_reason in LIMIT_REASONS else logging.INFO,
                        "ending call call_sid=%s: %s", self.call_sid, self.end_reason)
            await self._finish()
        return self.end_reason

    # -- the direct path: text messages as the server parses them ------------------------------
    #
    # With `telephony.direct`, a media frame is handled synchronously where the server parsed
    # it; only a frame that leaves async work (a turn-taking action, `start`, a key press)
    # starts a task, and the messages after it wait in `_backlog`, in order, until it is done.
    # The run loop above then only sees the end of the connection (and binary messages);
    # `_wake` brings it round when the direct path stops the stream or fails.

    async def _receive(self) -> dict[str, object] | None:
        if self._direct is None:
            return await self._ws.receive()
        self._raise_direct_error()
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self._ws.receive())
        self._wake = asyncio.get_running_loop().create_future()
        await asyncio.wait((self._receiving, self._wake), return_when=asyncio.FIRST_COMPLETED)
        self._wake = None
        self._raise_direct_error()
        if not self._receiving.done():
            return None
        receiving, self._receiving = self._receiving, None
        return receiving.result()

    def _on_text(self, text: str) -> None:
        """One text message from the direct path (runs in the server's `data_received`)."""
        if self._broken:
            return  # the call is ending with an error: nothing more is handled
        backlog = self._backlog
        if backlog is not None:
            backlog.append(text)
            if len(backlog) == BACKLOG_PAUSE and self._direct is not None:
                self._direct.pause_reading()
            return
        hold = self._hold
        if hold is not None and hold.count:
            # Frames the hold kept came before this message: they are heard first, and the
            # message waits behind what they leave to do.
            try:
                pending = self._flush_hold(hold)
            except Exception as exc:
                self._direct_failed(exc)
                return
            if pending is not None:
                self._begin_step(pending, text)
                return
        self._settle(self._take, text)

    def _settle(self, handle: Callable[[Any], Pending | None], arg: Any) -> None:
        """`handle(arg)` on the direct path: what it leaves to do runs in a step, or else the
        hold is armed for the next frames; a failure ends the call (never raises)."""
        try:
            pending = handle(arg)
            if pending is None and self._hold is not None:
                self._arm(self._hold)
        except Exception as exc:
            self._direct_failed(exc)
            return
        if pending is not None:
            self._begin_step(pending)

    def _begin_step(self, pending: Pending, *waiting: str) -> None:
        """Run `pending` in a task; the messages after it wait in the backlog meanwhile."""
        self._backlog = deque(waiting)
        if self._hold is not None:
            self._hold.limit = 0
        self._step_first = pending
        self._stepping = asyncio.get_running_loop().create_task(
            self._step(pending), name=f"stream-step:{self.call_sid}")

    # The quiet hold. Most of a call the caller is listening on a quiet line, and
    # `Conversation.hear` only holds those frames, to listen to them 25 at a time. With the
    # direct path and the C extension, the protocol keeps them in a `QuietHold` instead
    # (`voicebot.ws_protocol`, `_fastmedia.masked_hold`): no Python runs for such a frame.
    # The hold takes at most `Conversation.hold_room()` frames, asked after every message the
    # stream handles, and only while nothing waits in the backlog; what it kept goes to
    # `Conversation.hear_held` as one block before the next message is handled, or when it is
    # full. Bot audio going out stops it (`Conversation.hold`), so that the next frame comes
    # through `hear` and records where the audio fell between the held frames.

    def _attach_hold(self, stream_sid: str) -> None:
        attach = getattr(self._direct, "attach_hold", None)
        conversation = self.conversation
        if (QuietHold is None or attach is None or not 1 <= len(stream_sid) <= 64
                or not hasattr(conversation, "hold_room")):
            return  # a transport or conversation without it: every frame through `_take`
        hold = QuietHold(stream_sid, QUIET_CODES, self._max_message_bytes)
        if attach(hold, self._on_hold_full):
            self._hold = hold
            conversation.hold = hold  # type: ignore[union-attr]

    def _arm(self, hold: QuietHold) -> None:
        """Let the hold keep as many frames as the conversation would only hold now."""
        if hold.count:
            return  # kept under an earlier limit, heard before the next message
        conversation = self.conversation
        hold.limit = (conversation.hold_room()  # type: ignore[union-attr]
                      if self._media_sid is not None and self._backlog is None
                      and not self._broken else 0)

    def _on_hold_full(self) -> None:
        """The hold has as many frames as it may (runs in the server's `data_received`)."""
        hold = self._hold
        if hold is None or self._broken or self._backlog is not None:
            return
        self._settle(self._flush_hold, hold)

    def _flush_hold(self, hold: QuietHold) -> Pending | None:
        """The frames the hold kept, to the conversation as one block: counted, their lag
        sampled and heard as `_on_media` does one by one."""
        audio, stamps, arrivals = hold.take()
        self._count_held(stamps, arrivals)
        conversation = self.conversation
        assert conversation is not None
        actions = conversation.hear_held(audio, len(stamps))
        return conversation.act(actions) if actions else None

    def _count_held(self, stamps: list[int], arrivals: list[float]) -> None:
        stats = self.stats
        if self.on_frame_lag is None:
            stats.frames += len(stamps)
            return
        for stamp, arrival in zip(stamps, arrivals, strict=True):
            stats.frames += 1
            if stats.frames % LAG_SAMPLE_EVERY == 0:
                self._frame_lag(arrival - stamp / 1000)

    async def _step(self, pending: Pending) -> None:
        """Finish one message's async work, then the messages that arrived meanwhile."""
        try:
            await self._run_pending(pending)
            backlog = self._backlog
            assert backlog is not None
            while backlog:
                text = backlog.popleft()
                if len(backlog) == BACKLOG_RESUME and self._direct is not None:
                    self._direct.resume_reading()
                next_pending = self._take(text)
                if next_pending is not None:
                    await self._run_pending(next_pending)
            self._backlog = None
            if self._hold is not None:
                self._arm(self._hold)
            if self._direct is not None:
                self._direct.resume_reading()
        except Exception as exc:
            self._direct_failed(exc)

    async def _finish_backlog(self) -> None:
        """Let the running step finish the messages waiting behind it (bounded)."""
        step = self._stepping
        if step is None or step.done():
            return
        await asyncio.wait((step,), timeout=CLOSE_TIMEOUT_S)

    def _direct_failed(self, exc: Exception) -> None:
        # Raised in the run loop, so it ends the call as it would have there.
        self._broken = True
        if self._hold is not None:
            self._hold.limit = 0
        self._direct_error = exc
        self._wake_run()

    def _raise_direct_error(self) -> None:
        error, self._direct_error = self._direct_error, None
        if error is not None:
            raise error

    def _wake_run(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _stop_direct(self) -> None:
        if self._direct is not None:
            self._direct.detach()
            self._direct = None
        hold, self._hold = self._hold, None
        if hold is not None and hold.count and not self._broken:
            # The line's last quiet frames: heard and counted, as they would have been held.
            pending = self._flush_hold(hold)
            if pending is not None:
                pending.close()  # the call is over: nothing is left to act on
        tasks = [t for t in (self._receiving, self._stepping) if t is not None and not t.done()]
        self._receiving = self._stepping = None
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await asyncio.gather(*tasks, return_exceptions=True)
        if self._step_first is not None:
            # A step cancelled before it ran never awaited its message's work: close it.
            self._step_first.close()
            self._step_first = None

    # -- one message -----------------------------------------------------------------------------

    async def _on_frame(self, message: dict[str, object]) -> None:
        text = message.get("text")
        if text is None:
            # Twilio only accepts text frames (error 31950); we treat binary the same way.
            self._bad("binary frame")
            return
        assert isinstance(text, str)
        pending = self._take(text)
        if pending is not None:
            await self._run_pending(pending)

    def _take(self, text: str) -> Pending | None:
        """Parse and handle one text message; returns the async work it leaves, if any."""
        if len(text) > self._max_message_bytes:
            self._bad(f"message of {len(text)} bytes exceeds {self._max_message_bytes}")
            return None
        sid = self._media_sid
        if sid is not None:
            # A frame of the caller's audio, as Twilio sends it: read in C without building
            # the message, and handled as `_dispatch` would (the same checks passed).
            media = inbound_media(text, sid, MAX_PAYLOAD_B64)
            if media is not None:
                return self._on_media(media[0], media[1])
        try:
            return self._dispatch(parse_message(text))
        except (ProtocolError, IllegalTransition) as exc:
            self._bad(str(exc))
            return None

    async def _run_pending(self, pending: Pending) -> None:
        try:
            await pending
        except (ProtocolError, IllegalTransition) as exc:
            self._bad(str(exc))

    def _bad(self, reason: str) -> None:
        self.stats.bad_messages += 1
        # Rate-limit the log: a flood of junk must not become a flood of log lines.
        if self.stats.bad_messages <= 20 or self.stats.bad_messages % 1000 == 0:
            log.warning("ignored message call_sid=%s: %s (total %d)",
                        self.call_sid, reason, self.stats.bad_messages)

    def _dispatch(self, event: InboundMessage) -> Pending | None:
        """Handle one parsed message now; returns the async work left to do, if any."""
        if isinstance(event, Media):
            self._transition("media")
            self._check_stream(event.stream_sid)
            if event.track not in ("inbound", "inbound_track") or not event.payload:
                return None
            return self._on_media(event.payload, event.timestamp_ms)
        if isinstance(event, Mark):
            self._transition("mark")
            self._check_stream(event.stream_sid)
            self.stats.marks += 1
            assert self.playout is not None
            self.playout.on_mark(event.name)
        elif isinstance(event, Dtmf):
            self._transition("dtmf")
            self._check_stream(event.stream_sid)
            self.stats.dtmf += 1
            assert self.conversation is not None
            return self.conversation.on_dtmf(event.digit)
        elif isinstance(event, Start):
            self._transition("start", StreamState.STARTED)
            return self._start(event)
        elif isinstance(event, Stop):
            self._transition("stop")
            self._check_stream(event.stream_sid)
            self.state = StreamState.STOPPED
            self._media_sid = None
            self.end_reason = "stop"
            self._wake_run()
        elif isinstance(event, Connected):
            self._transition("connected", StreamState.CONNECTED)
        return None

    def _on_media(self, payload: bytes, timestamp_ms: int) -> Pending | None:
        """A frame of the caller's audio on this stream (checked): to the conversation."""
        self.stats.frames += 1
        conversation = self.conversation
        assert conversation is not None
        actions = conversation.hear(payload)
        if self.on_frame_lag is not None and self.stats.frames % LAG_SAMPLE_EVERY == 0:
            self._frame_lag(time.monotonic() - timestamp_ms / 1000)
        return conversation.act(actions) if actions else None

    def _frame_lag(self, offset: float) -> None:
        """A frame handled `offset` seconds after its timestamp: its lag behind the best."""
        if self._lag_base is None or offset < self._lag_base:
            self._lag_base = offset
        self.on_frame_lag(offset - self._lag_base)  # type: ignore[misc]

    def _check_stream(self, stream_sid: str) -> None:
        if stream_sid != self.stream_sid:
            # Twilio's error 31951 for a wrong streamSid; we log and ignore the message.
            raise ProtocolError(f"streamSid {stream_sid[:40]!r} is not this stream's")

    async def _start(self, start: Start) -> None:
        started = time.monotonic()
        self.call_sid = start.call_sid
        self.stream_sid = start.stream_sid
        params = start.custom_parameters
        info = CallInfo(
            call_sid=start.call_sid,
            stream_sid=start.stream_sid,
            from_number=params.get("from") or params.get("From"),
            to_number=params.get("to") or params.get("To"),
            direction=params.get("direction") or self._default_direction,
            parameters=params,
        )
        self.playout = TwilioPlayout(
            self._send, start.stream_sid, lead_ms=self._lead_ms, chunk_ms=self._chunk_ms
        )
        self._playout_task = asyncio.create_task(
            self.playout.run(), name=f"playout:{start.call_sid}"
        )
        self.conversation = await self._make_conversation(info, self.playout, self._end_async)
        await self.conversation.begin()
        if self.state is StreamState.STARTED:
            self._media_sid = start.stream_sid
            self._attach_hold(start.stream_sid)
        log.info("call started call_sid=%s stream_sid=%s direction=%s in %.1f ms",
                 info.call_sid, info.stream_sid, info.direction,
                 (time.monotonic() - started) * 1000)

    async def _send(self, *texts: str) -> None:
        """Send frames in order (several at once: one write, one system call), within
        `send_timeout_s` when that is set. A socket the peer has closed meanwhile raises
        `WebSocketDisconnect`, like a receive would."""
        direct = self._direct
        if direct is not None:
            if direct.closed:
                # The server closed the socket itself (the peer broke the protocol) while this
                # reply or barge-in was under way; the run loop is about to see the disconnect.
                raise PeerDisconnected(1006)
            if direct.send_texts(texts):
                return  # written at once: nothing to wait for, so no timeout to arm
        try:
            async with asyncio.timeout(self._send_timeout_s):
                for text in texts:
                    await self._ws.send_text(text)
        except TimeoutError:
            self.end("send_timeout")
            raise SendTimeout(self._send_timeout_s or 0.0) from None
        except (WebSocketDisconnect, WebSocketDisconnected) as exc:
            # WebSocketDisconnected: an earlier send already found the peer gone.
            raise PeerDisconnected(getattr(exc, "code", 1006)) from None

    async def _end_async(self, reason: str) -> None:
        """`end` for the conversation's call control (the bot hung up or transferred)."""
        self.end(reason)

    async def _finish(self) -> None:
        self.state = StreamState.STOPPED
        self._media_sid = None
        if self.conversation is not None:
            await self.conversation.close(self.end_reason)
        if self._playout_task is not None:
            self._playout_task.cancel()
            # Bounded: a task that swallowed its cancellation must not hold the call open.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._playout_task
            if not self._playout_task.done():
                log.error("playout did not stop call_sid=%s", self.call_sid)
        conversation = self.conversation
        if (self._on_end is not None and conversation is not None
                and conversation.started is not None and conversation.ended is not None
                and self.end_reason not in DROPPED_REASONS):
            try:  # stored before the socket closes: see the module doc
                async with asyncio.timeout(END_RECORD_TIMEOUT_S):
                    await self._on_end([conversation.started, conversation.ended])
            except Exception as exc:
                # A timeout's message is empty: name it.
                log.warning("could not store the end call_sid=%s: %s", self.call_sid,
                            str(exc) or type(exc).__name__)
        # A peer that stopped reading would hold the closing frame forever.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._send_timeout_s or CLOSE_TIMEOUT_S):
                await self._ws.close()
        if (self.end_reason in LIMIT_REASONS and self._on_limit is not None
                and self.call_sid != "-"):
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._on_limit(self.call_sid, self.end_reason)
            except Exception as exc:
                log.warning("limit hook failed call_sid=%s: %s", self.call_sid,
                            str(exc) or type(exc).__name__)
        log.info("call ended call_sid=%s reason=%s frames=%d bad=%d",
                 self.call_sid, self.end_reason, self.stats.frames, self.stats.bad_messages)
