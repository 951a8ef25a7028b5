"""Deliver jobs waiting in a sink's queue, sent together (workers.grouping), with real RQ
workers on real Redis and Postgres."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler

from ingest.rq_jobs import FastJSONSerializer, enqueue_batch
from tests.helpers import drain, rows
from workers.grouping import DeliverGroups
from workers.watchdog import IngestWorker


def envelope(n: int, data: dict[str, Any] | None = None) -> dict[str, Any]:
    body = orjson.dumps({"event": "lead.created", "resource": "lead", "workspaceId": "ws",
                         "timestamp": f"2026-06-04T05:{n // 60:02d}:{n % 60:02d}Z",
                         "data": {"id": f"lead_{n}", **(data or {})}})
    return {"id": str(uuid.uuid4()), "provider": "outcaller",
            "received_at": datetime.now(timezone.utc).isoformat(), "headers": {},
            "body": body.decode()}


def deliver_jobs(runtime: Any, *batches: list[dict[str, Any]]) -> list[str]:
    """One deliver job per batch in the Postgres sink's queue, in order (the ingest worker
    runs without groups, as the tests' drain does)."""
    for envelopes in batches:
        enqueue_batch(runtime.ingest_queue, envelopes,
                      runtime.names.job_id("batch", uuid.uuid4().hex))
        SimpleWorker([runtime.ingest_queue], connection=runtime.redis,
                     serializer=FastJSONSerializer).work(burst=True, with_scheduler=False)
    return sink_queue(runtime).get_job_ids()


def sink_queue(runtime: Any) -> Queue:
    return runtime.sink_queue("postgres")


def worker(runtime: Any, abandoned_after: int = 45) -> IngestWorker:
    return IngestWorker([sink_queue(runtime)], connection=runtime.redis,
                        serializer=FastJSONSerializer,
                        name=f"{runtime.names.namespace}-w-{uuid.uuid4().hex[:8]}",
                        names=runtime.names, abandoned_after=abandoned_after,
                        log_job_description=False, groups=DeliverGroups(runtime))


def sends() -> float:
    return REGISTRY.get_sample_value("ingest_sink_seconds_count", {"sink": "postgres"}) or 0.0


def stored(database_url: str) -> list[str]:
    return [r["resource_id"] for r in rows(
        database_url, "SELECT resource_id FROM webhook_events ORDER BY resource_id")]


def test_waiting_deliver_jobs_go_to_postgres_in_one_send_each_finished_with_its_result(
        runtime: Any, database_url: str) -> None:
    ids = deliver_jobs(runtime, *[[envelope(10 * b + i) for i in range(3)] for b in range(4)])
    assert len(ids) == 4
    before = sends()
    worker(runtime).work(burst=True, with_scheduler=False)

    assert sends() - before == 1  # one transaction for the four jobs
    assert stored(database_url) == sorted(f"lead_{10 * b + i}" for b in range(4) for i in range(3))
    assert len(rows(database_url, "SELECT id FROM webhook_deliveries")) == 12
    for job in Job.fetch_many(ids, connection=runtime.redis, serializer=FastJSONSerializer):
        assert job is not None and job.get_status() == JobStatus.FINISHED
        assert job.return_value() == {"delivered": 3}
    queue = sink_queue(runtime)
    assert queue.count == 0 and queue.intermediate_queue.get_job_ids() == []
    assert StartedJobRegistry(queue.name, connection=runtime.redis).get_job_ids() == []


def test_a_group_whose_send_fails_runs_each_job_alone_and_only_the_bad_event_fails(
        runtime: Any, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # A NUL character: valid JSON, refused by Postgres (jsonb cannot hold \u0000).
    bad = envelope(21, {"note": "a\u0000b"})
    ids = deliver_jobs(runtime, [envelope(10), envelope(11)], [envelope(20), bad],
                       [envelope(30)])
    with caplog.at_level(logging.WARNING, logger="workers.watchdog"):
        worker(runtime).work(burst=True, with_scheduler=False)

    assert "3 jobs run together failed (PermanentSinkError)" in caplog.text
    assert stored(database_url) == ["lead_10", "lead_11", "lead_20", "lead_30"]
    failed = FailedJobRegistry(sink_queue(runtime).name, connection=runtime.redis,
                               serializer=FastJSONSerializer)
    (dead,) = [Job.fetch(i, connection=runtime.redis, serializer=FastJSONSerializer)
               for i in failed.get_job_ids()]
    assert [e["resource_id"] for e in dead.args[1]] == ["lead_21"]
    statuses = [j.get_status() for j in Job.fetch_many(ids, connection=runtime.redis,
                                                        serializer=FastJSONSerializer) if j]
    assert statuses == [JobStatus.FINISHED] * 3  # the bad event's job split it off


def test_jobs_that_would_pass_the_sinks_batch_go_back_to_the_head_of_the_queue_in_order(
        runtime: Any, database_url: str) -> None:
    runtime.sinks["postgres"].batch_events = 4
    sizes = [1, 3, 3, 1]
    ids = deliver_jobs(runtime, *[[envelope(10 * b + i) for i in range(n)]
                                  for b, n in enumerate(sizes)])
    queue = sink_queue(runtime)
    w = worker(runtime)
    first_id = runtime.redis.lmove(queue.key, queue.intermediate_queue_key).decode()
    first = Job.fetch(first_id, connection=runtime.redis, serializer=FastJSONSerializer)

    group = w._gather(first, queue)

    assert [j.id for j in group] == ids[:2]  # 1 + 3 events fill the batch of 4
    assert queue.get_job_ids() == ids[2:]  # the others wait as they did, in their order
    assert set(queue.intermediate_queue.get_job_ids()) == set(ids[:2])
    w._execute_group(group, queue)
    worker(runtime).work(burst=True, with_scheduler=False)
    assert len(stored(database_url)) == sum(sizes)


def test_a_worker_that_dies_mid_group_leaves_each_job_to_the_watchdog(
        runtime: Any, database_url: str) -> None:
    ids = deliver_jobs(runtime, [envelope(10)], [envelope(20)], [envelope(30)])
    queue = sink_queue(runtime)
    dead = worker(runtime, abandoned_after=3)
    first_id = runtime.redis.lmove(queue.key, queue.intermediate_queue_key).decode()
    first = Job.fetch(first_id, connection=runtime.redis, serializer=FastJSONSerializer)
    dead._start_group(dead._gather(first, queue), queue)  # ... and then it died, mid-send
    registry = StartedJobRegistry(queue.name, connection=runtime.redis)
    assert sorted(registry.get_job_ids()) == sorted(ids)
    runtime.redis.zadd(registry.key, {m: time.time() - 1
                                      for m in runtime.redis.zrange(registry.key, 0, -1)})

    assert worker(runtime).sweep() == 1
    scheduled = ScheduledJobRegistry(queue.name, connection=runtime.redis,
                                     serializer=FastJSONSerializer)
    assert sorted(scheduled.get_job_ids()) == sorted(ids)  # each retried with its own backoff
    runtime.redis.zadd(scheduled.key, {i: time.time() - 1 for i in ids})
    scheduler = RQScheduler([queue], connection=runtime.redis, serializer=FastJSONSerializer)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    scheduler.release_locks()
    drain(runtime)
    assert stored(database_url) == ["lead_10", "lead_20", "lead_30"]


def test_a_sink_without_batch_events_gets_each_job_alone(runtime: Any) -> None:
    runtime.sinks["postgres"].batch_events = 0
    ids = deliver_jobs(runtime, [envelope(10)], [envelope(20)])
    first = Job.fetch(ids[0], connection=runtime.redis, serializer=FastJSONSerializer)
    assert DeliverGroups(runtime).room(first) == 0
    before = sends()
    worker(runtime).work(burst=True, with_scheduler=False)
    assert sends() - before == 2
