"""The machine's own ceilings, measured in the same run as the pipeline.

- Redis LPUSH of an envelope-sized value: with the acceptor's own client (redis-py, one call in
  flight, as its flush thread makes them) and with ``redis.asyncio`` at 64 calls in flight.
- RQ's own job rate: no-op jobs, JSON serializer, one plain ``SimpleWorker`` in burst mode.
- Postgres: rows/s into a copy of ``webhook_events`` (same columns, indexes and unique key;
  ``LIKE ... INCLUDING ALL``, which leaves out only the foreign key), 256 rows per transaction
  with the sink's own ``INSERT ... ON CONFLICT DO NOTHING`` through psycopg's pipelined
  ``executemany``: what the database and the driver allow, without our job machinery.

Beside the ceilings, :func:`batch_checks` times the two script calls a worker makes per batch
(the dedup claim and the stale check), per event, on batches of 64 new events about 64
different records, as the bench's traffic is.

The HTTP ceiling (bare Starlette) needs a load generator and a server process; it is run by
``bench.phases`` like the acceptor.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from ingest.redis_conn import acceptor_redis

__all__ = ["batch_checks", "noop", "pg_inserts", "redis_lpush_async", "redis_lpush_sync",
           "rq_noop"]

# An envelope of a typical delivery is about this long once JSON-encoded.
_VALUE = b"x" * 700


def noop() -> None:
    """The job RQ runs for its own ceiling."""


def redis_lpush_sync(url: str, key: str, seconds: float) -> float:
    """LPUSH ops/s, one in flight, with the acceptor's client settings."""
    client = acceptor_redis(url)
    try:
        done = 0
        started = time.perf_counter()
        deadline = started + seconds
        while True:
            for _ in range(100):
                client.lpush(key, _VALUE)
            done += 100
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - started
        client.delete(key)
        return done / elapsed
    finally:
        client.close()


def redis_lpush_async(url: str, key: str, seconds: float, in_flight: int = 64) -> float:
    """LPUSH ops/s from ``redis.asyncio`` with ``in_flight`` concurrent callers."""

    async def run() -> float:
        client = AsyncRedis.from_url(url, max_connections=in_flight)
        done = 0
        started = time.perf_counter()
        deadline = started + seconds

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await client.lpush(key, _VALUE)
                done += 1

        await asyncio.gather(*(caller() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        await client.delete(key)
        await client.aclose()
        return done / elapsed

    return asyncio.run(run())


def rq_noop(url: str, queue_name: str, jobs: int) -> float:
    """Jobs/s of one ``SimpleWorker`` (burst) running ``jobs`` no-op jobs already queued."""
    redis = Redis.from_url(url)
    queue = Queue(queue_name, connection=redis, serializer=JSONSerializer)
    for start in range(0, jobs, 500):
        queue.enqueue_many([
            Queue.prepare_data("bench.ceilings.noop", result_ttl=60)
            for _ in range(start, min(jobs, start + 500))
        ])
    worker = SimpleWorker([queue], connection=redis, serializer=JSONSerializer,
                          log_job_description=False)
    started = time.perf_counter()
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    elapsed = time.perf_counter() - started
    left = queue.count
    redis.close()
    if left:
        raise RuntimeError(f"RQ ceiling: {left} no-op jobs were left in the queue")
    return jobs / elapsed


def _row(template: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    return (str(uuid.uuid4()), template[1], f"bench|{n}", *template[3:])


def pg_inserts(url: str, seconds: float, batch: int = 256) -> float:
    """Rows/s into a copy of webhook_events, ``batch`` rows per transaction."""
    # The sink's columns and JSON encoding, one row per statement.
    from ingest.safejson import dumps as _json  # noqa: PLC0415
    from sinks.postgres import EVENT_COLUMNS  # noqa: PLC0415

    now = datetime.now(timezone.utc)
    data = {"type": "prospect", "id": 1, "attributes": {
        "updatedAt": now.isoformat(), "emails": ["ada@example.com"], "firstName": "Ada",
        "lastName": "Sample", "title": "VP Engineering"},
        "relationships": {"sequence": {"data": {"type": "sequence", "id": 42}}}}
    template = (None, "outreach", None, "prospect.updated", "contact.updated", "prospect", "1",
                "updated", now, now, None, "ada@example.com", "Ada Sample", None, "42",
                Jsonb(data, dumps=_json), Jsonb({"title": "Director"}, dumps=_json), None, False,
                Jsonb({"title": {"from": "Director", "to": "VP Engineering"}}, dumps=_json),
                False)  # sanitized
    statement = (f"\nINSERT INTO bench_events ({', '.join(EVENT_COLUMNS)})\n"
                 f"VALUES ({', '.join(['%s'] * len(EVENT_COLUMNS))})\n"
                 "ON CONFLICT DO NOTHING\nRETURNING delivery_id\n")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_events")
        conn.execute("CREATE TABLE bench_events (LIKE webhook_events INCLUDING ALL)")
    n = 0
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            rows = [_row(template, n + i) for i in range(batch)]
            n += batch
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(statement, rows, returning=True)
                while cur.nextset():
                    pass
        elapsed = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        stored = conn.execute("SELECT count(*) FROM bench_events").fetchone()
        conn.execute("DROP TABLE bench_events")
    if stored is None or stored[0] != n:
        raise RuntimeError(f"Postgres ceiling: {n} rows sent, {stored} stored")
    return n / elapsed


def batch_checks(url: str, seconds: float, batch: int = 64) -> dict[str, float]:
    """Microseconds per event of ``workers.dedup.claim`` and ``workers.marks.mark_stale``
    (one script call per batch each), with the workers' Redis client."""
    from datetime import timedelta  # noqa: PLC0415

    from ingest.constants import DEFAULT_DEDUP_TTL, Names  # noqa: PLC0415
    from ingest.events import Event  # noqa: PLC0415
    from ingest.redis_conn import worker_redis  # noqa: PLC0415
    from workers import dedup, marks  # noqa: PLC0415

    client = worker_redis(url)
    names = Names("bench-checks")
    now = datetime.now(timezone.utc)
    spent = {"claim": 0.0, "stale": 0.0}
    events = 0
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            evs = [Event(provider="outreach", dedup_key=f"bench|{events + i}",
                         event_type="prospect.updated", kind="contact.updated",
                         occurred_at=now + timedelta(microseconds=events + i), received_at=now,
                         resource_type="prospect", resource_id=str(events + i))
                   for i in range(batch)]
            t0 = time.perf_counter()
            dedup.claim(client, names, "bench-job", evs)
            t1 = time.perf_counter()
            marks.mark_stale(client, names, evs, DEFAULT_DEDUP_TTL)
            t2 = time.perf_counter()
            spent["claim"] += t1 - t0
            spent["stale"] += t2 - t1
            events += batch
        keys = list(client.scan_iter(match=names.key("*"), count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i:i + 1000])
    finally:
        client.close()
    return {name: total / events * 1e6 for name, total in spent.items()}
