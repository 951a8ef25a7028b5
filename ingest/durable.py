"""Making a delivery durable before the acceptor answers 200.

First choice is Redis, through the group-commit :class:`BatchEnqueuer`. When Redis cannot take
the delivery within its deadline, the local spool (``INGEST_SPOOL_DIR``) journals it with an
fsync, and a drainer moves it into Redis once Redis is back. When neither can take it,
:class:`NotDurable` tells the acceptor to refuse.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import RedisError

from ingest.config import Settings
from ingest.enqueue import BatchEnqueuer
from ingest.redis_conn import acceptor_redis

__all__ = ["Durable", "NotDurable", "Spool"]

log = logging.getLogger("ingest.durable")


class NotDurable(Exception):
    """Neither Redis nor the spool could take the delivery."""


class Spool(Protocol):
    """What :class:`Durable` needs from a spool."""

    def append(self, envelope: dict[str, Any]) -> None: ...
    def depth(self) -> int: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Durable:
    def __init__(self, redis: Redis, enqueuer: BatchEnqueuer, spool: Spool | None = None) -> None:
        self.redis = redis
        self.enqueuer = enqueuer
        self.spool = spool

    @classmethod
    def from_settings(cls, settings: Settings) -> Durable:
        redis = acceptor_redis(settings.require_redis())
        return cls(redis, BatchEnqueuer(redis, settings.names))

    async def store(self, envelope: dict[str, Any]) -> str:
        """Make ``envelope`` durable; return the result label ("accepted" or "spooled")."""
        try:
            await self.enqueuer.submit(envelope)
            return "accepted"
        except (RedisError, OSError) as exc:
            redis_error = exc
        if self.spool is None:
            raise NotDurable(f"Redis: {redis_error!r}; no spool configured")
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.spool.append, envelope)
        except OSError as exc:
            raise NotDurable(f"Redis: {redis_error!r}; spool: {exc!r}") from exc
        return "spooled"

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

    async def stop(self) -> None:
        if self.spool is not None:
            await self.spool.stop()
        self.enqueuer.close()
