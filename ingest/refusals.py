"""The refusal log: every refused request counted at once (``ingest_refused_total``), and
its record kept in Redis, for ``ingest refused`` and ``ingest status``:

- ``refused:<provider>``: the last 100 refused requests (JSON), newest first, 7 days. Header
  *names* only; never a header value, the path, the query string or the body, so no
  credential (a path to an unknown provider may carry anything);
- the provider's last refusal and the minute's count by reason (ingest.activity's keys).

A refusal's write is a task of its own with a deadline: it never delays or fails the answer,
and its errors are counted (``ingest_activity_write_errors_total``), not raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ingest import constants, metrics
from ingest.activity import minute_key

__all__ = ["REFUSAL_REASONS", "UNKNOWN", "RefusalLog", "read_refusals"]

# Every reason ingest_refused_total and the refusal log use.
REFUSAL_REASONS = ("signature", "token", "missing_credential", "not_json", "too_large",
                   "body_timeout", "unknown_provider", "busy")
# The provider label of a request to a provider that is not served here: random paths must not
# grow the label set.
UNKNOWN = "unknown"


class RefusalLog:
    """The acceptor's side: count a refusal at once, write its record in the background."""

    def __init__(self, redis: AsyncRedis | None, names: constants.Names) -> None:
        self.redis = redis
        self.names = names
        self._tasks: set[asyncio.Task[None]] = set()
        self._children: dict[tuple[str, str], Any] = {}

    def refused(self, provider: str, reason: str, scope: Mapping[str, Any],
                headers: Mapping[str, str], length: int | None) -> None:
        child = self._children.get((provider, reason))
        if child is None:
            child = self._children[(provider, reason)] = metrics.REFUSED.labels(provider, reason)
        child.inc()
        if self.redis is None:
            return
        if len(self._tasks) >= constants.REFUSAL_WRITES_IN_FLIGHT:
            metrics.ACTIVITY_WRITE_ERRORS.labels("dropped").inc()
            return
        at = time.time()
        client = scope.get("client")
        record: dict[str, Any] = {
            "time": at,
            "reason": reason,
            "client": str(client[0]) if client else None,
            "user_agent": (headers.get("user-agent") or "")[:200] or None,
            "content_length": length,
            "headers": sorted(headers)[:50],
        }
        task = asyncio.get_running_loop().create_task(
            self._write(provider, reason, orjson.dumps(record), at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self, provider: str, reason: str, record: bytes, at: float) -> None:
        assert self.redis is not None
        names = self.names
        try:
            async with asyncio.timeout(constants.REFUSAL_WRITE_DEADLINE):
                pipe = self.redis.pipeline(transaction=False)
                key = names.key(f"refused:{provider}")
                pipe.lpush(key, record)
                pipe.ltrim(key, 0, constants.REFUSAL_LOG_LENGTH - 1)
                pipe.expire(key, constants.REFUSAL_LOG_TTL)
                pipe.hset(names.key("activity:refused"), provider, repr(at))
                minute = minute_key(names, at)
                pipe.hincrby(minute, f"refused|{provider}|{reason}", 1)
                pipe.expire(minute, constants.ACTIVITY_MINUTE_TTL)
                await pipe.execute()
        except Exception:  # includes the deadline: the answer went out long ago
            metrics.ACTIVITY_WRITE_ERRORS.labels("error").inc()

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def read_refusals(redis: Redis, names: constants.Names,
                  providers: Iterable[str]) -> list[dict[str, Any]]:
    """The kept refused requests of ``providers``, newest first, each with its provider."""
    providers = list(providers)
    pipe = redis.pipeline(transaction=False)
    for provider in providers:
        pipe.lrange(names.key(f"refused:{provider}"), 0, -1)
    out: list[dict[str, Any]] = []
    for provider, items in zip(providers, pipe.execute(), strict=True):
        for raw in items:
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append({"provider": provider, **record})
    out.sort(key=lambda r: -float(r.get("time") or 0))
    return out
