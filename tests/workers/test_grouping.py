"""Jobs waiting in a queue, run together with the one a worker popped (workers.grouping):
deliver jobs in one send, process_batch jobs as one batch. Real RQ workers on real Redis and
Postgres."""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler

from ingest.rq_jobs import FastJSONSerializer, enqueue_batch
from tests.helpers import SimpleWorker, drain, rows
from workers.grouping import Groups
from workers.worker import IngestWorker


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
                        log_job_description=False, groups=Groups(runtime))


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
    # A value past a btree entry's limit in an index an operator added (SQLSTATE 54000):
    # refused by Postgres, for this event alone (a U+0000 is stored sanitized since 0009).
    import os

    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE INDEX ON webhook_events ((data->>'note'))")
    bad = envelope(21, {"note": os.urandom(4000).hex()})
    ids = deliver_jobs(runtime, [envelope(10), envelope(11)], [envelope(20), bad],
                       [envelope(30)])
    with caplog.at_level(logging.WARNING, logger="workers.worker"):
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
    assert Groups(runtime).room(first) == 0
    before = sends()
    worker(runtime).work(burst=True, with_scheduler=False)
    assert sends() - before == 2


def test_a_worker_that_last_found_its_queue_empty_takes_the_next_job_alone(
        runtime: Any, database_url: str) -> None:
    """Its last success pipeline read the queue's length: no round trip asks for more jobs
    when none waited then. Jobs queued since are grouped from the next job on."""
    w = worker(runtime)
    deliver_jobs(runtime, [envelope(1)])
    w.work(burst=True, with_scheduler=False)
    deliver_jobs(runtime, *[[envelope(10 * b)] for b in range(1, 6)])
    before = sends()
    w.work(burst=True, with_scheduler=False)
    assert sends() - before == 2  # the first alone, then the four behind it together
    assert len(stored(database_url)) == 6


# -- process_batch jobs ------------------------------------------------------------------------


def batch_jobs(runtime: Any, *batches: list[dict[str, Any]]) -> list[str]:
    ids = []
    for envelopes in batches:
        ids.append(runtime.names.job_id("batch", uuid.uuid4().hex))
        enqueue_batch(runtime.ingest_queue, envelopes, ids[-1])
    return ids


def ingest_worker(runtime: Any) -> IngestWorker:
    return IngestWorker([runtime.ingest_queue], connection=runtime.redis,
                        serializer=FastJSONSerializer,
                        name=f"{runtime.names.namespace}-w-{uuid.uuid4().hex[:8]}",
                        names=runtime.names, log_job_description=False, groups=Groups(runtime))


def test_waiting_batches_run_as_one_and_write_one_deliver_job_per_sink(
        runtime: Any, database_url: str) -> None:
    ids = batch_jobs(runtime, [envelope(10), envelope(11)], [envelope(20), envelope(10)],
                     [envelope(30)])
    ingest_worker(runtime).work(burst=True, with_scheduler=False)

    (deliver,) = Job.fetch_many(sink_queue(runtime).get_job_ids(), connection=runtime.redis,
                                serializer=FastJSONSerializer)
    assert deliver is not None and len(deliver.args[1]) == 4  # lead_10 once
    results = [j.return_value() for j in Job.fetch_many(ids, connection=runtime.redis,
                                                        serializer=FastJSONSerializer) if j]
    assert results == [{"deliveries": 2, "events": 2, "duplicates": 0, "poisoned": 0},
                       {"deliveries": 2, "events": 1, "duplicates": 1, "poisoned": 0},
                       {"deliveries": 1, "events": 1, "duplicates": 0, "poisoned": 0}]
    drain(runtime)
    assert stored(database_url) == ["lead_10", "lead_11", "lead_20", "lead_30"]


def test_each_event_of_a_group_is_claimed_for_its_own_job_so_each_retry_delivers_its_own(
        runtime: Any, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The group fails after its claims (as a worker dying there would leave them): each job
    then runs alone and finds its own events claimed by itself, not by the group's first."""
    import workers.jobs

    real = workers.jobs.enqueue_deliveries
    calls = []

    def fail_once(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("lost Redis after the claims")
        return real(*args, **kwargs)

    monkeypatch.setattr(workers.jobs, "enqueue_deliveries", fail_once)
    batch_jobs(runtime, [envelope(10)], [envelope(20)], [envelope(30)])
    ingest_worker(runtime).work(burst=True, with_scheduler=False)

    assert len(calls) == 4  # the group's, then each job's own
    drain(runtime)
    assert stored(database_url) == ["lead_10", "lead_20", "lead_30"]


def test_a_delivery_that_cannot_be_read_in_a_group_is_set_aside_by_its_own_job(
        runtime: Any, database_url: str) -> None:
    broken = {**envelope(21), "body": "{\"event\": \"lead.created\"}"}  # no resource, no data
    batch_jobs(runtime, [envelope(10)], [envelope(20), broken], [envelope(30)])
    ingest_worker(runtime).work(burst=True, with_scheduler=False)  # the set-aside job too

    failed = FailedJobRegistry(runtime.ingest_queue.name, connection=runtime.redis,
                               serializer=FastJSONSerializer)
    (alone,) = [Job.fetch(i, connection=runtime.redis, serializer=FastJSONSerializer)
                for i in failed.get_job_ids()]
    assert alone.args[0] == [broken]
    drain(runtime)
    assert stored(database_url) == ["lead_10", "lead_20", "lead_30"]


def test_a_set_aside_delivery_never_joins_a_group(runtime: Any) -> None:
    groups = Groups(runtime)
    (normal, alone) = (runtime.names.job_id("batch", "b1"), runtime.names.job_id("alone", "a1"))
    enqueue_batch(runtime.ingest_queue, [envelope(1)], normal)
    enqueue_batch(runtime.ingest_queue, [envelope(2)], alone)
    first, other = Job.fetch_many([normal, alone], connection=runtime.redis,
                                  serializer=FastJSONSerializer)
    assert first is not None and other is not None
    assert groups.room(first) > 0 and groups.room(other) == 0
    assert groups.select(first, [other]) == 0


def test_each_delivery_of_a_group_is_logged_with_the_job_it_came_in(
        runtime: Any, caplog: pytest.LogCaptureFixture) -> None:
    one, two = envelope(10), envelope(20)
    ids = batch_jobs(runtime, [one], [two])
    with caplog.at_level(logging.DEBUG, logger="workers.jobs"):
        ingest_worker(runtime).work(burst=True, with_scheduler=False)
    lines = {r.delivery_id: r.job_id for r in caplog.records
             if r.getMessage().startswith("delivery processed")}
    assert lines == {one["id"]: ids[0], two["id"]: ids[1]}
    assert any(r.getMessage().startswith("batches processed: 2 jobs") for r in caplog.records)
