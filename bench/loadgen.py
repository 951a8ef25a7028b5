"""The load generator: a separate process that fires signed deliveries at an HTTP server.

Run as ``python -m bench.loadgen URL --secret S ...``; it prints one JSON report on stdout.
It is a raw-socket HTTP/1.1 keep-alive client on uvloop (one ``asyncio.Protocol`` per
connection), because a full client library (httpx) spends more CPU per request than the
acceptor does, and on a 2-core machine the generator's CPU is taken from the server it measures.

Every delivery is a realistic Outreach ``prospect.updated``/``mailing.*`` body (from
:mod:`ingest.commands.samples`) whose ``data.id`` is a unique sequence number, signed with
HMAC-SHA256 as
Outreach signs. The sequence number comes back as ``resource_id`` in Postgres and in the body
of each RQ envelope, which is how the bench proves nothing was lost or doubled.

Two modes:

- closed loop (``--duration``): ``--connections`` connections each send the next request as
  soon as the previous answer arrives. Measures the most the server takes. ``--count N``
  stops after N requests instead (a burst: the test suite's batching guard uses it).
- open loop (``--rate``): request *i* is due at ``start + i / rate``, whoever is free sends it;
  latency counts from the due time, so a server that falls behind is not flattered
  (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from ingest.commands.samples import build_sample

__all__ = ["Templates", "main"]

# Stands for the sequence number in a template body; never produced by the sample builder.
_PLACEHOLDER = 987_654_321_987_654_321


class Templates:
    """Realistic Outreach bodies with a hole for a unique id; signs what it fills in."""

    def __init__(self, secret: str, count: int = 32, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.key = secret.encode()
        self.bodies: list[bytes] = []
        for _ in range(count):
            body, _headers = build_sample("outreach", secret, rng)
            payload: dict[str, Any] = orjson.loads(body)
            payload["data"]["id"] = _PLACEHOLDER
            if "beforeUpdate" in payload:
                payload["beforeUpdate"]["id"] = _PLACEHOLDER
            self.bodies.append(orjson.dumps(payload))
        self.hole = str(_PLACEHOLDER).encode()

    def body(self, seq: int) -> bytes:
        return self.bodies[seq % len(self.bodies)].replace(self.hole, str(seq).encode())

    def request(self, host: str, path: str, seq: int) -> bytes:
        body = self.body(seq)
        signature = hmac.new(self.key, body, hashlib.sha256).hexdigest()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nOutreach-Webhook-Signature: {signature}\r\n"
            f"Outreach-Webhook-Cleanup-Token: bench-{seq}\r\n\r\n"
        )
        return head.encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; :meth:`call` sends a request and returns the status."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's; they have what is used here.
        self.transport = cast(asyncio.WriteTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed before an answer"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).decode("latin-1")
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        status = int(head.split(" ", 2)[1])
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    async def call(self, request: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


@dataclass
class Report:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    accepted: list[int] = field(default_factory=list)  # sequence numbers answered 200
    latencies: list[float] = field(default_factory=list)  # of requests in the measured window
    measured: int = 0  # requests completed inside the measured window
    window: float = 0.0  # seconds of the measured window
    next_seq: int = 0  # one past the last sequence number used

    def as_dict(self, with_ids: bool) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1000 if lat else None

        out: dict[str, Any] = {
            "sent": self.sent, "ok": self.statuses.get(200, 0),
            "statuses": {str(k): v for k, v in self.statuses.items()}, "errors": self.errors,
            "rate": self.measured / self.window if self.window else 0.0,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": lat[-1] * 1000 if lat else None,
            "cpu_s": time.process_time(), "next_seq": self.next_seq,
        }
        if with_ids:
            out["accepted"] = self.accepted
        return out


async def _open(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, host, port)
    return protocol


async def run(url: str, secret: str, connections: int, duration: float | None,
              rate: float | None, start_seq: int, warmup: float,
              count: int | None = None) -> Report:
    """Closed loop for ``duration`` seconds (or ``count`` requests), or open loop at ``rate``
    for ``duration``."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port_text = hostport.partition(":")
    path = "/" + path
    templates = Templates(secret)
    report = Report()
    conns = [await _open(host, int(port_text)) for _ in range(connections)]
    next_seq = start_seq
    total = int(rate * duration) if rate and duration else None
    started = time.perf_counter()
    measure_from = started + warmup
    stop_at = started + (duration or 0)
    last_done = started

    async def one(index: int) -> None:
        nonlocal next_seq, last_done
        conn = conns[index]
        while True:
            seq = next_seq
            if rate is not None:
                if total is not None and seq - start_seq >= total:
                    return
                due = started + (seq - start_seq) / rate
                next_seq += 1
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            else:
                if time.perf_counter() >= stop_at or (count and seq - start_seq >= count):
                    return
                due = time.perf_counter()
                next_seq += 1
            request = templates.request(hostport, path, seq)
            if conn.closed:
                conn = conns[index] = await _open(host, int(port_text))
            report.sent += 1
            try:
                status = await conn.call(request)
            except (ConnectionError, OSError) as exc:
                report.errors[type(exc).__name__] = report.errors.get(type(exc).__name__, 0) + 1
                continue
            done = time.perf_counter()
            report.statuses[status] = report.statuses.get(status, 0) + 1
            if status == 200:
                report.accepted.append(seq)
            if done >= measure_from:
                report.latencies.append(done - due)
                report.measured += 1
                last_done = max(last_done, done)

    await asyncio.gather(*(one(i) for i in range(connections)))
    report.window = max(0.0, last_done - measure_from)
    report.next_seq = next_seq
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/webhooks/outreach")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--count", type=int, default=None,
                        help="closed loop: stop after this many requests")
    parser.add_argument("--rate", type=float, default=None, help="open loop: requests/s")
    parser.add_argument("--start-seq", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds left out of the rate and latency figures")
    parser.add_argument("--ids", action="store_true", help="list accepted sequence numbers")
    args = parser.parse_args(argv)
    coro = run(args.url, args.secret, args.connections, args.duration, args.rate,
               args.start_seq, args.warmup, args.count)
    try:
        import uvloop  # noqa: PLC0415  (shipped with uvicorn[standard])

        report = uvloop.run(coro)
    except ImportError:
        report = asyncio.run(coro)
    sys.stdout.buffer.write(orjson.dumps(report.as_dict(args.ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
