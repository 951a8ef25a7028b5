"""Exactly-once claims in Redis.

Each event's dedup record goes through two states:

- ``claimed:<job id>`` (expires after ``CLAIM_TTL``): a batch job owns the event and is
  handing it to the sinks. If that job dies, RQ retries it with the same id, and the retry
  recognises its own claim and carries on. If it never comes back, the claim expires and a
  redelivery of the event gets processed.
- ``done`` (expires after ``INGEST_DEDUP_TTL``): the sink jobs for it exist. Any later copy is
  a duplicate.

A copy that finds the event claimed by *another* live job is dropped: that job (or its retry)
delivers it. All claims of a batch go out in one pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from redis import Redis

from ingest.constants import CLAIM_TTL, Names
from ingest.events import Event

__all__ = ["claim", "mark_done"]

_DONE = b"done"


def _key(names: Names, event: Event) -> str:
    digest = hashlib.sha256(event.dedup_key.encode()).hexdigest()[:40]
    return names.dedup_key(event.provider, digest)


def claim(redis: Redis, names: Names, owner: str, events: Sequence[Event]) -> list[bool]:
    """For each event, True when this job should deliver it (new, or already ours)."""
    mine = f"claimed:{owner}".encode()
    pipe = redis.pipeline(transaction=False)
    for event in events:
        key = _key(names, event)
        pipe.set(key, mine, nx=True, ex=CLAIM_TTL)
        pipe.get(key)
    replies = pipe.execute()
    return [bool(replies[2 * i]) or replies[2 * i + 1] == mine for i in range(len(events))]


def mark_done(redis: Redis, names: Names, events: Sequence[Event], ttl: int) -> None:
    pipe = redis.pipeline(transaction=False)
    for event in events:
        pipe.set(_key(names, event), _DONE, ex=ttl)
    pipe.execute()
