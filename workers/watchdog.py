"""Heartbeats for running jobs, and a watchdog that retries the jobs of workers that died.

What RQ 3 does on its own is too slow for a worker killed mid-batch: a ``SimpleWorker``
registers the running job in the queue's ``StartedJobRegistry`` with an expiry of the job
timeout + 60 s (six minutes here) and renews nothing while the job runs; an expired entry is
noticed only by the maintenance of a live worker on the same queue, which an idle worker runs
between blocking dequeues, under a lock that a worker dying mid-maintenance (or hitting a Redis
error in it: there is no ``finally``) holds for 15 minutes. So a job could sit abandoned for
anywhere from six to twenty minutes.

:class:`Watchdog`, a thread in every :class:`workers.worker.IngestWorker`, makes that about a minute:

- the running job's entry expires ``INGEST_ABANDONED_AFTER`` seconds (45 by default) after its
  last renewal, and a background thread renews it every third of that while the job runs;
- the same thread sweeps each of its queues every third of that period: RQ's own
  ``StartedJobRegistry.cleanup()`` (a job whose entry expired is retried with its ``Retry``
  schedule while it has retries left, else moved to the failed registry) and the intermediate
  queue (a job popped by a worker that died, or lost Redis, before registering it as started;
  RQ waits a full minute before it re-queues one, we wait one sweep period: popping and
  registering are microseconds apart). A short lock of our own per queue means one worker
  sweeps per period, and it expires by itself, whatever happens to the worker holding it.

So a job whose worker died is retried within ``abandoned_after`` plus one sweep period. A job
retried while its first run was in fact still going (a worker frozen longer than
``abandoned_after``) is harmless: both runs carry the same job id, so the second recognises the
dedup claims as its own and writes the same deliver job ids (or, for a job that first ran in a
group, deliver jobs of its own besides the group's), and sinks are idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry

from ingest import constants

__all__ = ["Watchdog"]

log = logging.getLogger("workers.watchdog")


class Watchdog:
    """For an RQ worker class (before it among the bases): a background thread that renews the
    running job's entry in the started registry every ``beat_interval`` seconds and sweeps the
    worker's queues for jobs that dead workers left (see the module docstring)."""

    # Provided by the worker (workers.worker.IngestWorker).
    connection: Any
    queues: Any
    name: str
    job_class: Any
    serializer: Any
    names: constants.Names
    abandoned_after: int
    beat_interval: float
    heartbeat: Any
    handle_job_failure: Any
    _running: list[tuple[Job, Execution]]
    _running_lock: threading.Lock
    _beater: threading.Thread | None = None
    _stop_beating: threading.Event

    def start_watchdog(self) -> None:
        """Start the thread (the worker's bootstrap)."""
        self._stop_beating = threading.Event()
        self._beater = threading.Thread(target=self._beat_loop, name="rq-heartbeat", daemon=True)
        self._beater.start()

    def stop_watchdog(self) -> None:
        """Stop the thread and wait for it (the worker's teardown)."""
        self._stop_beating.set()
        if self._beater is not None:
            self._beater.join(timeout=self.beat_interval + 5)

    def _beat_loop(self) -> None:
        while True:
            try:
                self.renew()
                self.sweep()
            except (RedisError, OSError) as exc:
                log.warning("heartbeat/watchdog could not reach Redis: %r", exc)
            except Exception:
                log.exception("heartbeat/watchdog failed; trying again next period")
            if self._stop_beating.wait(self.beat_interval):
                return

    def renew(self) -> None:
        """Push back the expiry of the running job's entry in the started registry."""
        with self._running_lock:
            running = list(self._running)
        if not running:
            return
        # Renewing just after the job ended is harmless: the registry update only touches
        # entries that still exist (XX), and the execution hash it touches expires by itself.
        with self.connection.pipeline() as pipe:
            for job, execution in running:
                execution.heartbeat(job.started_job_registry, self.abandoned_after, pipe)
            self.heartbeat(self.abandoned_after + 60, pipeline=pipe)
            pipe.execute()

    def sweep(self) -> int:
        """Retry what dead workers left on our queues. Returns how many queues were swept."""
        swept = 0
        for queue in self.queues:
            lock = self.names.key(f"watchdog:{queue.name}")
            period = max(1, int(self.beat_interval))
            if not self.connection.set(lock, self.name, nx=True, ex=period):
                continue  # another worker swept this queue within the period
            registry = StartedJobRegistry(queue.name, connection=self.connection,
                                          job_class=self.job_class, serializer=self.serializer)
            registry.cleanup()
            self._rescue_stuck(queue, registry)
            swept += 1
        return swept

    def _rescue_stuck(self, queue: Any, started: StartedJobRegistry) -> None:
        """Retry jobs that sat in the intermediate queue, never started, for a whole period."""
        intermediate = queue.intermediate_queue
        job_ids = intermediate.get_job_ids()
        if not job_ids:
            return
        running = set(started.get_job_ids(cleanup=False))
        for job_id in job_ids:
            if job_id in running:
                continue
            job = queue.fetch_job(job_id)
            if job is None:
                intermediate.remove(job_id)
                continue
            if intermediate.set_first_seen(job_id):
                continue  # first sighting: give its worker one period to register it
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or time.time() - first_seen.timestamp() < self.beat_interval:
                continue
            log.warning("job %s was popped but never started (its worker died or lost Redis); "
                        "retrying it", job_id, extra={"job_id": job_id})
            self.handle_job_failure(job, queue, exc_string="popped but never started: "
                                    "its worker died or lost Redis")
            intermediate.remove(job_id)
