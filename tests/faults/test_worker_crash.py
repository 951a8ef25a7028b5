"""Workers killed with SIGKILL mid-job, and stopped with SIGTERM mid-job, under real traffic."""

from __future__ import annotations

import signal
import uuid
from datetime import datetime, timezone

import psutil
import psycopg
import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ingest.acceptor.app import create_app
from ingest.rq_jobs import enqueue_batch
from tests.faults.conftest import Stack, Traffic, outcaller_delivery
from tests.helpers import serve, wait_until

pytestmark = pytest.mark.fault


def big_batch(stack: Stack, traffic: Traffic, first: int, count: int) -> str:
    """Enqueue one process_batch job of ``count`` deliveries, as the acceptor would, and count
    them as acknowledged. Big, so the worker is certainly mid-batch for a while."""
    envelopes = []
    for n in range(first, first + count):
        provider, body, _, resource_id = outcaller_delivery(n)
        envelopes.append({"id": str(uuid.uuid4()), "provider": provider,
                          "received_at": datetime.now(timezone.utc).isoformat(),
                          "headers": {}, "body": body.decode()})
        traffic.sent.add((provider, resource_id))
        traffic.accepted.add((provider, resource_id))
    redis = stack.redis()
    job_id = stack.names.job_id("batch", uuid.uuid4().hex)
    enqueue_batch(Queue(stack.names.ingest_queue, connection=redis, serializer=JSONSerializer),
                  envelopes, job_id)
    redis.close()
    return job_id


def kill(worker: psutil.Process) -> list[psutil.Process]:
    """SIGKILL ``worker``; return its children (RQ's scheduler), which must not outlive it."""
    children = worker.children(recursive=True)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    return children


def kill_while_running(stack: Stack, worker: psutil.Process, job_id: str) -> list[psutil.Process]:
    """SIGKILL ``worker`` at a moment it is running ``job_id``: freeze it, look, then kill it
    (or let it go on and look again)."""
    redis = stack.redis()
    try:
        for _ in range(2000):
            worker.send_signal(signal.SIGSTOP)
            status = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status()
            if status == JobStatus.STARTED:
                return kill(worker)
            worker.send_signal(signal.SIGCONT)
            if status in (JobStatus.FINISHED, JobStatus.FAILED):
                raise AssertionError(f"job finished ({status}) before it could be killed")
            psutil.wait_procs([], timeout=0.005)
        raise AssertionError("the worker never started the job")
    finally:
        redis.close()


def test_sigkill_of_workers_mid_job_loses_and_doubles_nothing(stack: Stack) -> None:
    supervisor = stack.start_workers()
    stack.wait_for_workers()
    with serve(create_app(stack.settings)) as acceptor:
        traffic = Traffic(acceptor.url)
        with traffic.flowing():
            # 1. The ingest worker, killed in the middle of a 2000-delivery batch.
            ingest = stack.children(supervisor)[stack.names.ingest_queue]
            job_id = big_batch(stack, traffic, first=1_000_000, count=2000)
            left = kill_while_running(stack, ingest, job_id)

            # 2. The postgres sink worker, killed inside a deliver job: the test holds a lock
            # that makes the job's INSERT wait, so "mid-job" is certain, not a race.
            sink_queue = stack.names.sink_queue("postgres")
            wait_until(lambda: sink_queue in stack.children(supervisor) and
                       stack.children(supervisor)[sink_queue].is_running(), 30, "sink worker")
            sink = stack.children(supervisor)[sink_queue]
            with psycopg.connect(stack.database_url) as locker:
                locker.execute("LOCK TABLE webhook_events IN SHARE ROW EXCLUSIVE MODE")
                traffic.wait_for_accepted(len(traffic.accepted) + 10)
                wait_until(lambda: _insert_waiting(stack.database_url), 30,
                           "a deliver job blocked on the lock")
                left += kill(sink)
            traffic.wait_for_accepted(len(traffic.accepted) + 20)
        stack.wait_for_pipeline(traffic, timeout=90)

    # The supervisor replaced both, and RQ's scheduler children did not outlive them.
    children = stack.children(supervisor)
    assert children[stack.names.ingest_queue].pid != ingest.pid
    assert children[sink_queue].pid != sink.pid
    assert left, "the killed workers had no scheduler child: nothing checked"
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                               for p in left), 15, "the killed workers' scheduler children to exit")
    stack.assert_invariants(traffic)
    assert Job.fetch(job_id, connection=stack.redis(), serializer=JSONSerializer) \
        .get_status() in (JobStatus.FINISHED, None)


def _insert_waiting(database_url: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'webhook-ingest' "
            "AND wait_event_type = 'Lock' AND query ILIKE '%%INSERT INTO webhook_events%%'"
        ).fetchone()
    return bool(found and found[0])


def test_sigterm_finishes_the_job_in_hand_before_exiting(stack: Stack) -> None:
    sink_queue = stack.names.sink_queue("postgres")
    stack.start_workers(stack.names.ingest_queue)
    sink_worker = stack.start_workers(sink_queue)
    stack.wait_for_workers()
    with serve(create_app(stack.settings)) as acceptor:
        traffic = Traffic(acceptor.url, concurrency=1)
        with psycopg.connect(stack.database_url) as locker:
            locker.execute("LOCK TABLE webhook_events IN SHARE ROW EXCLUSIVE MODE")
            with traffic.flowing(5):
                wait_until(lambda: _insert_waiting(stack.database_url), 30,
                           "a deliver job blocked on the lock")
            sink_worker.send_signal(signal.SIGTERM)
            # It must not exit while its job waits for the lock ...
            with pytest.raises(psutil.TimeoutExpired):
                psutil.Process(sink_worker.pid).wait(timeout=1)
        # ... and once the lock is gone, it finishes the job, then exits cleanly.
        assert sink_worker.wait(timeout=30) == 0
        stored_before_restart = stack.stored()
        assert stored_before_restart, "the job in hand was not finished"
        stack.start_workers(sink_queue)  # for whatever was queued behind it
        stack.wait_for_pipeline(traffic, timeout=60)
    log = (stack.logs / "worker-1.log").read_text()
    assert "warm shut down requested" in log
    stack.assert_invariants(traffic)


def test_sigkill_of_a_sink_worker_mid_group_retries_each_job_alone(stack: Stack) -> None:
    """Deliver jobs wait while no sink worker runs; the one started then takes them as one
    group (workers.grouping), whose insert the test holds on a lock; killed there, every job
    of the group is retried alone, and nothing is lost or doubled."""
    sink_queue = stack.names.sink_queue("postgres")
    stack.start_workers(stack.names.ingest_queue)
    redis = stack.redis()
    queue = Queue(sink_queue, connection=redis, serializer=JSONSerializer)
    try:
        with serve(create_app(stack.settings)) as acceptor:
            traffic = Traffic(acceptor.url)
            with traffic.flowing(60):
                wait_until(lambda: queue.count >= 4, 30, "deliver jobs waiting")
            with psycopg.connect(stack.database_url) as locker:
                locker.execute("LOCK TABLE webhook_events IN SHARE ROW EXCLUSIVE MODE")
                sink = psutil.Process(stack.start_workers(sink_queue).pid)
                wait_until(lambda: _insert_waiting(stack.database_url), 30,
                           "the group's insert blocked on the lock")
                running = queue.started_job_registry.get_job_ids()
                assert len(running) >= 2, f"one job ran alone, not a group: {running}"
                left = kill(sink)
            stack.start_workers(sink_queue)
            stack.wait_for_pipeline(traffic, timeout=90)
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                   for p in left), 15, "the killed worker's scheduler to exit")
        stack.assert_invariants(traffic)
        for job_id in running:  # each finished on its own retry
            assert Job.fetch(job_id, connection=redis,
                             serializer=JSONSerializer).get_status() == JobStatus.FINISHED
    finally:
        redis.close()
