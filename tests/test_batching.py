"""Group commit stays on: a burst of deliveries through a real acceptor becomes few RQ jobs.

Throughput rests on this (see docs/performance.md): RQ's cost is per job, so a worker keeps up
with a burst only because the acceptor packs it into few jobs. These tests count jobs, they do
not time anything: a change that quietly gave every delivery a job of its own fails here.

The burst comes from the bench's load generator (bench/loadgen.py) in a process of its own:
signed Outreach deliveries with unique ids, over raw keep-alive connections, each sending its
next request as soon as the previous is answered. A client in the test's own process would
share the acceptor's interpreter lock, and an httpx client (``ingest send``) cannot send fast
enough to make a burst: both would trickle, which is not what this guards.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from ingest.config import Settings
from ingest.acceptor.enqueue import _OneTripWriter
from ingest.rq_jobs import FastJSONSerializer, batch_job, enqueue_batch
from ingest.redis_conn import acceptor_async_redis
from ingest.commands.samples import build_sample
from tests.helpers import SECRETS

BURST = 200  # deliveries sent at once
CONNECTIONS = 50  # concurrent connections the burst is sent over
ROOT = Path(__file__).resolve().parent.parent


def _queued(settings: Settings) -> list[list[dict[str, Any]]]:
    """The envelopes of each job waiting in the ingest queue (no worker runs here)."""
    redis = Redis.from_url(settings.require_redis())
    try:
        queue = Queue(settings.names.ingest_queue, connection=redis, serializer=JSONSerializer)
        return [list(job.args[0]) for job in queue.get_jobs()]
    finally:
        redis.close()


def test_a_burst_of_deliveries_becomes_far_fewer_jobs_each_delivery_in_exactly_one(
        acceptor: Any, settings: Settings) -> None:
    sent = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", f"{acceptor.url}/webhooks/outreach",
         "--secret", SECRETS["outreach"][0], "--connections", str(CONNECTIONS),
         "--count", str(BURST), "--duration", "120", "--warmup", "0", "--ids"],
        capture_output=True, cwd=ROOT, timeout=180)

    assert sent.returncode == 0, sent.stderr.decode(errors="replace")
    report = orjson.loads(sent.stdout)
    assert report["ok"] == report["sent"] == BURST, report
    jobs = _queued(settings)
    queued = Counter(orjson.loads(e["body"])["data"]["id"] for job in jobs for e in job)
    assert queued == Counter(report["accepted"])  # each delivery in exactly one job
    assert len(jobs) <= BURST // 4, f"{BURST} deliveries became {len(jobs)} jobs"


def test_a_lone_delivery_is_written_at_once_as_a_batch_of_one(
        acceptor: Any, settings: Settings) -> None:
    body, headers = build_sample("outreach", SECRETS["outreach"][0], random.Random(8))

    response = httpx.post(f"{acceptor.url}/webhooks/outreach", content=body, headers=headers)

    assert response.status_code == 200
    assert [[e["body"].encode() for e in job] for job in _queued(settings)] == [[body]]


def test_group_commit_writes_the_job_rq_itself_would_write_and_never_twice(
        settings: Settings) -> None:
    redis = Redis.from_url(settings.require_redis())
    queue = Queue(settings.names.ingest_queue, connection=redis, serializer=FastJSONSerializer)
    envelopes = [{"id": "d1", "provider": "outreach", "body": '{"data": {"id": 1}}'}]
    by_rq = settings.names.job_id("batch", "by-rq")
    mine = settings.names.job_id("batch", "one-trip")

    async def write_twice() -> list[list[Any]]:
        writer = _OneTripWriter(queue, acceptor_async_redis(settings.require_redis()))
        try:
            return [await writer.write(batch_job(queue, envelopes, mine),
                                       lambda pipe: pipe.llen(queue.key)) for _ in range(2)]
        finally:
            await writer.redis.aclose()

    try:
        enqueue_batch(queue, envelopes, by_rq)
        replies = asyncio.run(write_twice())

        assert replies == [[2], [2]]  # written once: the second write found the id taken
        assert queue.get_job_ids() == [by_rq, mine]
        theirs, ours = redis.hgetall(f"rq:job:{by_rq}"), redis.hgetall(f"rq:job:{mine}")
        stamps = {b"created_at", b"enqueued_at"}
        assert set(theirs) == set(ours) and stamps <= set(ours)
        assert {k: v for k, v in theirs.items() if k not in stamps} == \
            {k: v for k, v in ours.items() if k not in stamps}
        job = queue.fetch_job(mine)
        assert job is not None and list(job.args) == [envelopes] and job.origin == queue.name
        assert redis.sismember("rq:queues", queue.key)
    finally:
        redis.srem("rq:queues", queue.key)
        redis.close()
