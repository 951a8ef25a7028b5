"""The worker processes ``ingest worker`` starts: one per queue, supervised.

RQ pops a job atomically into its in-progress list only when a worker listens on a single
queue (BLMOVE); listening on several falls back to BLPOP, where a worker killed between the pop
and the registry write loses the job. So each worker process serves exactly one queue, and
``ingest worker`` without ``--queue`` supervises one child process per queue the configuration
needs (ingest, then one per enabled sink), restarting any that dies.

Workers are RQ ``SimpleWorker``s (the job runs in the worker process: no fork per job, which
matters when a job is a whole batch) with the scheduler on (retries with backoff need it).
SIGTERM lets the job in hand finish; a second SIGTERM or SIGKILL does not, and then the
watchdog (workers.watchdog) retries the job within about a minute.

At start, a worker waits up to INGEST_STARTUP_WAIT seconds for Redis to answer, then gives up
with a message saying what to check (ingest.startup). Once running, a worker waits out a Redis
outage: RQ itself quits its loop on some Redis errors (a timeout,
or an error outside the blocking dequeue), so :func:`_single` then waits until Redis answers
and starts a fresh worker on the same queue. Only a signal (or ``--burst``) ends it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from types import FrameType

from redis import Redis
from redis.exceptions import RedisError

from ingest import constants
from ingest.config import Settings
from ingest.rq_jobs import FastJSONSerializer
from ingest.startup import wait_for_redis
from workers.runtime import Runtime, install_runtime
from workers.grouping import Groups
from workers.scheduler import ResilientScheduler, die_with_parent
from workers.worker import IngestWorker

__all__ = ["run_worker"]

log = logging.getLogger("workers.processes")

# A child that dies sooner than this after its start counts as crashing; back off.
_MIN_HEALTHY_SECONDS = 10.0


def _wait_for_redis(redis: Redis, stopping: list[bool]) -> None:
    """Return once Redis answers a PING (or a signal asked us to stop)."""
    delay = 0.25
    while not stopping:
        try:
            if redis.ping():
                return
        except (RedisError, OSError):
            pass
        time.sleep(delay)
        delay = min(delay * 2, constants.WORKER_RECONNECT_MAX)


def _single(rt: Runtime, queue: str, burst: bool) -> int:
    scheduler: ResilientScheduler | None = None
    if not burst:  # (in burst mode RQ's worker promotes due retries itself, once)
        die_with_parent()  # the forked scheduler must not outlive a worker killed with SIGKILL
        scheduler = ResilientScheduler([queue], connection=rt.redis,
                                       redis_url=rt.settings.require_redis(),
                                       serializer=FastJSONSerializer,
                                       logging_level=_rq_level(rt))
        scheduler.start()  # type: ignore[no-untyped-call]
    try:
        return _work(rt, queue, burst)
    finally:
        if scheduler is not None:
            scheduler.shutdown()


def _rq_level(rt: Runtime) -> str:
    """RQ's own logger level: info, or quieter when INGEST_LOG_LEVEL asks (RQ sets it itself
    at every work loop, so setup_logging cannot)."""
    from ingest.logs import log_level

    return logging.getLevelName(max(logging.INFO, log_level(rt.settings)))


def _work(rt: Runtime, queue: str, burst: bool) -> int:
    while True:
        worker = IngestWorker(
            [rt.queue(queue)],
            connection=rt.redis,
            serializer=FastJSONSerializer,
            name=f"{queue}-{uuid.uuid4().hex[:12]}",
            maintenance_interval=constants.WATCHDOG_INTERVAL,
            worker_ttl=constants.WORKER_TTL,
            log_job_description=False,
            names=rt.names,
            abandoned_after=rt.settings.abandoned_after,
            groups=Groups(rt),
            min_replicas=rt.settings.redis_min_replicas,
            wait_ms=rt.settings.redis_wait_ms,
        )
        worker.max_connection_wait_time = constants.WORKER_RECONNECT_MAX
        log.info("worker listening", extra={"queue": queue})
        started = time.monotonic()
        try:
            # The scheduler of a long-running worker is the process-wide one above: it outlives
            # the worker objects this loop replaces after a Redis outage.
            worker.work(burst=burst, with_scheduler=burst, logging_level=_rq_level(rt))
            reason = "RQ ended its work loop"
        except (RedisError, OSError) as exc:
            reason = f"Redis error: {exc!r}"
        if burst or worker.stop_requested_by_signal:
            return 0
        # RQ's signal handlers belong to the worker that just ended: take signals ourselves
        # while waiting, so SIGTERM during an outage stops us cleanly.
        stopping: list[bool] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            stopping.append(True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.error("worker for %s stopped (%s); starting a new one once Redis answers",
                  queue, reason, extra={"queue": queue})
        if time.monotonic() - started < _MIN_HEALTHY_SECONDS:
            time.sleep(1.0)  # a worker that keeps failing at once must not spin
        _wait_for_redis(rt.redis, stopping)
        if stopping:
            return 0


def _supervise(queues: list[str], burst: bool, command: Sequence[str]) -> int:
    children: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False
    failures: dict[str, int] = {}

    def spawn(queue: str) -> None:
        cmd = [*command, "--queue", queue]
        if burst:
            cmd.append("--burst")
        children[queue] = (subprocess.Popen(cmd), time.monotonic())

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for queue in queues:
        spawn(queue)
    log.info("supervising %d workers: %s", len(queues), ", ".join(queues))
    exit_code = 0
    while children:
        time.sleep(0.2)
        for queue, (proc, started) in list(children.items()):
            code = proc.poll()
            if code is None:
                continue
            del children[queue]
            if stopping or (burst and code == 0):
                exit_code = exit_code or code
                continue
            crashed = time.monotonic() - started < _MIN_HEALTHY_SECONDS
            failures[queue] = failures.get(queue, 0) + 1 if crashed else 0
            delay = min(30.0, 0.5 * 2 ** failures[queue]) if crashed else 0.0
            log.error("worker for %s exited with %s; restarting in %.1f s", queue, code, delay)
            time.sleep(delay)
            if not stopping:
                spawn(queue)
    return exit_code


def _schedule_retention(rt: Runtime) -> None:
    """The daily retention run (workers.retention), once per deployment: any worker may ask."""
    from workers.retention import schedule

    try:
        schedule(rt)
    except RedisError as exc:  # the next worker start, or the next run, schedules it
        log.warning("could not schedule the daily retention run: %s", exc)


def run_worker(settings: Settings, queues: list[str] | None = None, burst: bool = False,
               command: Sequence[str] | None = None) -> int:
    """Serve ``queues`` (default: every queue the configuration needs): one in this process,
    or one child process per queue, supervised, each started as ``command`` (the ``ingest
    worker`` command line, given by the CLI) with ``--queue NAME``."""
    rt = Runtime(settings)  # validates sinks and connects before taking any job
    # Redis may still be starting (a host's boot, `docker compose up`): wait for it, bounded
    # and logged, rather than die with a traceback. Once running, a worker waits out any
    # outage without a bound (_work below).
    wait_for_redis(settings.require_redis(), settings.startup_wait)
    install_runtime(rt)
    names = queues or rt.queue_names()
    if rt.names.ingest_queue in names:
        _schedule_retention(rt)
        from workers.subscriptions import schedule_at_start

        schedule_at_start(rt)  # the periodic webhook subscription check (issue 36)
    if len(names) == 1:
        return _single(rt, names[0], burst)
    if burst:
        # Drain in pipeline order: ingest jobs create the sink jobs the next queues serve.
        return max(_single(rt, name, burst=True) for name in names)
    if command is None:
        raise ValueError("several queues need the command line that starts one worker")
    return _supervise(names, burst, command)
