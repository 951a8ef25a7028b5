"""The bench's stack: its own Redis and Postgres, the processes it starts (acceptor,
workers) and the context every phase shares."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.sql
from redis import Redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from bench import scale
from bench.procs import CpuMeter, Proc, by_pid, pids_of, python, this_process, wait_for_http
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from sinks.postgres import migrate

from ingest.providers import load_providers
from sinks.registry import load_sink_classes

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-outreach-secret-" + uuid.uuid4().hex[:8]
QUEUES = ("ingest", "sink-postgres")
# Open-loop rates, as shares of the end-to-end maximum with one worker process per queue: all
# three with one per queue (receipt-to-row latency), the last two again with two per queue.
LATENCY_SHARES = (0.1, 0.5, 0.9)
SAME_RATE_SHARES = (0.5, 0.9)
# Variables of the caller's environment that must not leak into the processes we start.
# Every provider's and every sink's settings are <NAME>_*: from the registries.
_OWN_PREFIXES = ("INGEST_", "REDIS_URL", "DATABASE_URL", "PROMETHEUS_",
                 *sorted(f"{name.upper().replace('-', '_')}_"
                         for name in [*load_providers(), *load_sink_classes()]))


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    redis_url: str
    redis_pid: int
    db_url: str
    next_seq: int = 1
    results: dict[str, Any] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    conn: psycopg.Connection[Any] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)  # for every process we start

    def env(self, namespace: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
        env.update({
            "REDIS_URL": self.redis_url, "DATABASE_URL": self.db_url,
            "INGEST_NAMESPACE": namespace, "INGEST_SINKS": "postgres",
            "OUTREACH_WEBHOOK_SECRETS": SECRET,
            "INGEST_SPOOL_DIR": str(self.tmp / f"spool-{namespace}"),
            "PYTHONPATH": str(ROOT),
        })
        env.update(self.extra_env)
        return env

    def take_seqs(self, count: int) -> int:
        start = self.next_seq
        self.next_seq += count
        return start

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        # One connection for the whole run: the bench polls often, and a new connection per
        # poll would cost Postgres a backend start each time, on the CPU being measured.
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.db_url, autocommit=True)
        cur = self.conn.execute(query, params)
        return list(cur.fetchall()) if cur.description is not None else []

    def pg_backends(self) -> list[int]:
        """Postgres server processes working for this run's database (the workers' sessions
        and the bench's own), so their CPU is counted as ours rather than as other load."""
        return [int(r[0]) for r in self.sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]

    def reset(self) -> None:
        """Empty our own Redis and the bench database between phases."""
        with contextlib.closing(self.redis()) as r:
            r.flushall()  # the bench's own embedded server, nobody else's
        self.sql("TRUNCATE webhook_events, webhook_deliveries")

    def counters(self) -> dict[str, Any]:
        """The shared servers' own counters now (bench.scale)."""
        with contextlib.closing(self.redis()) as r:
            snap = scale.snapshot(r, self.sql)
        return snap

    def costs(self, before: dict[str, Any], events: int) -> dict[str, Any]:
        """Redis and Postgres work per event since ``before`` (bench.scale.per_event)."""
        return scale.per_event(before, self.counters(), events)


# -- servers -----------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def configure_postgres(url: str, settings: Sequence[str]) -> bool:
    """``NAME=VALUE`` server settings, through ALTER SYSTEM and a reload. True when one of
    them takes effect only once the server restarts (context "postmaster": shared_buffers,
    for one)."""
    names = []
    with psycopg.connect(url, autocommit=True) as conn:
        for setting in settings:
            name, _, value = setting.partition("=")
            if not re.fullmatch(r"[a-z_]+", name) or not value:
                raise SystemExit(f"--pg-set wants NAME=VALUE, got {setting!r}")
            conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
            names.append(name)
        conn.execute("SELECT pg_reload_conf()")
        row = conn.execute("SELECT count(*) FROM pg_settings WHERE name = ANY(%s) "
                           "AND context = 'postmaster'", [names]).fetchone()
    return bool(row and row[0])


@contextlib.contextmanager
def servers(tmp: Path, pg_settings: Sequence[str] = ()) -> Iterator[tuple[str, int, str]]:
    """Redis and Postgres (embedded unless DATABASE_URL is set) and a database of our own.
    ``pg_settings``: ``NAME=VALUE`` for the embedded Postgres, restarted when one needs it."""
    redis = EmbeddedRedis(tmp / "redis", appendonly=True).start()
    assert redis.process is not None
    pg: EmbeddedPostgres | None = None
    admin = os.environ.get("DATABASE_URL")
    if admin and pg_settings:
        raise SystemExit("--pg-set changes the server: only with the embedded one "
                         "(DATABASE_URL unset)")
    if not admin:
        pg = EmbeddedPostgres(tmp / "pg").start()
        admin = pg.url
        if pg_settings and configure_postgres(admin, pg_settings):
            pg.stop()  # shared_buffers and the like take effect at start only
            pg.start()
    name = "bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = _with_database(admin, name)
    try:
        migrate(db_url)
        yield redis.url, redis.process.pid, db_url
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if pg is not None:
            pg.stop()
        redis.stop()


class Stack:
    """An acceptor (optional) and ``per_queue`` worker processes for each queue."""

    def __init__(self, ctx: Context, namespace: str, per_queue: int,
                 acceptor: bool = True) -> None:
        self.ctx = ctx
        self.namespace = namespace
        self.port = free_port()
        self.acceptor: Proc | None = None
        self.workers: list[Proc] = []
        env = ctx.env(namespace)
        if acceptor:
            self.acceptor = self._spawn("acceptor", python(
                "-m", "ingest.commands.cli",
                "serve", "--host", "127.0.0.1", "--port", str(self.port)),
                env)
            wait_for_http(self.port, self.acceptor)
        self.start_workers(per_queue)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, cmd, env, self.ctx.tmp / f"{self.namespace}-{name}.log", cwd=ROOT)
        self.ctx.procs.append(proc)
        return proc

    def start_workers(self, per_queue: int) -> None:
        env = self.ctx.env(self.namespace)
        for queue in QUEUES:
            for i in range(per_queue):
                self.workers.append(self._spawn(f"worker-{queue}-{i}", python(
                    "-m", "ingest.commands.cli", "worker", "--queue", queue), env))
        if per_queue:
            self.wait_for_workers(per_queue * len(QUEUES))

    def wait_for_workers(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.closing(self.ctx.redis()) as r:
            while time.monotonic() < deadline:
                for w in self.workers:
                    if not w.alive():
                        raise RuntimeError(f"{w.name} exited:\n{w.tail()}")
                if len(Worker.all(connection=r)) >= count:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"{count} workers did not register within {timeout} s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/outreach"

    def stop_acceptor(self) -> None:
        if self.acceptor is not None:
            self.acceptor.stop()

    def stop(self) -> None:
        for proc in [*self.workers, *([self.acceptor] if self.acceptor else [])]:
            proc.stop()

    def queue(self, name: str = "ingest") -> Queue:
        return Queue(f"{self.namespace}-{name}", connection=self.ctx.redis(),
                     serializer=JSONSerializer)

    def meter(self) -> CpuMeter:
        return CpuMeter({
            "acceptor": pids_of(self.acceptor),
            "workers": pids_of(*self.workers),
            "redis": by_pid(lambda: [self.ctx.redis_pid]),
            "postgres": by_pid(self.ctx.pg_backends),
            "bench": this_process,
        })
