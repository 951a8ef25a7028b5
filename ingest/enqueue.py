"""Group commit: deliveries that arrive together go to Redis as one RQ job.

Each request hands its envelope to :meth:`BatchEnqueuer.submit` and waits. If no flush is in
flight, a flush starts at once with just that envelope (light load: a batch of one, no added
latency). Envelopes that arrive while a flush is in flight wait for the next flush, which takes
all of them (up to ``MAX_BATCH_SIZE``) in one job and one Redis round trip. So the batch size
adapts to the load by itself, and no request waits for a timer.

A job is written with an explicit id and ``unique=True`` (one Lua script: check, save, push).
If the reply to a write is lost and redis-py retries it, the retry finds the job already there
(``DuplicateJobError``) and counts as success: a lost reply never doubles a job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.serializers import JSONSerializer

from ingest import constants, metrics

__all__ = ["BatchEnqueuer", "enqueue_batch"]

log = logging.getLogger(__name__)

# The job function, by name: the acceptor never imports worker code.
PROCESS_BATCH = "workers.jobs.process_batch"


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
                 max_batch: int = constants.MAX_BATCH_SIZE) -> None:
        self.queue = Queue(names.ingest_queue, connection=redis, serializer=JSONSerializer)
        self.names = names
        self.max_batch = max_batch
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # One thread: flushes are sequential by design, and redis-py's sync client is simplest.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enqueue")

    async def submit(self, envelope: dict[str, Any]) -> None:
        """Return once ``envelope`` is in Redis; raise the Redis error if it could not be."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((envelope, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        # shield: a client hanging up must not cancel the write other requests share.
        await asyncio.shield(future)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            envelopes = [envelope for envelope, _ in batch]
            job_id = self.names.job_id("batch", uuid.uuid4().hex)
            try:
                await loop.run_in_executor(
                    self._executor, enqueue_batch, self.queue, envelopes, job_id
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            metrics.BATCH_SIZE.observe(len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
