"""The RQ scheduler every worker process runs, and what ties it to its worker.

RQ's scheduler re-enqueues retries whose backoff has passed; without it a retried job waits
forever. RQ runs it in a forked child that dies on the first Redis error (leaving its lock to
block every other scheduler for 61 s), that a worker only replaces every few maintenance
periods, and that outlives a worker killed with SIGKILL. :class:`ResilientScheduler` rides out
Redis outages and takes a queue over within a second of its holder letting go; the worker
process starts one per worker process, and :func:`die_with_parent` makes it get SIGTERM when that
process dies (Linux), so it releases its lock and exits instead of lingering.

RQ's scheduler also sleeps through a SIGTERM until its next round; :class:`ResilientScheduler`
wakes at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
from typing import Any

from redis.exceptions import RedisError
from rq.scheduler import RQScheduler

from ingest.redis_conn import worker_redis

__all__ = ["ResilientScheduler", "die_with_parent"]

log = logging.getLogger("workers.scheduler")

_PR_SET_PDEATHSIG = 1
_forking_parent = 0


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _ask_for_sigterm_when_parent_dies() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _forking_parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


_installed = False


def die_with_parent() -> None:
    """Make every child this process forks from now on get SIGTERM when it dies (Linux only)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_ask_for_sigterm_when_parent_dies)
    _installed = True


class ResilientScheduler(RQScheduler):
    """RQ's scheduler loop, minus its habit of dying on a Redis error. See the module docstring.

    RQ's scheduler rebuilds its client in the forked child from the parent's connection pool
    settings, as a plain pool: that would lose a ``redis+sentinel://`` primary (and its
    failovers). Given ``redis_url``, the child makes its own client from it, as every other
    process does (ingest.redis_conn)."""

    def __init__(self, *args: Any, redis_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis_url = redis_url

    @property
    def connection(self) -> Any:
        if self._connection is None and self._redis_url is not None:
            self._connection = worker_redis(self._redis_url)  # type: ignore[assignment]
        return super().connection

    def work(self) -> None:
        self._install_signal_handlers()  # type: ignore[no-untyped-call]
        # A signal writes a byte here (the C handler, before any Python code runs), so the wait
        # between two rounds ends the moment SIGTERM arrives, not an interval later.
        wake, wake_w = os.pipe()
        os.set_blocking(wake, False)
        os.set_blocking(wake_w, False)
        previous: int | None = None
        try:
            previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (never so in the process RQ forks): a plain wait
            pass
        try:
            self._rounds(wake)
        finally:
            if previous is not None:
                signal.set_wakeup_fd(previous)
            os.close(wake)
            os.close(wake_w)
        with contextlib.suppress(RedisError, OSError):
            self.stop()  # type: ignore[no-untyped-call]

    def _rounds(self, wake: int) -> None:
        """Schedule due jobs every ``interval`` until asked to stop."""
        failing = False
        born = False
        while not self._stop_requested:
            try:
                if not born:
                    self.register_birth()
                    born = True
                if failing or self.acquired_locks != self._queue_names:
                    # One SET NX per queue: cheap enough to try every second.
                    self.acquire_locks()  # type: ignore[no-untyped-call]
                self.heartbeat()  # type: ignore[no-untyped-call]
                self.enqueue_scheduled_jobs()  # type: ignore[no-untyped-call]
                if failing:
                    log.info("scheduler reaches Redis again")
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("scheduler cannot reach Redis, will keep trying: %r", exc)
                failing = True
            if not self._stop_requested:
                select.select([wake], [], [], self.interval)
                with contextlib.suppress(BlockingIOError):
                    os.read(wake, 512)

    def shutdown(self, timeout: float = 10.0) -> None:
        """From the parent: stop the scheduler process and wait for it."""
        process = self._process
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
