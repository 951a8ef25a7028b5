"""Keeping what each sink did with each event (sinks.outcomes), from the deliver jobs.

Each job writes its rows in one statement, at the end of its run, whatever the sink did. The
write never decides the delivery: when Postgres is away or refuses (schema not migrated, a
lock timeout), the rows go to a Redis list (the backlog, ``<prefix>:outcomes:backlog``) and the
job ends as the sink made it end. A later job's write takes up to ``OUTCOME_BACKLOG_BATCH`` of
the backlog along (LPOP: each row is taken by one worker). After a failure the worker does not
try Postgres again for ``OUTCOME_RETRY_AFTER`` seconds, so an outage costs a job one Redis
call, not a connect timeout. Failures count in ``ingest_sink_outcome_errors{result}`` and log
one line naming the error's type (never its text: it may quote values).

Without ``DATABASE_URL``, or with ``INGEST_SINK_OUTCOMES=false``, nothing is kept.

A worker that dies between taking backlog rows and writing them loses those rows (at most one
batch, counted nowhere): until those events reach a next state, the console shows the state
they had before (or "pending"), an older one, not a made-up one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from redis import Redis

from ingest import constants, metrics
from ingest.config import Settings
from ingest.constants import Names
from sinks.outcomes import DERIVED_SINK, Outcome, write

__all__ = ["OutcomeRecorder", "attempts_of", "backlog_key", "forget", "next_attempt_at",
           "writes_delivered"]

log = logging.getLogger("workers.outcomes")


def attempts_of(job: Any) -> int:
    """Which attempt of its job this run is (1 the first), from RQ's retries left."""
    intervals = getattr(job, "retry_intervals", None)
    left = getattr(job, "retries_left", None)
    if job is None or not intervals or left is None:
        return 1
    return max(len(intervals) - int(left), 0) + 1


def next_attempt_at(job: Any, now: datetime) -> datetime | None:
    """When RQ runs the job again after this failed run (the interval it will use)."""
    if job is None or not job.retries_left:
        return None
    try:
        return now + timedelta(seconds=int(job.get_retry_interval()))
    except Exception:  # a job without intervals: retried at once
        return now


def backlog_key(names: Names) -> str:
    """The Redis list where outcome rows wait while Postgres cannot take them."""
    return names.key("outcomes:backlog")


def forget(redis: Redis, names: Names, event_ids: set[str], dry_run: bool = False) -> int:
    """Take the rows of ``event_ids`` out of the backlog (``ingest erase``: those events are
    gone, and a later write would bring their rows back). Returns how many there were."""
    if not event_ids:
        return 0
    key = backlog_key(names)
    found = 0
    items: list[Any] = list(redis.lrange(key, 0, -1))
    for item in items:
        try:
            event_id = str(orjson.loads(item)["event_id"])
        except Exception:
            continue
        if event_id in event_ids:
            found += 1
            if not dry_run:
                redis.lrem(key, 0, item)
    return found


def writes_delivered(sink: str, attempts: int) -> bool:
    """False for the Postgres sink's first attempt: its stored row says it (sinks.outcomes)."""
    return sink != DERIVED_SINK or attempts > 1


class OutcomeRecorder:
    """One worker process's writer of outcome rows (see the module docstring)."""

    def __init__(self, settings: Settings, redis: Redis, names: Names) -> None:
        self.url = settings.database_url if settings.sink_outcomes else None
        self.redis = redis
        self.backlog_key = backlog_key(names)
        self._conn: Any = None
        self._down_until = 0.0
        self._check_backlog_at = 0.0  # 0: look at once

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def record(self, outcomes: Sequence[Outcome]) -> None:
        """Write ``outcomes`` (and a batch of the backlog); never raises."""
        if self.url is None or not outcomes:
            return
        if time.monotonic() < self._down_until:
            metrics.SINK_OUTCOME_ERRORS.labels("backlogged").inc(len(outcomes))
            self._keep(outcomes)
            return
        backlog = self._take_backlog()
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                from sinks.postgres import connect

                self._conn = connect(self.url, autocommit=True, connect_timeout=3,
                                     options="-c statement_timeout=5000")
            write(self._conn, [*backlog, *outcomes])
        except Exception as exc:
            self.close()
            self._down_until = time.monotonic() + constants.OUTCOME_RETRY_AFTER
            metrics.SINK_OUTCOME_ERRORS.labels("backlogged").inc(len(outcomes))
            log.warning("sink outcomes not written to Postgres (%s); kept in Redis for a later "
                        "write", type(exc).__name__, extra={"count": len(outcomes)})
            self._keep([*backlog, *outcomes])

    def _take_backlog(self) -> list[Outcome]:
        now = time.monotonic()
        if now < self._check_backlog_at:
            return []
        try:
            raw: Any = self.redis.lpop(self.backlog_key, constants.OUTCOME_BACKLOG_BATCH)
        except Exception:
            return []  # Redis trouble is the job's own business; the rows stay where they are
        rows = []
        for item in raw or ():
            try:
                rows.append(Outcome.from_dict(orjson.loads(item)))
            except Exception:  # not ours, or from another version: nothing to show anyway
                continue
        # Rows found: look again on the next job, until it is empty.
        self._check_backlog_at = 0.0 if raw else now + constants.OUTCOME_BACKLOG_CHECK_EVERY
        return rows

    def _keep(self, outcomes: Sequence[Outcome]) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(self.backlog_key, *[orjson.dumps(o.to_dict()) for o in outcomes])
                pipe.ltrim(self.backlog_key, -constants.OUTCOME_BACKLOG_MAX, -1)
                length = pipe.execute()[0]
            self._check_backlog_at = 0.0
            if length > constants.OUTCOME_BACKLOG_MAX:
                metrics.SINK_OUTCOME_ERRORS.labels("lost").inc(
                    min(length - constants.OUTCOME_BACKLOG_MAX, len(outcomes)))
        except Exception as exc:
            metrics.SINK_OUTCOME_ERRORS.labels("lost").inc(len(outcomes))
            log.warning("sink outcomes lost: neither Postgres nor Redis took them (%s)",
                        type(exc).__name__, extra={"count": len(outcomes)})

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


def now() -> datetime:
    return datetime.now(timezone.utc)
