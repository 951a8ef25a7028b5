"""The bench's load and phases: closed and open loops, latency, CPU per stage, the
ceilings, the acceptor alone, end to end, the drains and the soak (bench.cli runs them in
order)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
from rq.job import Job
from rq.serializers import JSONSerializer

from bench import ceilings, scale
from bench.procs import CpuMeter, Proc, by_pid, pids_of, preemptions, python, wait_for_http
from ingest.commands.embedded import free_port
from bench.stack import (
    LATENCY_SHARES,
    QUEUES,
    ROOT,
    SAME_RATE_SHARES,
    SECRET,
    Context,
    Stack,
    log,
)


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
