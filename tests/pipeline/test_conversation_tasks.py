"""How a call's own tasks end: a barge-in's wait on the old reply, and a task whose caller is
gone (instant engines, no network)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pipeline.call_setup import CallInfo, ConversationConfig
from pipeline.conversation import Conversation
from pipeline.events import EventBus
from pipeline.listener import EndpointConfig
from pipeline.speech import PeerGone, SpokenSegment
from tests.fakes.engines import instant_engines


class _Sink:
    """An `AudioSink` that holds everything (nothing is ever played)."""

    def __init__(self) -> None:
        self.segments: list[SpokenSegment] = []

    def play(self, segment: SpokenSegment) -> None:
        self.segments.append(segment)

    async def clear(self) -> bool:
        return bool(self.segments)

    @property
    def busy(self) -> bool:
        return bool(self.segments)


def _conversation() -> Conversation:
    config = ConversationConfig(greeting="", system_prompt="Be brief.", apology="Sorry.",
                                endpoint=EndpointConfig())
    return Conversation(CallInfo("CA1", "MZ1"), instant_engines(), _Sink(), EventBus(), config)


async def test_a_barge_in_cancelled_while_it_waits_for_the_old_reply_stays_cancelled() -> None:
    """Before: `await reply` under suppress(CancelledError) swallowed the hang-up's cancel
    along with the reply's, and the listen task went on (it could start a new reply)."""
    conversation = _conversation()
    release = asyncio.Event()

    async def stubborn_reply() -> None:  # a reply that takes a moment to wind down
        try:
            await asyncio.sleep(3600)
        finally:
            await release.wait()

    conversation._reply = asyncio.create_task(stubborn_reply())
    await asyncio.sleep(0)
    barge_in = asyncio.create_task(conversation._interrupt("speech", onset_at=0.0))
    await asyncio.sleep(0.01)
    barge_in.cancel()  # the call hung up meanwhile
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await barge_in
    await conversation.close("stop")


async def test_a_task_that_finds_the_caller_gone_is_reaped_quietly(caplog) -> None:
    conversation = _conversation()

    async def send_after_hang_up() -> None:
        raise PeerGone("socket closed")

    async def broken() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.INFO):
        gone = conversation._spawn(send_after_hang_up(), "partial")
        bug = conversation._spawn(broken(), "words")
        await asyncio.wait({gone, bug})
        await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["words:CA1 failed"]
    assert any("partial:CA1 stopped: the caller is gone" in r.getMessage()
               for r in caplog.records)
    assert not conversation._tasks
    await conversation.close("stop")
