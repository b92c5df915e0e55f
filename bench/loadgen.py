"""A small closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending its next
request when the previous answer is in. Latency per request, status codes, requests/s.

Why not httpx (used everywhere else): on this 2-core machine its client spent 3.5 ms of CPU
per request (measured by bench/serving.py), so at concurrency 32 the client, not the server,
was the limit (150 req/s with the client at 96 % of a core). This one sends pre-encoded
requests and reads answers by Content-Length with uvloop: tens of microseconds per request.
It speaks only what `stream-sentinel serve` answers (Content-Length bodies, keep-alive).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


def post(path: str, host: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    wall_s: float = 0.0
    sample: bytes = b""  # one answer's body, to check what was answered

    @property
    def errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code != 200)


async def _connection(host: str, port: int, requests: list[bytes], start: int, step: int, stop_at: float | None,
                      count: list[int], out: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        i = start
        while True:
            if (stop_at is not None and time.perf_counter() >= stop_at) or count[0] <= 0:
                return
            count[0] -= 1
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += step
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            out.latencies.append(time.perf_counter() - t0)
            out.statuses[status] = out.statuses.get(status, 0) + 1
            if not out.sample:
                out.sample = body
    finally:
        writer.close()


async def _run(host: str, port: int, requests: list[bytes], concurrency: int, seconds: float | None,
               count: int | None) -> Result:
    out = Result()
    started = time.perf_counter()
    stop_at = None if seconds is None else started + seconds
    left = [count if count is not None else 1 << 62]
    await asyncio.gather(*(_connection(host, port, requests, c, concurrency, stop_at, left, out)
                           for c in range(concurrency)))
    out.wall_s = time.perf_counter() - started
    return out


def run(url: str, requests: list[bytes], concurrency: int, seconds: float | None = None,
        count: int | None = None) -> Result:
    """Closed loop from ``concurrency`` connections for ``seconds`` or ``count`` requests."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # uvicorn's standard extra brings it; plain asyncio works too, slower
        runner = asyncio.run
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return runner(_run(host, int(port), requests, concurrency, seconds, count))
