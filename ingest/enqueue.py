"""Group commit: deliveries that arrive together go to Redis as one RQ job.

Each request hands its envelope to :meth:`BatchEnqueuer.submit` and waits. If no flush is in
flight, a flush starts at once with just that envelope (light load: a batch of one, no added
latency). Envelopes that arrive while a flush is in flight wait for the next flush, which takes
all of them (up to ``MAX_BATCH_SIZE``) in one job and one Redis round trip. So the batch size
adapts to the load by itself.

That alone leaves batches small under moderate, spread-out load (a flush takes a fraction of a
millisecond, so deliveries 1 ms apart each get a job of their own), and RQ's cost per job, not
per delivery, then caps what the workers can take: they fall behind and latency grows without
bound. So each flush also reads how many jobs wait in the pipeline's queues (one pipelined LLEN
per queue). While jobs wait, the workers are behind, a delivery would wait in the queue anyway,
and the next flush holds its batch open to let it grow: until it is full, or
``GROUP_COMMIT_MAX_WAIT`` after the previous flush started, or arrivals pause for three times
their usual spacing (every sender is already waiting on us: more waiting cannot grow the batch).
When the queues are empty again, flushes go out at once. A negative feedback loop: the further
behind the workers are, the fewer and larger the jobs they get.

A job is written with an explicit id and ``unique=True`` (one Lua script: check, save, push).
If the reply to a write is lost and redis-py retries it, the retry finds the job already there
(``DuplicateJobError``) and counts as success: a lost reply never doubles a job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError

from ingest import constants, metrics

__all__ = ["BatchEnqueuer", "FastJSONSerializer", "enqueue_batch"]

log = logging.getLogger(__name__)

# The job function, by name: the acceptor never imports worker code.
PROCESS_BATCH = "workers.jobs.process_batch"


class FastJSONSerializer:
    """RQ's JSON serializer, writing with orjson: the same JSON, which any ``JSONSerializer``
    (every worker) reads, several times faster for the large argument lists of batch jobs.
    What orjson refuses (an integer past 64 bits from a plugin's parser) is written by the
    standard library as before."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        try:
            return orjson.dumps(obj)
        except TypeError:
            return json.dumps(obj).encode("utf-8")

    @staticmethod
    def loads(data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))  # as JSONSerializer reads (exact big integers)


def enqueue_batch(queue: Queue, envelopes: list[dict[str, Any]], job_id: str) -> None:
    """Write one process_batch job holding ``envelopes``. Idempotent on ``job_id``."""
    try:
        queue.enqueue_call(
            PROCESS_BATCH,
            args=(envelopes,),
            job_id=job_id,
            unique=True,
            timeout=constants.JOB_TIMEOUT,
            result_ttl=constants.RESULT_TTL,
            failure_ttl=constants.FAILED_JOB_TTL,
            retry=Retry(max=len(constants.BATCH_RETRY_INTERVALS),
                        interval=list(constants.BATCH_RETRY_INTERVALS)),
            # RQ's default description is the call with its arguments: every body. Keep it short.
            description=f"process_batch({len(envelopes)} deliveries)",
        )
    except DuplicateJobError:
        pass  # an earlier attempt whose reply was lost already wrote it


class BatchEnqueuer:
    """Adaptive group commit of envelopes into RQ jobs on the ingest queue."""

    def __init__(self, redis: Redis, names: constants.Names,
                 max_batch: int = constants.MAX_BATCH_SIZE,
                 max_wait: float = constants.GROUP_COMMIT_MAX_WAIT) -> None:
        self.queue = Queue(names.ingest_queue, connection=redis, serializer=FastJSONSerializer)
        self.names = names
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # One thread: flushes are sequential by design, and redis-py's sync client is simplest.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enqueue")
        self._watched = [self.queue.key]  # queues whose waiting jobs say the workers are behind
        self._backlog = 0  # jobs waiting in the watched queues, as of the last flush
        # Times are time.perf_counter(): uvloop's loop.time() has a resolution of 1 ms.
        self._last_flush = 0.0  # when the last flush started
        self._last_arrival = 0.0  # when the latest submit came
        self._spacing = 0.0  # smoothed seconds between submits (capped at max_wait)

    def watch(self, queue_names: Iterable[str]) -> None:
        """Also count jobs waiting in these queues (the sinks' queues) as workers behind."""
        for name in queue_names:
            key = Queue(name, connection=self.queue.connection).key
            if key not in self._watched:
                self._watched.append(key)

    async def submit(self, envelope: dict[str, Any]) -> None:
        """Return once ``envelope`` is in Redis; raise the Redis error if it could not be."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        self._spacing += (min(now - self._last_arrival, self.max_wait) - self._spacing) * 0.2
        self._last_arrival = now
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((envelope, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        # shield: a client hanging up must not cancel the write other requests share.
        await asyncio.shield(future)

    async def _linger(self) -> None:
        """Let the batch grow while the workers are behind (see the module docstring)."""
        deadline = self._last_flush + self.max_wait
        while len(self._pending) < self.max_batch:
            wake = min(deadline, self._last_arrival + 3 * self._spacing)
            wait = wake - time.perf_counter()
            if wait <= 0:
                return
            # Below the loop's 1 ms timer resolution, let one loop iteration run instead (it
            # reads whatever requests have arrived) and look again.
            await asyncio.sleep(wait if wait >= 0.001 else 0)

    def _waiting_jobs(self) -> int:
        """Jobs waiting in the watched queues (0 when Redis does not say)."""
        try:
            pipe = self.queue.connection.pipeline(transaction=False)
            for key in self._watched:
                pipe.llen(key)
            return sum(pipe.execute())
        except (RedisError, OSError):
            return 0

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._backlog:
                await self._linger()
            self._last_flush = time.perf_counter()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            envelopes = [envelope for envelope, _ in batch]
            job_id = self.names.job_id("batch", uuid.uuid4().hex)
            try:
                await loop.run_in_executor(
                    self._executor, enqueue_batch, self.queue, envelopes, job_id
                )
            except Exception as exc:
                self._backlog = 0
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            metrics.BATCH_SIZE.observe(len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            # After answering, so it adds nothing to their latency; the next batch grows
            # meanwhile, which is the point.
            self._backlog = await loop.run_in_executor(self._executor, self._waiting_jobs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
