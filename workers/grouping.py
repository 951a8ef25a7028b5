"""Jobs waiting in a queue, run together with the one a worker popped.

RQ costs a worker and Redis the same for every job whatever it holds (dequeue, start, finish:
about half of what a 64-delivery job costs a worker), and a sink's send has a cost per call
too (a Postgres transaction). Under load jobs wait in the queues: the acceptor writes one per
flush, as many deliveries as arrived together (64 with 64 senders), faster than the workers
take them. So when the job a worker pops may grow, the worker also takes the jobs waiting
behind it and runs them as one:

- ``process_batch`` jobs, up to ``MAX_BATCH_SIZE`` deliveries (:func:`workers.jobs.process_group`):
  each event is claimed under the id of the job it came in, so a job retried alone after a
  crash recognises its own claims; the group writes one deliver job per sink for all of them;
- ``deliver`` jobs of a sink that sets ``batch_events`` (the Postgres sink: 256), up to that
  many events, in one ``send`` (:func:`workers.jobs.deliver_group`).

At most ``MAX_GROUP_JOBS`` jobs go together. Only jobs already waiting join: nobody waits for
a group to fill, so a quiet queue runs each job alone, as before; and a worker asks for more
only when the last job's success pipeline found jobs waiting (workers.worker).

Each job keeps its own life in RQ (workers.worker.IngestWorker): all are started (status,
started registry, heartbeats) in one transaction before the run and finished in one pipeline
after it, so a worker that dies mid-run leaves every one of them to the watchdog, which
retries each alone. If the run raises (a delivery that must be set aside, a sink's error),
each job runs again on its own, as if there had been no group: a delivery is set aside, a
transient error retries each job with its own backoff, a permanent one splits its events.
Either way some events may reach a sink twice (a group's deliver job, then the retried job's
own), which sinks absorb: they are idempotent on the event id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rq.job import Job

from ingest import constants
from workers.jobs import deliver_group, process_group
from workers.outcomes import attempts_of
from workers.runtime import Runtime

__all__ = ["Groups"]


class Groups:
    """The rules of :class:`workers.worker.JobGroups` for our two job functions."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._set_aside = rt.names.job_id("alone", "")  # a delivery set aside stays alone

    def _limit(self, job: Job) -> int:
        """How large (deliveries or events) a group with ``job`` may grow; 0: not at all."""
        if job.kwargs or job.repeats_left or job.has_rate_limit:
            return 0
        if job.func_name == constants.PROCESS_BATCH and len(job.args) == 1:
            return 0 if job.id.startswith(self._set_aside) else constants.MAX_BATCH_SIZE
        if job.func_name == constants.DELIVER and len(job.args) in (2, 3):
            enabled = self.rt.sinks.get(job.args[0])
            return enabled.batch_events if enabled is not None else 0
        return 0

    @staticmethod
    def _size(job: Job) -> int:
        return len(job.args[0] if job.func_name == constants.PROCESS_BATCH else job.args[1])

    @staticmethod
    def _kind(job: Job) -> tuple[str | None, Any]:
        return job.func_name, job.args[0] if job.func_name == constants.DELIVER else None

    def room(self, job: Job) -> int:
        limit = self._limit(job)
        size = self._size(job) if limit else 0
        if not limit or size >= limit:
            return 0
        return min(constants.MAX_GROUP_JOBS - 1, limit // max(size, 1) - 1)

    def select(self, first: Job, others: Sequence[Job]) -> int:
        limit, total, kind = self._limit(first), self._size(first), self._kind(first)
        joining = 0
        for job in others:
            try:
                size = self._size(job)
                fits = (self._limit(job) == limit and self._kind(job) == kind
                        and total + size <= limit)
            except Exception:  # data that cannot be read: RQ's own run reports it
                fits = False
            if not fits:
                break
            total += size
            joining += 1
        return joining

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        if jobs[0].func_name == constants.PROCESS_BATCH:
            return list(process_group([(j.id, j.args[0]) for j in jobs]))
        return list(deliver_group([tuple(j.args) for j in jobs], [j.id for j in jobs],
                                  [attempts_of(j) for j in jobs]))
