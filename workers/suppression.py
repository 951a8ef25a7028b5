"""The suppression list: contacts erased with ``ingest erase --suppress``, whose future events
workers drop.

The list is a Redis set of hex SHA-256 digests of lower-cased email addresses (never the
addresses). One ``SMISMEMBER`` per batch checks the contacts of its new events; an event whose
contact is listed is dropped before any sink sees it and counted in
``ingest_suppressed_events_total``. Its raw delivery is then not archived either (the Postgres
sink archives only deliveries that produced a stored event).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

from redis import Redis

from ingest import metrics
from ingest.constants import Names
from ingest.events import Event

__all__ = ["add", "digest", "drop_suppressed", "remove"]


def _key(names: Names) -> str:
    return names.key("suppressed")


def digest(address: str) -> str:
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


def add(redis: Redis, names: Names, sha256: str) -> bool:
    """List a contact by its digest; True when it was not listed yet."""
    return bool(redis.sadd(_key(names), sha256))


def remove(redis: Redis, names: Names, sha256: str) -> bool:
    """Lift a suppression; True when the contact was listed."""
    return bool(redis.srem(_key(names), sha256))


def drop_suppressed(redis: Redis, names: Names, events: Sequence[Event],
                    produced: Counter[str] | None = None) -> list[Event]:
    """``events`` without those whose contact is on the list. They are taken off
    ``produced`` (events per provider the batch counts), so they never count as duplicates."""
    with_email = [e for e in events if e.contact is not None and e.contact.email]
    if not with_email:
        return list(events)
    digests = [digest(e.contact.email) for e in with_email if e.contact and e.contact.email]
    listed = redis.smismember(_key(names), digests)
    dropped = {e.id for e, hit in zip(with_email, listed) if hit}
    for e in with_email:
        if e.id in dropped:
            metrics.SUPPRESSED.labels(e.provider).inc()
            if produced is not None:
                produced[e.provider] -= 1
    return [e for e in events if e.id not in dropped]
