"""Smooth traffic: every request sent at its own moment, as real opens and clicks come.

wrk paces each connection (a fixed wait before every request), so its connections fall
into step and their requests arrive in bursts; ingest then puts tens of events per job,
and the consumer sees a few large jobs. Real readers are millions of independent
clients: arrivals form a Poisson process. This driver draws the arrival moments in
advance (exponential gaps, seeded), keeps a pool of keep-alive connections open, and
sends each request at its moment on a connection that is free then (or as soon as one
frees up, counted as late). Latency runs from the scheduled moment, not from the send,
so a slow server cannot hide its queueing by slowing the client down.

Loopback only, bounded in time; plain HTTP/1.1 on asyncio streams, since a client
library would spend more CPU per request than the servers it measures.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

# A request sent this long after its moment is counted as late: no connection was free.
LATE_S = 0.005


def poisson_schedule(rate: float, seconds: float, seed: int = 7) -> list[float]:
    """Arrival moments (seconds from the start, increasing, all below ``seconds``) of a
    Poisson process of ``rate`` per second."""
    if rate <= 0 or seconds <= 0:
        raise ValueError("rate and seconds must be positive")
    rng = random.Random(seed)
    moments: list[float] = []
    t = rng.expovariate(rate)
    while t < seconds:
        moments.append(t)
        t += rng.expovariate(rate)
    return moments


def response_length(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """(status, total length) of the first whole HTTP/1.1 response in ``buffer``, or
    None while it is incomplete. A response without Content-Length has no body (the
    servers measured always send one; chunked answers are not expected here)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).split(b"\r\n")
    parts = head[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {head[0]!r}")
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    total = end + 4 + length
    return (int(parts[1]), total) if len(buffer) >= total else None


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SmoothResult:
    scheduled: int
    answered: int  # whole answers, whatever their status
    errors: int  # requests lost to a connection error, or never sent (no connection left)
    non_2xx_3xx: int
    late: int  # sent more than LATE_S after their moment
    requests_per_s: float
    p50_ms: float  # from the scheduled moment to the whole answer
    p99_ms: float
    connections: int
    duration_s: float
    requests: int = 0  # answered, as wrk's result names it


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    async def exchange(self, request: bytes) -> int:
        """Send one request and read its whole answer; its status."""
        self.writer.write(request)
        while True:
            found = response_length(self.buffer)
            if found is not None:
                status, length = found
                del self.buffer[:length]
                return status
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk


async def drive(
    listen: str,
    lines: Sequence[str],
    rate: float,
    seconds: float,
    connections: int = 64,
    seed: int = 7,
) -> SmoothResult:
    """Send ``lines`` (``path<TAB>user agent``, cycled) to ``listen`` (127.0.0.1 only)
    at Poisson moments of ``rate`` per second for ``seconds``."""
    host, port = listen.rsplit(":", 1)
    if host != "127.0.0.1":
        raise ValueError(f"load goes to 127.0.0.1 only, not {host}")
    requests = []
    for line in lines:
        path, _, agent = line.partition("\t")
        requests.append(
            f"GET {path} HTTP/1.1\r\nHost: {listen}\r\nUser-Agent: {agent}\r\n\r\n".encode()
        )
    moments = poisson_schedule(rate, seconds, seed)
    idle: collections.deque[_Connection] = collections.deque()
    for _ in range(connections):
        idle.append(_Connection(*await asyncio.open_connection(host, int(port))))
    waiting: collections.deque[tuple[float, bytes]] = collections.deque()
    latencies: list[float] = []
    counts = {"errors": 0, "late": 0, "non_2xx_3xx": 0}
    tasks: set[asyncio.Task[None]] = set()

    async def one(conn: _Connection, due: float, request: bytes) -> None:
        while True:
            if time.monotonic() - due > LATE_S:
                counts["late"] += 1
            try:
                status = await conn.exchange(request)
            except (OSError, ValueError):
                counts["errors"] += 1
                conn.writer.close()
                return  # the connection is gone: the pool shrinks by one
            latencies.append(time.monotonic() - due)
            if not 200 <= status < 400:
                counts["non_2xx_3xx"] += 1
            if not waiting:
                idle.append(conn)
                return
            due, request = waiting.popleft()  # the oldest request that found none free

    start = time.monotonic()
    for i, moment in enumerate(moments):
        due = start + moment
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        request = requests[i % len(requests)]
        if idle:
            task = asyncio.create_task(one(idle.popleft(), due, request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            waiting.append((due, request))
    while tasks:
        await asyncio.wait(set(tasks), timeout=30)
        if time.monotonic() - start > seconds + 30:
            break
    elapsed = time.monotonic() - start
    for conn in idle:
        conn.writer.close()
    return SmoothResult(
        scheduled=len(moments),
        answered=len(latencies),
        errors=counts["errors"] + len(waiting),
        non_2xx_3xx=counts["non_2xx_3xx"],
        late=counts["late"],
        requests_per_s=round(len(latencies) / elapsed, 1),
        p50_ms=round(percentile(latencies, 0.5) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        connections=connections,
        duration_s=round(elapsed, 1),
        requests=len(latencies),
    )


def run(
    listen: str, lines: Sequence[str], rate: float, seconds: float, connections: int = 64
) -> SmoothResult:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(drive(listen, lines, rate, seconds, connections))
    return uvloop.run(drive(listen, lines, rate, seconds, connections))
