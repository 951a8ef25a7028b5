"""The RQ worker class every ``ingest worker`` process runs: :class:`IngestWorker`.

It is a ``SimpleWorker`` (the job runs in the worker process) with a watchdog thread
(workers.watchdog: renewals of the running job, the sweep of dead workers' jobs), trimmed
bookkeeping, group execution and a prompt stop.

RQ's own bookkeeping is most of a job's cost that is not the job, and :class:`IngestWorker`
trims what it does not need. RQ writes the worker's heartbeat (three commands, three round
trips) before and after each dequeue and after each job: here those three go in one round trip,
at most once per ``_BEAT_EVERY`` seconds unless a longer expiry is asked for (the worker's key
lives ``worker_ttl`` + 60 s, so it never lapses while the worker lives). The worker's state is
written only when it changes. The job-hash heartbeat RQ writes between a job's end and its
bookkeeping serves job callbacks, which our jobs do not have. At a job's success RQ watches and
reads its dependents (ours have none) and saves the whole job hash again, its arguments (a whole
batch) compressed anew, sent and appended to the AOF a second time; here one pipeline writes
what changed (status and times), the result, the finished registry and the execution cleanup,
as RQ does. What recovery and monitoring read stays: the started registry and its renewals, the
job's status, result and registries. A job's start is one pipeline, not RQ's two (the
execution record, then the job's status: nothing happens between them in a ``SimpleWorker``),
the worker's "idle" state goes out with the job's success, and whether ``rq suspend`` asked
workers to pause is read at most once per ``_SUSPENSION_EVERY`` seconds, not before every job.
Per job that is 4 round trips of RQ's instead of 20.

Given :class:`JobGroups` (workers.grouping), a worker that pops a job also takes the jobs
waiting behind it that may join it, starts them all in one transaction, runs them as one and
finishes them all in one pipeline: each keeps its own execution, started-registry entry,
status and result, so everything above (renewals, the sweep of a dead worker's jobs) holds for
each job of a group as for a job alone. If the group's run raises, each job then runs on its
own, as RQ runs it.

With ``INGEST_REDIS_MIN_REPLICAS`` set, a job that wrote follow-up jobs (deliver jobs, a set
aside delivery) finishes only once that many replicas acknowledged them (``WAIT``, in
:meth:`IngestWorker.handle_job_success` and for a group before its success pipeline): on a
shortfall the job fails with :class:`ingest.redis_conn.ReplicaShortfall` and is retried with its
own backoff, writing the same follow-up job ids again. A failover then loses no follow-up job.

A worker told to stop (SIGTERM) stops within a second when idle, and that long after the job
in hand when busy: a platform gives it ten seconds before SIGKILL (docker), and a killed worker
leaves its job to the watchdog. Two things in RQ would make that up to a minute. Its thread
listening for ``rq`` commands (shutdown, stop-job) waits 60 s at a time for one, and RQ's
teardown sends UNSUBSCRIBE, then stops that thread and waits for it: from redis-py 8.2 on,
``PubSubWorkerThread.stop()`` waits without a bound, and when the UNSUBSCRIBE reply wakes the
thread before the stop reaches it (several processes stopping at once on a busy machine),
the thread, subscribed to nothing now, waits out its 60 s before it looks again.
:class:`IngestWorker` tells the thread to stop before it sends UNSUBSCRIBE, waits for it a
bounded time whatever redis-py does, and runs it with a ``_COMMAND_WAIT`` of half a second
(the longest it can take to notice a stop by itself).
"""


from __future__ import annotations

import contextlib
import inspect
import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, Protocol

from redis.client import PubSubWorkerThread
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result
from rq.timeouts import JobTimeoutException
from rq.utils import as_text, now, utcformat
from rq.worker import WorkerStatus

from ingest import constants
from ingest.redis_conn import ReplicaShortfall, replicated
from ingest.rq_jobs import jobs_written
from workers.watchdog import Watchdog

__all__ = ["IngestWorker", "JobGroups", "StopsPromptly"]

log = logging.getLogger("workers.worker")

# The worker's own heartbeat, sent outside a pipeline, at most once per this many seconds.
_BEAT_EVERY = 5.0
# How often an idle or busy worker asks whether ``rq suspend`` paused the workers.
_SUSPENSION_EVERY = 1.0
# How long the thread listening for `rq` commands waits for one before it looks whether it
# should stop (RQ: 60 s). A wait is a poll() on its socket: nothing is sent to Redis.
_COMMAND_WAIT = 0.5
# From redis-py 8.2 on, PubSubWorkerThread.stop() waits for the thread, by default without end.
_STOP_TAKES_TIMEOUT = "timeout" in inspect.signature(PubSubWorkerThread.stop).parameters


def tell_listener_to_stop(thread: PubSubWorkerThread) -> None:
    """Ask a redis-py pub/sub thread to stop after its current wait, without waiting for it,
    whatever the redis-py version."""
    if _STOP_TAKES_TIMEOUT:
        thread.stop(timeout=0)  # type: ignore[call-arg, unused-ignore]
    else:
        thread.stop()  # redis-py < 8.2: only tells the thread to stop


class JobGroups(Protocol):
    """Which waiting jobs a worker may run together with the one it popped, and how
    (workers.grouping has the rules for our jobs)."""

    def room(self, job: Job) -> int:
        """How many more jobs may join ``job`` (0: it runs alone, as RQ runs it)."""

    def select(self, first: Job, others: Sequence[Job]) -> int:
        """How many of ``others`` (a prefix, in queue order) join ``first``."""

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """Run ``jobs`` as one; each job's result, in order. Raising makes each run alone."""


class StopsPromptly:
    """For an RQ worker class (before it among the bases): RQ's listener for ``rq`` commands
    (shutdown, stop-job), stopped within ``_COMMAND_WAIT`` seconds whatever redis-py does (see
    the module docstring's end). The tests' burst workers use it too."""

    pubsub: Any
    pubsub_thread: Any
    connection: Any
    name: str
    log: Any
    pubsub_channel_name: str
    handle_payload: Any
    _pubsub_exception_handler: Any

    def subscribe(self) -> None:
        """RQ's listener for commands, waiting ``_COMMAND_WAIT`` seconds at a time (RQ: 60)."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=_COMMAND_WAIT, daemon=True,
            exception_handler=self._pubsub_exception_handler)

    def unsubscribe(self) -> None:
        """RQ's, in another order: tell the thread to stop, then UNSUBSCRIBE, whose reply
        wakes it at once, then wait for it (a bounded time), then close the connection. RQ
        sends UNSUBSCRIBE first: its reply may wake the thread before the stop reaches it,
        which then waits for its next wake (see the module docstring)."""
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        self.pubsub_thread = None
        self.log.info("Worker %s: unsubscribing from channel %s", self.name,
                      self.pubsub_channel_name)
        tell_listener_to_stop(thread)
        # If the thread woke by itself meanwhile, it closes the connection as it leaves, and
        # this goes on a connection of its own, closed below: harmless either way.
        with contextlib.suppress(RedisError, OSError):
            pubsub.unsubscribe()
        thread.join(_COMMAND_WAIT + 1.0)
        if thread.is_alive():
            log.warning("the thread listening for rq commands did not stop within %.1f s",
                        _COMMAND_WAIT + 1.0)
        with contextlib.suppress(RedisError, OSError):
            pubsub.close()


class IngestWorker(StopsPromptly, Watchdog, SimpleWorker):
    """A ``SimpleWorker`` whose running job is renewed while alive and swept when abandoned,
    and that stops promptly."""

    # RQ's line per job saying how long its result is kept: always RESULT_TTL here.
    log_result_lifespan = False

    def __init__(self, *args: Any, names: constants.Names,
                 abandoned_after: int = constants.DEFAULT_ABANDONED_AFTER,
                 groups: JobGroups | None = None, min_replicas: int = 0,
                 wait_ms: int = constants.DEFAULT_REDIS_WAIT_MS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = names
        self.min_replicas = min_replicas  # INGEST_REDIS_MIN_REPLICAS
        self.wait_ms = wait_ms
        self._written_at_start = jobs_written()  # jobs_written() when the running job started
        self.groups = groups
        # Jobs waiting in the queue when the last success was written (None: not known).
        self._waiting: int | None = None
        self.abandoned_after = abandoned_after
        self.beat_interval = max(1.0, abandoned_after / 3)
        # True once SIGTERM/SIGINT asked this worker to stop (as opposed to RQ quitting its loop
        # on a Redis error, after which the worker process starts a new worker).
        self.stop_requested_by_signal = False
        self._running: list[tuple[Job, Execution]] = []  # the job, or the group, running now
        self._running_lock = threading.Lock()
        self._stop_beating = threading.Event()
        self._beater = None
        self._beat_sent = (-_BEAT_EVERY, 0)  # (monotonic time, expiry) of the last own beat
        self._suspension_checked = -_SUSPENSION_EVERY  # monotonic time of the last check
        # The job start prepare_execution wrote and prepare_job_execution sends with its own.
        self._starting: Any = None

    # -- RQ hooks ------------------------------------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's worker heartbeat; on its own (no pipeline given), one round trip, and none
        when one with at least this expiry went out within ``_BEAT_EVERY`` seconds."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        expiry = timeout or self.worker_ttl + 60
        sent_at, sent_expiry = self._beat_sent
        if time.monotonic() - sent_at < _BEAT_EVERY and expiry <= sent_expiry:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(expiry, pipeline=pipe)
            pipe.execute()
        self._beat_sent = (time.monotonic(), expiry)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's worker state, written only when it changes (RQ sets "idle" twice per job)."""
        if pipeline is None and state == self.get_state():
            return
        super().set_state(state, pipeline=pipeline)

    def handle_job_success(self, job: Job, queue: Any, started_job_registry: StartedJobRegistry,
                           execution: Execution) -> None:
        """RQ's bookkeeping of a finished job (counters, result, finished registry, execution
        cleanup) in its one pipeline, without the WATCH and read of the job's dependents that
        RQ does first: no job of ours has dependents or repeats (those still go RQ's way).
        Raises :class:`ReplicaShortfall` (RQ then fails the job, which is retried) when the job
        wrote follow-up jobs that too few replicas acknowledged."""
        self._confirm_replicated()
        if job.repeats_left or job.has_rate_limit:
            self._waiting = None
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        with self.connection.pipeline() as pipeline:
            self._write_success(job, execution, pipeline)
            # SimpleWorker sets it right after this, in a round trip of its own; it is then
            # already written, and set_state skips it.
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            self._finish(pipeline, queue)

    def _confirm_replicated(self) -> None:
        """``WAIT`` for ``min_replicas`` when the running job (or group) wrote jobs."""
        if self.min_replicas and jobs_written() != self._written_at_start:
            replicated(self.connection, self.names, self.min_replicas, self.wait_ms)

    def _finish(self, pipeline: Any, queue: Any) -> None:
        """Send a job's (or a group's) success pipeline, reading on the way how many jobs wait
        in the queue: a group is gathered next only if some did."""
        if self.groups is None:
            pipeline.execute()
            return
        pipeline.llen(queue.key)
        self._waiting = int(pipeline.execute()[-1])

    def _write_success(self, job: Job, execution: Execution, pipeline: Any) -> None:
        assert job.started_at is not None and job.ended_at is not None
        self.increment_successful_job_count(pipeline=pipeline)
        self.increment_total_working_time(job.ended_at - job.started_at, pipeline)
        result_ttl = job.get_result_ttl(self.default_result_ttl)
        job._status = JobStatus.FINISHED
        if result_ttl != 0:
            # What RQ's Job._handle_success writes, but of the job hash only the fields that
            # changed: RQ saves the whole hash again, the arguments (a whole batch) compressed
            # anew, sent and appended to the AOF once more.
            pipeline.hset(job.key, mapping={
                "status": JobStatus.FINISHED, "ended_at": utcformat(job.ended_at),
                "started_at": utcformat(job.started_at), "worker_name": self.name,
                "last_heartbeat": utcformat(job.last_heartbeat or job.ended_at)})
            Result.create(job, Result.Type.SUCCESSFUL, return_value=job._result,
                          ttl=result_ttl, worker_name=self.name, pipeline=pipeline,
                          execution_id=execution.id, execution_started_at=execution.created_at,
                          execution_ended_at=job.ended_at)
            job.finished_job_registry.add(job, result_ttl, pipeline)
        job.cleanup(result_ttl, pipeline=pipeline, remove_from_queue=False)
        self.cleanup_execution(job, pipeline=pipeline, execution=execution)

    def handle_execution_ended(self, job: Job, queue: Any, heartbeat_ttl: int) -> None:
        """RQ writes one more job heartbeat here, for the job's callbacks; ours have none."""
        job.ended_at = now()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.abandoned_after

    def check_for_suspension(self, burst: bool) -> None:
        """RQ asks Redis before every job; once per ``_SUSPENSION_EVERY`` seconds is enough for
        ``rq suspend`` to take effect (the worker's heartbeat that RQ sends along is kept
        fresh by :meth:`heartbeat` anyway)."""
        if time.monotonic() - self._suspension_checked < _SUSPENSION_EVERY:
            return
        super().check_for_suspension(burst)
        self._suspension_checked = time.monotonic()

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's execution record and "busy" state, written by :meth:`prepare_job_execution`
        in its pipeline (RQ sends each in a pipeline of its own)."""
        pipeline = self.connection.pipeline()
        execution = self._new_execution(job, pipeline)
        self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        self._starting = pipeline
        with self._running_lock:
            self._running = [(job, execution)]
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """What RQ writes when a job starts (heartbeats, the job's status, off the intermediate
        queue), sent in one pipeline with :meth:`prepare_execution`'s record: the job moves
        from popped to started in one transaction."""
        pipeline, self._starting = self._starting, None
        self._written_at_start = jobs_written()
        if pipeline is None:
            pipeline = self.connection.pipeline()
        with pipeline:
            self.heartbeat(self.get_heartbeat_ttl(job), pipeline=pipeline)
            intermediate = self.queue_class(job.origin, connection=self.connection) \
                .intermediate_queue_key if remove_from_intermediate_queue else None
            self._write_job_start(job, pipeline, intermediate)
            pipeline.execute()

    def _new_execution(self, job: Job, pipeline: Any) -> Execution:
        """RQ's execution record of ``job`` (and its started-registry entry), on ``pipeline``."""
        execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipeline,
                                     worker_name=self.name)
        self.executions[execution.id] = execution
        return execution

    def _write_job_start(self, job: Job, pipeline: Any, intermediate: str | None) -> None:
        """What RQ writes on the job when it starts: its heartbeat, its status, no expiry, and
        off the intermediate queue (``intermediate``: that queue's key, None to leave it)."""
        job.heartbeat(now(), self.get_heartbeat_ttl(job), pipeline=pipeline)
        job.prepare_for_execution(self.name, pipeline=pipeline)
        pipeline.persist(job.key)
        if intermediate is not None:
            pipeline.lrem(intermediate, 1, job.id)

    def execute_job(self, job: Job, queue: Any) -> None:
        try:
            jobs = self._gather(job, queue) if self.groups is not None else [job]
            if len(jobs) == 1:
                super().execute_job(job, queue)
            else:
                self._execute_group(jobs, queue)
        finally:
            with self._running_lock:
                self._running = []

    # -- groups: waiting jobs run together with the one popped (see workers.grouping) ---------

    def _gather(self, job: Job, queue: Any) -> list[Job]:
        """``job`` and the waiting jobs that join it, taken off the queue as RQ takes one
        (onto its intermediate queue, so a worker dying now leaves them to :meth:`sweep`)."""
        assert self.groups is not None
        try:
            room = self.groups.room(job)
        except Exception:  # its data cannot be read: RQ's own run reports that
            room = 0
        if self._waiting is not None:  # as the last success found the queue, minus this job
            room = min(room, self._waiting - 1)
        self._waiting = None
        if room <= 0:
            return [job]
        intermediate = queue.intermediate_queue_key
        with self.connection.pipeline(transaction=False) as pipe:
            for _ in range(room):
                pipe.lmove(queue.key, intermediate)
            ids = [as_text(i) for i in pipe.execute() if i is not None]
        if not ids:
            return [job]
        fetched = self.job_class.fetch_many(ids, connection=self.connection,
                                            serializer=self.serializer)
        others = [j for j in fetched if j is not None]
        try:
            joining = self.groups.select(job, others)
        except Exception:
            joining = 0
        rest = others[joining:]
        with self.connection.pipeline() as pipe:
            for job_id, found in zip(ids, fetched):
                if found is None:  # gone since it was queued: RQ skips such ids too
                    pipe.lrem(intermediate, 1, job_id)
            for other in reversed(rest):  # back to the head of the queue, in their order
                pipe.lrem(intermediate, 1, other.id)
                pipe.lpush(queue.key, other.id)
            if len(pipe):
                pipe.execute()
        return [job, *others[:joining]]

    def _execute_group(self, jobs: list[Job], queue: Any) -> None:
        """Start every job of the group (one pipeline), run them as one, and finish each (one
        pipeline). If the group run raises, each job runs on its own, as RQ would run it."""
        assert self.groups is not None
        started = self._start_group(jobs, queue)
        try:
            timeout = max(j.timeout or self.queue_class.DEFAULT_TIMEOUT for j in jobs)
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                results = self.groups.run(jobs)
            if len(results) != len(jobs):
                raise RuntimeError(f"{len(results)} results for {len(jobs)} jobs")
        except Exception as exc:
            log.warning("%d jobs run together failed (%s); running each on its own",
                        len(jobs), type(exc).__name__, extra={"job_id": jobs[0].id,
                                                               "count": len(jobs)})
            for job, execution in started:
                self.perform_job(job, queue, execution)
            self.set_state(WorkerStatus.IDLE)
            return
        ended = now()
        try:
            self._confirm_replicated()
        except ReplicaShortfall as exc:
            log.warning("%d jobs run together are retried: %s", len(jobs), exc,
                        extra={"job_id": jobs[0].id, "count": len(jobs)})
            for job, execution in started:
                job.ended_at = ended
                self.handle_job_failure(job, queue, queue.started_job_registry,
                                        exc_string=f"ReplicaShortfall: {exc}", execution=execution)
            self.set_state(WorkerStatus.IDLE)
            return
        with self.connection.pipeline() as pipeline:
            for (job, execution), result in zip(started, results):
                job.ended_at = ended
                job._result = result
                self._write_success(job, execution, pipeline)
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            self._finish(pipeline, queue)

    def _start_group(self, jobs: list[Job], queue: Any) -> list[tuple[Job, Execution]]:
        """What :meth:`prepare_execution` and :meth:`prepare_job_execution` write for one
        job, for each job of the group, in one transaction."""
        started: list[tuple[Job, Execution]] = []
        with self.connection.pipeline() as pipeline:
            for job in jobs:
                started.append((job, self._new_execution(job, pipeline)))
                self._write_job_start(job, pipeline, queue.intermediate_queue_key)
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            self.heartbeat(self.abandoned_after, pipeline=pipeline)
            with self._running_lock:
                self._running = list(started)
            pipeline.execute()
        self._written_at_start = jobs_written()
        return started

    def _stop_before_first_job(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested_by_signal = True
        self._stop_requested = True
        self.log.info("Worker %s: warm shut down requested while starting", self.name)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested_by_signal = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        # RQ registers the worker (so `rq info`, and whoever waits for it, sees it listening)
        # a few calls before work() installs its SIGTERM handler. A signal in between would end
        # the process at once, by the default action, leaving its registration behind. Until
        # RQ's handlers take over, a signal asks for a stop, which the loop honours before it
        # pops a job.
        signal.signal(signal.SIGTERM, self._stop_before_first_job)
        signal.signal(signal.SIGINT, self._stop_before_first_job)
        super().bootstrap(*args, **kwargs)
        self.start_watchdog()

    def teardown(self) -> None:
        self.stop_watchdog()
        super().teardown()  # type: ignore[no-untyped-call]
