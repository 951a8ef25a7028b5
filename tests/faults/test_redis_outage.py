"""Redis stopped for ten seconds, and Redis killed and restarted, under continuous traffic."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from rq import Queue
from rq.serializers import JSONSerializer

from ingest.acceptor.app import create_app
from tests.faults.conftest import Stack, Traffic
from tests.helpers import serve, wait_until

pytestmark = pytest.mark.fault


def spool_depth(url: str) -> int:
    return int(httpx.get(f"{url}/readyz", timeout=5).json()["spool_depth"])


def spooled_count(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.findall(r'ingest_deliveries_total\{provider="\w+",result="spooled"\} (\S+)', text)
    return sum(float(v) for v in found)


def test_redis_down_for_ten_seconds_spool_absorbs_then_drains(stack: Stack) -> None:
    assert stack.redis_server is not None
    supervisor = stack.start_workers()
    stack.wait_for_workers()
    workers_before = {q: p.pid for q, p in stack.children(supervisor).items()}
    schedulers = [c for p in stack.children(supervisor).values() for c in p.children()]
    assert len(schedulers) == len(workers_before)  # one RQ scheduler per worker process
    with serve(create_app(stack.settings)) as acceptor:
        spooled_before = spooled_count(acceptor.url)
        traffic = Traffic(acceptor.url)
        with traffic.flowing():
            stack.redis_server.stop()
            down_since = time.monotonic()
            during = len(traffic.accepted)
            wait_until(lambda: spool_depth(acceptor.url) > 0, 10, "deliveries in the spool")
            traffic.wait_for_accepted(during + 30)  # still answered 200 with Redis gone
            while time.monotonic() - down_since < 10:
                time.sleep(0.2)
            assert httpx.get(f"{acceptor.url}/readyz", timeout=5).status_code == 503
            stack.redis_server.start()
            traffic.wait_for_accepted(len(traffic.accepted) + 20)
        wait_until(lambda: spool_depth(acceptor.url) == 0, 30, "the spool to drain")
        stack.wait_for_pipeline(traffic, timeout=90)
        assert spooled_count(acceptor.url) - spooled_before >= 30
    # The workers waited the outage out in the same processes: nothing had to restart them.
    assert {q: p.pid for q, p in stack.children(supervisor).items()} == workers_before
    # And so did their schedulers, which re-enqueue retries: RQ's own would have died.
    assert all(s.is_running() and s.status() != "zombie" for s in schedulers)
    assert list((stack.logs.parent / "spool").glob("seg-*")) == []
    stack.assert_invariants(traffic)


def test_redis_killed_and_restarted_with_aof_loses_no_acknowledged_delivery(
        stack: Stack) -> None:
    assert stack.redis_server is not None
    supervisor = stack.start_workers()
    stack.wait_for_workers()
    with serve(create_app(stack.settings)) as acceptor:
        traffic = Traffic(acceptor.url)
        with traffic.flowing():
            # Freeze the ingest worker so acknowledged batches pile up in Redis, unprocessed.
            ingest = stack.children(supervisor)[stack.names.ingest_queue]
            ingest.suspend()
            redis = stack.redis()
            queue = Queue(stack.names.ingest_queue, connection=redis, serializer=JSONSerializer)
            wait_until(lambda: queue.count >= 10, 30, "batches waiting in Redis")
            waiting = set(queue.get_job_ids())
            redis.close()

            stack.redis_server.stop(kill=True)  # SIGKILL: no shutdown, no final AOF rewrite
            stack.redis_server.start()

            redis = stack.redis()
            kept = set(Queue(stack.names.ingest_queue, connection=redis,
                             serializer=JSONSerializer).get_job_ids())
            redis.close()
            assert waiting <= kept, f"lost with the Redis process: {sorted(waiting - kept)[:5]}"
            ingest.resume()
            traffic.wait_for_accepted(len(traffic.accepted) + 20)
        stack.wait_for_pipeline(traffic, timeout=90)
    stack.assert_invariants(traffic)
