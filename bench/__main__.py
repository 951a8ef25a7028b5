"""``python -m bench``: the pipeline measured against this machine's own ceilings, in one run.

Starts its own Redis (embedded, append-only as docker-compose runs it) and Postgres (a fresh
database on ``DATABASE_URL``'s server when set, else an embedded one), on 127.0.0.1 and random
ports, and removes them afterwards. Then, in order:

1. ceilings: bare Starlette POST route (same uvicorn settings as ``ingest serve``), Redis
   LPUSH, RQ no-op jobs with a SimpleWorker, Postgres inserts into a copy of webhook_events;
2. the acceptor alone (``ingest serve``), closed loop at ``--connections``: req/s, p99, and
   every accepted delivery found exactly once in the RQ jobs;
3. end to end: acceptor + one ``ingest worker`` per queue + Postgres, closed loop, until every
   accepted delivery is a row: events/s, none lost or doubled;
4. receipt-to-row latency (``stored_at - received_at``) at 10/50/90% of that throughput, open
   loop;
5. scaling: the same end to end with two worker processes per queue, closed loop and then
   open loop at 50% and 90% of one per queue's maximum (the same deliveries at the same
   times: CPU per event end to end at the same load); and the workers alone
   draining a pre-filled queue with one and with two processes per queue, ``--pairs`` times
   each, interleaved, compared pair by pair;
6. last, a soak at 50% for ``--soak`` seconds on a fresh acceptor and workers, sampling the RSS
   of every process.

Between 2 and 3, CPU fairness (bench.fairness): one sender's expensive bodies (the audit's
340,000 empty arrays, from ``--attackers`` connections) against valid deliveries of another
provider at ``--fairness-rate``; ``--fairness`` runs that phase alone.

For the acceptor-alone and end-to-end phases the report also gives the CPU per event of each
process type and the Redis commands, bytes and memory and the Postgres WAL and write
transactions per event (bench.scale): the inputs of the scale model in docs/performance.md.

The load generator (bench.loadgen) is always a separate process. ``--profile DIR`` records
py-spy profiles of the acceptor and the workers during phases 2 and 3.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psutil
import psycopg
import psycopg.sql
from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from bench import ceilings, scale
from bench.procs import (CpuMeter, Proc, by_pid, pids_of, preemptions, python, this_process,
                         wait_for_http)
from bench.report import Row, render
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from sinks.postgres import migrate

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-outreach-secret-" + uuid.uuid4().hex[:8]
QUEUES = ("ingest", "sink-postgres")
# Open-loop rates, as shares of the end-to-end maximum with one worker process per queue: all
# three with one per queue (receipt-to-row latency), the last two again with two per queue.
LATENCY_SHARES = (0.1, 0.5, 0.9)
SAME_RATE_SHARES = (0.5, 0.9)
# Variables of the caller's environment that must not leak into the processes we start.
_OWN_PREFIXES = ("INGEST_", "REDIS_URL", "DATABASE_URL", "CRM_", "SLACK_", "PROMETHEUS_",
                 "OUTREACH_", "SALESLOFT_", "OUTCALLER_", "OUTBOUNDRY_", "MAILSTAND_")


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


# -- load --------------------------------------------------------------------------------------


def loadgen(ctx: Context, url: str, duration: float, rate: float | None = None,
            ids: bool = False, during: Callable[[], None] | None = None,
            every: float = 1.0) -> dict[str, Any]:
    """Run bench.loadgen in its own process; ``during`` is called every ``every`` s."""
    if rate:
        rate = round(rate, 1)  # what the load generator is given, so both count alike
    expected = int(rate * duration) if rate else int(duration * 50_000)
    start = ctx.take_seqs(expected + 1)
    out_path = ctx.tmp / f"loadgen-{start}.json"
    cmd = python("-m", "bench.loadgen", url, "--secret", SECRET, "--duration", str(duration),
                 "--connections", str(ctx.args.connections), "--start-seq", str(start))
    if rate:
        cmd += ["--rate", repr(rate)]
    if ids:
        cmd.append("--ids")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + duration + 120
        while proc.poll() is None:
            if during is not None:
                during()
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("load generator did not finish")
            time.sleep(every if during is not None else 0.05)
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')}")
    report: dict[str, Any] = orjson.loads(out_path.read_bytes())
    if report["next_seq"] > start + expected + 1:
        raise RuntimeError("load generator used more sequence numbers than reserved")
    report["start_seq"] = start
    report["end_seq"] = report["next_seq"]  # exclusive bound of the numbers it used
    return report


def wait_for_rows(ctx: Context, lo: int, hi: int, expected: int,
                  stall: float = 60.0) -> float:
    """Wait until ``expected`` rows with resource_id in [lo, hi) exist; return when the last
    of them was stored (epoch s, from ``stored_at``, so the poll interval does not count).

    Each poll scans the table, on the CPU being measured: a few polls a second, not more.
    """
    last, last_change = -1, time.monotonic()
    query = ("SELECT count(*), extract(epoch FROM max(stored_at)) FROM webhook_events"
             " WHERE resource_id::bigint >= %s AND resource_id::bigint < %s")
    while True:
        (count, stored), = ctx.sql(query, lo, hi)
        if count >= expected:
            return float(stored)
        if count != last:
            last, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > stall:
            raise RuntimeError(f"rows stopped at {count} of {expected}")
        time.sleep(0.25)


def check_rows(ctx: Context, lo: int, hi: int, accepted: set[int]) -> dict[str, int]:
    found = Counter(int(r[0]) for r in ctx.sql(
        "SELECT resource_id FROM webhook_events WHERE resource_id::bigint >= %s"
        " AND resource_id::bigint < %s", lo, hi))
    return {"lost": len(accepted - found.keys()),
            "doubled": sum(1 for n in found.values() if n > 1),
            "unanswered_but_stored": len(found.keys() - accepted)}


def latency_ms(ctx: Context, lo: int, hi: int) -> dict[str, float]:
    (p50, p99, n), = ctx.sql(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s),"
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY s), count(*)"
        " FROM (SELECT extract(epoch FROM stored_at - received_at) * 1000 AS s"
        " FROM webhook_events WHERE resource_id::bigint >= %s AND resource_id::bigint < %s) t",
        lo, hi)
    return {"p50": float(p50 or 0), "p99": float(p99 or 0), "rows": int(n)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def stage_times(stack: Stack, since: float) -> dict[str, dict[str, float]]:
    """Where a latency phase's time went, per queue, from the finished jobs RQ keeps (a
    minute): waiting in the queue (enqueued to started) and running (started to ended), p50
    and p99 in ms, of the jobs enqueued since ``since`` (epoch s)."""
    out: dict[str, dict[str, float]] = {}
    for name in QUEUES:
        queue = stack.queue(name)
        ids = queue.finished_job_registry.get_job_ids()
        waits: list[float] = []
        runs: list[float] = []
        for i in range(0, len(ids), 500):
            for job in Job.fetch_many(ids[i:i + 500], connection=queue.connection,
                                      serializer=JSONSerializer):
                if job is None or not (job.enqueued_at and job.started_at and job.ended_at):
                    continue
                if job.enqueued_at.timestamp() < since:
                    continue
                waits.append((job.started_at - job.enqueued_at).total_seconds() * 1000)
                runs.append((job.ended_at - job.started_at).total_seconds() * 1000)
        out[name] = {"jobs": len(runs), "wait_p50": _pct(waits, 0.5),
                     "wait_p99": _pct(waits, 0.99), "run_p50": _pct(runs, 0.5),
                     "run_p99": _pct(runs, 0.99)}
    return out


@contextlib.contextmanager
def profiled(ctx: Context, name: str, procs: list[Proc], seconds: float) -> Iterator[None]:
    """py-spy record of each process during the block (with ``--profile DIR``)."""
    spies: list[subprocess.Popen[bytes]] = []
    if ctx.args.profile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out = Path(ctx.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        for proc in procs:
            spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(proc.pid), "--rate", "250", "--nonblocking",
                 "--format", "raw", "--duration", str(int(seconds)),
                 "--output", str(out / f"{name}-{proc.name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield
    finally:
        for spy_proc in spies:
            try:
                spy_proc.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                spy_proc.kill()


# -- phases ------------------------------------------------------------------------------------


def phase_ceilings(ctx: Context) -> None:
    d = ctx.args.duration
    log("ceiling: bare Starlette")
    port = free_port()
    bare = Proc("bare-starlette", python("-m", "bench.bare", "--port", str(port)),
                {**os.environ, "PYTHONPATH": str(ROOT)}, ctx.tmp / "bare.log", cwd=ROOT)
    ctx.procs.append(bare)
    try:
        wait_for_http(port, bare)
        meter = CpuMeter({"server": pids_of(bare), "redis": by_pid(lambda: [ctx.redis_pid])})
        meter.start()
        lg = loadgen(ctx, f"http://127.0.0.1:{port}/webhooks/outreach", d)
        cpu = meter.stop({"loadgen": lg["cpu_s"]})
    finally:
        bare.stop()
    ctx.results["bare"] = {**lg, "cpu": cpu}

    log("ceiling: Redis LPUSH")
    ctx.results["lpush_sync"] = ceilings.redis_lpush_sync(ctx.redis_url, "bench:lpush", d / 2)
    ctx.results["lpush_async"] = ceilings.redis_lpush_async(ctx.redis_url, "bench:lpush", d / 2)
    log("ceiling: RQ no-op jobs")
    ctx.results["rq_noop"] = ceilings.rq_noop(ctx.redis_url, "bench-noop", ctx.args.rq_jobs)
    log("ceiling: Postgres inserts")
    ctx.results["pg_rows"] = ceilings.pg_inserts(ctx.db_url, d / 2)
    log("per-batch Redis checks: dedup claim, stale check")
    ctx.results["checks"] = ceilings.batch_checks(ctx.redis_url, d / 2)
    ctx.reset()


def _jobs_envelopes(stack: Stack) -> tuple[int, Counter[int]]:
    """(jobs, how often each sequence number appears) over every job in the ingest queue."""
    queue = stack.queue()
    ids = queue.get_job_ids()
    seen: Counter[int] = Counter()
    for i in range(0, len(ids), 500):
        for job in Job.fetch_many(ids[i:i + 500], connection=queue.connection,
                                  serializer=JSONSerializer):
            if job is None:
                continue
            for envelope in job.args[0]:
                seen[int(orjson.loads(envelope["body"])["data"]["id"])] += 1
    return len(ids), seen


def phase_acceptor(ctx: Context) -> None:
    log("acceptor alone: signature check + durable enqueue")
    stack = Stack(ctx, "acc", per_queue=0)
    try:
        assert stack.acceptor is not None
        counters = ctx.counters()
        meter = stack.meter().start()
        with profiled(ctx, "acceptor", [stack.acceptor], ctx.args.duration):
            lg = loadgen(ctx, stack.url, ctx.args.duration, ids=True)
        cpu = meter.stop({"loadgen": lg["cpu_s"]})
        costs = ctx.costs(counters, lg["ok"])
        jobs, seen = _jobs_envelopes(stack)
    finally:
        stack.stop()
    accepted = set(lg.pop("accepted"))
    ctx.results["acceptor"] = {
        **lg, "cpu": cpu, "costs": costs, "jobs": jobs,
        "deliveries_in_jobs": sum(seen.values()),
        "lost": len(accepted - seen.keys()),
        "doubled": sum(1 for n in seen.values() if n > 1),
        "mean_batch": sum(seen.values()) / jobs if jobs else 0.0,
    }
    ctx.reset()


def phase_fairness(ctx: Context) -> None:
    from bench import fairness

    ctx.results["fairness"] = fairness.run(
        ctx.env("fair"), SECRET, ctx.tmp, ctx.args.duration, ctx.args.fairness_rate,
        ctx.args.attackers, log)
    ctx.reset()


def e2e(ctx: Context, stack: Stack, name: str, profile: bool = False) -> dict[str, Any]:
    """Closed loop through acceptor and workers until every accepted delivery is a row."""
    counters = ctx.counters()
    meter = stack.meter().start()
    procs = [p for p in [stack.acceptor, *stack.workers] if p is not None]
    with profiled(ctx, name, procs if profile else [], ctx.args.duration):
        lg = loadgen(ctx, stack.url, ctx.args.duration, ids=True)
    accepted = set(lg.pop("accepted"))
    done = wait_for_rows(ctx, lg["start_seq"], lg["end_seq"], len(accepted))
    meter.sample()
    cpu = meter.stop({"loadgen": lg["cpu_s"]})
    costs = ctx.costs(counters, len(accepted))
    (first,), = ctx.sql(
        "SELECT extract(epoch FROM min(received_at)) FROM webhook_events"
        " WHERE resource_id::bigint >= %s AND resource_id::bigint < %s",
        lg["start_seq"], lg["end_seq"])
    elapsed = done - float(first)
    checks = check_rows(ctx, lg["start_seq"], lg["end_seq"], accepted)
    return {**lg, **checks, "cpu": cpu, "costs": costs, "events": len(accepted),
            "elapsed": elapsed,
            "events_per_s": len(accepted) / elapsed}


def open_loop(ctx: Context, stack: Stack, rate: float) -> dict[str, Any]:
    """Deliveries at a fixed ``rate`` for ``--duration`` s (open loop), until each is a row:
    receipt-to-row latency, where it went, and what it cost (CPU, shared servers) per event."""
    since = time.time()
    counters = ctx.counters()
    meter = stack.meter().start()
    lg = loadgen(ctx, stack.url, ctx.args.duration, rate=rate)
    wait_for_rows(ctx, lg["start_seq"], lg["end_seq"], lg["ok"])
    cpu = meter.stop({"loadgen": lg["cpu_s"]})
    return {**latency_ms(ctx, lg["start_seq"], lg["end_seq"]), "events": lg["ok"],
            "rate": lg["ok"] / ctx.args.duration, "http_p99": lg["p99_ms"], "cpu": cpu,
            "costs": ctx.costs(counters, lg["ok"]), "stages": stage_times(stack, since)}


def phase_pipeline(ctx: Context) -> None:
    log("end to end, one worker process per queue")
    stack = Stack(ctx, "e2e1", per_queue=1)
    try:
        ctx.results["e2e1"] = e2e(ctx, stack, "e2e1", profile=True)
        top = ctx.results["e2e1"]["events_per_s"]
        ctx.results["latency"] = {}
        for share in LATENCY_SHARES:
            log(f"latency at {share:.0%} of {top:.0f} events/s")
            ctx.results["latency"][share] = open_loop(ctx, stack, top * share)
    finally:
        stack.stop()
    ctx.reset()

    log("end to end, two worker processes per queue")
    stack = Stack(ctx, "e2e2", per_queue=2)
    try:
        ctx.results["e2e2"] = e2e(ctx, stack, "e2e2")
        ctx.results["latency2"] = {}
        for share in SAME_RATE_SHARES:  # the rates of one per queue, for target 4 at equal load
            log(f"2 per queue at {share:.0%} of one per queue's {top:.0f} events/s")
            ctx.results["latency2"][share] = open_loop(ctx, stack, top * share)
    finally:
        stack.stop()
    ctx.reset()


def phase_soak(ctx: Context) -> None:
    """Last, so a long soak does not push the short phases apart in time."""
    rate = ctx.results["e2e1"]["events_per_s"] * 0.5
    log(f"soak: {ctx.args.soak:.0f} s at 50% ({rate:.0f} deliveries/s)")
    stack = Stack(ctx, "soak", per_queue=1)
    try:
        ctx.results["soak"] = soak(ctx, stack, rate)
    finally:
        stack.stop()
    ctx.reset()


def soak(ctx: Context, stack: Stack, rate: float) -> dict[str, Any]:
    procs = [p for p in [stack.acceptor, *stack.workers] if p is not None]
    samples: list[tuple[float, dict[str, int]]] = []
    t0 = time.monotonic()

    def sample() -> None:
        samples.append((time.monotonic() - t0, {p.name: p.rss() for p in procs}))

    every = max(1.0, ctx.args.soak / 60)
    lg = loadgen(ctx, stack.url, ctx.args.soak, rate=rate, during=sample, every=every)
    wait_for_rows(ctx, lg["start_seq"], lg["end_seq"], lg["ok"])
    sample()
    span = samples[-1][0]
    out: dict[str, Any] = {"rate": lg["ok"] / ctx.args.soak, "errors": lg["errors"],
                           "ok": lg["ok"], "sent": lg["sent"], "rss": {}}
    for p in procs:
        early = [s[p.name] for t, s in samples if t <= 0.2 * span and s[p.name]]
        late = [s[p.name] for t, s in samples if t >= 0.8 * span and s[p.name]]
        peak = max(s[p.name] for _, s in samples)
        start, end = max(early or [0]), max(late or [0])
        out["rss"][p.name] = {"start": start, "end": end, "peak": peak,
                              "growth": (end - start) / start if start else 0.0}
    return out


def phase_drain(ctx: Context, per_queue: int) -> dict[str, Any]:
    """Workers alone, draining a queue the acceptor filled beforehand (no HTTP load)."""
    log(f"workers alone draining a full queue, {per_queue} per queue")
    ns = f"drain{per_queue}"
    filler = Stack(ctx, ns, per_queue=0)
    try:
        lg = loadgen(ctx, filler.url, ctx.args.duration, ids=True)
    finally:
        filler.stop()
    accepted = set(lg.pop("accepted"))
    with contextlib.closing(ctx.redis()) as r:
        key = f"rq:queue:{ns}-ingest"
        held = [x.decode() if isinstance(x, bytes) else str(x) for x in r.lrange(key, 0, -1)]
        r.delete(key)  # held back while the workers start, so start-up is not timed
        stack = Stack(ctx, ns, per_queue=0, acceptor=False)
        try:
            stack.start_workers(per_queue)
            meter = stack.meter()

            def pipeline() -> list[psutil.Process]:  # the meter's own groups of these
                return [p for name in ("workers", "redis", "postgres")
                        for p in meter.groups[name]()]

            counters = ctx.counters()
            switched = preemptions(pipeline())
            meter.start()
            released = time.time()
            for i in range(0, len(held), 1000):
                r.rpush(key, *held[i:i + 1000])
            done = wait_for_rows(ctx, lg["start_seq"], lg["end_seq"], len(accepted))
            cpu = meter.stop()
            switched = preemptions(pipeline()) - switched
            costs = ctx.costs(counters, len(accepted))
        finally:
            stack.stop()
    checks = check_rows(ctx, lg["start_seq"], lg["end_seq"], accepted)
    ctx.reset()
    return {**checks, "cpu": cpu, "costs": costs, "events": len(accepted), "jobs": len(held),
            "preemptions": switched / max(len(accepted), 1),
            "events_per_s": len(accepted) / (done - released)}


def phase_drains(ctx: Context, pairs: int) -> None:
    """Draining with one and with two processes per queue, ``pairs`` times, interleaved (1, 2,
    1, 2, ...): the two are compared pair by pair, so that a change in the machine's speed
    during the run (a shared host) moves both sides of a pair alike. ``drain1``/``drain2`` are
    the pair with the median ratio of CPU per event; ``drain_pairs`` holds every pair."""
    runs = [(phase_drain(ctx, 1), phase_drain(ctx, 2)) for _ in range(pairs)]

    def ratio(pair: tuple[dict[str, Any], dict[str, Any]]) -> float:
        one, two = (scale.cpu_per_event(d["cpu"], d["events"])["pipeline"] for d in pair)
        return two / one

    ordered = sorted(runs, key=ratio)
    ctx.results["drain1"], ctx.results["drain2"] = ordered[(len(ordered) - 1) // 2]
    ctx.results["drain_pairs"] = [{"one": one, "two": two} for one, two in runs]


# -- main --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = psutil.virtual_memory().total / 2**30
    return (f"{psutil.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python "
            f"{sys.version.split()[0]}, load average before the run "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=8.0,
                        help="seconds of each load phase (default %(default)s)")
    parser.add_argument("--soak", type=float, default=30.0,
                        help="seconds of the memory soak (default %(default)s; 300 for the doc)")
    parser.add_argument("--connections", type=int, default=64,
                        help="concurrent connections of the closed-loop phases")
    parser.add_argument("--pairs", type=int, default=3,
                        help="draining phases with 1 and 2 processes per queue, interleaved "
                             "(default %(default)s)")
    parser.add_argument("--rq-jobs", type=int, default=3000, help="no-op jobs for RQ's ceiling")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="write py-spy profiles (raw collapsed stacks) here")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write raw results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--fairness", action="store_true",
                        help="only the CPU fairness phase (bench.fairness)")
    parser.add_argument("--fairness-rate", type=float, default=100.0,
                        help="valid deliveries/s beside the attack (default %(default)s)")
    parser.add_argument("--attackers", type=int, default=32,
                        help="connections sending expensive bodies (default %(default)s)")
    parser.add_argument("--lifecycle", action="store_true",
                        help="only the large-table and retention measurements (bench.lifecycle)")
    parser.add_argument("--lifecycle-rows", type=int, default=10_000_000,
                        help="rows in webhook_events for --lifecycle (default %(default)s)")
    parser.add_argument("--retention-rows", type=int, default=1_000_000,
                        help="expired rows --lifecycle's retention run removes per table "
                             "(0: measure the large table only)")
    parser.add_argument("--lifecycle-load", type=float, default=0.5,
                        help="--lifecycle's fixed offered load, a share of the saturated rate")
    parser.add_argument("--replicas", action="store_true",
                        help="only the cost of INGEST_REDIS_MIN_REPLICAS: the acceptor alone "
                             "against a primary with one replica, waiting for 0 and for 1 "
                             "(--pairs rounds, interleaved), with this run's ceilings")
    parser.add_argument("--pg-set", metavar="NAME=VALUE", action="append", default=[],
                        help="--lifecycle: a server setting for the embedded Postgres "
                             "(ALTER SYSTEM; reloadable ones only), repeatable")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.lifecycle:
        return _lifecycle(args)
    if args.fairness:
        return _fairness(args)
    if args.replicas:
        return _replicas(args)

    description = machine()
    log(description)
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    started = time.monotonic()
    ctx: Context | None = None
    try:
        with servers(tmp) as (redis_url, redis_pid, db_url):
            ctx = Context(args, tmp, redis_url, redis_pid, db_url)
            try:
                phase_ceilings(ctx)
                phase_acceptor(ctx)
                phase_fairness(ctx)
                phase_pipeline(ctx)
                phase_drains(ctx, args.pairs)
                phase_soak(ctx)
            finally:
                for proc in ctx.procs:
                    proc.stop()
                if ctx.conn is not None:
                    ctx.conn.close()
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    assert ctx is not None
    ctx.results["machine"] = description
    # WAL position and transaction ids are the server's, not the database's.
    ctx.results["pg_server_shared"] = bool(os.environ.get("DATABASE_URL"))
    ctx.results["cores"] = psutil.cpu_count()
    ctx.results["seconds"] = time.monotonic() - started
    ctx.results["args"] = vars(args)
    rows: list[Row] = []
    print(render(ctx.results, rows))
    from bench import fairness

    print("\n" + fairness.render(ctx.results["fairness"]))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(ctx.results, option=orjson.OPT_INDENT_2
                                                 | orjson.OPT_NON_STR_KEYS))
    # Exit status says whether the pipeline was correct (nothing lost or doubled), not fast.
    phases = [ctx.results[k] for k in ("acceptor", "e2e1", "e2e2")]
    phases += [d for pair in ctx.results["drain_pairs"] for d in pair.values()]
    correct = all(d["lost"] == 0 and d["doubled"] == 0 for d in phases)
    return 0 if correct else 1


def _fairness(args: argparse.Namespace) -> int:
    from bench import fairness

    description = machine()
    log(description)
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    try:
        with servers(tmp) as (redis_url, redis_pid, db_url):
            ctx = Context(args, tmp, redis_url, redis_pid, db_url)
            try:
                phase_fairness(ctx)
            finally:
                if ctx.conn is not None:
                    ctx.conn.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = ctx.results["fairness"]
    print(fairness.render(results) + f"\nMachine: {description}.")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    attacked = results["attacked"]
    return 0 if attacked["ok"] == attacked["sent"] else 1


def _replicas(args: argparse.Namespace) -> int:
    """The acceptor's rate and p99 when each group-commit write waits for one replica
    (``INGEST_REDIS_MIN_REPLICAS=1``) against not waiting (0), on the same primary with one
    replica attached, rounds interleaved; ceilings measured in the same run."""
    log(machine())
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    results: dict[str, Any] = {"machine": machine(), "rounds": []}
    try:
        with servers(tmp) as (redis_url, redis_pid, db_url):
            port = int(urlsplit(redis_url).port or 0)
            replica = EmbeddedRedis(tmp / "replica", appendonly=True,
                                    extra_args=["--replicaof", "127.0.0.1", str(port)]).start()
            try:
                _wait_in_sync(replica.url)
                ctx = Context(args, tmp, redis_url, redis_pid, db_url)
                try:
                    phase_ceilings(ctx)
                    results["bare"], results["lpush_async"] = (ctx.results["bare"],
                                                               ctx.results["lpush_async"])
                    for _ in range(args.pairs):
                        round_: dict[str, Any] = {}
                        for wanted in (0, 1):
                            ctx.extra_env = {"INGEST_REDIS_MIN_REPLICAS": str(wanted)}
                            phase_acceptor(ctx)
                            acc = ctx.results.pop("acceptor")
                            # A write too few replicas took is spooled: say so if any was.
                            log_text = (tmp / "acc-acceptor.log").read_text(errors="replace")
                            acc["spooled"] = "spooling them" in log_text
                            round_[str(wanted)] = acc
                        results["rounds"].append(round_)
                finally:
                    for proc in ctx.procs:
                        proc.stop()
                    if ctx.conn is not None:
                        ctx.conn.close()
            finally:
                replica.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(_render_replicas(results))
    runs = [r for round_ in results["rounds"] for r in round_.values()]
    return 0 if all(r["lost"] == 0 and r["doubled"] == 0 for r in runs) else 1


def _wait_in_sync(replica_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.closing(Redis.from_url(replica_url)) as r:
        while r.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the primary")
            time.sleep(0.1)


def _render_replicas(results: dict[str, Any]) -> str:
    bare = results["bare"]
    lines = [results["machine"],
             f"ceiling, bare Starlette: {bare['rate']:,.0f} req/s, p99 {bare['p99_ms']:.1f} ms;"
             f" Redis LPUSH (async): {float(results['lpush_async']):,.0f}/s",
             "acceptor alone, primary with one replica (append-only file on both):",
             f"{'round':>5} {'MIN_REPLICAS':>12} {'req/s':>8} {'of bare':>8} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'batch':>6} {'lost':>5}"]
    for i, round_ in enumerate(results["rounds"], 1):
        for wanted, acc in round_.items():
            lines.append(f"{i:>5} {wanted:>12} {acc['rate']:>8,.0f} "
                         f"{acc['rate'] / bare['rate']:>8.0%} {acc['p50_ms']:>7.1f} "
                         f"{acc['p99_ms']:>7.1f} {acc['mean_batch']:>6.1f} {acc['lost']:>5}"
                         + ("  (some spooled: a replica fell short)" if acc["spooled"] else ""))
    for wanted in ("0", "1"):
        runs = [r[wanted] for r in results["rounds"]]
        rate = sum(r["rate"] for r in runs) / len(runs)
        p99 = sum(r["p99_ms"] for r in runs) / len(runs)
        lines.append(f"mean, MIN_REPLICAS={wanted}: {rate:,.0f} req/s "
                     f"({rate / bare['rate']:.0%} of bare), p99 {p99:.1f} ms")
    return "\n".join(lines)


def _lifecycle(args: argparse.Namespace) -> int:
    from bench import lifecycle

    log(machine())
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    try:
        with servers(tmp, args.pg_set) as (_redis_url, _redis_pid, db_url):
            results = lifecycle.run(db_url, args.lifecycle_rows, args.retention_rows,
                                    args.duration, args.lifecycle_load)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(lifecycle.render(results))
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0 if results["retention_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
