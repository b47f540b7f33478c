"""The floor under the media path: a bare uvloop server that only accepts the upgrade and
reads the frames, so its CPU is what the kernel and the event loop cost for the same load.

    .venv/bin/python bench/floor_server.py --port 18777 --seconds 30 &
    .venv/bin/python bench/media_load.py --url ws://127.0.0.1:18777/twilio/media \\
        --calls 150 --duration 20 --ramp-s 3 --speech-every-s 0

Prints the process's CPU seconds when it stops; divide by the frames the generator reports
as sent (`frames_sent`) for the cost per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import resource

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


class Reader(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.open = False
        self.head = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.open:
            return  # the frames are read, and nothing more
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        self.open = True
        key = next(line.split(b":", 1)[1].strip() for line in self.head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        self.transport.write(  # type: ignore[attr-defined]
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())


async def serve(port: int, seconds: float) -> None:
    server = await asyncio.get_running_loop().create_server(Reader, "127.0.0.1", port)
    await asyncio.sleep(seconds)
    server.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu_s {usage.ru_utime + usage.ru_stime:.2f}", flush=True)


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=18777)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.seconds))


if __name__ == "__main__":
    main()
