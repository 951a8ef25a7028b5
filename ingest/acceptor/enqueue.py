"""Group commit: deliveries that arrive together go to Redis as one RQ job.

Each request hands its envelope to :meth:`BatchEnqueuer.submit` and waits. If no flush is in
flight, a flush starts at once with just that envelope (light load: a batch of one, no added
latency). Envelopes that arrive while a flush is in flight wait for the next flush, which takes
all of them (up to ``MAX_BATCH_SIZE``) in one job and one Redis round trip. So the batch size
adapts to the load by itself.

That alone leaves batches small under moderate, spread-out load (a flush takes a fraction of a
millisecond, so deliveries 1 ms apart each get a job of their own), and RQ's cost per job (some
18 Redis round trips), not per delivery, then caps what the workers can take: they fall behind
and latency grows without bound. So each flush also asks Redis how busy the workers are: jobs
waiting in each queue of the pipeline (LLEN) and running from it (ZCARD of its started
registry), in the same round trip as the write. While jobs run, a new job would wait for a
worker anyway, so the next flush may hold its batch open to let it grow, for at most a *hold*
after the previous flush started. The hold adapts like TCP's congestion window, the other way
round: it grows (doubles, plus 1 ms) each time jobs are found waiting, up to
``GROUP_COMMIT_MAX_WAIT``, and halves each time the workers are found idle; while they are
idle, flushes go out at once.
A negative feedback loop: the further behind the workers, the fewer and larger the jobs they
get; the less loaded, the less anyone waits.

A held batch also goes out as soon as every connection that sent a request within the last
second has one waiting in it (HTTP/1.1 has one request in flight per connection): nobody else
can add to it, and holding on would only cap senders with a fixed concurrency (and the
closed-loop benchmark) at connections per hold. The acceptor tells the enqueuer which
connection each delivery came over (:meth:`BatchEnqueuer.sender`).

A job is written with an explicit id by RQ's unique-enqueue Lua script (check, save, push).
If the reply to a write is lost and redis-py retries it, the retry finds the job already there
and counts as success: a lost reply never doubles a job. The spool's drainer writes through
RQ's own ``enqueue_job(unique=True)`` (``DuplicateJobError``); group commit writes the same
job (:func:`ingest.rq_jobs.batch_job`), plus its reads, in one pipeline
(:class:`_OneTripWriter`).

With ``INGEST_REDIS_MIN_REPLICAS`` set, the same pipeline ends in a ``WAIT`` for that many
replicas (on the connection that carried the write, so it covers it): a flush whose write
fewer replicas acknowledged within ``INGEST_REDIS_WAIT_MS`` fails its deliveries with
:class:`ingest.redis_conn.ReplicaShortfall`, and the acceptor spools them instead
(:mod:`ingest.acceptor.durable`). A failover can then lose no delivery answered 200.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterable
from typing import Any, cast

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.exceptions import NoScriptError
from rq import Queue
from rq.job import Job
from rq.scripts import UNIQUE_ENQUEUE_SCRIPT
from rq.utils import now

from ingest import constants, metrics
from ingest.activity import note_accepted
from ingest.redis_conn import ReplicaShortfall, add_wait
from ingest.rq_jobs import FastJSONSerializer, batch_job

__all__ = ["BatchEnqueuer"]

log = logging.getLogger(__name__)

# What the group-commit hold grows by (seconds) each time workers are found behind.
_HOLD_STEP = 0.001
# A connection that sent nothing for this long (seconds) no longer counts as a sender.
_SENDER_WINDOW = 1.0


class _OneTripWriter:
    """What ``Queue.enqueue_job(job, unique=True)`` writes, plus the reads group commit needs,
    in one pipeline on the event loop's own Redis client: one round trip per flush instead of
    three (RQ registers the queue, then runs its unique-enqueue script, each a trip of its own),
    and no thread to hand the flush to (a thread would fight the event loop for the GIL).

    It runs RQ's own script (``rq.scripts.UNIQUE_ENQUEUE_SCRIPT``) with the job hash RQ builds
    (``Job.to_dict``, fields as RQ's ``_build_hset_args`` writes them), so a worker cannot tell
    the two apart; tests/test_batching.py compares them field by field.
    """

    def __init__(self, queue: Queue, redis: AsyncRedis) -> None:
        self.queue = queue
        self.redis = redis
        self.sha = hashlib.sha1(UNIQUE_ENQUEUE_SCRIPT.encode()).hexdigest()
        self._server_version: tuple[int, int, int] | None = None

    async def write(self, job: Job, reads: Callable[[AsyncPipeline], object]) -> list[Any]:
        """Write ``job`` unless its id exists; return the replies of what ``reads`` added
        (0 for a read that failed)."""
        queue = self.queue
        if self._server_version is None:  # what RQ records on every job, asked once
            info = await self.redis.info("server")
            self._server_version = cast(tuple[int, int, int], tuple(
                int(part) for part in str(info["redis_version"]).split(".")[:3]))
            # Loaded up front: a NoScriptError re-runs the whole pipeline, and the activity counts
            # in it (ingest.activity) would count that batch twice. After a Redis restart it
            # can still happen once, for one batch's per-minute count.
            await self.redis.script_load(UNIQUE_ENQUEUE_SCRIPT)
        job.redis_server_version = self._server_version
        job.origin = queue.name
        job.enqueued_at = now()
        fields: list[Any] = []
        for key, value in job.to_dict().items():
            if value is not None:
                fields += (key, value if isinstance(value, (bytes, str)) else str(value))
        ttl = job.ttl if job.ttl is not None else -1
        for attempt in (1, 2):
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(queue.redis_queues_keys, queue.key)
            pipe.evalsha(self.sha, 2, job.key, queue.key, job.id, "R", ttl, *fields)
            reads(pipe)
            replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[1], NoScriptError) and attempt == 1:
                await self.redis.script_load(UNIQUE_ENQUEUE_SCRIPT)  # a restarted Redis
                continue
            for reply in replies[:2]:
                if isinstance(reply, Exception):
                    raise reply
            # replies[1] == 0: the job id exists, written by an attempt whose reply was lost.
            # The job is written now: a read Redis refused must not fail the deliveries.
            return [0 if isinstance(r, Exception) else r for r in replies[2:]]
        raise AssertionError("unreachable")


class BatchEnqueuer:
    """Adaptive group commit of envelopes into RQ jobs on the ingest queue."""

    def __init__(self, redis: Redis, async_redis: AsyncRedis, names: constants.Names,
                 max_batch: int = constants.MAX_BATCH_SIZE,
                 max_wait: float = constants.GROUP_COMMIT_MAX_WAIT, min_replicas: int = 0,
                 wait_ms: int = constants.DEFAULT_REDIS_WAIT_MS) -> None:
        self.queue = Queue(names.ingest_queue, connection=redis, serializer=FastJSONSerializer)
        self.names = names
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.min_replicas = min_replicas  # replicas each write waits for (0: none)
        self.wait_ms = wait_ms
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # (queue key, started registry key) of each queue of the pipeline: jobs waiting, running.
        self._watched = [(self.queue.key, self.queue.started_job_registry.key)]
        self._writer = _OneTripWriter(self.queue, async_redis)
        self._waiting = 0  # jobs waiting in the watched queues, as of the last flush
        self._running = 0  # jobs running from them, as of the last flush
        self._hold = 0.0  # how long the next flush may hold its batch open, adapted to load
        self._last_flush = 0.0  # time.perf_counter() when the last flush started
        self._senders: dict[Hashable, float] = {}  # connection -> when it last sent
        self._senders_pruned = 0.0
        self._full: asyncio.Event | None = None  # set while a hold may end early

    @property
    def async_redis(self) -> AsyncRedis:
        """The event loop's own Redis client (also for the acceptor's refusal records)."""
        return self._writer.redis

    def watch(self, queue_names: Iterable[str]) -> None:
        """Also count the jobs of these queues (the sinks' queues) as keeping workers busy."""
        for name in queue_names:
            queue = Queue(name, connection=self.queue.connection)
            keys = (queue.key, queue.started_job_registry.key)
            if keys not in self._watched:
                self._watched.append(keys)

    def sender(self, connection: Hashable) -> None:
        """Note that the next submit comes over ``connection`` (the ASGI client address)."""
        now = time.perf_counter()
        self._senders[connection] = now
        if now - self._senders_pruned > _SENDER_WINDOW / 10:
            self._senders_pruned = now
            for key in [k for k, t in self._senders.items() if now - t > _SENDER_WINDOW]:
                del self._senders[key]

    def _complete(self) -> bool:
        """True when waiting longer cannot grow the batch: it is full, or every sender's
        connection already has a delivery in it."""
        pending = len(self._pending)
        return pending >= self.max_batch or 0 < len(self._senders) <= pending

    async def submit(self, envelope: dict[str, Any]) -> None:
        """Return once ``envelope`` is in Redis; raise the Redis error if it could not be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((envelope, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        elif self._full is not None and self._complete():
            self._full.set()
        # A client hanging up cancels only its own future: the flush, which other requests
        # share, is a task of its own and skips futures that are already done.
        await future

    async def _linger(self) -> None:
        """Let the batch grow while the workers are busy (see the module docstring)."""
        wait = self._last_flush + self._hold - time.perf_counter()
        if wait <= 0 or self._complete():
            return
        self._full = asyncio.Event()
        try:
            async with asyncio.timeout(wait):
                await self._full.wait()
        except TimeoutError:
            pass
        finally:
            self._full = None

    async def _write(self, envelopes: list[dict[str, Any]], job_id: str) -> tuple[int, int]:
        """Enqueue one job and read how busy the workers are: jobs (waiting, running) in the
        watched queues. One round trip to Redis."""
        def busy_reads(pipe: AsyncPipeline) -> None:
            for queue_key, started_key in self._watched:
                pipe.llen(queue_key)
                pipe.zcard(started_key)
            # Last accepted per provider (ingest.activity), in the same round trip.
            note_accepted(pipe, self.names, envelopes)
            if self.min_replicas:  # last: after the write, on its connection
                add_wait(pipe, self.min_replicas, self.wait_ms)

        counts = await self._writer.write(batch_job(self.queue, envelopes, job_id), busy_reads)
        if self.min_replicas and int(counts[-1]) < self.min_replicas:
            # (A WAIT that failed counts 0: the deliveries go to the spool all the same.)
            raise ReplicaShortfall(int(counts[-1]), self.min_replicas, self.wait_ms)
        counts = counts[:2 * len(self._watched)]
        return sum(counts[0::2]), sum(counts[1::2])

    def _adapt(self, waiting: int, running: int) -> None:
        self._waiting, self._running = waiting, running
        if waiting:
            self._hold = min(self.max_wait, self._hold * 2 + _HOLD_STEP)
        elif not running:
            self._hold = self._hold / 2 if self._hold > _HOLD_STEP else 0.0

    async def _flush_loop(self) -> None:
        while self._pending:
            if self._hold and (self._waiting or self._running):
                await self._linger()
            self._last_flush = time.perf_counter()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            envelopes = [envelope for envelope, _ in batch]
            job_id = self.names.job_id("batch", uuid.uuid4().hex)
            try:
                busy = await self._write(envelopes, job_id)
            except Exception as exc:
                self._adapt(0, 0)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self._adapt(*busy)
            metrics.BATCH_SIZE.observe(len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def aclose(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)  # let it finish
        await self._writer.redis.aclose()
