"""CPU fairness at the acceptor: one sender's expensive bodies against other providers'
deliveries. A phase of ``python -m bench``; alone: ``python -m bench --fairness``.

The attack is the audit's: bodies of 340,000 empty arrays (1 MiB, under the body limit), sent
by ``--attackers`` (32) connections at once, each sending the next as soon as it has an answer,
to Outboundry with its token in the URL (a leaked token is enough). Beside it, valid Outreach
deliveries at a fixed rate (open loop: latency counts from when each was due, so a stalled
acceptor is not flattered). Measured in the same run, on the same acceptor:

1. ceiling: checking one attack body in line, in this process (``orjson.loads`` and the
   nesting check): what each would cost the event loop if it were parsed there;
2. the valid deliveries alone, at ``--fairness-rate`` for ``--duration`` seconds;
3. the same deliveries during the attack: their latency (target: every one under 1 s), the
   attack's answers, and the acceptor's CPU per attack body, split into its own process (the
   event loop) and the structure-check processes.

``python -m bench.fairness attack URL`` is the attacker (a process of its own, as the load
generator is): it prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from bench.loadgen import _Connection
from bench.procs import Proc, python, wait_for_http
from bench.report import Row, _table
from ingest.acceptor.structure import verdict
from ingest.commands.embedded import free_port

__all__ = ["attack_body", "render", "run"]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-outboundry-token-0123456789"
EMPTY_ARRAYS = 340_000
# The target: another provider's valid deliveries answered within this, whatever the attack.
TARGET_SECONDS = 1.0


def attack_body() -> bytes:
    return (b'{"type": "email.opened", "data": {"rows": ['
            + b",".join([b"[]"] * EMPTY_ARRAYS) + b"]}}")


def inline_cost(rounds: int = 5) -> dict[str, float]:
    """Milliseconds to check one attack body in line (the best of ``rounds``)."""
    body = attack_body()
    best = min(_timed(verdict, body) for _ in range(rounds))
    parse = min(_timed(orjson.loads, body) for _ in range(rounds))
    return {"check_ms": best * 1000, "parse_ms": parse * 1000, "bytes": len(body)}


def _timed(fn: Any, *args: Any) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# -- the attacker ------------------------------------------------------------------------------


async def _attack(url: str, connections: int, duration: float) -> dict[str, Any]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    body = attack_body()
    request = (f"POST /{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration

    async def one() -> None:
        conn: _Connection | None = None
        while time.perf_counter() < stop_at:
            if conn is None or conn.closed:
                _, conn = await loop.create_connection(_Connection, host, int(port))
            started = time.perf_counter()
            try:
                key = str(await conn.call(request))
            except (ConnectionError, OSError) as exc:
                key = type(exc).__name__
                conn = None
            statuses[key] = statuses.get(key, 0) + 1
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one() for _ in range(connections)))
    latencies.sort()
    return {"statuses": statuses, "sent": len(latencies),
            "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
            "max_ms": latencies[-1] * 1000 if latencies else None}


# -- the phase ---------------------------------------------------------------------------------


def _cpu(process: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the process itself, of its children: the structure-check processes)."""
    own = process.cpu_times()
    children = 0.0
    for child in process.children(recursive=True):
        try:
            t = child.cpu_times()
            children += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, children


def _valid(url: str, secret: str, rate: float, duration: float, start_seq: int) -> Any:
    return subprocess.Popen(
        python("-m", "bench.loadgen", url, "--secret", secret, "--duration", str(duration),
               "--rate", repr(rate), "--connections", "16", "--start-seq", str(start_seq),
               "--warmup", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})


def _report(proc: Any, what: str, timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: {err.decode(errors='replace')}")
    report: dict[str, Any] = orjson.loads(out)
    return report


def run(env: dict[str, str], secret: str, tmp: Path, duration: float, rate: float,
        attackers: int, log: Any = print) -> dict[str, Any]:
    """The phase, against an acceptor of its own started with ``env`` (Redis and an Outreach
    secret; the Outboundry token is added here)."""
    results: dict[str, Any] = {"rate": rate, "attackers": attackers, "duration": duration}
    log("fairness: checking one attack body in line (the ceiling)")
    results["inline"] = inline_cost()
    port = free_port()
    acceptor = Proc("fairness-acceptor", python(
        "-m", "ingest.commands.cli", "serve", "--host", "127.0.0.1", "--port", str(port)),
        {**env, "OUTBOUNDRY_WEBHOOK_TOKENS": TOKEN}, tmp / "fairness-acceptor.log", cwd=ROOT)
    try:
        wait_for_http(port, acceptor)
        base = f"http://127.0.0.1:{port}/webhooks"
        process = psutil.Process(acceptor.pid)
        log(f"fairness: valid Outreach deliveries alone, {rate:.0f}/s")
        own0, kids0 = _cpu(process)
        alone = _report(_valid(f"{base}/outreach", secret, rate, duration, 10_000_000),
                        "load generator", duration + 120)
        own1, kids1 = _cpu(process)
        results["alone"] = {**alone, "acceptor_cpu_s": own1 - own0}

        log(f"fairness: the same, while {attackers} connections send bodies of "
            f"{EMPTY_ARRAYS:,} empty arrays to Outboundry")
        attacker = subprocess.Popen(
            python("-m", "bench.fairness", "attack", f"{base}/outboundry?token={TOKEN}",
                   "--connections", str(attackers), "--duration", str(duration + 2)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(2)  # every attacker has its body in flight before the measured deliveries
        own2, kids2 = _cpu(process)
        attacked = _report(_valid(f"{base}/outreach", secret, rate, duration, 20_000_000),
                           "load generator", duration + 120)
        own3, kids3 = _cpu(process)
        attack = _report(attacker, "attacker", duration + 120)
        results["attacked"] = {**attacked, "acceptor_cpu_s": own3 - own2,
                               "checkers_cpu_s": kids3 - kids2}
        results["attack"] = attack
        results["checked_s"] = kids3 - kids2
    finally:
        acceptor.stop()
    return results


def render(r: dict[str, Any]) -> str:
    """The phase's report: Markdown, the ceilings first."""
    inline, alone, attacked, attack = r["inline"], r["alone"], r["attacked"], r["attack"]
    accepted = attack["statuses"].get("200", 0)
    # The acceptor's own CPU the attack added, over the attack bodies it took in meanwhile
    # (the attacker's whole run: it began 2 s before and ended 2 s after the measured window).
    window = r["duration"] / (r["duration"] + 2)
    bodies = max(1.0, attack["sent"] * window)
    extra_cpu = attacked["acceptor_cpu_s"] - alone["acceptor_cpu_s"]
    loop_ms = max(0.0, extra_cpu) / bodies * 1000
    ceilings = [
        [f"checking one attack body in line ({inline['bytes']:,} bytes, {EMPTY_ARRAYS:,} empty "
         "arrays): parse and nesting check", f"{inline['check_ms']:.0f} ms (parse alone "
         f"{inline['parse_ms']:.0f} ms)"],
        [f"valid Outreach deliveries alone, {r['rate']:.0f}/s open loop",
         f"p50 {alone['p50_ms']:.1f} ms, p99 {alone['p99_ms']:.1f} ms, max "
         f"{alone['max_ms']:.1f} ms"],
    ]
    worst = attacked["max_ms"] or 0.0
    rows = [
        Row(f"valid Outreach deliveries during the attack ({r['attackers']} connections)",
            f"p50 {attacked['p50_ms']:.1f} ms, p99 {attacked['p99_ms']:.1f} ms, max "
            f"{worst:.1f} ms", f"p99 {attacked['p99_ms'] / alone['p99_ms']:.1f}x alone",
            f"max < {TARGET_SECONDS * 1000:.0f} ms", worst < TARGET_SECONDS * 1000),
        Row("valid deliveries answered 200 during the attack",
            f"{attacked['ok']:,} of {attacked['sent']:,}", "", "all",
            attacked["ok"] == attacked["sent"] and not attacked["errors"]),
        Row("attack bodies answered", ", ".join(f"{k}: {v:,}" for k, v in
                                                sorted(attack["statuses"].items())),
            f"{accepted / (r['duration'] + 2):.1f} accepted/s; attacker's p50 "
            f"{attack['p50_ms'] or 0:.0f} ms"),
        Row("acceptor process CPU per attack body (its event loop)", f"{loop_ms:.1f} ms",
            f"{loop_ms / inline['check_ms']:.1%} of checking it in line"),
        Row("structure-check processes: CPU per accepted attack body",
            f"{r['checked_s'] / max(1.0, accepted * window) * 1000:.0f} ms", ""),
    ]
    return "\n".join([
        "## CPU fairness: one sender's expensive bodies (ceilings measured in this run)", "",
        _table(["ceiling", "measured"], ceilings), "",
        _table(["measure", "value", "ratio", "target", "met"], [x.cells() for x in rows]), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attack", help="send attack bodies; print a JSON report")
    p.add_argument("url")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, required=True)
    args = parser.parse_args(argv)
    coro = _attack(args.url, args.connections, args.duration)
    try:
        import uvloop  # noqa: PLC0415

        report = uvloop.run(coro)
    except ImportError:
        report = asyncio.run(coro)
    sys.stdout.buffer.write(orjson.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
