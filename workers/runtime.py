"""What job functions need, built once per worker process.

A worker installs its runtime at start-up (so a bad setting stops it before it takes a job);
a job that runs without one (tests, `rq` used directly) builds it from the environment.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from redis import Redis
from rq import Queue

from ingest.config import Settings
from ingest.constants import Names
from ingest.rq_jobs import FastJSONSerializer, compress_fast
from ingest.providers import Provider, load_providers
from ingest.redis_conn import worker_redis
from sinks.registry import EnabledSink, build_sinks
from workers.outcomes import OutcomeRecorder

__all__ = ["Runtime", "current_runtime", "install_runtime"]


class Runtime:
    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        compress_fast()  # the jobs this process writes or saves again: RQ at level 1
        self.settings = settings
        self.names: Names = settings.names
        self.redis = redis if redis is not None else worker_redis(settings.require_redis())
        self.providers: dict[str, Provider] = load_providers()
        self.sinks: dict[str, EnabledSink] = build_sinks(settings)

    @functools.cached_property
    def outcomes(self) -> OutcomeRecorder:
        """This process's writer of sink outcomes (workers.outcomes)."""
        return OutcomeRecorder(self.settings, self.redis, self.names)

    @functools.cached_property
    def ingest_queue(self) -> Queue:
        return self.queue(self.names.ingest_queue)

    def sink_queue(self, sink: str) -> Queue:
        return self.queue(self.names.sink_queue(sink))

    def queue(self, name: str) -> Queue:
        # Jobs enqueued here are written with orjson (deliver jobs carry whole batches); any
        # JSONSerializer reads them, and the workers read them with orjson too.
        return Queue(name, connection=self.redis, serializer=FastJSONSerializer)

    def queue_names(self) -> list[str]:
        """Every queue this configuration needs: ingest first, then one per sink."""
        return [self.names.ingest_queue] + [self.names.sink_queue(s) for s in self.sinks]

    def close(self) -> None:
        for enabled in self.sinks.values():
            enabled.close()
        if "outcomes" in self.__dict__:
            self.outcomes.close()
        self.redis.close()


_lock = threading.Lock()
_runtime: Runtime | None = None


def install_runtime(runtime: Runtime | None) -> Runtime | None:
    """Make ``runtime`` the one job functions use; returns the previous one."""
    global _runtime
    with _lock:
        previous, _runtime = _runtime, runtime
    return previous


def current_runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(Settings.from_env())
        return _runtime


def _reset_for_tests(*_: Any) -> None:
    install_runtime(None)
