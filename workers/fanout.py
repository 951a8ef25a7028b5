"""Bounded deliver jobs, and a chain of them for a delivery that expands into thousands.

A sink's share of a batch used to be one deliver job, however many events it held: a
Salesloft delivery whose ``data`` array holds 15,500 resources became one CRM job of 15,500
posts, which hit the job timeout half way and started again from the first, forever. Now:

- **Bounded jobs.** No deliver job holds more than its sink's bound, :func:`job_events`: the
  sink's ``job_events`` when it sets one, else ``MAX_JOB_EVENTS`` (1,000). The CRM sets it from
  its timeout so that a job's posts take at most half the job timeout even when every request
  takes its whole deadline (15 events at ``CRM_TIMEOUT`` 10 s); Slack to one digest (100).
- **A chain per bulk delivery.** The events of a delivery that alone exceeds the bound are
  split into chunks, and each chunk is a job of its own. Only the first is queued; the others
  are written at the same time, but *deferred* (RQ's deferred registry of the sink's queue:
  durable in Redis, listed by ``rq info``, seen by ``ingest erase``). When a chunk's job starts,
  it first queues the next chunk's job at the *tail* of the queue (:func:`hand_on`), then sends
  its own events. So a bulk delivery has at most two jobs waiting in its sink's queue at any
  time, and every other delivery's job, queued meanwhile, runs after at most two of its chunks:
  a 15,500-event import reaches the CRM at the CRM's pace while other deliveries wait their
  own share, not the import's. The same holds for Postgres, where the import lands in chunks
  of 1,000 in seconds.
- **Small deliveries stay together.** The events of the other deliveries in the batch go into
  ordinary jobs of at most the bound, queued at once, as before.

Handing on is one Lua script: take the next job out of the deferred registry and push it on
the queue, only if it is still deferred (so a chunk retried after a crash, or run twice, hands
on nothing twice). A chunk job whose next job is gone (``ingest erase`` removed it with all
its events) hands on to the one after. A chain job is never removed by erase: left without
events, it still hands on. Each chunk carries the raw deliveries its events came from when the
sink archives them (Postgres): its own transaction needs them, whatever order chunks commit in.

Why not one queue per sink for bulk deliveries: each queue needs a worker process of its own
(README, "Why one worker process per queue"), in every deployment file; and a bulk queue still
serves two bulk imports one after the other. Why not RQ's job dependencies: a dependent waits
until its dependency *ends*, so a chunk retrying for an hour (a receiver refusing one event
with 503) would hold the rest of the import; here a chunk hands on before it sends.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from redis import Redis
from redis.commands.core import Script
from rq.job import Job, JobStatus
from rq.utils import now, utcformat

from ingest import constants
from ingest.events import Event
from ingest.rq_jobs import deliver_retry, enqueue_new, make_job
from sinks.registry import EnabledSink
from workers.runtime import Runtime

__all__ = ["chain_job_id", "enqueue_bounded", "hand_on", "job_events", "plan", "split_job"]

# KEYS: deferred registry, the next job's hash, the queue. ARGV: job id, enqueued_at.
# 1: handed on; 0: not deferred any more (someone handed it on already); -1: no such job.
_HAND_ON = """
if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[1])
    return -1
end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'status', 'queued', 'enqueued_at', ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
"""
_scripts: weakref.WeakKeyDictionary[Redis, Script] = weakref.WeakKeyDictionary()


def job_events(enabled: EnabledSink) -> int:
    """Most events one deliver job of this sink holds."""
    limit = getattr(enabled.sink, "job_events", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(limit, constants.MAX_JOB_EVENTS)
    return constants.MAX_JOB_EVENTS


def plan(events: Sequence[Event], bound: int) -> tuple[list[list[Event]], list[list[list[Event]]]]:
    """(ordinary jobs, chains): the events of every delivery that alone holds more than
    ``bound`` events become a chain of chunks of ``bound``; the others are packed, in order,
    into jobs of at most ``bound``."""
    by_delivery: dict[str | None, list[Event]] = {}
    for event in events:
        by_delivery.setdefault(event.delivery_id, []).append(event)
    bulk = {d for d, evs in by_delivery.items() if len(evs) > bound}
    rest = [e for e in events if e.delivery_id not in bulk]
    ordinary = [rest[i:i + bound] for i in range(0, len(rest), bound)]
    chains = [[evs[i:i + bound] for i in range(0, len(evs), bound)]
              for d, evs in by_delivery.items() if d in bulk]
    return ordinary, chains


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:32]


def chain_job_id(rt: Runtime, sink: str, token: str, index: int) -> str:
    return rt.names.job_id(f"deliver-{sink}", f"{token}-{index}")


def enqueue_bounded(rt: Runtime, name: str, enabled: EnabledSink, events: Sequence[Event],
                    forms: Mapping[str, dict[str, Any]],
                    deliveries: Mapping[str, dict[str, Any]]) -> int:
    """The deliver jobs of ``events`` for one sink, none over its bound (see the module
    docstring). ``forms``: each event's job form by id; ``deliveries``: raw deliveries (as
    dicts) by id, for a sink that archives them. Ids make writing them again a no-op. Returns
    how many jobs this call created."""
    ordinary, chains = plan(events, job_events(enabled))
    created = 0
    queue = rt.sink_queue(name)
    for chunk in ordinary:
        created += enqueue_new(
            queue, constants.DELIVER, _args(name, enabled, chunk, forms, deliveries),
            rt.names.job_id(f"deliver-{name}", _digest([e.id for e in chunk])),
            deliver_retry(), f"deliver({name}, {len(chunk)} events)")
    for chunks in chains:
        created += _enqueue_chain(rt, name, enabled, chunks, forms, deliveries)
    return created


def _args(name: str, enabled: EnabledSink, chunk: Sequence[Event],
          forms: Mapping[str, dict[str, Any]], deliveries: Mapping[str, dict[str, Any]],
          chain: dict[str, Any] | None = None) -> tuple[Any, ...]:
    raw = None
    if enabled.needs_raw:
        used = {e.delivery_id for e in chunk}
        raw = [d for i, d in deliveries.items() if i in used]
    args: tuple[Any, ...] = (name, [forms[e.id] for e in chunk], raw)
    return args + (chain,) if chain is not None else args


def _enqueue_chain(rt: Runtime, name: str, enabled: EnabledSink, chunks: list[list[Event]],
                   forms: Mapping[str, dict[str, Any]],
                   deliveries: Mapping[str, dict[str, Any]]) -> int:
    """Write chunks 1.. deferred, then queue chunk 0; returns how many jobs were new."""
    token = _digest([e.id for chunk in chunks for e in chunk])
    count = len(chunks)
    queue = rt.sink_queue(name)
    ids = [chain_job_id(rt, name, token, i) for i in range(count)]
    # Jobs already written (process_batch retried after a crash) are left as they are: one
    # already handed on must not become deferred again.
    with rt.redis.pipeline(transaction=False) as pipe:
        for job_id in ids[1:]:
            pipe.exists(Job.key_for(job_id))
        exists = pipe.execute()
    created = 0
    deferred = queue.deferred_job_registry.key
    with rt.redis.pipeline(transaction=False) as pipe:
        for index in range(1, count):
            if exists[index - 1]:
                continue
            job = make_job(queue, constants.DELIVER,
                           _args(name, enabled, chunks[index], forms, deliveries,
                                 {"chain": token, "index": index, "count": count}),
                           ids[index], deliver_retry(),
                           f"deliver({name}, {len(chunks[index])} events, "
                           f"chunk {index + 1} of {count})")
            job.origin = queue.name
            job._status = JobStatus.DEFERRED
            job.save(pipeline=pipe)
            pipe.zadd(deferred, {job.id: time.time()})
            created += 1
        pipe.execute()
    created += enqueue_new(
        queue, constants.DELIVER,
        _args(name, enabled, chunks[0], forms, deliveries,
              {"chain": token, "index": 0, "count": count}),
        ids[0], deliver_retry(), f"deliver({name}, {len(chunks[0])} events, chunk 1 of {count})")
    return created


def hand_on(rt: Runtime, sink: str, chain: Mapping[str, Any]) -> str | None:
    """Queue the next chunk of a chain at the tail of the sink's queue, if nobody has yet.
    Returns the id of the job queued, or None."""
    token, index, count = str(chain["chain"]), int(chain["index"]), int(chain["count"])
    queue = rt.sink_queue(sink)
    script = _scripts.get(rt.redis)
    if script is None:
        script = _scripts[rt.redis] = rt.redis.register_script(_HAND_ON)
    for following in range(index + 1, count):
        job_id = chain_job_id(rt, sink, token, following)
        done = script(keys=[queue.deferred_job_registry.key, Job.key_for(job_id), queue.key],
                      args=[job_id, utcformat(now())], client=rt.redis)
        if done == 1:
            return job_id
        if done == 0:
            return None
        # -1: erased with all its events; the one after takes its place.
    return None


def split_job(rt: Runtime, sink: str, enabled: EnabledSink, events: list[dict[str, Any]],
              deliveries: list[dict[str, Any]] | None) -> int:
    """A deliver job over its sink's bound (written before jobs were bounded, or re-queued
    from the dead letters): its events go into bounded jobs and chains, as if just enqueued.
    Returns how many jobs were created."""
    evs = [Event.from_job(e) for e in events]
    forms = {e.id: form for e, form in zip(evs, events)}
    raw = {d["id"]: d for d in deliveries or ()}
    return enqueue_bounded(rt, sink, enabled, evs, forms, raw)
