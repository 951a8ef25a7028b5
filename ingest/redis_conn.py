"""Redis clients with their timeouts and retries set on purpose, never library defaults."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

from ingest import constants

__all__ = ["acceptor_async_redis", "acceptor_redis", "worker_redis"]


# The acceptor's clients: every call answers or fails well inside a second. One immediate
# retry covers a connection the server closed while idle; more would eat into the sender's
# deadline, and the spool is the fallback anyway.
_ACCEPTOR_OPTIONS: dict[str, Any] = {
    "socket_timeout": constants.ACCEPTOR_REDIS_TIMEOUT,
    "socket_connect_timeout": constants.ACCEPTOR_REDIS_TIMEOUT,
    "retry_on_error": [ConnectionError, TimeoutError],
    "health_check_interval": 30,
}


def acceptor_redis(url: str) -> Redis:
    """For the acceptor's occasional calls (readiness, the spool drainer)."""
    return Redis.from_url(url, retry=Retry(NoBackoff(), retries=1), **_ACCEPTOR_OPTIONS)


def acceptor_async_redis(url: str) -> AsyncRedis:
    """For group commit's writes, on the acceptor's event loop: the same settings."""
    return AsyncRedis.from_url(url, retry=AsyncRetry(NoBackoff(), retries=1),
                               **_ACCEPTOR_OPTIONS)


def worker_redis(url: str) -> Redis:
    """For workers: patient (RQ raises the socket timeout above its blocking dequeue)."""
    return Redis.from_url(
        url,
        socket_timeout=constants.WORKER_REDIS_TIMEOUT,
        socket_connect_timeout=5,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
        health_check_interval=30,
    )
