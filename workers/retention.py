"""Retention: remove archived deliveries and events older than their retention, daily.

The worker runs it (:func:`schedule`, :func:`run_slice`); ``ingest retention``
(ingest.commands.retention) runs :func:`run_retention` by hand.

``INGEST_RETENTION_DAYS`` applies to raw deliveries (``"deliveries"``: the Postgres sink's
``webhook_deliveries``), ``INGEST_EVENTS_RETENTION_DAYS`` to events (``"events"``:
``webhook_events``), both by when they were received. Unset keeps forever. What expires is
each sink's own (sinks.base: ``expire``, reached through :class:`sinks.registry.EnabledSink`,
for every installed sink that keeps such data, enabled or not); this module only paces it.

Why batched deletes: rows go a thousand at a time, each batch its own short transaction
(sinks.postgres_data says how), so no lock is held for long, writers never wait on it, and
autovacuum keeps up.

The pace (:class:`Pace`, :func:`next_step`): after each batch the run rests several times as
long as the batch took, so it deletes a tenth of the time at most. It backs off (longer
rests) when a batch takes much longer per row than the fastest ones before it, a sign the
server is busy with something else, and when jobs wait in the ingest or sink
queues; it comes back to its full pace once neither holds.

Workers run it once a day (:func:`schedule`): the first worker to start claims the day's run
with a Redis ``SET NX`` marker and schedules one job, with a fixed id, through RQ's scheduler
on the ingest queue. The job works for at most ``SLICE_SECONDS`` and, when rows are left,
enqueues its next slice behind the batches waiting in the queue: ingestion never waits long
behind it, however many rows expire, and however many workers there are it runs once. A slice
also ends early when jobs are waiting in the queues, so the worker running it turns to them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job

from ingest.config import Settings
from ingest.rq_jobs import enqueue_unique, make_job
from sinks.registry import EnabledSink, data_keepers
from workers.runtime import Runtime, current_runtime

log = logging.getLogger("workers.retention")

__all__ = ["Pace", "cutoffs", "expiring", "next_step", "places", "queued_jobs", "remaining",
           "run_retention", "run_slice", "schedule"]

# Rows removed per transaction: each commit takes a few milliseconds of one server process
# and writes well under a megabyte of WAL. (Fixed: the pace adapts the rests, so batch times
# stay comparable with each other.)
BATCH = 1000
# After each batch, rest this many times as long as the batch took (9: deleting a tenth of
# the time at most, a tenth of one server process's core).
REST = 9.0
# Longest rest the pace backs off to, as a multiple of the batch's time ...
MAX_REST = 64.0
# ... and in seconds, whatever the batch took.
MAX_REST_SECONDS = 5.0
# A batch slower per row than this many times the run's reference means the server is busy.
SLOW = 2.0
# The reference is the fastest batch per row so far, rising by this share per batch: one lucky
# early batch (its rows still in memory) does not hold the run backed off for good, and a
# server that stays slower (a larger table, steady traffic) becomes the new reference within
# some 15 batches, while a batch slower than those just before still backs off.
DRIFT = 0.05
# Jobs waiting in the ingest and sink queues (together) past which the pace backs off, and a
# scheduled slice ends to let its worker take them.
BACKLOG_JOBS = 4
# Least rest (seconds) after a batch while jobs are waiting.
BACKLOG_REST = 1.0
# Longest a scheduled retention job works (seconds) before leaving the rest to its next slice.
SLICE_SECONDS = 20.0
# Hour of the day (UTC) of the daily run.
DAILY_HOUR_UTC = 3
# The job function of the daily run, by name.
SLICE_JOB = "workers.retention.run_slice"
# Earlier versions' name of the same job: schedule() repairs a run they scheduled.
_OLD_SLICE_JOBS = ("ingest.retention.run_slice",)

def cutoffs(settings: Settings, now: datetime | None = None) -> dict[str, datetime]:
    """Retention ("deliveries", "events") -> what was received before this instant expires.
    Those kept forever are absent."""
    now = now or datetime.now(timezone.utc)
    days = {"deliveries": settings.retention_days, "events": settings.events_retention_days}
    return {t: now - timedelta(days=d) for t, d in days.items() if d is not None}


def expiring(settings: Settings) -> list[EnabledSink]:
    """Every installed sink whose data expires, built to reach it (sinks.registry). One
    whose storage is not configured stops the run, naming the setting."""
    keepers, unreachable = data_keepers(settings, "expire")
    for exc in unreachable.values():
        raise exc
    return [k for k in keepers.values() if k.expires]


def places(keepers: list[EnabledSink]) -> dict[str, str]:
    """Place (a table) -> the retention that applies to it, in the order reports print."""
    return {place: kind for k in keepers for place, kind in k.expires.items()}


@dataclass
class Pace:
    """How fast a retention run goes now, and what it has done. :func:`next_step` changes it
    after each batch; the totals are for reports (``ingest retention``, the bench)."""

    rest: float = REST
    # Reference seconds per row, per table (DRIFT): the server's pace when not busy.
    fastest: dict[str, float] = field(default_factory=dict)
    working: float = 0.0  # seconds spent in batches
    resting: float = 0.0  # seconds spent resting between them
    rows: int = 0
    batches: int = 0
    backed_off: int = 0  # batches after which the pace backed off

    def __post_init__(self) -> None:
        if self.rest < 0:
            raise ValueError(f"rest must be >= 0, got {self.rest!r}")

    @property
    def duty(self) -> float:
        """Share of the run's time spent deleting."""
        total = self.working + self.resting
        return self.working / total if total else 0.0


def next_step(pace: Pace, table: str, rows: int, seconds: float, waiting: int) -> float:
    """After a batch of ``rows`` that took ``seconds``, with ``waiting`` jobs in the queues:
    adjust ``pace`` and return how long to rest before the next batch.

    Busy (the batch was :data:`SLOW` times slower per row than the run's reference, or more
    than :data:`BACKLOG_JOBS` jobs wait): double the rest, up to :data:`MAX_REST` times the
    batch's time. Otherwise halve it, down to :data:`REST`."""
    pace.rows += rows
    pace.batches += 1
    pace.working += seconds
    per_row = seconds / rows if rows else 0.0
    fastest = pace.fastest.get(table)
    slow = fastest is not None and rows > 0 and per_row > SLOW * fastest
    if rows:
        pace.fastest[table] = per_row if fastest is None else min(per_row,
                                                                  fastest * (1 + DRIFT))
    backlog = waiting > BACKLOG_JOBS
    if slow or backlog:
        pace.rest = min(MAX_REST, pace.rest * 2)
        pace.backed_off += 1
    else:
        pace.rest = max(REST, pace.rest / 2)
    rest = min(MAX_REST_SECONDS, seconds * pace.rest)
    if backlog:
        rest = max(rest, BACKLOG_REST)
    return rest


def queued_jobs(redis: Redis, settings: Settings) -> int:
    """Jobs waiting (not yet started) in the ingest queue and every sink queue."""
    names = settings.names
    pipe = redis.pipeline(transaction=False)
    for queue in [names.ingest_queue, *(names.sink_queue(s) for s in settings.sinks)]:
        pipe.llen(f"rq:queue:{queue}")
    return sum(int(n) for n in pipe.execute())


def _waiting(redis: Redis | None, settings: Settings) -> int:
    if redis is None:
        return 0
    try:
        return queued_jobs(redis, settings)
    except RedisError as exc:
        # The pace still follows the batches' own times; the run does not stop for Redis.
        log.warning("retention cannot read the queues' length (%s); pacing without it",
                    type(exc).__name__)
        return 0


def run_retention(settings: Settings, dry_run: bool = False, now: datetime | None = None,
                  deadline: float | None = None, batch: int | None = None,
                  progress: Callable[[str, int], None] | None = None,
                  redis: Redis | None = None, pace: Pace | None = None,
                  stop_on_backlog: bool = False) -> dict[str, int]:
    """Remove (or, dry, count) what is older than the retention; returns rows per place
    (table) whose retention is set.

    Stops at ``deadline`` (time.monotonic()) when one is given, after one batch at least, and
    with ``stop_on_backlog`` as soon as jobs wait in the queues (a worker's slice). With
    ``redis``, the pace backs off while jobs wait; ``pace`` (else a new one at full pace)
    holds the pace and, afterwards, what the run did. ``batch``: rows per batch."""
    pace = pace or Pace()
    size = batch or BATCH
    limits = cutoffs(settings, now)
    keepers = expiring(settings)
    removed = {place: 0 for place, kind in places(keepers).items() if kind in limits}
    try:
        for keeper in keepers:
            if dry_run:
                for place, rows in keeper.expire(limits, dry_run=True):
                    removed[place] = rows
                continue
            if not _expire_paced(keeper, limits, size, removed, pace, settings, deadline,
                                 progress, redis, stop_on_backlog):
                break  # out of time, or jobs are waiting: the rest is for the next slice
    finally:
        for keeper in keepers:
            keeper.close()
    return removed


def _expire_paced(keeper: EnabledSink, limits: dict[str, datetime], size: int,
                  removed: dict[str, int], pace: Pace, settings: Settings,
                  deadline: float | None, progress: Callable[[str, int], None] | None,
                  redis: Redis | None, stop_on_backlog: bool) -> bool:
    """One sink's expired data, batch by batch at ``pace``. True when all of it went."""
    batches = keeper.expire(limits, batch=size)
    try:
        while True:
            started = time.monotonic()
            step = next(batches, None)
            if step is None:
                return True
            place, done = step
            took = time.monotonic() - started
            removed[place] = removed.get(place, 0) + done
            if progress is not None and done:
                progress(place, done)
            waiting = _waiting(redis, settings)
            rest = next_step(pace, place, done, took, waiting)
            log.debug("retention batch: %d rows from %s in %.1f ms, %d jobs waiting; "
                      "resting %.1f ms", done, place, took * 1000, waiting, rest * 1000)
            if done < size:
                continue  # that place is done: the next one, without a rest
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if stop_on_backlog and waiting > BACKLOG_JOBS:
                return False
            time.sleep(rest)
            pace.resting += rest
    finally:
        batches.close()  # type: ignore[attr-defined]


def remaining(settings: Settings, now: datetime | None = None) -> bool:
    """True when some sink still holds expired data."""
    limits = cutoffs(settings, now)
    keepers = expiring(settings)
    try:
        return any(rows for keeper in keepers
                   for _, rows in keeper.expire(limits, dry_run=True, probe=True))
    finally:
        for keeper in keepers:
            keeper.close()


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
    pace = Pace()
    # Jobs waiting end the slice: this worker turns to them, the next slice queues behind.
    removed = run_retention(rt.settings, deadline=time.monotonic() + SLICE_SECONDS,
                            redis=rt.redis, pace=pace, stop_on_backlog=True)
    log.info("retention %s part %d: removed %s in %d batches, deleting %.0f%% of %.1f s",
             day, part, removed, pace.batches, pace.duty * 100, pace.working + pace.resting)
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
