"""The RQ jobs webhook-ingest writes: their serializer, how one is built and written exactly
once, and the retry policy of each job kind.

Shared core: the acceptor (group commit, the spool's drainer), the workers (deliver jobs, set
aside batches), ``ingest dlq retry`` and the lifecycle commands all build jobs here, so a job
looks the same whoever wrote it. Job ids are explicit and writing is unique: a write whose
reply was lost, tried again, never doubles a job.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from typing import Any

import orjson
import rq.job
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job

from ingest import constants

__all__ = [
    "FastJSONSerializer",
    "compress_fast",
    "batch_job",
    "batch_retry",
    "deliver_retry",
    "enqueue_batch",
    "enqueue_new",
    "enqueue_unique",
    "make_job",
]


class FastJSONSerializer:
    """RQ's JSON serializer, with orjson where it gives the same values: the same JSON, which
    any ``JSONSerializer`` reads, several times faster for the large argument lists of batch
    jobs.

    Writing: orjson; what it refuses (an integer past 64 bits from a plugin's parser) the
    standard library writes, as ``JSONSerializer`` would. Reading: orjson when orjson wrote the
    bytes, since it then wrote no integer that orjson would read back as a float (it reads
    integers past 64 bits that way); everything else (the standard library's fallback, jobs
    from other writers, results) is read by the standard library, exact."""

    @staticmethod
    def dumps(obj: Any) -> bytes:
        try:
            return orjson.dumps(obj)
        except TypeError:
            return json.dumps(obj).encode("utf-8")

    @staticmethod
    def loads(data: bytes) -> Any:
        if _written_by_orjson(data):
            return orjson.loads(data)
        return json.loads(data.decode("utf-8"))  # as JSONSerializer reads (exact big integers)


def _written_by_orjson(data: bytes) -> bool:
    """True for a job's data as orjson writes it. RQ's job data is a JSON array whose first
    item is the function's name, ``["workers.jobs.deliver",...``; orjson writes no space
    after that comma, the standard library always writes one (``", "``)."""
    if not data.startswith(b'["'):
        return False
    end = data.find(b'"', 2)
    return end > 0 and data[end + 1:end + 2] == b"," and data[end + 2:end + 3] != b" "


class _FastZlib:
    """What ``rq.job`` uses of zlib, compressing at level 1 instead of 6.

    RQ compresses every job's data when it writes the job; for a batch job at level 6 that is
    a few microseconds per delivery, in the acceptor and in the workers. Level 1 costs about a
    third of that for data about a quarter larger. Any RQ reader decompresses either."""

    error = zlib.error
    decompress = staticmethod(zlib.decompress)

    @staticmethod
    def compress(data: bytes, level: int = constants.JOB_DATA_COMPRESSION) -> bytes:
        return zlib.compress(data, level)


def compress_fast() -> None:
    """Make RQ compress job data at level 1 (:class:`_FastZlib`) in this process from now on.
    Called where our jobs are made (:func:`make_job`, :func:`batch_job`) and by a worker's
    runtime (workers.runtime), which saves jobs too: importing this module changes nothing."""
    if rq.job.zlib is not _FastZlib:  # type: ignore[attr-defined, comparison-overlap]
        rq.job.zlib = _FastZlib  # type: ignore[assignment,attr-defined]


def make_job(queue: Queue, func: str, args: tuple[Any, ...], job_id: str,
             retry: Retry | None, description: str) -> Job:
    """One of our jobs, not yet written: our timeout and TTLs, an explicit id, and a short
    description (RQ's default is the call with its arguments: every body)."""
    compress_fast()
    return queue.create_job(
        func, args=args, job_id=job_id, retry=retry, description=description,
        timeout=constants.JOB_TIMEOUT, result_ttl=constants.RESULT_TTL,
        failure_ttl=constants.FAILED_JOB_TTL,
    )


# When this process last added each queue to RQ's set of queues (``rq:queues``), by key.
_registered: dict[str, float] = {}
# How many job writes this process attempted (see :func:`jobs_written`).
_attempted = 0


def jobs_written() -> int:
    """How many jobs this process has written, or found already written, so far: a worker
    whose job moved this on wrote follow-up jobs, which ``INGEST_REDIS_MIN_REPLICAS`` makes it
    wait for (workers.worker). A job found already written counts too: a retried job's first
    run may have written it without any replica acknowledging it."""
    return _attempted


def enqueue_unique(queue: Queue, job: Job) -> bool:
    """Write ``job`` unless a job with its id exists. True when this call wrote it; False
    when an earlier attempt (whose reply was lost) or another worker already had.

    RQ adds the queue to its set of queues in a round trip of its own before each write (the
    write itself is one script call). Here that happens at most once per
    ``QUEUE_REGISTER_EVERY`` seconds per queue: RQ queues it on the pipeline it is given, and
    the pipeline is sent only when it is due."""
    global _attempted
    _attempted += 1
    with queue.connection.pipeline(transaction=False) as registration:
        try:
            # With unique=True, RQ writes the job at once (the script ignores the pipeline).
            queue.enqueue_job(job, pipeline=registration, unique=True)
        except DuplicateJobError:
            return False
        last = _registered.get(queue.key)
        if last is None or time.monotonic() - last >= constants.QUEUE_REGISTER_EVERY:
            registration.execute()
            _registered[queue.key] = time.monotonic()
    return True


def enqueue_new(queue: Queue, func: str, args: tuple[Any, ...], job_id: str,
                retry: Retry | None, description: str) -> bool:
    """Build and write a job unless one with this id exists. True when this call created it."""
    return enqueue_unique(queue, make_job(queue, func, args, job_id, retry, description))


# -- retry policies, one per job kind ---------------------------------------------------------


def batch_retry() -> Retry:
    """``process_batch``: a batch job fails only when Redis does; short, fixed waits."""
    return Retry(max=len(constants.BATCH_RETRY_INTERVALS),
                 interval=list(constants.BATCH_RETRY_INTERVALS))


def deliver_retry() -> Retry:
    """``deliver``: long waits for a receiver to come back, each ±25%: jitter spreads the
    retries of many jobs that failed together (a receiver outage), also after
    ``ingest dlq retry``."""
    intervals = [max(1, int(i * random.uniform(0.75, 1.25)))
                 for i in constants.DELIVER_RETRY_INTERVALS]
    return Retry(max=len(intervals), interval=intervals)


# -- the batch job -----------------------------------------------------------------------------


def batch_job(queue: Queue, envelopes: list[dict[str, Any]], job_id: str) -> Job:
    """The process_batch job holding ``envelopes``, not yet written."""
    return make_job(queue, constants.PROCESS_BATCH, (envelopes,), job_id, batch_retry(),
                    f"process_batch({len(envelopes)} deliveries)")


def enqueue_batch(queue: Queue, envelopes: list[dict[str, Any]], job_id: str) -> None:
    """Write one process_batch job holding ``envelopes``. Idempotent on ``job_id``."""
    enqueue_unique(queue, batch_job(queue, envelopes, job_id))
