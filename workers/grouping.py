"""Deliver jobs that wait in a sink's queue, sent together.

Under load a sink's queue holds several deliver jobs, each about one acceptor batch (as many
deliveries as arrived together: 64 with 64 senders). Each job costs the worker and Redis the
same whatever its size (dequeue, start, finish: about half of what a 64-event job costs the
Postgres sink's worker), and the sink one transaction. So when the job a worker pops is for
a sink that sets ``batch_events`` (the Postgres sink: 256), the worker also takes the jobs
waiting behind it, up to that many events and ``MAX_GROUP_JOBS`` jobs, and hands all their
events to one ``send`` (:func:`workers.jobs.deliver_group`). Only jobs already waiting join:
nobody waits for a group to fill, so a quiet queue runs each job alone, as before.

Each job keeps its own life in RQ (workers.watchdog.IngestWorker): all of them are started
(status, started registry, heartbeats) in one transaction before the send and finished in one
after it, so a worker that dies mid-send leaves every one of them to the watchdog, which
retries each. If the send raises, each job runs again on its own, through ``deliver`` as if
there had been no group: a transient error then retries each job with its own backoff, and a
permanent one splits its events as always. The sink sees those events again, which its
idempotent ``send`` allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rq.job import Job

from ingest import constants
from workers.jobs import deliver_group
from workers.runtime import Runtime

__all__ = ["DeliverGroups"]


def _events(job: Job) -> int:
    return len(job.args[1])


class DeliverGroups:
    """The rules of :class:`workers.watchdog.JobGroups` for deliver jobs."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _limit(self, job: Job) -> int:
        if job.func_name != constants.DELIVER or len(job.args) < 2 or job.kwargs:
            return 0
        if job.repeats_left or job.has_rate_limit:  # RQ's own bookkeeping for those
            return 0
        enabled = self.rt.sinks.get(job.args[0])
        return enabled.batch_events if enabled is not None else 0

    def room(self, job: Job) -> int:
        limit, size = self._limit(job), _events(job)
        if not limit or size >= limit:
            return 0
        return min(constants.MAX_GROUP_JOBS - 1, limit // max(size, 1) - 1)

    def select(self, first: Job, others: Sequence[Job]) -> int:
        limit, total = self._limit(first), _events(first)
        joining = 0
        for job in others:
            try:
                fits = (self._limit(job) == limit and job.args[0] == first.args[0]
                        and total + _events(job) <= limit)
            except Exception:  # data that cannot be read: RQ's own run reports it
                fits = False
            if not fits:
                break
            total += _events(job)
            joining += 1
        return joining

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        return list(deliver_group([tuple(j.args) for j in jobs], [j.id for j in jobs]))
