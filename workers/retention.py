"""Retention: remove archived deliveries and events older than their retention, daily.

The worker runs it (:func:`schedule`, :func:`run_slice`); ``ingest retention``
(ingest.commands.retention) runs :func:`run_retention` by hand.

``INGEST_RETENTION_DAYS`` applies to ``webhook_deliveries`` (the raw bodies),
``INGEST_EVENTS_RETENTION_DAYS`` to ``webhook_events``, both by ``received_at``. Unset keeps
forever.

Why batched deletes: rows go a few thousand at a time, each batch its own short transaction
found through the ``received_at`` index, so no lock is held for long, writers never wait on
it, and autovacuum keeps up. (Monthly partitions dropped whole would be cheaper still, but
the sink's ``ON CONFLICT (id)`` and ``(provider, dedup_key)`` need unique constraints over the
whole table, which a partitioned table only allows when they include the partition key.)

Workers run it once a day (:func:`schedule`): the first worker to start claims the day's run
with a Redis ``SET NX`` marker and schedules one job, with a fixed id, through RQ's scheduler
on the ingest queue. The job works for at most ``SLICE_SECONDS`` and, when rows are left,
enqueues its next slice behind the batches waiting in the queue: ingestion never waits long
behind it, however many rows expire, and however many workers there are it runs once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from rq.exceptions import NoSuchJobError
from rq.job import Job

from ingest.config import Settings
from ingest.rq_jobs import enqueue_unique, make_job
from sinks.postgres import connect
from workers.runtime import Runtime, current_runtime

log = logging.getLogger("workers.retention")

__all__ = ["TABLES", "cutoffs", "remaining", "run_retention", "run_slice", "schedule"]

# Rows removed per transaction: small enough that each commit is a few milliseconds.
BATCH = 5000
# After each batch, rest this many times as long as the batch took: the deletes use at most
# about half of one server process, leaving the rest to ingestion.
YIELD = 1.0
# Longest a scheduled retention job works (seconds) before leaving the rest to its next slice.
SLICE_SECONDS = 20.0
# Hour of the day (UTC) of the daily run.
DAILY_HOUR_UTC = 3
# The job function of the daily run, by name.
SLICE_JOB = "workers.retention.run_slice"
# Earlier versions' name of the same job: schedule() repairs a run they scheduled.
_OLD_SLICE_JOBS = ("ingest.retention.run_slice",)

# The tables retention applies to, in the order reports print them.
TABLES = ("webhook_deliveries", "webhook_events")


def cutoffs(settings: Settings, now: datetime | None = None) -> dict[str, datetime]:
    """Table -> rows received before this instant expire. Tables kept forever are absent."""
    now = now or datetime.now(timezone.utc)
    days = {"webhook_deliveries": settings.retention_days,
            "webhook_events": settings.events_retention_days}
    return {t: now - timedelta(days=d) for t, d in days.items() if d is not None}


def run_retention(settings: Settings, dry_run: bool = False, now: datetime | None = None,
                  deadline: float | None = None, batch: int | None = None,
                  progress: Callable[[str, int], None] | None = None) -> dict[str, int]:
    """Remove (or, dry, count) what is older than the retention; returns rows per table.
    Stops at ``deadline`` (time.monotonic()) when one is given, after one batch at least."""
    batch = batch or BATCH
    removed: dict[str, int] = {}
    limits = cutoffs(settings, now)
    with connect(settings.require_database(), autocommit=True) as conn:
        for table, cutoff in limits.items():
            removed[table] = 0
            if dry_run:
                row = conn.execute(f"SELECT count(*) FROM {table} WHERE received_at < %s",
                                   [cutoff]).fetchone()
                removed[table] = int(row[0]) if row else 0
                continue
            while True:
                started = time.monotonic()
                # SKIP LOCKED: a row a replay is updating now waits for the next run.
                cur = conn.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "
                    f"WHERE received_at < %s LIMIT %s FOR UPDATE SKIP LOCKED)", [cutoff, batch])
                done = cur.rowcount
                removed[table] += done
                if progress is not None and done:
                    progress(table, done)
                if done < batch or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep((time.monotonic() - started) * YIELD)
    return removed


def remaining(settings: Settings, now: datetime | None = None) -> bool:
    """True when some table still holds expired rows."""
    with connect(settings.require_database(), autocommit=True) as conn:
        for table, cutoff in cutoffs(settings, now).items():
            if conn.execute(f"SELECT 1 FROM {table} WHERE received_at < %s LIMIT 1",
                            [cutoff]).fetchone():
                return True
    return False


# -- the daily run ------------------------------------------------------------------------------


def _next_run(now: datetime) -> datetime:
    at = now.replace(hour=DAILY_HOUR_UTC, minute=0, second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


def schedule(runtime: Runtime, now: datetime | None = None) -> bool:
    """Schedule the next daily run unless a worker already did. True when this call did
    (or when it repaired a run an earlier version scheduled: :func:`_repair`)."""
    if not cutoffs(runtime.settings):
        return False
    when = _next_run(now or datetime.now(timezone.utc))
    day = when.strftime("%Y%m%d")
    job_id = runtime.names.job_id("retention", f"{day}-0")
    marker = runtime.names.key(f"retention:{day}")
    # Kept past the run, so a worker starting later that day does not schedule it again.
    if not runtime.redis.set(marker, b"1", nx=True, ex=3 * 24 * 3600):
        return _repair(runtime, job_id, day)
    queue = runtime.ingest_queue
    queue.schedule_job(make_job(queue, SLICE_JOB, (day, 0), job_id, None, f"retention({day})"),
                       when)
    return True


def _repair(runtime: Runtime, job_id: str, day: str) -> bool:
    """A day's run scheduled by an earlier version names its function by the old module path,
    which no longer imports: schedule it again under :data:`SLICE_JOB`, same id, same time."""
    queue = runtime.ingest_queue
    registry = queue.scheduled_job_registry
    try:
        job = Job.fetch(job_id, connection=runtime.redis, serializer=queue.serializer)
    except NoSuchJobError:
        return False
    if job.func_name not in _OLD_SLICE_JOBS or job_id not in registry:
        return False
    at = registry.get_scheduled_time(job_id)
    registry.remove(job, delete_job=True)
    queue.schedule_job(make_job(queue, SLICE_JOB, (day, 0), job_id, None, f"retention({day})"),
                       at)
    log.info("rescheduled the retention run of %s under %s", day, SLICE_JOB)
    return True


def run_slice(day: str, part: int) -> dict[str, int]:
    """RQ job: one slice of the day's run; enqueues the next slice, or schedules tomorrow."""
    rt = current_runtime()
    removed = run_retention(rt.settings, deadline=time.monotonic() + SLICE_SECONDS)
    if remaining(rt.settings):
        queue = rt.ingest_queue
        enqueue_unique(queue, make_job(
            queue, SLICE_JOB, (day, part + 1), rt.names.job_id("retention", f"{day}-{part + 1}"),
            None, f"retention({day}, part {part + 1})"))
    else:
        # From the day's own run time: a slice run early or late still schedules the next day.
        slot = datetime.strptime(day, "%Y%m%d").replace(hour=DAILY_HOUR_UTC, tzinfo=timezone.utc)
        schedule(rt, max(slot, datetime.now(timezone.utc)))
    return removed
