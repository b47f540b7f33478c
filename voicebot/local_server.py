"""Run the app on a free loopback port inside this process (for `simulate`, tests, benches)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from voicebot.ws_protocol import DirectTextProtocol


@contextlib.asynccontextmanager
async def running_server(app: Starlette, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """Serve `app` on `host`:<free port>; yields the base URL (http://host:port)."""
    config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on",
                            ws_max_size=1 << 20, ws=DirectTextProtocol)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
                raise RuntimeError("server stopped during startup")
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
