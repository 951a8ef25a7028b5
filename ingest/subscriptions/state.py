"""What ``ingest subscriptions`` keeps in Redis, and what ``/metrics`` and ``ingest status``
read back. All keys under :meth:`ingest.constants.Names.key`; never a secret or a token:

- ``subscriptions:created:<provider>``: hash, subscription id -> JSON ``{"topic", "url",
  "secret", "at"}`` for each subscription ``apply`` created or updated; ``secret`` is a
  fingerprint (:func:`ingest.subscriptions.tokens.fingerprint`) of the secret it pushed. It is
  how ``plan`` knows which subscriptions are this deployment's own (the only ones ``apply``
  deletes without ``--delete-extra``) and which secret a provider that never shows it holds.
- ``subscriptions:health``: hash, provider -> JSON ``{"at", "healthy", "problems", "every",
  "error"}``: the last check's result (workers' periodic check, ``plan``, ``apply``).
  ``problems`` are short lines an operator reads (the provider's own reason included, masked).

The OAuth state (``subscriptions:oauth:<provider>``, sealed) is ingest.subscriptions.tokens'.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis

from ingest.constants import Names

__all__ = ["Health", "Records", "SubscriptionCollector", "add_to_status", "read_health",
           "write_health"]

log = logging.getLogger("ingest.subscriptions")

_HEALTH = "subscriptions:health"
# Problem lines kept per provider in the health record (the rest are counted).
MAX_PROBLEMS = 5
# A check older than this many intervals (plus a minute) is overdue in `ingest status`.
OVERDUE_INTERVALS = 3


class Records:
    """The subscriptions this deployment created or updated at one provider."""

    def __init__(self, redis: Redis, names: Names, provider: str) -> None:
        self.redis = redis
        self.key = names.key(f"subscriptions:created:{provider}")

    def all(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for rid, raw in self.redis.hgetall(self.key).items():
            try:
                value = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out[rid.decode() if isinstance(rid, bytes) else str(rid)] = value
        return out

    def put(self, rid: str, topic: str, url: str, secret_fingerprint: str) -> None:
        self.redis.hset(self.key, rid, orjson.dumps({
            "topic": topic, "url": url, "secret": secret_fingerprint, "at": time.time()}))

    def forget(self, rid: str) -> None:
        self.redis.hdel(self.key, rid)


@dataclass(frozen=True)
class Health:
    provider: str
    at: float
    healthy: bool
    problems: list[str] = field(default_factory=list)
    every: float | None = None
    error: str | None = None


def write_health(redis: Redis, names: Names, health: Health) -> None:
    redis.hset(names.key(_HEALTH), health.provider, orjson.dumps({
        "at": health.at, "healthy": health.healthy, "problems": health.problems[:MAX_PROBLEMS],
        "more": max(0, len(health.problems) - MAX_PROBLEMS), "every": health.every,
        "error": health.error}))


def read_health(redis: Redis, names: Names) -> dict[str, Health]:
    out: dict[str, Health] = {}
    for name, raw in redis.hgetall(names.key(_HEALTH)).items():
        provider = name.decode() if isinstance(name, bytes) else str(name)
        try:
            doc = orjson.loads(raw)
            problems = [str(p) for p in doc.get("problems") or []]
            if doc.get("more"):
                problems.append(f"and {int(doc['more'])} more")
            every = doc.get("every")
            out[provider] = Health(provider, float(doc["at"]), bool(doc["healthy"]), problems,
                                   float(every) if every else None, doc.get("error"))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def add_to_status(redis: Redis, names: Names, now: float, providers: list[dict[str, Any]],
                  attention: list[str]) -> None:
    """``ingest status``: each provider entry gains ``subscriptions`` (the last check, or
    None), and ``attention`` a line per provider whose subscriptions need it or whose check is
    overdue."""
    found = read_health(redis, names)
    for entry in providers:
        health = found.get(str(entry.get("name")))
        if health is None:
            entry["subscriptions"] = None
            continue
        age = max(0.0, now - health.at)
        overdue = (health.every is not None
                   and age > OVERDUE_INTERVALS * health.every + 60)
        entry["subscriptions"] = {"healthy": health.healthy, "checked_seconds_ago": round(age),
                                  "problems": health.problems, "error": health.error,
                                  "overdue": overdue}
        name = health.provider
        if not health.healthy:
            what = health.error or "; ".join(health.problems) or "see the plan"
            attention.append(f"{name}'s webhook subscriptions need attention (checked "
                             f"{_ago(age)} ago): {what}. See `ingest subscriptions plan "
                             f"--provider {name}`, then `ingest subscriptions apply`")
        elif overdue:
            attention.append(f"{name}'s webhook subscriptions were last checked {_ago(age)} "
                             f"ago (every {_ago(health.every or 0)}): is an `ingest worker "
                             "--queue ingest` running?")


class SubscriptionCollector:
    """``/metrics``: the last check per provider, read from Redis at scrape time."""

    def __init__(self, redis: Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    def describe(self) -> list[Any]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        healthy = GaugeMetricFamily(
            "ingest_subscription_healthy",
            "1 when the provider's webhook subscriptions were, at the last check, all present, "
            "active, pointing here and holding the current secret; 0 when not, or when the "
            "check could not read them (`ingest subscriptions plan`).", labels=["provider"])
        checked = GaugeMetricFamily(
            "ingest_subscription_checked_timestamp_seconds",
            "Unix time of the provider's last subscription check.", labels=["provider"])
        try:
            found = read_health(self.redis, self.names)
        except Exception as exc:
            log.warning("metrics: could not read the subscription checks from Redis: %r", exc)
            found = {}
        for name, health in sorted(found.items()):
            healthy.add_metric([name], 1 if health.healthy else 0)
            checked.add_metric([name], health.at)
        yield healthy
        yield checked
