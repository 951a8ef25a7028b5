"""The bench's printed report: Markdown tables of absolute figures, ratios and targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.scale import PIPELINE, cpu_per_event

__all__ = ["Row", "render"]


@dataclass
class Row:
    measure: str
    value: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None  # None: no target

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("yes" if self.met else "**no**")
        return [self.measure, self.value, self.ratio, self.target, met]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _mib(x: int) -> str:
    return f"{x / 2**20:.1f} MiB"


def _latency_target(share: float, p99: float) -> tuple[str, bool | None]:
    """The receipt-to-row p99 targets: 100 ms at half the end-to-end maximum, 300 at 90%."""
    bound = {0.5: 100.0, 0.9: 300.0}.get(round(share, 2))
    return ("", None) if bound is None else (f"p99 <= {bound:.0f} ms", p99 <= bound)


def render(r: dict[str, Any], rows: list[Row]) -> str:
    """The report as Markdown; appends the pipeline rows (with their verdicts) to ``rows``."""
    bare, acc = r["bare"], r["acceptor"]
    e1, e2 = r["e2e1"], r["e2e2"]
    d1, d2 = r["drain1"], r["drain2"]  # the median pair (bench.phases.phase_drains)
    pairs = r.get("drain_pairs") or [{"one": d1, "two": d2}]
    drains = [d for pair in pairs for d in pair.values()]
    cores = r.get("cores", 2)
    ceilings = [
        ["bare Starlette POST route, same uvicorn settings, 64 connections",
         f"{_n(bare['rate'])} req/s (p99 {bare['p99_ms']:.1f} ms)"],
        ["Redis LPUSH, the acceptor's client (redis-py), 1 in flight",
         f"{_n(r['lpush_sync'])} ops/s"],
        ["Redis LPUSH, redis.asyncio, 64 in flight", f"{_n(r['lpush_async'])} ops/s"],
        ["RQ no-op jobs, one SimpleWorker", f"{_n(r['rq_noop'])} jobs/s"],
        ["Postgres inserts into a copy of webhook_events, 256 rows per transaction",
         f"{_n(r['pg_rows'])} rows/s"],
    ]
    acc_ratio = acc["rate"] / bare["rate"]
    rows += [
        Row("acceptor (signature check + durable enqueue), 64 connections",
            f"{_n(acc['rate'])} req/s", f"{acc_ratio:.0%} of bare Starlette",
            ">= 40%", acc_ratio >= 0.40),
        Row("acceptor p50 / p99 latency", f"{acc['p50_ms']:.1f} / {acc['p99_ms']:.1f} ms",
            "", "p99 < 50 ms", acc["p99_ms"] < 50),
        Row("acceptor: deliveries answered 200 missing / doubled in RQ",
            f"{acc['lost']} / {acc['doubled']} of {acc['ok']:,}", "", "0 / 0",
            acc["lost"] == 0 and acc["doubled"] == 0 and not acc["errors"]),
        Row("acceptor: deliveries per RQ job (group commit)",
            f"{acc['mean_batch']:.1f} ({acc['jobs']:,} jobs)",
            f"{acc['rate'] / acc['mean_batch']:,.0f} jobs/s: "
            f"{acc['rate'] / acc['mean_batch'] / r['lpush_sync']:.1%} of the LPUSH ceiling"),
        Row("end to end, 1 worker process per queue", f"{_n(e1['events_per_s'])} events/s",
            f"{e1['events_per_s'] / r['rq_noop']:.1f}x RQ no-op jobs/s", ">= 5x",
            e1["events_per_s"] >= 5 * r["rq_noop"]),
        Row("end to end, 1 worker process per queue, against the acceptor alone",
            f"{_n(e1['events_per_s'])} / {_n(acc['rate'])} per s",
            f"{e1['events_per_s'] / acc['rate']:.2f}x", ">= 0.5x",
            e1["events_per_s"] >= 0.5 * acc["rate"]),
        *([Row("stale check (workers.marks), one script call per 64-event batch",
               f"{r['checks']['stale']:.1f} us/event",
               f"{r['checks']['stale'] * e1['events_per_s'] / 1e6:.1%} of an event's end-to-end "
               f"time; dedup claim {r['checks']['claim']:.1f} us/event")]
          if "checks" in r else []),
        Row("end to end: accepted deliveries missing / doubled in Postgres",
            f"{e1['lost']} / {e1['doubled']} of {e1['events']:,}", "", "0 / 0",
            e1["lost"] == 0 and e1["doubled"] == 0),
        Row("end to end, 2 worker processes per queue", f"{_n(e2['events_per_s'])} events/s",
            f"{e2['events_per_s'] / e1['events_per_s']:.2f}x one per queue", ">= 1.7x",
            e2["events_per_s"] >= 1.7 * e1["events_per_s"]),
        Row("most 2 per queue could reach end to end: idle CPU with 1 per queue",
            f"{cores - e1['cpu']['machine']:.2f} of {cores} cores idle",
            f"<= {cores / e1['cpu']['machine']:.2f}x"),
        Row("end to end (2 per queue): missing / doubled",
            f"{e2['lost']} / {e2['doubled']} of {e2['events']:,}", "", "0 / 0",
            e2["lost"] == 0 and e2["doubled"] == 0),
        Row("workers alone draining a full queue, 1 per queue",
            f"{_n(d1['events_per_s'])} events/s",
            f"{d1['events_per_s'] / r['rq_noop']:.1f}x RQ no-op jobs/s"),
        Row("workers alone draining a full queue, 2 per queue",
            f"{_n(d2['events_per_s'])} events/s",
            f"{d2['events_per_s'] / d1['events_per_s']:.2f}x one per queue", ">= 1.7x",
            d2["events_per_s"] >= 1.7 * d1["events_per_s"]),
        Row("most 2 per queue could reach draining: idle CPU with 1 per queue",
            f"{cores - d1['cpu']['machine']:.2f} of {cores} cores idle",
            f"<= {cores / d1['cpu']['machine']:.2f}x"),
        Row("workers alone: missing / doubled (every draining phase)",
            f"{sum(d['lost'] for d in drains)} / {sum(d['doubled'] for d in drains)}", "",
            "0 / 0", all(d["lost"] == 0 and d["doubled"] == 0 for d in drains)),
    ]
    for share, lat in sorted(r["latency"].items(), key=lambda kv: float(kv[0])):
        rows.append(Row(f"receipt to Postgres row at {float(share):.0%} of max "
                        f"({_n(lat['rate'])} deliveries/s)",
                        f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms", "",
                        *_latency_target(float(share), lat["p99"])))
        stages = lat.get("stages")
        if stages:  # where it went: queue wait and run time per job, the machine's load
            parts = [f"{q} wait {st['wait_p50']:.0f}/{st['wait_p99']:.0f}, run "
                     f"{st['run_p50']:.0f}/{st['run_p99']:.0f}" for q, st in stages.items()]
            cpu = lat.get("cpu", {})
            rows.append(Row(f"  at {float(share):.0%}: per job p50/p99 ms",
                            "; ".join(parts),
                            f"other load {cpu.get('other', 0):.2f} cores, machine "
                            f"{cpu.get('machine', 0):.2f}"))
    soak = r["soak"]
    for name, m in soak["rss"].items():
        rows.append(Row(f"RSS over {r['args']['soak']:.0f} s soak at {_n(soak['rate'])}/s: {name}",
                        f"{_mib(m['start'])} -> {_mib(m['end'])}, peak {_mib(m['peak'])}",
                        f"{m['growth']:+.1%}", "within 10%", abs(m["growth"]) <= 0.10))
    rows.append(Row("soak: deliveries refused or failed",
                    f"{soak['sent'] - soak['ok']} of {soak['sent']:,}", "", "0",
                    soak["sent"] == soak["ok"]))

    cpu_cols = ["loadgen", "server", "acceptor", "workers", "redis", "postgres", "bench",
                "other", "machine"]
    cpu_rows = []
    for label, res in [("bare Starlette", bare), ("acceptor alone", acc),
                       ("end to end, 1 per queue", e1), ("end to end, 2 per queue", e2),
                       ("workers draining, 1 per queue", d1),
                       ("workers draining, 2 per queue", d2)]:
        cpu = res["cpu"]
        cpu_rows.append([label] + [f"{cpu[c]:.2f}" if c in cpu else "" for c in cpu_cols])

    per_event_cols = [*PIPELINE, "pipeline"]
    # (key in per_event, label, results, events): the phases of the per-event tables.
    phases: list[tuple[str, str, dict[str, Any], int]] = [
        ("acceptor", "acceptor alone", acc, acc["ok"]),
        ("e2e1", "end to end, 1 per queue", e1, e1["events"]),
        ("e2e2", "end to end, 2 per queue", e2, e2["events"]),
        ("drain1", "workers draining, 1 per queue", d1, d1["events"]),
        ("drain2", "workers draining, 2 per queue", d2, d2["events"])]
    # (one per queue, two per queue, label, the open-loop pair or None): target 4's comparisons.
    comparisons: list[tuple[str, str, str,
                            tuple[str, dict[str, Any], dict[str, Any]] | None]] = [
        ("e2e1", "e2e2", "end to end", None), ("drain1", "drain2", "draining", None)]
    for share, single, double in _same_rate(r):
        key = f"{float(share):.0%}"
        phases += [(f"open1-{key}", f"open loop at {key}, 1 per queue", single, single["events"]),
                   (f"open2-{key}", f"open loop at {key}, 2 per queue", double, double["events"])]
        comparisons.append((f"open1-{key}", f"open2-{key}",
                            f"open loop at {key} of max, {_n(single['rate'])} / "
                            f"{_n(double['rate'])} deliveries/s", (key, single, double)))
    per_event_rows, per_event = [], {}
    for key, label, res, events in phases:
        per_event[key] = cpu_per_event(res["cpu"], events)
        per_event_rows.append([label, f"{events:,}", f"{res['cpu']['other']:.2f}"]
                              + [f"{per_event[key][c]:.0f}" for c in per_event_cols])
    for one, two, label, open_pair in comparisons:
        cost = per_event[two]["pipeline"] / per_event[one]["pipeline"]
        ratio = f"{cost:.2f}x one per queue"
        if one == "drain1" and len(pairs) > 1:
            ratio = f"{ratio} (median of {len(pairs)} pairs)"
        rows.append(Row(f"CPU per event, all pipeline processes, 2 per queue ({label})",
                        f"{per_event[two]['pipeline']:.0f} us "
                        f"(1 per queue: {per_event[one]['pipeline']:.0f} us)",
                        ratio, "<= 1.10x", cost <= 1.10))
        if open_pair is not None:
            share_label, single, double = open_pair
            rows.append(Row(f"  2 per queue at {share_label}: receipt to Postgres row",
                            f"p50 {double['p50']:.0f} ms, p99 {double['p99']:.0f} ms",
                            f"1 per queue: p50 {single['p50']:.0f} ms, "
                            f"p99 {single['p99']:.0f} ms"))
    r["cpu_per_event"] = per_event

    out = ["## Ceilings (this machine, this run)", "",
           _table(["ceiling", "measured"], ceilings), "",
           "## Pipeline", "",
           _table(["measure", "value", "ratio", "target", "met"], [x.cells() for x in rows]),
           "", "## Where the CPU went (cores, averaged over each phase; 'other' is everything "
           "outside the bench)", "",
           _table(["phase", *cpu_cols], cpu_rows), "",
           "## CPU per event (microseconds of CPU per accepted event, by process type; "
           "'other' in cores, for judging the phase)", "",
           _table(["phase", "events", "other", *per_event_cols], per_event_rows), "",
           "## Events/s one core of each process type carries (1,000,000 / its CPU us per "
           "event; Redis runs commands on one core, so its row is one Redis primary's bound)",
           "",
           _table(["process type", "end to end, 1 per queue", "workers draining, 1 per queue",
                   "acceptor alone"],
                  # (under half a microsecond, as Postgres with the acceptor alone: no figure)
                  [[k] + [_n(1e6 / per_event[ph][k]) if per_event[ph][k] >= 0.5 else ""
                          for ph in ("e2e1", "drain1", "acceptor")] for k in PIPELINE]), "",
           *_pairs(pairs),
           *_costs(r, [(res, label) for _, label, res, _ in phases]),
           f"Machine: {r['machine']}. Run took {r['seconds']:.0f} s."]
    return "\n".join(out)


def _same_rate(r: dict[str, Any]) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
    """(share, one per queue, two per queue) for each open-loop rate both ran: the same
    deliveries at the same times (the jobs they make may differ: fewer wait with two per
    queue, so fewer are grouped); ``events`` and ``cpu`` in both."""
    one_side, two_side = r["latency"], r.get("latency2") or {}
    return [(share, one_side[share], two_side[share]) for share in sorted(two_side, key=float)
            if share in one_side and "events" in one_side[share]]


def _pairs(pairs: list[dict[str, dict[str, Any]]]) -> list[str]:
    """Draining, pair by pair. Both sides of a pair do the same work (the same Redis commands
    per event): where Redis's CPU per command differs between them, the machine ran slower for
    one side, and the pipeline's CPU per event carries that too."""
    rows = []
    for i, pair in enumerate(pairs, 1):
        cells = [str(i)]
        figures: dict[str, list[str]] = {"cpu": [], "commands": [], "redis": [], "switches": []}
        pipeline = []
        for side in ("one", "two"):
            d = pair[side]
            cost = cpu_per_event(d["cpu"], d["events"])
            pipeline.append(cost["pipeline"])
            commands = d.get("costs", {}).get("redis_commands") or 0.0
            figures["cpu"].append(f"{cost['pipeline']:.0f}")
            figures["commands"].append(f"{commands:.2f}")
            figures["redis"].append(f"{cost['redis'] / commands:.2f}" if commands else "")
            figures["switches"].append(f"{d.get('preemptions', 0.0):.3f}")
        cells += [" / ".join(figures["cpu"]), f"{pipeline[1] / pipeline[0]:.2f}x",
                  " / ".join(figures["commands"]), " / ".join(figures["redis"]),
                  " / ".join(figures["switches"])]
        rows.append(cells)
    return ["## Draining, pair by pair (1 per queue / 2 per queue, run one after the other)", "",
            _table(["pair", "pipeline CPU us/event", "ratio", "Redis commands/event",
                    "Redis CPU us/command", "preemptions/event"], rows), "",
            "Both sides run the same jobs in the same groups, so they send Redis the same "
            "commands per event. Redis CPU per command is then a measure of how fast the "
            "machine ran each side; preemptions count the involuntary context switches of every "
            "pipeline process (more processes than cores).", ""]


def _costs(r: dict[str, Any], phases: list[tuple[dict[str, Any], str]]) -> list[str]:
    """The scale model's inputs: what one event costs Redis and Postgres (bench.scale), for
    each (results, label) of ``phases`` that measured them."""
    rows = []
    for phase, label in phases:
        c = phase.get("costs")
        if not c:
            continue
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(c["redis_by_command"].items())[:6])
        rows.append([label, f"{c['redis_commands']:.3f}", f"{c['redis_in_bytes']:.0f}",
                     f"{c['redis_out_bytes']:.0f}", "rewritten" if c["redis_aof_bytes"] is None else f"{c['redis_aof_bytes']:.0f}",
                     f"{c.get('redis_memory_bytes', 0):.0f}",
                     f"{c['pg_write_transactions']:.4f}",
                     f"{c['wal_bytes']:.0f}", top])
    if not rows:
        return []
    return ["## Shared servers per event (the bench's own Redis and Postgres, counter deltas "
            "over the phase; Redis commands include those its Lua scripts run)", "",
            _table(["phase", "Redis commands", "Redis bytes in", "Redis bytes out",
                    "AOF bytes", "Redis memory bytes", "PG write transactions", "WAL bytes",
                    "Redis commands per event, most frequent"], rows), "",
            *(["WAL bytes and write transactions are the whole Postgres server's: with "
               "DATABASE_URL set, whatever else uses that server counts too. Unset it for "
               "these two columns (the bench then starts its own).", ""]
              if r.get("pg_server_shared") else [])]


def render_replicas(results: dict[str, Any]) -> str:
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
