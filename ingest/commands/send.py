"""``ingest send``: fire realistic, correctly signed deliveries at an acceptor.

Shows a progress bar while it runs and a summary at the end: sent, accepted, rejected (by
status), errors, and latency percentiles. ``--duplicates 0.2`` re-sends 20% of deliveries
byte-for-byte, as providers that redeliver do. Exit status 0 only when every delivery got 200.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ingest.commands.samples import Sample, build_sample

__all__ = ["SendReport", "send"]


@dataclass
class SendReport:
    sent: int = 0
    duplicates: int = 0  # deliveries that re-sent an earlier one byte-for-byte
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def accepted(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def rejected(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.accepted == self.sent

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def _plan(provider: str, secret: str, count: int, duplicates: float,
          seed: int | None) -> tuple[list[Sample], int]:
    """The deliveries to send, in order, and how many of them are re-sends."""
    rng = random.Random(seed)
    plan: list[Sample] = []
    repeated = 0
    while len(plan) < count:
        if plan and rng.random() < duplicates:
            plan.append(rng.choice(plan))  # the very same bytes again
            repeated += 1
        else:
            plan.append(build_sample(provider, secret, rng))
    return plan, repeated


async def _run(url: str, plan: list[Sample], concurrency: int, timeout: float,
               progress: Progress | None) -> SendReport:
    report = SendReport()
    task = progress.add_task("sending", total=len(plan)) if progress else None
    queue: asyncio.Queue[Sample] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    body, headers = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                    report.statuses[response.status_code] += 1
                except httpx.HTTPError as exc:
                    report.errors[type(exc).__name__] += 1
                report.latencies.append(time.perf_counter() - started)
                report.sent += 1
                if progress is not None and task is not None:
                    progress.advance(task)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        report.elapsed = time.perf_counter() - started
    return report


def send(provider: str, url: str, secret: str, count: int = 1, concurrency: int = 1,
         duplicates: float = 0.0, timeout: float = 10.0, seed: int | None = None,
         console: Console | None = None, quiet: bool = False) -> SendReport:
    """Send ``count`` deliveries and print a summary; returns the report."""
    if count < 1 or concurrency < 1 or not 0.0 <= duplicates < 1.0:
        raise ValueError("count and concurrency must be >= 1, duplicates in [0, 1)")
    console = console or Console(stderr=True)
    plan, repeated = _plan(provider, secret, count, duplicates, seed)
    if quiet:
        report = asyncio.run(_run(url, plan, concurrency, timeout, None))
    else:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            report = asyncio.run(_run(url, plan, concurrency, timeout, progress))
    report.duplicates = repeated
    if not quiet:
        _summary(console, provider, url, report)
    return report


def _summary(console: Console, provider: str, url: str, report: SendReport) -> None:
    table = Table(title=f"{provider} -> {url}", show_header=False)
    rate = report.sent / report.elapsed if report.elapsed else 0.0
    by_status = ", ".join(f"{n} x {s}" for s, n in sorted(report.statuses.items()) if s != 200)
    table.add_row("sent", f"{report.sent} ({report.duplicates} of them duplicates)")
    table.add_row("accepted (200)", str(report.accepted))
    table.add_row("rejected", f"{report.rejected} ({by_status})" if report.rejected else "0")
    table.add_row("network errors", ", ".join(f"{n} x {e}" for e, n in report.errors.items()) or "0")
    table.add_row("latency p50 / p99", f"{report.percentile(50) * 1000:.1f} ms / "
                                       f"{report.percentile(99) * 1000:.1f} ms")
    table.add_row("rate", f"{rate:.0f} deliveries/s over {report.elapsed:.2f} s")
    console.print(table)
