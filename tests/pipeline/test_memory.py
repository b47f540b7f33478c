"""Within-call memory: a bounded window of recent turns plus a rolling summary of older ones,
made by the LLM behind the scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from pipeline.llm_openai import OpenAiLlm
from pipeline.memory import ConversationMemory, RollingSummarizer, clip_text
from tests.fakes.openai_server import FakeOpenAi, Rule


@pytest.fixture
async def llm(fake_openai: FakeOpenAi) -> AsyncIterator[OpenAiLlm]:
    client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test", max_retries=0)
    engine = OpenAiLlm(client, "scripted", complete_timeout_s=5.0)
    yield engine
    await engine.aclose()


def talk(memory: ConversationMemory, turns: int, start: int = 0) -> None:
    for n in range(start, start + turns):
        memory.add_user(f"Question number {n} about the booking.")
        memory.add_assistant(f"Answer number {n}.")


def test_window_is_bounded_and_older_turns_are_abridged() -> None:
    memory = ConversationMemory("Be brief.", max_turns=2)
    talk(memory, 5)
    messages = memory.messages()
    assert [m.role for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[-1].content == "Answer number 4."
    assert "Earlier in this call (abridged)" in messages[0].content
    assert "Question number 2" in messages[0].content
    assert len(memory.turns) == 10 and len(memory.older) == 6


def test_same_role_twice_is_merged() -> None:
    memory = ConversationMemory("Be brief.")
    memory.add_assistant("Hello…")
    memory.add_user("Hi.")
    memory.add_user("I want a table.")
    assert [m.content for m in memory.messages()[1:]] == ["Hello…", "Hi. I want a table."]


def test_caller_context_tells_the_model_the_caller_called_before() -> None:
    memory = ConversationMemory("Be brief.", caller_context="Ann booked a table for Friday.")
    system = memory.messages()[0].content
    assert system.startswith("Be brief.")
    assert "called before" in system and "Ann booked a table for Friday." in system
    assert "called before" not in ConversationMemory("Be brief.").messages()[0].content


def test_clip_text_cuts_at_a_sentence_end() -> None:
    text = "Ann called. She booked a table for four on Friday at eight. She likes the window."
    assert clip_text(text, 70) == "Ann called. She booked a table for four on Friday at eight."
    assert len(clip_text("word " * 100, 50)) <= 50
    assert clip_text("  short\n text ", 50) == "short text"


async def test_summarizer_waits_until_enough_turns_left_the_window(
    llm: OpenAiLlm, fake_openai: FakeOpenAi
) -> None:
    memory = ConversationMemory("Be brief.", max_turns=2)
    summarizer = RollingSummarizer(min_new=6)
    talk(memory, 4)  # 8 messages, 4 in the window, 4 left
    assert not summarizer.due(memory)
    assert await summarizer.maybe_summarize(memory, llm) is False
    assert fake_openai.chat_requests == []
    talk(memory, 1, start=4)
    assert summarizer.due(memory)


async def test_rolling_summary_keeps_a_long_call_bounded(
    llm: OpenAiLlm, fake_openai: FakeOpenAi
) -> None:
    fake_openai.script(
        Rule(when="Updated notes", reply="Ann is booking a table for four on Friday at eight."),
    )
    memory = ConversationMemory("Be brief.", max_turns=4)
    summarizer = RollingSummarizer(min_new=6, max_chars=300)
    sizes = []
    for n in range(200):
        talk(memory, 1, start=n)
        await summarizer.maybe_summarize(memory, llm)
        messages = memory.messages()
        assert len(messages) <= 1 + 2 * 4
        sizes.append(sum(len(m.content) for m in messages))
    assert memory.summary == "Ann is booking a table for four on Friday at eight."
    assert len(memory.unsummarized()) < 6
    assert len(memory.turns) == 400  # the full history is kept, just not sent
    assert max(sizes) < 2000 and max(sizes[100:]) <= max(sizes[:100]) + 50
    requests = fake_openai.chat_requests
    assert len(requests) == (400 - 8) // 6
    # Each summary request carries the previous summary and only the new turns.
    last = requests[-1].last_user_message
    assert "Notes so far: Ann is booking a table" in last
    assert "Question number 0 " not in last and len(last) < 1000
    assert requests[-1].body["stream"] is False


async def test_two_summaries_never_run_at_once(llm: OpenAiLlm, fake_openai: FakeOpenAi) -> None:
    fake_openai.script(Rule(reply="Notes.", first_token_delay_s=0.2))
    memory = ConversationMemory("Be brief.", max_turns=1)
    summarizer = RollingSummarizer(min_new=2)
    talk(memory, 4)
    first = asyncio.create_task(summarizer.maybe_summarize(memory, llm))
    await asyncio.sleep(0)  # let it take the slot
    assert summarizer.running
    assert await summarizer.maybe_summarize(memory, llm) is False
    assert await first is True
    assert len(fake_openai.chat_requests) == 1 and memory.summary == "Notes."
    assert memory.summarized == len(memory.older) and not summarizer.running


async def test_failed_summary_keeps_the_abridged_fallback_and_warns(
    llm: OpenAiLlm, fake_openai: FakeOpenAi, caplog: pytest.LogCaptureFixture
) -> None:
    fake_openai.script(Rule(status=500))
    memory = ConversationMemory("Be brief.", max_turns=1)
    summarizer = RollingSummarizer(min_new=2)
    talk(memory, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.memory"):
        assert await summarizer.maybe_summarize(memory, llm) is False
    assert "rolling summary failed" in caplog.text
    assert memory.summary is None and summarizer.failures == 1
    assert "Earlier in this call (abridged)" in memory.messages()[0].content
    # No retry on every turn against a failing model: only after `min_new` more messages.
    assert not summarizer.due(memory)
    talk(memory, 1, start=3)
    assert summarizer.due(memory)
    fake_openai.script(Rule(reply="Caller asked four questions."))
    assert await summarizer.maybe_summarize(memory, llm) is True
    system = memory.messages()[0].content
    assert "Earlier in this call: Caller asked four questions." in system
    assert "abridged" not in system


async def test_turns_that_arrive_while_summarizing_stay_abridged(
    llm: OpenAiLlm, fake_openai: FakeOpenAi
) -> None:
    fake_openai.script(Rule(reply="First part.", first_token_delay_s=0.1))
    memory = ConversationMemory("Be brief.", max_turns=1)
    summarizer = RollingSummarizer(min_new=2)
    talk(memory, 2)
    task = asyncio.create_task(summarizer.maybe_summarize(memory, llm))
    await asyncio.sleep(0)
    talk(memory, 1, start=2)  # two more messages leave the window meanwhile
    assert await task
    assert memory.summarized == 2 and len(memory.unsummarized()) == 2
    system = memory.messages()[0].content
    assert "Earlier in this call: First part." in system
    assert "Then (abridged): user: Question number 1" in system
