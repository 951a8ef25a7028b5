"""The watchdog with real RQ on real Redis: renewals, abandoned jobs, jobs stuck after a pop."""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.connection as rc
from redis import Redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.suspension import resume, suspend
from rq.worker_registration import get_keys

from ingest.commands.embedded import EmbeddedRedis
from ingest.constants import Names
from ingest.rq_jobs import enqueue_batch

from tests.helpers import drain, rows, wait_until
from workers.worker import IngestWorker


def enqueue_one(runtime: Any, n: int) -> Job:
    body = orjson.dumps({"event": "lead.created", "resource": "lead", "workspaceId": "ws",
                         "timestamp": f"2026-06-04T05:49:{n:02d}Z",
                         "data": {"id": f"lead_{n}", "email": f"p{n}@example.com"}})
    envelope = {"id": str(uuid.uuid4()), "provider": "outcaller",
                "received_at": datetime.now(timezone.utc).isoformat(), "headers": {},
                "body": body.decode()}
    job_id = runtime.names.job_id("batch", uuid.uuid4().hex)
    enqueue_batch(runtime.ingest_queue, [envelope], job_id)
    return Job.fetch(job_id, connection=runtime.redis, serializer=JSONSerializer)


def make_worker(runtime: Any, abandoned_after: int = 3) -> IngestWorker:
    return IngestWorker([runtime.ingest_queue], connection=runtime.redis,
                        serializer=JSONSerializer,
                        # In the test's namespace, so its Redis keys are cleaned up with it.
                        name=f"{runtime.names.namespace}-w-{uuid.uuid4().hex[:8]}",
                        names=runtime.names, abandoned_after=abandoned_after)


def score(runtime: Any, job: Job) -> float:
    registry = StartedJobRegistry(runtime.ingest_queue.name, connection=runtime.redis)
    entries = runtime.redis.zrange(registry.key, 0, -1, withscores=True)
    (found,) = [s for member, s in entries if member.decode().startswith(job.id)]
    return float(found)


def pop(runtime: Any) -> Job:
    """What a worker does first: move the job id into the intermediate queue."""
    queue = runtime.ingest_queue
    job_id = runtime.redis.lmove(queue.key, queue.intermediate_queue.key, "LEFT", "RIGHT")
    return Job.fetch(job_id.decode(), connection=runtime.redis, serializer=JSONSerializer)


def start(worker: IngestWorker, runtime: Any) -> Job:
    """A worker taking the next job, up to the moment its function would run."""
    job = pop(runtime)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    return job


def test_a_running_job_is_registered_briefly_and_renewed(runtime: Any) -> None:
    job = enqueue_one(runtime, 1)
    worker = make_worker(runtime, abandoned_after=30)
    start(worker, runtime)
    first = score(runtime, job)
    assert first <= time.time() + 31  # not RQ's job timeout + 60 s (six minutes)
    runtime.redis.zadd(StartedJobRegistry(job.origin, connection=runtime.redis).key,
                       {m: first - 20 for m in runtime.redis.zrange(
                           StartedJobRegistry(job.origin, connection=runtime.redis).key, 0, -1)})
    worker.renew()
    assert score(runtime, job) >= first - 1  # pushed back out again


def test_a_job_whose_worker_died_is_retried_by_the_next_sweep(runtime: Any,
                                                              database_url: str) -> None:
    job = enqueue_one(runtime, 2)
    dead = make_worker(runtime)
    start(dead, runtime)  # ... and then the worker died: no renewals
    key = StartedJobRegistry(job.origin, connection=runtime.redis).key
    runtime.redis.zadd(key, {m: time.time() - 1 for m in runtime.redis.zrange(key, 0, -1)})

    assert make_worker(runtime).sweep() == 1
    job.refresh()
    assert job.get_status() == JobStatus.SCHEDULED  # retried with its own backoff
    assert job.id in ScheduledJobRegistry(job.origin, connection=runtime.redis,
                                          serializer=JSONSerializer)
    # Once due, it runs and the delivery is stored, once.
    runtime.redis.zadd(ScheduledJobRegistry(job.origin, connection=runtime.redis).key,
                       {job.id: time.time() - 1})
    _promote_and_drain(runtime)
    assert rows(database_url, "SELECT resource_id FROM webhook_events") == [
        {"resource_id": "lead_2"}]


def test_a_job_popped_but_never_started_is_retried_after_one_period(
        runtime: Any, database_url: str) -> None:
    job = enqueue_one(runtime, 3)
    pop(runtime)  # the worker died (or lost Redis) right after the pop
    rescuer = make_worker(runtime)
    rescuer.sweep()
    assert job.id in runtime.ingest_queue.intermediate_queue.get_job_ids()  # first sighting
    runtime.redis.delete(rescuer.names.key(f"watchdog:{runtime.ingest_queue.name}"))
    wait_until(lambda: _swept_again(rescuer, runtime, job), 10, "the stuck job to be retried",
               interval=0.2)
    assert job.id not in runtime.ingest_queue.intermediate_queue.get_job_ids()
    runtime.redis.zadd(ScheduledJobRegistry(job.origin, connection=runtime.redis).key,
                       {job.id: time.time() - 1})
    _promote_and_drain(runtime)
    assert rows(database_url, "SELECT resource_id FROM webhook_events") == [
        {"resource_id": "lead_3"}]


def _swept_again(worker: IngestWorker, runtime: Any, job: Job) -> bool:
    runtime.redis.delete(worker.names.key(f"watchdog:{runtime.ingest_queue.name}"))
    worker.sweep()
    job.refresh()
    return job.get_status() == JobStatus.SCHEDULED


def _promote_and_drain(runtime: Any) -> None:
    from rq.scheduler import RQScheduler

    scheduler = RQScheduler([runtime.ingest_queue], connection=runtime.redis,
                            serializer=JSONSerializer)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    scheduler.release_locks()
    drain(runtime)


def test_a_live_workers_sweep_leaves_a_running_job_alone(runtime: Any) -> None:
    job = enqueue_one(runtime, 4)
    live = make_worker(runtime)
    start(live, runtime)
    assert make_worker(runtime).sweep() == 1
    job.refresh()
    assert job.get_status() == JobStatus.STARTED


def test_a_finished_job_keeps_what_rq_records_without_its_arguments_written_again(
        runtime: Any) -> None:
    """IngestWorker's own success bookkeeping: status, times, result, finished registry, the
    started registry emptied; the job's stored arguments are the bytes the enqueue wrote."""
    job = enqueue_one(runtime, 7)
    stored_data = runtime.redis.hget(job.key, "data")
    worker = make_worker(runtime)
    sent: list[bytes] = []
    original = rc.AbstractConnection.send_packed_command

    def counting(conn: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        original(conn, command, check_health)

    rc.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        worker.work(burst=True, with_scheduler=False)
    finally:
        rc.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]

    job.refresh()
    assert job.get_status() == JobStatus.FINISHED
    assert job.started_at is not None and job.ended_at is not None
    assert job.ended_at >= job.started_at
    assert job.worker_name == worker.name
    assert job.return_value() == {"deliveries": 1, "events": 1, "duplicates": 0, "poisoned": 0}
    assert job.id in runtime.ingest_queue.finished_job_registry.get_job_ids()
    assert job.id not in StartedJobRegistry(runtime.ingest_queue.name,
                                            connection=runtime.redis).get_job_ids()
    assert runtime.redis.hget(job.key, "data") == stored_data
    assert 0 < runtime.redis.ttl(job.key) <= 60  # RESULT_TTL, as RQ would set it
    # The job's arguments went to Redis once (the enqueue), not again at its end.
    assert sent and not any(stored_data in command for command in sent)


def test_the_workers_own_heartbeat_is_sent_once_per_period(runtime: Any) -> None:
    worker = make_worker(runtime)
    worker.register_birth()
    try:
        worker.heartbeat()
        first = runtime.redis.hget(worker.key, "last_heartbeat")
        runtime.redis.hset(worker.key, "last_heartbeat", "marker")
        worker.heartbeat()  # within the period, the same expiry: nothing sent
        assert runtime.redis.hget(worker.key, "last_heartbeat") == b"marker"
        worker.heartbeat(worker.worker_ttl + 600)  # a longer expiry is always sent
        assert runtime.redis.hget(worker.key, "last_heartbeat") not in (b"marker", None)
        assert runtime.redis.ttl(worker.key) > worker.worker_ttl + 60
        assert first is not None
        worker.set_state("busy")
        runtime.redis.hset(worker.key, "state", "marker")
        worker.set_state("busy")  # unchanged: not written again
        assert runtime.redis.hget(worker.key, "state") == b"marker"
        worker.set_state("idle")
        assert runtime.redis.hget(worker.key, "state") == b"idle"
    finally:
        worker.register_death()


def test_a_job_starts_in_one_write_and_leaves_its_worker_idle(runtime: Any) -> None:
    """The execution record waits for the job's own start bookkeeping, then both go at once;
    the worker's "idle" goes with the job's success."""
    enqueue_one(runtime, 8)
    worker = make_worker(runtime)
    worker.register_birth()
    try:
        job = pop(runtime)
        execution = worker.prepare_execution(job)
        started = StartedJobRegistry(runtime.ingest_queue.name, connection=runtime.redis)
        assert started.get_job_ids() == []  # nothing written yet
        assert runtime.redis.hget(job.key, "status") == b"queued"
        assert worker.perform_job(job, runtime.ingest_queue, execution)
        job.refresh()
        assert job.get_status() == JobStatus.FINISHED
        assert started.get_job_ids() == []
        assert runtime.ingest_queue.intermediate_queue.get_job_ids() == []
        assert runtime.redis.hget(worker.key, "state") == b"idle"
    finally:
        worker.register_death()


def test_sigterm_just_after_the_worker_registers_stops_it_cleanly(
        runtime: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """RQ registers a worker a few calls before it installs its own SIGTERM handler. A SIGTERM
    in that window (a deploy stopping a worker that just started) stops it before it pops a job,
    and unregisters it, instead of killing the process by the signal's default action."""
    job = enqueue_one(runtime, 9)
    worker = make_worker(runtime)
    register_birth = worker.register_birth

    def register_then_signal() -> None:
        register_birth()
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode

    monkeypatch.setattr(worker, "register_birth", register_then_signal)
    escaped: list[int] = []  # stands in for the default action, which would end pytest
    previous = {sig: signal.signal(sig, lambda signum, frame: escaped.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.work(burst=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert escaped == []
    assert worker.stop_requested_by_signal
    assert runtime.ingest_queue.get_job_ids() == [job.id]  # left for the next worker
    # Unregistered on the way out, as after any warm shutdown.
    assert worker.key not in get_keys(runtime.ingest_queue)
    assert runtime.redis.hget(worker.key, "death") is not None


def test_rq_suspend_still_stops_a_worker_within_about_a_second(tmp_path: Path) -> None:
    """``rq suspend`` sets a key of RQ's own, outside any namespace: on a Redis of this test's
    own. A burst worker that finds it stops (RQ raises StopRequested); it is read once a
    second, not before every job."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    try:
        connection = Redis.from_url(server.url)
        worker = IngestWorker([Queue("q", connection=connection)], connection=connection,
                              serializer=JSONSerializer, names=Names("suspend-test"))
        worker.check_for_suspension(burst=True)  # not suspended: goes on
        suspend(connection)
        worker.check_for_suspension(burst=True)  # asked within the second: not yet seen
        time.sleep(1.1)
        with pytest.raises(StopRequested):
            worker.check_for_suspension(burst=True)
        resume(connection)
        connection.close()
    finally:
        server.stop(kill=True)
