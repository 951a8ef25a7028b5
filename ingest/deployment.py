"""What the running deployment registered in Redis (its providers, sinks and queues), and its
state read back (:func:`read_state`: activity, silence and backlog, for ``ingest status``
and the ``/metrics`` gauges).

``ingest status`` must be right from any host that can reach Redis, with nothing but
``REDIS_URL`` (and ``INGEST_NAMESPACE`` for a namespaced deployment) in its shell: the
providers and sinks it shows are the running stack's, not whatever that shell happens to
configure. So each acceptor process registers what it serves, and RQ already registers every
queue and worker:

- ``deployment:acceptors`` (under :meth:`ingest.constants.Names.key`): a hash, one field per
  acceptor process (``host:pid``), its value JSON ``{"providers": {name: silence seconds or
  null}, "sinks": [...], "at": unix time}``, written at start and every
  :data:`ingest.constants.DEPLOYMENT_REGISTER_EVERY` seconds. Readers take the union of the
  acceptors seen within :data:`ingest.constants.DEPLOYMENT_LIVE_AFTER`, or, when none is live,
  of the last ones seen (a stopped stack still has a configuration to show), and forget fields
  older than :data:`ingest.constants.DEPLOYMENT_FORGET_AFTER`.
- ``rq:queues``: RQ's own set of every queue a job was ever put on; the deployment's are those
  named by its namespace (``ingest``, ``sink-<name>``), so a plugin sink with dead letters
  shows even where this shell does not enable it.

Names only, never a secret: the registration says which providers are enabled, not with what.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from ingest import constants
from ingest.activity import enqueued_time
from ingest.config import Settings

__all__ = ["Deployment", "ProviderState", "QueueState", "State", "deployment_queues",
           "keep_registered", "read_deployment", "read_state", "registration"]

log = logging.getLogger("ingest.deployment")

_KEY = "deployment:acceptors"


@dataclass(frozen=True)
class Deployment:
    """The providers (with their silence thresholds) and sinks the acceptors registered."""

    providers: Mapping[str, float | None] = field(default_factory=dict)
    sinks: tuple[str, ...] = ()
    # Unix time an acceptor last registered, and whether one did so recently (it runs).
    seen_at: float = 0.0
    live: bool = False


def registration(settings: Settings) -> bytes:
    """This process's registration: what it serves, never with what secret."""
    return orjson.dumps({
        "providers": {name: settings.silence_threshold(name)
                      for name in sorted(settings.provider_secrets)},
        "sinks": list(settings.sinks),
        "at": time.time(),
    })


def _member() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def keep_registered(redis: AsyncRedis, settings: Settings) -> None:
    """Register this acceptor now and every DEPLOYMENT_REGISTER_EVERY seconds, until
    cancelled. Redis being away only delays it: the acceptor never waits on it."""
    key = settings.names.key(_KEY)
    while True:
        try:
            await asyncio.wait_for(redis.hset(key, _member(), registration(settings)),
                                   constants.DEPLOYMENT_WRITE_TIMEOUT)
        except Exception as exc:  # Redis down or slow: the next round tries again
            log.debug("could not register the acceptor in Redis: %s", type(exc).__name__)
        await asyncio.sleep(constants.DEPLOYMENT_REGISTER_EVERY)


def read_deployment(redis: Redis, names: constants.Names, now: float) -> Deployment | None:
    """What the acceptors registered (see the module docstring), or None when none ever did."""
    key = names.key(_KEY)
    entries: list[dict[str, Any]] = []
    forgotten: list[bytes | str] = []
    for member, raw in redis.hgetall(key).items():
        try:
            entry = orjson.loads(raw)
            at = float(entry["at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            forgotten.append(member)
            continue
        if now - at > constants.DEPLOYMENT_FORGET_AFTER:
            forgotten.append(member)
            continue
        entries.append(entry)
    if forgotten:
        redis.hdel(key, *forgotten)
    if not entries:
        return None
    seen_at = max(float(e["at"]) for e in entries)
    live = [e for e in entries if now - float(e["at"]) <= constants.DEPLOYMENT_LIVE_AFTER]
    chosen = live or [e for e in entries if float(e["at"]) == seen_at]
    providers: dict[str, float | None] = {}
    sinks: dict[str, None] = {}
    for entry in chosen:
        for name, threshold in dict(entry.get("providers") or {}).items():
            providers[str(name)] = None if threshold is None else float(threshold)
        sinks.update(dict.fromkeys(str(s) for s in entry.get("sinks") or ()))
    return Deployment(providers=dict(sorted(providers.items())), sinks=tuple(sinks),
                      seen_at=seen_at, live=bool(live))


def deployment_queues(redis: Redis, names: constants.Names,
                      sinks: tuple[str, ...]) -> list[tuple[str, str]]:
    """(label, queue name) of the deployment's queues: ``ingest``, each of ``sinks``, and every
    other sink queue of this namespace RQ knows (one with dead letters of a sink since
    disabled, a plugin's), in that order."""
    out = {constants.INGEST_QUEUE: names.ingest_queue}
    out.update({sink: names.sink_queue(sink) for sink in sinks})
    prefix = "rq:queue:" + names.sink_queue("")
    found = sorted(m.decode() if isinstance(m, bytes) else str(m)
                   for m in redis.smembers("rq:queues"))
    for member in found:
        if member.startswith(prefix) and len(member) > len(prefix):
            sink = member[len(prefix):]
            out.setdefault(sink, names.sink_queue(sink))
    return list(out.items())


# -- the state of the deployment: activity, silence and backlog (scrape time, `ingest status`) -


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
            when = enqueued_time(enqueued)
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
