"""A loopback fake of Google Translate's TTS endpoint, the one gTTS 2.2.4 talks to.

gTTS POSTs `f.req=<rpc json>` to `https://translate.google.<tld>/_/TranslateWebserverUi/data/
batchexecute` and scans the response lines for `jQ1olc","[\\"<base64 mp3>\\"]`. The fake answers
in that same format with a real MP3 (`tests/fixtures/tone.mp3`, 0.5 s of 440 Hz at 24 kHz,
encoded with LAME without a Xing tag so copies concatenate), repeated once per `chars_per_clip`
characters so longer text yields longer audio. `pointed_at()` patches gTTS's URL builder
(`gtts.tts._translate_url`) to the fake for the duration of a `with` block.

Usage::

    with FakeGtts() as fake, fake.pointed_at():
        clips = [c async for c in GttsTts().synthesize("Hello there.")]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from unittest import mock
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from tests.fakes.loopback import LoopbackServer

TONE_MP3 = Path(__file__).resolve().parent.parent / "fixtures" / "tone.mp3"
TONE_SECONDS = 0.5


@dataclass(frozen=True)
class GttsRequest:
    text: str
    lang: str


class FakeGtts:
    """The fake endpoint; a context manager. `status` makes it fail with that HTTP status;
    `no_audio` makes it answer 200 without audio (gTTS raises gTTSError for both); `delay_s`
    holds each answer back that long."""

    PATH = "/_/TranslateWebserverUi/data/batchexecute"

    def __init__(self, chars_per_clip: int = 8) -> None:
        self.chars_per_clip = chars_per_clip
        self.status: int | None = None
        self.no_audio = False
        self.delay_s = 0.0
        self.requests: list[GttsRequest] = []
        self._mp3 = TONE_MP3.read_bytes()
        self._server = LoopbackServer(
            Starlette(routes=[Route(self.PATH, self._batchexecute, methods=["POST"])])
        )
        self.url = self._server.url

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def pointed_at(self) -> Iterator[None]:
        """Make gTTS send its requests here instead of to Google."""

        def translate_url(tld: str = "com", path: str = "") -> str:
            return f"{self.url}/{path}"

        with mock.patch("gtts.tts._translate_url", translate_url):
            yield

    async def _batchexecute(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        rpc = json.loads(form["f.req"][0])
        text, lang, *_ = json.loads(rpc[0][0][1])
        self.requests.append(GttsRequest(text=text, lang=lang))
        await asyncio.sleep(self.delay_s)
        if self.status is not None:
            return PlainTextResponse("scripted failure", status_code=self.status)
        if self.no_audio:
            return PlainTextResponse(')]}\'\n\n25\n[["wrb.fr","jQ1olc",null]]\n')
        clips = max(1, math.ceil(len(text) / self.chars_per_clip))
        audio = base64.b64encode(self._mp3 * clips).decode("ascii")
        # Compact separators: gTTS's regex expects `jQ1olc","[\"` with no spaces.
        inner = json.dumps([audio], separators=(",", ":"))
        payload = json.dumps(
            [["wrb.fr", "jQ1olc", inner, None, None, None, "generic"]], separators=(",", ":")
        )
        return PlainTextResponse(f")]}}'\n\n{len(payload)}\n{payload}\n")
