"""Making a delivery durable before the acceptor answers 200.

First choice is Redis, through the group-commit :class:`BatchEnqueuer`. When Redis cannot take
the delivery within its deadline, the local spool (``INGEST_SPOOL_DIR``,
:mod:`ingest.acceptor.spool`)
journals it with an fsync, and a drainer moves it into Redis once Redis is back. When neither
can take it, :class:`NotDurable` tells the acceptor to refuse.

With ``INGEST_REDIS_MIN_REPLICAS`` set, a write that too few replicas acknowledged counts as a
Redis failure (the delivery is spooled), and the drainer removes a segment only once its jobs
reached that many replicas.

After one Redis failure, deliveries go straight to the spool until the drainer has seen Redis
answer and emptied the spool (a circuit breaker). Without it, every request during an outage of
a *frozen* Redis would first wait out the Redis deadline, and the flushes, which run one after
another, would pile up behind each other past the senders' own timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from ingest import constants
from ingest.config import Settings
from ingest.acceptor.enqueue import BatchEnqueuer
from ingest.redis_conn import acceptor_async_redis, acceptor_redis, replicated
from ingest.acceptor.spool import Spool as JournalSpool

__all__ = ["Durable", "NotDurable", "Spool"]

log = logging.getLogger("ingest.acceptor.durable")


class NotDurable(Exception):
    """Neither Redis nor the spool could take the delivery."""


class Spool(Protocol):
    """What :class:`Durable` needs from a spool."""

    async def append(self, envelope: dict[str, Any]) -> None: ...
    def depth(self) -> int: ...
    def drain(self, queue: Queue, names: constants.Names, *,
              confirm: Callable[[], None] | None = None) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Durable:
    def __init__(self, redis: Redis, enqueuer: BatchEnqueuer, spool: Spool | None = None,
                 drain_interval: float = constants.SPOOL_DRAIN_INTERVAL) -> None:
        self.redis = redis  # (its WAIT, the drainer's, is as long as the enqueuer's)
        self.enqueuer = enqueuer
        self.spool = spool
        self.drain_interval = drain_interval
        self.redis_failing = False  # the breaker: True sends deliveries straight to the spool
        self._drainer: asyncio.Task[None] | None = None
        self._drain_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-drain")

    @classmethod
    def from_settings(cls, settings: Settings) -> Durable:
        url = settings.require_redis()
        wait_ms = settings.redis_wait_ms if settings.redis_min_replicas else 0
        redis = acceptor_redis(url, wait_ms)
        enqueuer = BatchEnqueuer(redis, acceptor_async_redis(url, wait_ms), settings.names,
                                 min_replicas=settings.redis_min_replicas,
                                 wait_ms=settings.redis_wait_ms)
        return cls(redis, enqueuer, JournalSpool(settings.spool_dir))

    async def store(self, envelope: dict[str, Any]) -> str:
        """Make ``envelope`` durable; return the result label ("accepted" or "spooled")."""
        redis_error: BaseException | str
        if self.spool is not None and self.redis_failing:
            redis_error = "failing moments ago (spooling until the drainer sees it answer)"
        else:
            try:
                await self.enqueuer.submit(envelope)
                return "accepted"
            except Exception as exc:  # noqa: BLE001  whatever the client raised mid-failover:
                # the spool takes the delivery rather than the sender getting no answer.
                redis_error = exc
                if self.spool is not None and not self.redis_failing:
                    self.redis_failing = True
                    log.warning("Redis cannot take deliveries (%r); spooling them to %s",
                                exc, getattr(self.spool, "directory", "the spool"))
        if self.spool is None:
            raise NotDurable(f"Redis: {redis_error!r}; no spool configured")
        try:
            await self.spool.append(envelope)
        except OSError as exc:
            raise NotDurable(f"Redis: {redis_error!r}; spool: {exc!r}") from exc
        return "spooled"

    async def _drain_loop(self) -> None:
        """Move the spool into Redis whenever it holds anything and Redis answers."""
        assert self.spool is not None
        loop = asyncio.get_running_loop()
        failed_before = False
        while True:
            await asyncio.sleep(self.drain_interval)
            if not self.redis_failing and self.spool.depth() == 0:
                continue
            if not await self.redis_ok():
                continue
            enqueuer = self.enqueuer
            confirm = partial(replicated, self.redis, enqueuer.names, enqueuer.min_replicas,
                              enqueuer.wait_ms) if enqueuer.min_replicas else None
            try:
                await loop.run_in_executor(self._drain_executor, partial(
                    self.spool.drain, enqueuer.queue, enqueuer.names, confirm=confirm))
            except (RedisError, OSError) as exc:
                # Once per streak: a replica shortfall can last (INGEST_REDIS_MIN_REPLICAS).
                (log.debug if failed_before else log.warning)(
                    "spool drain stopped, will try again every %.1f s: %r",
                    self.drain_interval, exc)
                failed_before = True
            except Exception:
                log.exception("spool drain failed, will try again")
            else:
                failed_before = False
            # Redis answered: once nothing waits in the spool, go back to Redis first (also when
            # the spool itself is what failed, so a broken spool never blocks a healthy Redis).
            if self.spool.depth() == 0 and self.redis_failing:
                self.redis_failing = False
                log.info("Redis answers again and the spool is empty; enqueueing directly")

    async def redis_ok(self) -> bool:
        try:
            return bool(await asyncio.get_running_loop().run_in_executor(None, self.redis.ping))
        except (RedisError, OSError):
            return False

    def spool_depth(self) -> int:
        return self.spool.depth() if self.spool is not None else 0

    async def start(self) -> None:
        if self.spool is not None:
            await self.spool.start()
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def stop(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        if self.spool is not None:
            await self.spool.stop()
        self._drain_executor.shutdown(wait=True)
        await self.enqueuer.aclose()
