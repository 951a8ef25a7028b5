"""``python -m bench`` (this module's :func:`main`): the pipeline measured against this machine's own ceilings, in one run.

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
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil
from redis import Redis

from bench.report import Row, render
from ingest.commands.embedded import EmbeddedRedis

from bench.report import render_replicas

# -- main --------------------------------------------------------------------------------------
from bench.phases import (
    phase_acceptor,
    phase_ceilings,
    phase_drains,
    phase_fairness,
    phase_pipeline,
    phase_soak,
)
from bench.stack import Context, log, servers


@contextlib.contextmanager
def run_context(args: argparse.Namespace) -> Iterator[Context]:
    """A scratch directory, this run's own Redis and Postgres (bench.stack.servers) and the
    :class:`Context` over them; afterwards every process a phase left running is stopped and
    the directory removed (kept with ``--keep``)."""
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    try:
        with servers(tmp) as (redis_url, redis_pid, db_url):
            ctx = Context(args, tmp, redis_url, redis_pid, db_url)
            try:
                yield ctx
            finally:
                for proc in ctx.procs:
                    proc.stop()
                if ctx.conn is not None:
                    ctx.conn.close()
    finally:
        if getattr(args, "keep", False):
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0].replace(" (this module's :func:`main`)", ""))
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
    parser.add_argument("--search", action="store_true",
                        help="only the console's searches at --search-rows events, and what "
                             "their indexes cost the Postgres sink (bench.search)")
    parser.add_argument("--search-rows", type=int, default=10_000_000,
                        help="events in webhook_events for --search (default %(default)s)")
    parser.add_argument("--search-runs", type=int, default=40,
                        help="calls of each search shape, values varied (default %(default)s)")
    parser.add_argument("--replicas", action="store_true",
                        help="only the cost of INGEST_REDIS_MIN_REPLICAS: the acceptor alone "
                             "against a primary with one replica, waiting for 0 and for 1 "
                             "(--pairs rounds, interleaved), with this run's ceilings")
    parser.add_argument("--outcomes", action="store_true",
                        help="only the cost of keeping sink outcomes: the end-to-end phase with "
                             "INGEST_SINK_OUTCOMES on and off (--pairs rounds, interleaved)")
    parser.add_argument("--pg-set", metavar="NAME=VALUE", action="append", default=[],
                        help="--lifecycle: a server setting for the embedded Postgres "
                             "(ALTER SYSTEM; reloadable ones only), repeatable")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.lifecycle:
        return _lifecycle(args)
    if args.search:
        return _search(args)
    if args.fairness:
        return _fairness(args)
    if args.replicas:
        return _replicas(args)
    if args.outcomes:
        return _outcomes(args)

    description = machine()
    log(description)
    started = time.monotonic()
    with run_context(args) as ctx:
        phase_ceilings(ctx)
        phase_acceptor(ctx)
        phase_fairness(ctx)
        phase_pipeline(ctx)
        phase_drains(ctx, args.pairs)
        phase_soak(ctx)
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
    with run_context(args) as ctx:
        phase_fairness(ctx)
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
    results: dict[str, Any] = {"machine": machine(), "rounds": []}
    with run_context(args) as ctx:
        port = int(urlsplit(ctx.redis_url).port or 0)
        replica = EmbeddedRedis(ctx.tmp / "replica", appendonly=True,
                                extra_args=["--replicaof", "127.0.0.1", str(port)]).start()
        try:
            _wait_in_sync(replica.url)
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
                    log_text = (ctx.tmp / "acc-acceptor.log").read_text(errors="replace")
                    acc["spooled"] = "spooling them" in log_text
                    round_[str(wanted)] = acc
                results["rounds"].append(round_)
        finally:
            for proc in ctx.procs:  # before the replica, which they may be writing through
                proc.stop()
            replica.stop()
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(render_replicas(results))
    runs = [r for round_ in results["rounds"] for r in round_.values()]
    return 0 if all(r["lost"] == 0 and r["doubled"] == 0 for r in runs) else 1


def _outcomes(args: argparse.Namespace) -> int:
    """The end-to-end phase (acceptor, one worker process per queue, Postgres; closed loop
    until every accepted delivery is a row) with the workers keeping sink outcomes
    (``INGEST_SINK_OUTCOMES=true``, the default) and without, ``--pairs`` rounds, the order
    alternating: events/s and the pipeline's CPU per event, compared pair by pair."""
    from bench import scale
    from bench.phases import e2e
    from bench.stack import Stack

    description = machine()
    log(description)
    results: dict[str, Any] = {"machine": description, "rounds": []}
    with run_context(args) as ctx:
        for index in range(args.pairs):
            round_: dict[str, Any] = {}
            for keep in (("true", "false") if index % 2 == 0 else ("false", "true")):
                ctx.extra_env = {"INGEST_SINK_OUTCOMES": keep}
                name = f"outcomes{index}{keep[0]}"
                log(f"round {index + 1}: end to end, INGEST_SINK_OUTCOMES={keep}")
                stack = Stack(ctx, name, per_queue=1)
                try:
                    done = e2e(ctx, stack, name)
                finally:
                    stack.stop()
                ctx.reset()
                round_[keep] = {
                    "events": done["events"], "events_per_s": done["events_per_s"],
                    "cpu_us": scale.cpu_per_event(done["cpu"], done["events"])["pipeline"],
                    "lost": done["lost"], "doubled": done["doubled"]}
            results["rounds"].append(round_)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    lines = ["Sink outcomes on the end-to-end rate (one worker process per queue, closed loop)",
             "", "| round | outcomes | events/s | pipeline CPU µs/event | on/off rate |"
             " on/off CPU | lost | doubled |", "|---|---|---|---|---|---|---|---|"]
    for number, round_ in enumerate(results["rounds"], 1):
        on, off = round_["true"], round_["false"]
        for keep, d in (("on", on), ("off", off)):
            ratio = (f"{on['events_per_s'] / off['events_per_s']:.3f}",
                     f"{on['cpu_us'] / off['cpu_us']:.3f}") if keep == "on" else ("", "")
            lines.append(f"| {number} | {keep} | {d['events_per_s']:,.0f} | {d['cpu_us']:.0f} |"
                         f" {ratio[0]} | {ratio[1]} | {d['lost']} | {d['doubled']} |")
    print("\n".join(lines) + f"\nMachine: {description}.")
    runs = [d for round_ in results["rounds"] for d in round_.values()]
    return 0 if all(d["lost"] == 0 and d["doubled"] == 0 for d in runs) else 1


def _wait_in_sync(replica_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.closing(Redis.from_url(replica_url)) as r:
        while r.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the primary")
            time.sleep(0.1)


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


def _search(args: argparse.Namespace) -> int:
    from bench import search

    description = machine()
    log(description)
    tmp = Path(tempfile.mkdtemp(prefix="wi-bench-"))
    try:
        with servers(tmp) as (_redis_url, _redis_pid, db_url):
            results = search.run(db_url, args.search_rows, args.search_runs, args.duration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"] = description
    print(search.render(results) + f"\nMachine: {description}.")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0 if all(s["p95"] <= search.TARGET_MS for s in results["searches"].values()) else 1
