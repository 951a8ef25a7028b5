"""``python -m bench.workercost``: what the workers cost per event, without HTTP in front.

Fills the ingest queue with ``--batches`` process_batch jobs of ``--batch`` Outreach deliveries
each (as group commit writes them), then drains it with one ``IngestWorker`` in burst mode in
this process, and then the ``sink-postgres`` queue the same way. For each queue it prints the
worker's own CPU per event (``time.process_time``), the Redis server's CPU per event, the
Postgres backends' CPU per event, and the Redis round trips per job (redis-py commands and
pipelines sent). No other process competes in this process, so the figures move far less with
the machine's other load than the full bench's do, which makes it the tool to compare two
versions of the worker code; the full bench (``python -m bench``) remains the measure.

Starts its own Redis and Postgres (embedded) on 127.0.0.1 and removes them afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import psycopg
from redis import Redis
from redis.connection import AbstractConnection

__all__ = ["main"]

_SECRET = "workercost-secret-" + "0" * 16


class _RoundTrips:
    """Counts what redis-py sends: one per command outside a pipeline, one per pipeline."""

    def __init__(self) -> None:
        self.count = 0
        self._send: Any = AbstractConnection.send_packed_command

    def __enter__(self) -> _RoundTrips:
        counter = self
        original = self._send

        def send(conn: Any, command: Any, check_health: bool = True) -> None:
            counter.count += 1
            original(conn, command, check_health)

        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AbstractConnection.send_packed_command = self._send  # type: ignore[method-assign]


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _envelopes(count: int, start: int) -> list[dict[str, Any]]:
    from bench.loadgen import Templates

    templates = Templates(_SECRET)
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return [{"id": str(uuid.uuid4()), "provider": "outreach", "received_at": now,
             "headers": {"content-type": "application/json"},
             "body": templates.body(start + i).decode()} for i in range(count)]


@contextlib.contextmanager
def _servers(tmp: Path) -> Iterator[tuple[str, int, str]]:
    from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis
    from sinks.postgres import migrate

    redis = EmbeddedRedis(tmp / "redis", appendonly=True).start()
    assert redis.process is not None
    pg = EmbeddedPostgres(tmp / "pg").start()
    try:
        migrate(pg.url)
        yield redis.url, redis.process.pid, pg.url
    finally:
        pg.stop()
        redis.stop()


def _drain(rt: Any, queue: str, redis_proc: psutil.Process, db_url: str,
           profile: str | None = None, alone: bool = False) -> dict[str, float]:
    from ingest.rq_jobs import FastJSONSerializer
    from workers.grouping import Groups
    from workers.worker import IngestWorker

    with psycopg.connect(db_url, autocommit=True) as conn:
        def backends() -> list[psutil.Process]:
            pids = [r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'"
                " AND pid <> pg_backend_pid()")]
            out = []
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    out.append(psutil.Process(pid))
            return out

        jobs = rt.redis.llen(f"rq:queue:{queue}")
        worker = IngestWorker([rt.queue(queue)], connection=rt.redis, serializer=FastJSONSerializer,
                              name=f"cost-{uuid.uuid4().hex[:8]}", names=rt.names,
                              log_job_description=False,
                              groups=None if alone else Groups(rt))
        pg_before = _cpu(backends())
        redis_before = _cpu([redis_proc])
        cpu_before = time.process_time()
        wall = time.perf_counter()
        with _RoundTrips() as trips:
            if profile:
                import cProfile

                # CPU time, not wall time: waiting on Redis or Postgres is not the worker's cost.
                profiler = cProfile.Profile(time.process_time)
                profiler.runcall(worker.work, burst=True, with_scheduler=False)
                profiler.dump_stats(profile)
            else:
                worker.work(burst=True, with_scheduler=False)
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu_before
        redis_cpu = _cpu([redis_proc]) - redis_before
        pg_cpu = _cpu(backends()) - pg_before
    return {"jobs": jobs, "cpu": cpu, "redis": redis_cpu, "postgres": pg_cpu, "wall": wall,
            "round_trips": trips.count}


def run(batches: int, batch: int, repeat: int, profile: str | None = None,
        alone: bool = False) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="wi-cost-"))
    results: list[dict[str, Any]] = []
    with _servers(tmp) as (redis_url, redis_pid, db_url):
        os.environ.update({"REDIS_URL": redis_url, "DATABASE_URL": db_url,
                           "INGEST_SINKS": "postgres", "OUTREACH_WEBHOOK_SECRETS": _SECRET})
        from ingest.config import Settings
        from ingest.logs import log_level, setup_logging
        from ingest.rq_jobs import enqueue_batch
        from workers.runtime import Runtime, install_runtime

        settings = Settings.from_env()
        setup_logging("json", level=log_level(settings))  # as a worker logs
        redis_proc = psutil.Process(redis_pid)
        seq = 1
        for round_ in range(repeat):
            rt = Runtime(settings)
            install_runtime(rt)
            for i in range(batches):
                enqueue_batch(rt.ingest_queue, _envelopes(batch, seq),
                              rt.names.job_id("batch", uuid.uuid4().hex))
                seq += batch
            events = batches * batch
            row: dict[str, Any] = {"round": round_ + 1, "events": events}
            for name in (rt.names.ingest_queue, rt.names.sink_queue("postgres")):
                row[name] = _drain(rt, name, redis_proc, db_url,
                                   f"{profile}-{name}.prof" if profile else None, alone)
            with psycopg.connect(db_url) as conn:
                (stored,), = conn.execute("SELECT count(*) FROM webhook_events").fetchall()
                conn.execute("TRUNCATE webhook_events, webhook_deliveries, webhook_records")
            row["stored"] = stored
            Redis.from_url(redis_url).flushall()  # our own embedded server
            rt.close()
            install_runtime(None)
            results.append(row)
    return results


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| round | queue | jobs | worker us/event | redis us/event | postgres us/event |"
             " round trips/job | wall s |", "|---|---|---|---|---|---|---|---|"]
    for row in results:
        n = row["events"]
        for name in ("ingest", "sink-postgres"):
            r = row[name]
            lines.append(f"| {row['round']} | {name} | {r['jobs']} | {r['cpu'] / n * 1e6:.0f} |"
                         f" {r['redis'] / n * 1e6:.0f} | {r['postgres'] / n * 1e6:.0f} |"
                         f" {r['round_trips'] / max(r['jobs'], 1):.1f} | {r['wall']:.2f} |")
        total = sum(row[q][k] for q in ("ingest", "sink-postgres")
                    for k in ("cpu", "redis", "postgres"))
        lines.append(f"| {row['round']} | all | | | | | | total {total / n * 1e6:.0f} us/event,"
                     f" stored {row['stored']} of {n} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workercost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="deliveries per batch job")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", metavar="PREFIX", default=None,
                        help="write cProfile stats of each drain to PREFIX-<queue>.prof")
    parser.add_argument("--alone", action="store_true",
                        help="run each job alone, as a worker does when none wait behind it")
    args = parser.parse_args(argv)
    random.seed(7)
    results = run(args.batches, args.batch, args.repeat, args.profile, args.alone)
    print(render(results))
    return 0 if all(r["stored"] == r["events"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
