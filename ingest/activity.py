"""Per-provider activity in Redis: when each provider last had a delivery accepted or a
request refused, and counts per minute.

Everything here lives in Redis, so several acceptor processes and hosts add up instead of each
telling its own story, and ``/metrics`` and ``ingest status`` read the same keys (all under
:meth:`ingest.constants.Names.key`):

- ``activity:accepted`` / ``activity:refused``: hash, provider -> unix time of the last one.
  The accepted side is written in group commit's own pipeline (no extra round trip); the
  refused side by the refusal log (ingest.refusals).
- ``activity:started``: when the first acceptor of this deployment started (``SET NX``); a
  provider that never delivered is silent counted from there.
- ``activity:minute:<unix minute>``: hash of counts (``accepted|<provider>``,
  ``refused|<provider>|<reason>``) for "the last hour" in ``ingest status``; lives 2 hours.

Reading them back with the queues' backlog (silence, ``ingest status``, the ``/metrics``
gauges) is ingest.deployment's :func:`~ingest.deployment.read_state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ingest import constants

__all__ = ["enqueued_time", "mark_started", "minute_key", "note_accepted", "read_last_hour",
           "received_at"]

log = logging.getLogger("ingest.activity")


def minute_key(names: constants.Names, at: float) -> str:
    return names.key(f"activity:minute:{int(at // 60)}")


def note_accepted(pipe: Any, names: constants.Names, envelopes: Iterable[Mapping[str, Any]],
                  at: float | None = None) -> None:
    """Add to ``pipe`` (sync or async) the activity writes of these accepted deliveries."""
    at = time.time() if at is None else at
    counts: dict[str, int] = {}
    for envelope in envelopes:
        provider = str(envelope.get("provider"))
        counts[provider] = counts.get(provider, 0) + 1
    if not counts:
        return
    pipe.hset(names.key("activity:accepted"), mapping={p: repr(at) for p in counts})
    minute = minute_key(names, at)
    for provider, n in counts.items():
        pipe.hincrby(minute, f"accepted|{provider}", n)
    pipe.expire(minute, constants.ACTIVITY_MINUTE_TTL)


def received_at(envelope: Mapping[str, Any]) -> float:
    """When the acceptor received ``envelope`` (unix seconds); now if it does not say."""
    when = enqueued_time(str(envelope.get("received_at") or "").encode())
    return time.time() if when is None else when


async def mark_started(redis: AsyncRedis, names: constants.Names) -> None:
    """Record this deployment's start-up time, unless an earlier acceptor did."""
    try:
        async with asyncio.timeout(constants.REFUSAL_WRITE_DEADLINE * 2):
            await redis.set(names.key("activity:started"), repr(time.time()), nx=True)
    except Exception as exc:  # never keeps the acceptor from starting; retried at scrape time
        log.warning("could not record the start-up time in Redis: %r", exc)


def enqueued_time(raw: bytes | None) -> float | None:
    """An RQ time (ISO 8601, UTC without an offset) as unix seconds; None when unreadable."""
    if not raw:
        return None
    from datetime import datetime, timezone

    text = raw.decode()
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:  # RQ writes UTC without an offset
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def read_last_hour(redis: Redis, names: constants.Names, now: float) -> dict[str, int]:
    """Counts of the last 60 minutes, summed: ``accepted|<p>`` and ``refused|<p>|<reason>``."""
    pipe = redis.pipeline(transaction=False)
    for i in range(60):
        pipe.hgetall(minute_key(names, now - i * 60))
    out: dict[str, int] = {}
    for counts in pipe.execute():
        for k, v in counts.items():
            out[k.decode()] = out.get(k.decode(), 0) + int(v)
    return out
