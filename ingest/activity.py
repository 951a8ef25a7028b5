"""What operators need to see: refusals, per-provider activity, silence and backlog.

Everything here lives in Redis, so several acceptor processes and hosts add up instead of each
telling its own story, and ``/metrics``, ``ingest status`` and ``ingest refused`` all read the
same keys (all under :meth:`ingest.constants.Names.key`):

- ``activity:accepted`` / ``activity:refused``: hash, provider -> unix time of the last one.
  The accepted side is written in group commit's own pipeline (no extra round trip).
- ``activity:started``: when the first acceptor of this deployment started (``SET NX``); a
  provider that never delivered is silent counted from there.
- ``activity:minute:<unix minute>``: hash of counts (``accepted|<provider>``,
  ``refused|<provider>|<reason>``) for "the last hour" in ``ingest status``; lives 2 hours.
- ``refused:<provider>``: the last 100 refused requests (JSON), newest first, 7 days. Header
  *names* only; never a header value, the path, the query string or the body, so no
  credential (a path to an unknown provider may carry anything).

A refusal's write is a task of its own with a deadline: it never delays or fails the answer,
and its errors are counted (``ingest_activity_write_errors_total``), not raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ingest import constants, metrics
from ingest.config import Settings

__all__ = [
    "REFUSAL_REASONS",
    "ActivityCollector",
    "RefusalLog",
    "State",
    "mark_started",
    "note_accepted",
    "read_last_hour",
    "read_refusals",
    "received_at",
    "read_state",
]

log = logging.getLogger("ingest.activity")

# Every reason ingest_refused_total and the refusal log use.
REFUSAL_REASONS = ("signature", "token", "missing_credential", "not_json", "too_large",
                   "body_timeout", "unknown_provider", "busy")
# The provider label of a request to a provider that is not served here: random paths must not
# grow the label set.
UNKNOWN = "unknown"


def _minute_key(names: constants.Names, at: float) -> str:
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
    minute = _minute_key(names, at)
    for provider, n in counts.items():
        pipe.hincrby(minute, f"accepted|{provider}", n)
    pipe.expire(minute, constants.ACTIVITY_MINUTE_TTL)


def received_at(envelope: Mapping[str, Any]) -> float:
    """When the acceptor received ``envelope`` (unix seconds); now if it does not say."""
    when = _enqueued(str(envelope.get("received_at") or "").encode())
    return time.time() if when is None else when


async def mark_started(redis: AsyncRedis, names: constants.Names) -> None:
    """Record this deployment's start-up time, unless an earlier acceptor did."""
    try:
        async with asyncio.timeout(constants.REFUSAL_WRITE_DEADLINE * 2):
            await redis.set(names.key("activity:started"), repr(time.time()), nx=True)
    except Exception as exc:  # never keeps the acceptor from starting; retried at scrape time
        log.warning("could not record the start-up time in Redis: %r", exc)


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
                minute = _minute_key(names, at)
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


# -- reading it back (scrape time, `ingest status`) ------------------------------------------


@dataclass
class QueueState:
    name: str
    label: str  # "ingest" or the sink's name
    queued: int = 0
    started: int = 0
    scheduled: int = 0
    failed: int = 0
    oldest_seconds: float = 0.0
    workers: int = 0


@dataclass
class ProviderState:
    name: str
    last_accepted: float | None
    last_refused: float | None
    silent: bool | None  # None: not watched
    silence_after: float | None


@dataclass
class State:
    now: float
    started: float | None
    providers: list[ProviderState] = field(default_factory=list)
    queues: list[QueueState] = field(default_factory=list)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _queues(settings: Settings) -> list[tuple[str, str]]:
    names = settings.names
    return [("ingest", names.ingest_queue)] + [(s, names.sink_queue(s)) for s in settings.sinks]


def read_state(redis: Redis, settings: Settings,
               providers: Mapping[str, float | None] | None = None,
               queues: list[tuple[str, str]] | None = None) -> State:
    """Activity, silence and backlog, in two pipelined round trips whatever the load: counts
    are O(1) reads (LLEN, ZCARD, SCARD), the oldest job is the head of each queue.

    ``providers`` (name -> silence threshold) and ``queues`` ((label, name) pairs) default to
    what ``settings`` enables; ``ingest status`` passes the deployment's (ingest.deployment)."""
    from rq.job import Job

    names = settings.names
    if queues is None:
        queues = _queues(settings)
    if providers is None:
        providers = {name: settings.silence_threshold(name)
                     for name in sorted(settings.provider_secrets)}
    pipe = redis.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(names.key("activity:accepted"))
    pipe.hgetall(names.key("activity:refused"))
    pipe.get(names.key("activity:started"))
    for _, qname in queues:
        pipe.llen(f"rq:queue:{qname}")
        pipe.zcard(f"rq:wip:{qname}")
        pipe.zcard(f"rq:scheduled:{qname}")
        pipe.zcard(f"rq:failed:{qname}")
        pipe.lindex(f"rq:queue:{qname}", 0)
        pipe.smembers(f"rq:workers:{qname}")
    replies = pipe.execute()
    seconds, micros = replies[0]
    now = seconds + micros / 1e6  # Redis's clock: ages agree across hosts
    accepted = {k.decode(): _float(v) for k, v in replies[1].items()}
    refused = {k.decode(): _float(v) for k, v in replies[2].items()}
    started = _float(replies[3])
    if started is None:
        redis.set(names.key("activity:started"), repr(now), nx=True)
        started = now
    state = State(now=now, started=started)
    heads: list[tuple[QueueState, bytes]] = []
    worker_keys: list[tuple[QueueState, list[bytes]]] = []
    at = 4
    for label, qname in queues:
        queued, wip, scheduled, failed, head, workers = replies[at:at + 6]
        at += 6
        q = QueueState(qname, label, queued, wip, scheduled, failed)
        state.queues.append(q)
        if head:
            heads.append((q, head))
        worker_keys.append((q, sorted(workers)[:constants.SCRAPE_MAX_WORKERS]))
    if heads or worker_keys:
        pipe = redis.pipeline(transaction=False)
        for _, head in heads:
            pipe.hget(Job.key_for(head.decode()), "enqueued_at")
        for _, keys in worker_keys:
            for key in keys:
                pipe.exists(key)  # a worker that died uncleanly leaves its set entry behind
        replies = pipe.execute()
        for (q, _), enqueued in zip(heads, replies, strict=False):
            when = _enqueued(enqueued)
            q.oldest_seconds = max(0.0, now - when) if when is not None else 0.0
        at = len(heads)
        for q, keys in worker_keys:
            q.workers = sum(bool(r) for r in replies[at:at + len(keys)])
            at += len(keys)
    for name, threshold in providers.items():
        last = accepted.get(name)
        since = last if last is not None else started
        silent = None if threshold is None else now - since > threshold
        state.providers.append(ProviderState(name, last, refused.get(name), silent, threshold))
    return state


def _enqueued(raw: bytes | None) -> float | None:
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
        pipe.hgetall(_minute_key(names, now - i * 60))
    out: dict[str, int] = {}
    for counts in pipe.execute():
        for k, v in counts.items():
            out[k.decode()] = out.get(k.decode(), 0) + int(v)
    return out


class ActivityCollector:
    """A prometheus-client collector reading :func:`read_state` at scrape time."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: never call Redis at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("ingest_activity_redis_up",
                               "1 when /metrics could read activity and backlog from Redis.")
        try:
            state = read_state(self.redis, self.settings)
        except Exception as exc:
            log.warning("metrics: could not read activity from Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        last_acc = GaugeMetricFamily(
            "ingest_last_accepted_timestamp_seconds",
            "Unix time of the provider's last accepted delivery, any acceptor.", labels=["provider"])
        last_ref = GaugeMetricFamily(
            "ingest_last_refused_timestamp_seconds",
            "Unix time of the provider's last refused request, any acceptor.", labels=["provider"])
        silent = GaugeMetricFamily(
            "ingest_provider_silent",
            "1 when an enabled provider accepted nothing for INGEST_SILENCE_AFTER.",
            labels=["provider"])
        for p in state.providers:
            if p.last_accepted is not None:
                last_acc.add_metric([p.name], p.last_accepted)
            if p.last_refused is not None:
                last_ref.add_metric([p.name], p.last_refused)
            if p.silent is not None:
                silent.add_metric([p.name], 1 if p.silent else 0)
        jobs = GaugeMetricFamily("ingest_queue_jobs", "Jobs in an RQ queue, by state.",
                                 labels=["queue", "state"])
        oldest = GaugeMetricFamily("ingest_queue_oldest_seconds",
                                   "Age of the oldest queued job (0 when none).", labels=["queue"])
        workers = GaugeMetricFamily("ingest_queue_workers", "Live RQ workers serving a queue.",
                                    labels=["queue"])
        dead = GaugeMetricFamily("ingest_dead_letters",
                                 "Jobs in a queue's failed registry (`ingest dlq list`).",
                                 labels=["sink"])
        for q in state.queues:
            for name in ("queued", "started", "scheduled", "failed"):
                jobs.add_metric([q.name, name], getattr(q, name))
            oldest.add_metric([q.name], q.oldest_seconds)
            workers.add_metric([q.name], q.workers)
            dead.add_metric([q.label], q.failed)
        yield from (last_acc, last_ref, silent, jobs, oldest, workers, dead)
