"""The bench's report: the verdicts it prints are worked out from the figures it measured.

No timing here: the results are made up, and only the arithmetic of the report is checked.
"""

from __future__ import annotations

from typing import Any

from bench.report import Row, render


def _cpu(wall: float, **cores: float) -> dict[str, float]:
    """A phase's CPU split, in cores over ``wall`` seconds (bench.procs.CpuMeter's shape)."""
    split = {"acceptor": 0.0, "workers": 0.0, "redis": 0.0, "postgres": 0.0, "loadgen": 0.0,
             "bench": 0.0, "other": 0.0, **cores}
    split["machine"] = sum(split.values())
    return {**split, "wall": wall}


def _phase(events: int, pipeline_us: float, **extra: Any) -> dict[str, Any]:
    """A phase whose pipeline processes spent ``pipeline_us`` of CPU per event, all of it in
    the workers, over 10 s."""
    cores = events * pipeline_us / 1e6 / 10.0
    return {"events": events, "events_per_s": events / 10.0, "lost": 0, "doubled": 0,
            "cpu": _cpu(10.0, workers=cores), **extra}


def _open_loop(events: int, pipeline_us: float, p99: float) -> dict[str, Any]:
    return _phase(events, pipeline_us, rate=events / 5.0, p50=p99 / 4, p99=p99)


def _results(latency2: dict[float, dict[str, Any]] | None) -> dict[str, Any]:
    drain1, drain2 = _phase(50_000, 200.0), _phase(50_000, 230.0)
    results: dict[str, Any] = {
        "bare": {"rate": 15_000.0, "p99_ms": 7.0, "cpu": _cpu(10.0, loadgen=0.5)},
        "acceptor": {"rate": 10_000.0, "p50_ms": 5.0, "p99_ms": 20.0, "lost": 0, "doubled": 0,
                     "ok": 100_000, "errors": 0, "mean_batch": 64.0, "jobs": 1_563,
                     "cpu": _cpu(10.0, acceptor=0.9)},
        "lpush_sync": 10_000.0, "lpush_async": 16_000.0, "rq_noop": 300.0, "pg_rows": 29_000.0,
        "e2e1": _phase(50_000, 300.0), "e2e2": _phase(40_000, 360.0),
        "drain1": drain1, "drain2": drain2, "drain_pairs": [{"one": drain1, "two": drain2}],
        "latency": {0.1: _open_loop(3_000, 600.0, 30.0), 0.5: _open_loop(15_000, 400.0, 60.0),
                    0.9: _open_loop(27_000, 300.0, 250.0)},
        "soak": {"rate": 2_500.0, "sent": 25_000, "ok": 25_000,
                 "rss": {"acceptor": {"start": 50 << 20, "end": 51 << 20, "peak": 51 << 20,
                                      "growth": 0.02}}},
        "args": {"soak": 10.0}, "machine": "test", "seconds": 1.0, "cores": 2,
    }
    if latency2 is not None:
        results["latency2"] = latency2
    return results


def _row(rows: list[Row], start: str) -> Row:
    found = [row for row in rows if row.measure.startswith(start)]
    assert len(found) == 1, [row.measure for row in rows]
    return found[0]


def test_two_per_queue_at_the_same_load_is_judged_against_one_per_queue_at_that_load() -> None:
    rows: list[Row] = []
    report = render(_results({0.5: _open_loop(15_000, 420.0, 70.0),
                              0.9: _open_loop(27_000, 360.0, 120.0)}), rows)

    half = _row(rows, "CPU per event, all pipeline processes, 2 per queue (open loop at 50%")
    assert (half.value, half.ratio, half.met) == ("420 us (1 per queue: 400 us)",
                                                  "1.05x one per queue", True)
    high = _row(rows, "CPU per event, all pipeline processes, 2 per queue (open loop at 90%")
    assert (high.value, high.ratio, high.met) == ("360 us (1 per queue: 300 us)",
                                                  "1.20x one per queue", False)
    latency = _row(rows, "  2 per queue at 90%: receipt to Postgres row")
    assert (latency.value, latency.ratio) == ("p50 30 ms, p99 120 ms",
                                              "1 per queue: p50 62 ms, p99 250 ms")
    assert "| open loop at 90%, 2 per queue | 27,000 |" in " ".join(report.split())


def test_a_run_without_the_same_load_phases_still_reports_the_others() -> None:
    rows: list[Row] = []
    render(_results(None), rows)

    assert not [row for row in rows if "open loop" in row.measure]
    end_to_end = _row(rows, "CPU per event, all pipeline processes, 2 per queue (end to end)")
    assert (end_to_end.ratio, end_to_end.met) == ("1.20x one per queue", False)
    draining = _row(rows, "CPU per event, all pipeline processes, 2 per queue (draining)")
    assert (draining.ratio, draining.met) == ("1.15x one per queue", False)


def _fairness(worst_ms: float, ok: int = 800) -> dict[str, Any]:
    """A fairness phase (bench.fairness.run's shape) whose valid deliveries took at most
    ``worst_ms`` during the attack."""
    valid = {"sent": 800, "errors": {}, "p50_ms": 15.0, "p99_ms": 30.0, "max_ms": 35.0}
    return {
        "rate": 100.0, "attackers": 32, "duration": 8.0, "checked_s": 9.0,
        "inline": {"check_ms": 150.0, "parse_ms": 120.0, "bytes": 1_020_045},
        "alone": {**valid, "ok": 800, "acceptor_cpu_s": 1.0},
        "attacked": {**valid, "ok": ok, "p99_ms": worst_ms / 2, "max_ms": worst_ms,
                     "acceptor_cpu_s": 1.4},
        "attack": {"statuses": {"200": 90, "503": 10}, "sent": 100, "p50_ms": 3000.0,
                   "max_ms": 3100.0},
    }


def test_the_fairness_target_is_every_valid_delivery_under_one_second() -> None:
    from bench.fairness import render as render_fairness

    def verdicts(text: str) -> dict[str, str]:
        return {cells[1].strip(): cells[-2].strip() for line in text.splitlines()
                if (cells := line.split("|")) and len(cells) == 7 and cells[5].strip()}

    met = verdicts(render_fairness(_fairness(88.0)))
    assert met["valid Outreach deliveries during the attack (32 connections)"] == "yes"
    assert met["valid deliveries answered 200 during the attack"] == "yes"
    missed = verdicts(render_fairness(_fairness(1_500.0, ok=799)))
    assert missed["valid Outreach deliveries during the attack (32 connections)"] == "**no**"
    assert missed["valid deliveries answered 200 during the attack"] == "**no**"
    # The acceptor's own CPU per attack body: the extra CPU over the attack bodies it took in
    # during the measured window (8 of the attacker's 10 s): 0.4 s / 80 bodies.
    assert "| 5.0 ms " in render_fairness(_fairness(88.0))
