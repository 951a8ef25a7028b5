"""``ingest retention``: remove archived deliveries and events older than their retention.

Example::

    INGEST_RETENTION_DAYS=30 INGEST_EVENTS_RETENTION_DAYS=400 ingest retention --dry-run

The removal itself (batched deletes, paced so ingestion keeps its rate) is the workers' daily
job, in workers.retention; this command runs it once, now, with a progress line. With
``REDIS_URL`` set it also backs off while jobs wait in the queues.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ingest.config import Settings

__all__ = ["add_command"]


def cmd_retention(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ingest.redis_conn import worker_redis
    from workers.retention import Pace, cutoffs, expiring, places, run_retention

    settings = Settings.from_env()
    limits = cutoffs(settings)
    console = Console()
    if not limits:
        console.print("nothing to do: INGEST_RETENTION_DAYS and INGEST_EVENTS_RETENTION_DAYS "
                      "are unset, so everything is kept")
        return 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("removing expired rows", total=None)
        counts: dict[str, int] = {}

        def tick(table: str, n: int) -> None:
            counts[table] = counts.get(table, 0) + n
            bar.update(task, description="removed " + ", ".join(
                f"{c} from {t}" for t, c in counts.items()))

        pace = Pace()
        redis = worker_redis(settings.redis_url) if settings.redis_url else None
        try:
            removed = run_retention(settings, dry_run=args.dry_run, progress=tick, redis=redis,
                                    pace=pace)
        finally:
            if redis is not None:
                redis.close()
    table = Table(title="ingest retention" + (" (dry run: nothing changed)" if args.dry_run
                                              else ""))
    table.add_column("table")
    table.add_column("received before")
    table.add_column("would be removed" if args.dry_run else "removed", justify="right")
    for name, kind in places(expiring(settings)).items():
        if kind in limits:
            table.add_row(name, limits[kind].isoformat(timespec="seconds"), str(removed[name]))
        else:
            table.add_row(name, "(kept forever)", "0")
    console.print(table)
    if pace.batches:
        took = pace.working + pace.resting
        console.print(f"{pace.rows} rows in {took:.1f} s ({pace.rows / took if took else 0:.0f}"
                      f" rows/s), deleting {pace.duty:.0%} of the time"
                      + (f"; backed off after {pace.backed_off} of {pace.batches} batches"
                         if pace.backed_off else ""))
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest retention`` (called by ingest.commands.cli)."""
    p = add("retention", cmd_retention,
            "remove deliveries and events older than INGEST_RETENTION_DAYS / "
            "INGEST_EVENTS_RETENTION_DAYS")
    p.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")

