"""Every name, key prefix, TTL and limit in one place.

Redis keys and RQ queue names all pass through :class:`Names`, so two deployments (or two
tests) can share one Redis server by setting different ``INGEST_NAMESPACE`` values.
"""

from __future__ import annotations

import re

# Entry point group for provider plugins (built-ins register here too).
PROVIDER_ENTRY_POINT_GROUP = "webhook_ingest.providers"
# Entry point group for sink plugins (built-ins register here too).
SINK_ENTRY_POINT_GROUP = "webhook_ingest.sinks"

# Default largest request body the acceptor reads (1 MiB); larger ones get 413 while streaming.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
# Shortest provider secret or token accepted at start-up (characters): shorter is guessable.
MIN_SECRET_CHARS = 16
# Deepest JSON nesting (arrays and objects) a delivery body may have; deeper gets 400.
MAX_JSON_DEPTH = 64
# Largest total size of one request's head (request line and headers, bytes); more gets 431.
MAX_HEADER_BYTES = 32 * 1024
# Most header fields one request may carry; more gets 431.
MAX_HEADER_COUNT = 100
# Seconds a sender has to finish sending its body; slower ones get 408 (slow-loris guard).
DEFAULT_BODY_TIMEOUT = 10.0
# Seconds a connection has to send a whole request head, from when it opened or its last
# answer went out: then 408 if part of a head came, else a silent close (INGEST_HEAD_TIMEOUT).
DEFAULT_HEAD_TIMEOUT = 10.0
# Seconds an idle keep-alive connection stays open after its answer (uvicorn's keep-alive).
KEEP_ALIVE_TIMEOUT = 5
# Default most connections the acceptor holds open at once (INGEST_MAX_CONNECTIONS); past it,
# the connection that has waited longest for its request is closed to make room.
DEFAULT_MAX_CONNECTIONS = 4096
# `ingest console`: where it listens unless INGEST_CONSOLE_HOST / INGEST_CONSOLE_PORT say.
DEFAULT_CONSOLE_HOST = "127.0.0.1"
DEFAULT_CONSOLE_PORT = 8001
# How long a console login lasts (seconds) before the token must be given again.
CONSOLE_SESSION_TTL = 12 * 3600
# Events per page of the console's search (and the API's default and largest limit).
CONSOLE_PAGE_SIZE = 50
CONSOLE_MAX_PAGE_SIZE = 500
# Connections the kernel may queue for the acceptor before it accepts them (uvicorn's backlog).
LISTEN_BACKLOG = 2048
# File descriptors `ingest serve` keeps for other than connections (Redis, spool, logs, the
# structure-check processes); the connection limit is lowered to fit the rest of its limit.
FD_RESERVE = 256
# Seconds between two "connection limit reached" log lines (each counts what happened since).
CONNECTION_LIMIT_LOG_EVERY = 10.0
# A body with more JSON containers ([ and {) than this, or more commas than INLINE_MAX_COMMAS,
# is parsed in a separate process: in line, it would hold the event loop for milliseconds.
INLINE_MAX_CONTAINERS = 2048
# See INLINE_MAX_CONTAINERS: commas count the values of arrays and objects.
INLINE_MAX_COMMAS = 16384
# Expensive bodies of one provider checked at once; that provider's others wait their turn.
EXPENSIVE_BODIES_PER_PROVIDER = 1
# Longest an expensive body waits for its provider's turn (seconds): then 503 (Outreach: the
# connection is dropped), well inside senders' own deadlines (Outreach: 5 s), so they retry.
EXPENSIVE_BODY_WAIT = 3.0
# Most processes checking expensive bodies; fewer on small machines (one core stays with the
# event loop).
MAX_STRUCTURE_WORKERS = 4
# Seconds a finished event's dedup record lives in Redis (7 days): redelivery window.
DEFAULT_DEDUP_TTL = 7 * 24 * 3600
# Seconds an in-flight claim lives: a worker that dies holding one frees it after this.
CLAIM_TTL = 600
# Where the acceptor journals deliveries when Redis cannot take them.
DEFAULT_SPOOL_DIR = "./spool"

# Socket deadline for every Redis call the acceptor makes: far inside Outreach's 5 s.
ACCEPTOR_REDIS_TIMEOUT = 0.5
# INGEST_REDIS_WAIT_MS: how long a write waits for INGEST_REDIS_MIN_REPLICAS replicas to
# acknowledge it (WAIT) before the acceptor spools the batch instead, or a worker retries its
# job. A replica on the same network acknowledges within a millisecond or two.
DEFAULT_REDIS_WAIT_MS = 200
# Socket deadline for Redis calls in workers (they can wait longer than the acceptor).
WORKER_REDIS_TIMEOUT = 10.0
# Largest number of deliveries the acceptor groups into one RQ job.
MAX_BATCH_SIZE = 256
# Longest the acceptor holds a batch open (seconds) to let it grow, and only while workers are
# busy (jobs wait or run): a new job would wait for them anyway, and fewer jobs cost them less.
GROUP_COMMIT_MAX_WAIT = 0.025
# Most waiting jobs a worker runs together (workers.grouping): process_batch jobs up to
# MAX_BATCH_SIZE deliveries in all, deliver jobs up to their sink's batch_events.
MAX_GROUP_JOBS = 16
# RQ job timeout for process_batch and deliver jobs (seconds).
JOB_TIMEOUT = 300
# Most events one deliver job holds (workers.fanout); a sink may set a lower job_events. A
# fan-out to a sink larger than its bound becomes a chain of jobs of at most that many.
MAX_JOB_EVENTS = 1000
# Most events one deliver job of an HTTP sink holds (posted one by one), whatever its timeout.
MAX_JOB_EVENTS_HTTP = 100
# The two job functions, by name: whoever enqueues or inspects jobs need not import them.
PROCESS_BATCH = "workers.jobs.process_batch"
DELIVER = "workers.jobs.deliver"
# How long RQ keeps a failed job (and its reason) in the failed registry: 30 days.
FAILED_JOB_TTL = 30 * 24 * 3600
# How long RQ keeps finished job results; we never read them, so keep them briefly.
RESULT_TTL = 60
# zlib level of the job data RQ writes (ingest.rq_jobs): 1 is about three times cheaper
# than RQ's 6 for batches of JSON, for data about a quarter larger.
JOB_DATA_COMPRESSION = 1
# Seconds between a process's writes of a queue's name to RQ's set of queues (ingest.rq_jobs);
# RQ writes it before every job, and it only changes when a queue is new.
QUEUE_REGISTER_EVERY = 60
# Retry schedule (seconds) of process_batch jobs: transient Redis/worker trouble.
BATCH_RETRY_INTERVALS = (1, 5, 15, 60, 300)
# Retry schedule (seconds) of deliver jobs: sinks get a longer backoff; jitter is added.
DELIVER_RETRY_INTERVALS = (5, 15, 60, 300, 900, 1800, 3600)
# Seconds between RQ's own registry maintenance in each worker (our watchdog, which retries
# jobs abandoned by dead workers, sweeps every INGEST_ABANDONED_AFTER / 3 s: workers.watchdog).
WATCHDOG_INTERVAL = 30
# Default seconds a running job may go without a heartbeat before the watchdog treats its
# worker as dead and retries it (INGEST_ABANDONED_AFTER). Workers heartbeat 3 times per period.
DEFAULT_ABANDONED_AFTER = 45
# RQ worker TTL. It also bounds the blocking dequeue (TTL - 15 s), so an idle worker notices a
# frozen Redis, and runs RQ's own maintenance, well within a minute.
WORKER_TTL = 60
# Longest pause (seconds) between a worker's attempts to reach Redis again during an outage.
WORKER_RECONNECT_MAX = 5.0
# Default seconds a starting process (`ingest migrate`, `ingest worker`) waits for Redis or
# Postgres to answer before it gives up (INGEST_STARTUP_WAIT): covers a server still starting.
DEFAULT_STARTUP_WAIT = 60.0
# Longest pause (seconds) between two attempts to reach a server while starting up.
STARTUP_RETRY_MAX = 2.0
# Seconds between two "still waiting" log lines while a starting process waits for a server.
STARTUP_LOG_EVERY = 10.0

# Spool (ingest.acceptor.spool): a segment is sealed once it grows past this many bytes (16 MiB).
SPOOL_SEGMENT_BYTES = 16 * 1024 * 1024
# Seconds between the spool drainer's checks whether Redis answers again.
SPOOL_DRAIN_INTERVAL = 0.5
# Largest record the spool reader accepts; a longer length prefix is corruption, not data.
SPOOL_MAX_RECORD_BYTES = 64 * 1024 * 1024

# HTTP sinks (sinks.crm, sinks.slack): default seconds for one request (CRM_TIMEOUT, SLACK_TIMEOUT).
SINK_HTTP_TIMEOUT = 10.0
# Longest Retry-After (seconds) a sink's retry schedule is stretched to; longer hints are capped.
MAX_RETRY_AFTER = 3600

# Observability (ingest.activity): default INGEST_SILENCE_AFTER for every provider (24 h).
DEFAULT_SILENCE_AFTER = 24 * 3600
# Refused requests kept per provider for `ingest refused` (a capped Redis list).
REFUSAL_LOG_LENGTH = 100
# Seconds the refusal log and the per-minute activity counts live in Redis (7 days).
REFUSAL_LOG_TTL = 7 * 24 * 3600
# Seconds a per-minute activity count lives (long enough for "the last hour").
ACTIVITY_MINUTE_TTL = 2 * 3600
# Longest (seconds) a refusal's Redis write may take; it never delays the answer anyway.
REFUSAL_WRITE_DEADLINE = 0.5
# Most refusal writes in flight per acceptor; a flood of bad requests beyond it is counted only.
REFUSAL_WRITES_IN_FLIGHT = 64
# Most worker entries per queue a scrape checks for liveness (bounds the Redis work per scrape).
SCRAPE_MAX_WORKERS = 100
# `ingest status`: an oldest queued job older than this (seconds) needs attention.
STATUS_OLDEST_LIMIT = 300
# Seconds between an acceptor's registrations of what it serves (ingest.deployment).
DEPLOYMENT_REGISTER_EVERY = 30
# An acceptor that registered within this many seconds counts as running.
DEPLOYMENT_LIVE_AFTER = 90
# A registration this old (seconds) belongs to an acceptor long gone: forgotten.
DEPLOYMENT_FORGET_AFTER = 7 * 86400
# Longest (seconds) one registration write may take; it never holds up the acceptor.
DEPLOYMENT_WRITE_TIMEOUT = 1.0

# Sink outcomes (workers.outcomes): most rows of the Redis backlog (kept while Postgres cannot
# take them) one job writes along with its own; the backlog drains a batch per job.
OUTCOME_BACKLOG_BATCH = 500
# Most rows the backlog holds (about 200 bytes each); past it the oldest are dropped, counted.
OUTCOME_BACKLOG_MAX = 1_000_000
# Seconds a worker writes outcomes only to the backlog after Postgres failed one write, so an
# outage costs a job one Redis call, not a connect timeout.
OUTCOME_RETRY_AFTER = 5.0
# Seconds between a worker's looks at a backlog it has not seen rows in (one LPOP).
OUTCOME_BACKLOG_CHECK_EVERY = 5.0

# Queue name of the batches the acceptor enqueues.
INGEST_QUEUE = "ingest"
# Prefix of each sink's own delivery queue: "sink-postgres", "sink-crm", ...
SINK_QUEUE_PREFIX = "sink-"

# What a namespace may contain: it ends up in RQ job ids, which allow only these characters.
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9_-]{0,40}")


class Names:
    """Queue names, job-id prefixes and Redis keys for one namespace."""

    __slots__ = ("namespace",)

    def __init__(self, namespace: str = "") -> None:
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise ValueError(f"namespace {namespace!r} may hold only letters, digits, _ and -")
        self.namespace = namespace

    def _p(self, name: str) -> str:
        return f"{self.namespace}-{name}" if self.namespace else name

    @property
    def ingest_queue(self) -> str:
        return self._p(INGEST_QUEUE)

    def sink_queue(self, sink: str) -> str:
        return self._p(SINK_QUEUE_PREFIX + sink)

    def job_id(self, kind: str, token: str) -> str:
        return self._p(f"{kind}-{token}")

    def dedup_key(self, provider: str, digest: str) -> str:
        return f"{self._p('ingest')}:dedup:{provider}:{digest}"

    def key(self, name: str) -> str:
        """Any other Redis key of ours (rate limits, spool markers, ...)."""
        return f"{self._p('ingest')}:{name}"

    def __repr__(self) -> str:
        return f"Names(namespace={self.namespace!r})"
