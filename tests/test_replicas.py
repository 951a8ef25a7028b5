"""INGEST_REDIS_MIN_REPLICAS on a real primary with a real replica (two redis-server processes
on random ports): each write a 200 or a finished job stands on waits for the replica, and a
shortfall spools (acceptor), keeps the segment (drainer) or retries the job (worker).

The replica is detached (``REPLICAOF NO ONE``) to make the primary short of replicas, and
attached again to end the shortfall: what a replica that died or lags looks like to ``WAIT``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from ingest.acceptor.durable import Durable
from ingest.acceptor.enqueue import BatchEnqueuer
from ingest.acceptor.spool import Spool
from ingest.commands.embedded import EmbeddedRedis
from ingest.config import Settings
from ingest.constants import Names
from ingest.redis_conn import acceptor_async_redis, acceptor_redis
from ingest.rq_jobs import enqueue_batch
from tests.helpers import wait_until
from workers.runtime import Runtime, install_runtime
from workers.worker import IngestWorker


class Pair:
    """A primary and its replica."""

    def __init__(self, directory: Path) -> None:
        self.primary = EmbeddedRedis(directory / "primary", appendonly=False).start()
        self.replica = EmbeddedRedis(directory / "replica", appendonly=False,
                                     extra_args=["--replicaof", "127.0.0.1",
                                                 str(self.primary.port)]).start()
        self.attach()

    def _replica(self) -> Redis:
        return Redis.from_url(self.replica.url, socket_timeout=2)

    def detach(self) -> None:
        client = self._replica()
        client.execute_command("REPLICAOF", "NO", "ONE")
        client.close()
        primary = Redis.from_url(self.primary.url, socket_timeout=2)
        wait_until(lambda: primary.info("replication")["connected_slaves"] == 0, 10,
                   "the primary to lose its replica")
        primary.close()

    def attach(self) -> None:
        client = self._replica()
        client.execute_command("REPLICAOF", "127.0.0.1", str(self.primary.port))
        wait_until(lambda: client.info("replication").get("master_link_status") == "up", 10,
                   "the replica in sync")
        client.close()
        # The link is up; the primary counts the replica once it acknowledges an offset. Until
        # then a short WAIT may come back short on a loaded machine: wait for one generous one.
        primary = Redis.from_url(self.primary.url, socket_timeout=10)
        try:
            wait_until(lambda: int(primary.execute_command("WAIT", 1, 2000)) >= 1, 30,
                       "the replica to acknowledge the primary's writes")
        finally:
            primary.close()

    def on_replica(self, key: str) -> bool:
        client = self._replica()
        try:
            return bool(client.exists(key))
        finally:
            client.close()

    def stop(self) -> None:
        self.replica.stop(kill=True)
        self.primary.stop(kill=True)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    servers = Pair(tmp_path)
    try:
        yield servers
    finally:
        servers.stop()


def envelope(n: int) -> dict[str, Any]:
    body = orjson.dumps({"event": "lead.created", "resource": "lead", "workspaceId": "ws",
                         "timestamp": f"2026-06-04T05:49:{n:02d}Z",
                         "data": {"id": f"lead_{n}", "email": f"p{n}@example.com"}})
    return {"id": str(uuid.uuid4()), "provider": "outcaller",
            "received_at": datetime.now(timezone.utc).isoformat(), "headers": {},
            "body": body.decode()}


def test_acceptor_answers_from_redis_only_once_the_replica_has_it_else_spools(
        pair: Pair, tmp_path: Path) -> None:
    names = Names("r" + uuid.uuid4().hex[:8])
    url = pair.primary.url
    redis = acceptor_redis(url, 200)
    enqueuer = BatchEnqueuer(redis, acceptor_async_redis(url, 200), names, min_replicas=1,
                             wait_ms=200)
    durable = Durable(redis, enqueuer, Spool(tmp_path / "spool"), drain_interval=0.05)
    spool_dir = tmp_path / "spool"

    async def run() -> list[str]:
        await durable.start()
        try:
            results = [await durable.store(envelope(0))]
            # Its job is on the replica by the time the acceptor answers.
            (job_id,) = enqueuer.queue.get_job_ids()
            assert pair.on_replica(f"rq:job:{job_id}")
            pair.detach()
            results += [await durable.store(envelope(i)) for i in (1, 2)]
            assert durable.spool_depth() == 2
            # The drainer moves them into the primary but keeps the segment: no replica has it.
            await asyncio.sleep(0.5)
            assert durable.spool_depth() == 2
            assert list(spool_dir.glob("seg-*")), "a segment removed that no replica holds"
            await asyncio.get_running_loop().run_in_executor(None, pair.attach)
            for _ in range(200):  # bounded: 10 s
                if durable.spool_depth() == 0 and not durable.redis_failing:
                    break
                await asyncio.sleep(0.05)
            results.append(await durable.store(envelope(3)))
            return results
        finally:
            await durable.stop()

    try:
        assert asyncio.run(run()) == ["accepted", "spooled", "spooled", "accepted"]
        assert list(spool_dir.glob("seg-*")) == []
    finally:
        redis.close()


@pytest.fixture
def replicated_runtime(pair: Pair, make_env: Callable[..., dict[str, str]],
                       database_url: str) -> Iterator[Runtime]:
    settings = Settings.from_env(make_env(database_url, REDIS_URL=pair.primary.url,
                                          INGEST_REDIS_MIN_REPLICAS="1",
                                          INGEST_REDIS_WAIT_MS="100"))
    rt = Runtime(settings)
    previous = install_runtime(rt)
    try:
        yield rt
    finally:
        install_runtime(previous)
        rt.close()


def worker(rt: Runtime) -> IngestWorker:
    return IngestWorker([rt.ingest_queue], connection=rt.redis, serializer=JSONSerializer,
                        name=f"{rt.names.namespace}-w-{uuid.uuid4().hex[:8]}", names=rt.names,
                        min_replicas=rt.settings.redis_min_replicas,
                        wait_ms=rt.settings.redis_wait_ms)


def test_worker_finishes_a_job_only_once_a_replica_has_its_deliver_jobs(
        pair: Pair, replicated_runtime: Runtime) -> None:
    rt = replicated_runtime
    job_id = rt.names.job_id("batch", uuid.uuid4().hex)
    enqueue_batch(rt.ingest_queue, [envelope(1)], job_id)
    sink = rt.sink_queue("postgres")
    pair.detach()
    worker(rt).work(burst=True, with_scheduler=False, logging_level="WARNING")
    job = Job.fetch(job_id, connection=rt.redis, serializer=JSONSerializer)
    # Its deliver job is written, but no replica acknowledged it: the job is retried.
    assert sink.count == 1
    assert job.get_status() == JobStatus.SCHEDULED
    assert job.retries_left is not None and job.retries_left < len(job.retry_intervals or [])

    pair.attach()
    # Its backoff, cut short, as RQ's scheduler ends one: out of the registry, onto the queue.
    rt.ingest_queue.scheduled_job_registry.remove(job)
    rt.ingest_queue.enqueue_job(job)
    worker(rt).work(burst=True, with_scheduler=False, logging_level="WARNING")
    queue = rt.ingest_queue
    # Done: not waiting, not scheduled for a retry, not failed.
    assert queue.count == 0
    assert job_id not in queue.scheduled_job_registry.get_job_ids()
    assert job_id not in queue.failed_job_registry.get_job_ids()
    assert job_id in queue.finished_job_registry.get_job_ids()
    assert sink.count == 1  # the same deliver job id, written again: not doubled
    assert all(pair.on_replica(f"rq:job:{j}") for j in sink.get_job_ids())
