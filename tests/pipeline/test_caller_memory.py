"""Memory across calls: the caller stores (in-process and real Redis, same tests), the post-call
summary that reaches the caller's next call, and `voicebot forget`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from openai import AsyncOpenAI
from redis.asyncio import Redis

from db.engine import create_db_engine
from db.repository import CallRepository
from pipeline.call_summary import CallerMemory
from pipeline.caller_memory import (
    CallerKeys,
    CallerMemoryStore,
    CallerMemoryUnavailable,
    InProcessCallerStore,
    InvalidNumber,
    RedisCallerStore,
    build_caller_store,
    normalize_number,
    rememberable,
)
from pipeline.engines import ChatMessage
from pipeline.events import CallEnded, CallStarted, EventBus, UtteranceDone
from pipeline.llm_openai import OpenAiLlm
from pipeline.memory import ConversationMemory
from tests.conftest_db import migrated_sqlite_url
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.forget import forget_caller
from voicebot.settings import load_settings

REDIS_URL = os.environ.get("VOICEBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NUMBER = "+15550100001"
TTL_S = 90 * 86400


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def namespace() -> str:
    return f"vbtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_admin(namespace: str) -> AsyncIterator[Redis]:
    """A plain client to the test Redis; deletes the test's namespace afterwards."""
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(params=["in_process", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[CallerMemoryStore]:
    """Each store under test; Redis keys live under a namespace of their own, deleted after."""
    keys = CallerKeys.for_namespace(namespace)
    if request.param == "in_process":
        yield InProcessCallerStore(keys, ttl_s=TTL_S, clock=Clock())
        return
    made = RedisCallerStore(REDIS_URL, keys, namespace=namespace, ttl_s=TTL_S)
    try:
        await made.redis.ping()
    except OSError as exc:  # redis' ConnectionError is an OSError
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}); deselect with -m 'not redis'")
    yield made
    stale = [key async for key in made.redis.scan_iter(f"{namespace}:*")]
    if stale:
        await made.redis.delete(*stale)
    await made.aclose()


async def raw_contents(store: CallerMemoryStore) -> list[str]:
    """Every key and value the store holds, as text."""
    if isinstance(store, InProcessCallerStore):
        return [f"{key} {value}" for key, (_, value) in store._entries.items()]
    assert isinstance(store, RedisCallerStore)
    out = []
    async for key in store.redis.scan_iter(f"{store.namespace}:*"):
        out.append(f"{key} {await store.redis.get(key)}")
    return out


async def remaining_ttl(store: CallerMemoryStore, number: str) -> float:
    if isinstance(store, InProcessCallerStore):
        expires_at, _ = store._entries["caller:" + store.keys.hash(number)]
        return expires_at - store._clock()
    assert isinstance(store, RedisCallerStore)
    return float(await store.redis.ttl(store.caller_key(number)))


@pytest.fixture
async def llm(fake_openai: FakeOpenAi) -> AsyncIterator[OpenAiLlm]:
    client = AsyncOpenAI(base_url=fake_openai.base_url, api_key="test", max_retries=0)
    engine = OpenAiLlm(client, "scripted", complete_timeout_s=5.0)
    yield engine
    await engine.aclose()


# -- numbers and keys ----------------------------------------------------------------------


def test_numbers_normalize_and_withheld_callers_are_not_remembered() -> None:
    assert normalize_number(" +1 (555) 010-0001 ") == NUMBER
    assert normalize_number("0044 20 7946 0000") == "+442079460000"
    assert normalize_number("client:Alice") == "client:alice"
    with pytest.raises(InvalidNumber):
        normalize_number("not a number")
    assert rememberable(NUMBER)
    assert not rememberable(None) and not rememberable("") and not rememberable("junk")
    assert not rememberable("+266696687")  # Twilio's "anonymous"


def test_keys_are_keyed_hashes_of_the_number() -> None:
    keys = CallerKeys("secret")
    digest = keys.hash(NUMBER)
    assert len(digest) == 64 and "5550100001" not in digest
    assert keys.hash("+1 555 010 0001") == digest
    assert CallerKeys("other").hash(NUMBER) != digest
    assert CallerKeys.for_namespace("a").hash(NUMBER) != CallerKeys.for_namespace("b").hash(NUMBER)


async def test_the_settings_choose_the_store(namespace: str) -> None:
    assert isinstance(build_caller_store(load_settings(redis_url=None)), InProcessCallerStore)
    redis_store = build_caller_store(load_settings(redis_url=REDIS_URL, redis_namespace=namespace))
    assert isinstance(redis_store, RedisCallerStore) and redis_store.namespace == namespace
    await redis_store.aclose()


# -- both stores ---------------------------------------------------------------------------


async def test_summary_round_trip(store: CallerMemoryStore) -> None:
    assert await store.get_summary(NUMBER) is None
    await store.put_summary(NUMBER, "Ann booked a table for four on Friday.")
    assert await store.get_summary("+1 555 010 0001") == "Ann booked a table for four on Friday."
    assert await store.get_summary("+15550100002") is None


async def test_no_number_in_clear_and_ttl_set(store: CallerMemoryStore) -> None:
    await store.put_summary(NUMBER, "Ann booked a table.")
    contents = await raw_contents(store)
    assert len(contents) == 1
    assert all("5550100001" not in text for text in contents)
    assert TTL_S - 60 < await remaining_ttl(store, NUMBER) <= TTL_S


async def test_forget_removes_the_summary(store: CallerMemoryStore) -> None:
    await store.put_summary(NUMBER, "Ann booked a table.")
    await store.put_summary("+15550100002", "Bob asked about prices.")
    assert await store.forget(NUMBER) is True
    assert await store.get_summary(NUMBER) is None
    assert await store.forget(NUMBER) is False
    assert await store.get_summary("+15550100002") == "Bob asked about prices."


async def test_call_context_round_trip(store: CallerMemoryStore) -> None:
    messages = [ChatMessage("assistant", "Hello!"), ChatMessage("user", "A table, please.")]
    assert await store.load_context("CA1") is None
    await store.save_context("CA1", messages)
    assert await store.load_context("CA1") == messages


async def test_in_process_summary_expires() -> None:
    clock = Clock()
    store = InProcessCallerStore(CallerKeys("k"), ttl_s=10, clock=clock)
    await store.put_summary(NUMBER, "Ann.")
    clock.now += 9
    assert await store.get_summary(NUMBER) == "Ann."
    clock.now += 2
    assert await store.get_summary(NUMBER) is None


# -- Redis outages -------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_redis_falls_back_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisCallerStore(f"redis://127.0.0.1:{closed_port()}/0", CallerKeys("k"))
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.caller_memory"):
            await store.warm_up(timeout_s=1.0)
            assert "not reachable at start-up" in caplog.text
            await store.put_summary(NUMBER, "Ann booked a table.")
            assert await store.get_summary(NUMBER) == "Ann booked a table."
            await store.save_context("CA1", [ChatMessage("user", "Hi.")])
            assert await store.load_context("CA1") == [ChatMessage("user", "Hi.")]
        assert store.degraded and store.outages == 1  # one warning, then the cooldown
        assert caplog.text.count("redis unreachable") == 1
        # Erasing must not pretend: the fallback copy goes, and the caller hears of the outage.
        with pytest.raises(CallerMemoryUnavailable):
            await store.forget(NUMBER)
        assert await store.fallback.get_summary(NUMBER) is None
    finally:
        await store.aclose()


async def test_a_hanging_redis_does_not_hold_up_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisCallerStore(f"redis://127.0.0.1:{port}/0", CallerKeys("k"), op_timeout_s=0.2)
    service = CallerMemory(store, llm=None)  # type: ignore[arg-type]
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with caplog.at_level(logging.WARNING, logger="pipeline.caller_memory"):
            assert await service.context_for(NUMBER) is None
        assert loop.time() - began < 0.6
        assert store.degraded and "redis unreachable" in caplog.text
        began = loop.time()
        assert await service.context_for(NUMBER) is None  # the cooldown: no waiting at all
        assert loop.time() - began < 0.05
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()


class TcpProxy:
    """A loopback TCP proxy to Redis that the test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.mark.redis
async def test_redis_dropping_mid_call_falls_back_then_reconnects(
    redis_admin: Redis, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(target)
    await proxy.start()
    store = RedisCallerStore(
        f"redis://127.0.0.1:{proxy.port}/0", CallerKeys("k"), namespace=namespace, cooldown_s=0
    )
    try:
        await store.put_summary(NUMBER, "First call.")
        assert await store.get_summary(NUMBER) == "First call."
        await proxy.cut()
        with caplog.at_level(logging.WARNING, logger="pipeline.caller_memory"):
            await store.put_summary(NUMBER, "Second call.")  # during the outage
            assert await store.get_summary(NUMBER) == "Second call."
        assert "redis unreachable" in caplog.text and store.outages >= 1
        await proxy.start()  # same port: Redis is back
        assert await store.get_summary(NUMBER) == "Second call."  # the newer, from the fallback
        await store.put_summary(NUMBER, "Third call.")
        assert await store.fallback.get_summary(NUMBER) is None
        raw = await redis_admin.get(store.caller_key(NUMBER))
        assert raw is not None and "Third call." in raw
    finally:
        await store.aclose()
        await proxy.cut()


# -- the post-call summary reaches the next call -------------------------------------------


def call_events(call_sid: str, lines: list[tuple[str, str]], number: str = NUMBER) -> list:
    at = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
    events: list = [CallStarted(call_sid, "MZ" + call_sid, number, "+15550100999", "inbound", at)]
    for turn, (role, text) in enumerate(lines):
        events.append(UtteranceDone(call_sid, turn, role, text, at, at))  # type: ignore[arg-type]
    events.append(CallEnded(call_sid, at, "stop"))
    return events


@pytest.fixture
async def memory_service(
    store: CallerMemoryStore, llm: OpenAiLlm
) -> AsyncIterator[tuple[CallerMemory, EventBus]]:
    bus = EventBus()
    service = CallerMemory(store, llm, max_chars=300)
    bus.subscribe("memory", service.handle)
    await bus.start()
    yield service, bus
    await bus.stop()
    await service.stop()


async def run_call(service: CallerMemory, bus: EventBus, events: list) -> None:
    for event in events:
        bus.publish(event)
    await bus.drain()
    await service.wait_idle()


async def test_summary_of_call_one_is_in_call_two_system_prompt(
    memory_service: tuple[CallerMemory, EventBus], fake_openai: FakeOpenAi
) -> None:
    service, bus = memory_service
    fake_openai.script(
        Rule(when="Known from earlier calls: (nothing",
             reply="Ann booked a table for four on Friday 14 March at eight."),
        Rule(when="Known from earlier calls: Ann",
             reply="Ann moved her Friday booking to nine. She asked about parking."),
    )
    assert await service.context_for(NUMBER) is None
    await run_call(service, bus, call_events("CA1", [
        ("bot", "Hello! How can I help?"),
        ("caller", "Hi, this is Ann. A table for four on Friday at eight, please."),
        ("bot", "Done: Friday at eight for four."),
    ]))
    request = fake_openai.chat_requests[-1].last_user_message
    assert "Caller: Hi, this is Ann." in request and "Assistant: Done" in request
    assert "2025-03-14" in request

    context = await service.context_for(NUMBER)
    assert context == "Ann booked a table for four on Friday 14 March at eight."
    system = ConversationMemory("Be brief.", caller_context=context).messages()[0].content
    assert "called before" in system and "Ann booked a table for four" in system

    # Call two merges with call one's summary.
    await run_call(service, bus, call_events("CA2", [
        ("caller", "It's Ann again, can we make it nine? Is there parking?"),
        ("bot", "Moved to nine. Yes, there is parking."),
    ]))
    assert "Known from earlier calls: Ann booked" in fake_openai.chat_requests[-1].last_user_message
    assert await service.context_for(NUMBER) == (
        "Ann moved her Friday booking to nine. She asked about parking."
    )
    assert await service.context_for("+15550100002") is None


async def test_calls_without_a_usable_number_or_words_are_not_summarized(
    memory_service: tuple[CallerMemory, EventBus], fake_openai: FakeOpenAi
) -> None:
    service, bus = memory_service
    await run_call(service, bus, call_events("CA1", [("caller", "Hi.")], number="+266696687"))
    await run_call(service, bus, call_events("CA2", [("bot", "Hello! Anyone there?")]))
    assert fake_openai.chat_requests == []
    assert await service.context_for("+266696687") is None


async def test_summary_never_stores_the_callers_number(
    memory_service: tuple[CallerMemory, EventBus], fake_openai: FakeOpenAi, store: CallerMemoryStore
) -> None:
    service, bus = memory_service
    fake_openai.script(Rule(reply="Ann (+15550100001) wants a call back on 15550100001."))
    await run_call(service, bus, call_events("CA1", [("caller", "Call me back, it's Ann.")]))
    summary = await service.context_for(NUMBER)
    assert summary == "Ann ([number]) wants a call back on [number]."
    assert all("5550100001" not in text for text in await raw_contents(store))


async def test_failed_summary_keeps_the_previous_one(
    memory_service: tuple[CallerMemory, EventBus],
    fake_openai: FakeOpenAi,
    store: CallerMemoryStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, bus = memory_service
    await store.put_summary(NUMBER, "Ann booked Friday.")
    fake_openai.script(Rule(status=503))
    with caplog.at_level(logging.WARNING, logger="pipeline.call_summary"):
        await run_call(service, bus, call_events("CA1", [("caller", "Hello again.")]))
    assert "caller summary failed call_sid=CA1" in caplog.text
    assert await service.context_for(NUMBER) == "Ann booked Friday."


class StartedLlm:
    """Delegates to a real engine; `started` is set when a summary request begins."""

    def __init__(self, inner: OpenAiLlm) -> None:
        self.inner = inner
        self.name = inner.name
        self.started = asyncio.Event()

    async def complete(self, messages: list[ChatMessage]) -> str:
        self.started.set()
        return await self.inner.complete(messages)


async def test_stop_cancels_a_running_summary(
    store: CallerMemoryStore, llm: OpenAiLlm, fake_openai: FakeOpenAi
) -> None:
    fake_openai.script(Rule(hang=True))
    watched = StartedLlm(llm)
    service = CallerMemory(store, watched)  # type: ignore[arg-type]
    for event in call_events("CA1", [("caller", "Hello.")]):
        await service.handle(event)
    await watched.started.wait()
    running = list(service._tasks)
    assert len(running) == 1
    await service.stop()
    assert running[0].cancelled()
    for request in fake_openai.chat_requests:  # the HTTP request, if it got out, was closed
        assert await request.wait_finished() and request.disconnected
    assert await service.context_for(NUMBER) is None


async def test_outbound_calls_remember_the_callee(
    memory_service: tuple[CallerMemory, EventBus], fake_openai: FakeOpenAi
) -> None:
    service, bus = memory_service
    fake_openai.script(Rule(reply="Bob confirmed his appointment."))
    at = datetime(2025, 3, 14, tzinfo=UTC)
    await run_call(service, bus, [
        CallStarted("CA9", "MZ9", "+15550100999", "+15550100002", "outbound-api", at),
        UtteranceDone("CA9", 1, "caller", "Yes, I'll be there.", at, at),
        CallEnded("CA9", at, "stop"),
    ])
    assert await service.context_for("+15550100002") == "Bob confirmed his appointment."
    assert await service.context_for("+15550100999") is None


# -- voicebot forget -----------------------------------------------------------------------


@pytest.fixture
async def seeded_db(tmp_path) -> AsyncIterator[tuple[str, CallRepository]]:
    """A migrated SQLite database with two calls from NUMBER and one from another number."""
    url = await migrated_sqlite_url(tmp_path)
    engine = create_db_engine(url)
    repository = CallRepository(engine)
    at = datetime(2025, 3, 14, tzinfo=UTC)
    for sid, number in (("CA1", NUMBER), ("CA2", NUMBER), ("CA3", "+15550100002")):
        await repository.start_call(sid, started_at=at, from_number=number, to_number="+15550100999")
        await repository.add_utterance(sid, turn=1, role="caller", text="Hi.", started_at=at,
                                       ended_at=at)
    yield url, repository
    await engine.dispose()


async def test_forget_erases_memory_and_calls(
    store: CallerMemoryStore, namespace: str, seeded_db: tuple[str, CallRepository]
) -> None:
    url, repository = seeded_db
    await store.put_summary(NUMBER, "Ann booked Friday.")
    await store.put_summary("+15550100002", "Bob.")
    redis_url = REDIS_URL if isinstance(store, RedisCallerStore) else None
    settings = load_settings(database_url=url, redis_url=redis_url, redis_namespace=namespace)
    # Redis: the command builds its own store from the settings, as the CLI does.
    own_store = store if redis_url is None else None
    result = await forget_caller(settings, "+1 555 010 0001", store=own_store)
    assert result == {"number": NUMBER, "caller_memory": "erased", "calls_deleted": 2,
                      "errors": []}
    assert await store.get_summary(NUMBER) is None
    assert await store.get_summary("+15550100002") == "Bob."
    remaining = await repository.list_calls()
    assert [c.call_sid for c in remaining.calls] == ["CA3"]


async def test_forget_without_redis_says_the_memory_is_in_the_server(
    seeded_db: tuple[str, CallRepository],
) -> None:
    url, _ = seeded_db
    result = await forget_caller(load_settings(database_url=url, redis_url=None), NUMBER)
    assert result["caller_memory"] == "in_process" and result["calls_deleted"] == 2


async def test_forget_reports_an_unreachable_redis(tmp_path) -> None:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/none.db",
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
    )
    result = await forget_caller(settings, NUMBER)
    assert result["caller_memory"] == "error" and result["errors"]
    assert result["calls_deleted"] == 0
    with pytest.raises(InvalidNumber):
        await forget_caller(settings, "Ann")
