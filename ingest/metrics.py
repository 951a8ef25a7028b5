"""Every Prometheus metric, defined once. Names start with ``ingest_``.

Acceptor metrics are updated in the acceptor process; worker metrics in workers. When
``PROMETHEUS_MULTIPROC_DIR`` is set (several processes behind one scrape), prometheus-client's
multiprocess mode aggregates them; :func:`render` handles both cases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from ingest.events import FALLBACK_FIELDS, Event

__all__ = ["CONTENT_TYPE_LATEST", "ActivityCollector", "render"]

# -- acceptor -------------------------------------------------------------------------------
DELIVERIES = Counter(
    "ingest_deliveries",
    "Deliveries received, by provider and result (accepted, spooled, unauthorized, ...).",
    ["provider", "result"],
)
ENQUEUE_SECONDS = Histogram(
    "ingest_enqueue_seconds",
    "Time a request waited for its delivery to become durable in Redis.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_SIZE = Histogram(
    "ingest_batch_size",
    "Deliveries per RQ job written by the acceptor (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
SPOOL_DEPTH = Gauge(
    "ingest_spool_depth",
    "Deliveries waiting in the local spool for Redis to come back.",
    multiprocess_mode="livesum",
)
OPEN_CONNECTIONS = Gauge(
    "ingest_open_connections",
    "HTTP connections open at the acceptor.",
    multiprocess_mode="livesum",
)
CONNECTION_LIMIT = Gauge(
    "ingest_connection_limit",
    "Most HTTP connections the acceptor holds open at once (INGEST_MAX_CONNECTIONS, lowered "
    "to fit the file-descriptor limit).",
    multiprocess_mode="livesum",
)
CONNECTIONS_CLOSED = Counter(
    "ingest_connections_closed",
    "Connections the acceptor closed before their request had arrived, by reason: "
    "head_timeout (no whole request head within INGEST_HEAD_TIMEOUT), made_room (the limit "
    "was reached: the one waiting longest for its request), refused (the limit was reached "
    "and every open connection had a request in hand: the new one).",
    ["reason"],
)
EXPENSIVE_BODIES = Counter(
    "ingest_expensive_bodies",
    "Bodies parsed in the structure-check processes rather than on the event loop, by "
    "provider and outcome: checked, busy (waited too long for the provider's turn: 503).",
    ["provider", "outcome"],
)

# -- observability (ingest.activity; the Redis-derived gauges are read at scrape time) -------
REFUSED = Counter(
    "ingest_refused",
    "Requests refused, by provider (unknown for a provider not served) and reason.",
    ["provider", "reason"],
)
ACTIVITY_WRITE_ERRORS = Counter(
    "ingest_activity_write_errors",
    "Refusal records not written to Redis (error: Redis failed or was late; dropped: too "
    "many writes in flight). The refusal itself is still counted and answered.",
    ["outcome"],
)

# -- workers --------------------------------------------------------------------------------
EVENTS = Counter(
    "ingest_events", "New events normalized, by provider and kind.", ["provider", "kind"]
)
UNKNOWN_EVENTS = Counter(
    "ingest_unknown_events",
    "Events whose provider event type maps to no kind, by provider and event type.",
    ["provider", "event_type"],
)
DUPLICATES = Counter(
    "ingest_duplicates", "Events dropped as duplicates, by provider.", ["provider"]
)
POISON = Counter(
    "ingest_poison_deliveries",
    "Deliveries that could not be normalized, and events a sink refused for good (data it "
    "cannot store or send), by provider; each is in the failed registry.",
    ["provider"],
)
SINK_EVENTS = Counter(
    "ingest_sink_events", "Events handed to a sink, by sink and outcome.", ["sink", "outcome"]
)
SINK_OUTCOME_ERRORS = Counter(
    "ingest_sink_outcome_errors",
    "Sink outcome rows a worker could not write to Postgres (result: backlogged, kept in the "
    "Redis backlog for a later write; lost: Redis could not keep them either, or the backlog "
    "was full). The deliveries themselves are not affected.",
    ["result"],
)
SINK_SECONDS = Histogram(
    "ingest_sink_seconds", "Time one sink.send() call took, by sink.", ["sink"]
)
LAG_SECONDS = Histogram(
    "ingest_lag_seconds",
    "From receipt at the acceptor to a sink having the event, by sink.",
    ["sink"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)

# -- normalization drift ----------------------------------------------------------------------
NORMALIZATION_FALLBACKS = Counter(
    "ingest_normalization_fallbacks",
    "New events that lacked a field their resource type should carry, by provider and field "
    "(occurred_at: fell back to the delivery or receipt time; contact_email; campaign_id).",
    ["provider", "field"],
)


def count_fallbacks(events: Iterable[Event]) -> None:
    """Count each event's fallbacks; fields outside the closed set are ignored (bounded labels)."""
    for event in events:
        for name in event.fallbacks:
            if name in FALLBACK_FIELDS:
                NORMALIZATION_FALLBACKS.labels(event.provider, name).inc()

# -- personal data ----------------------------------------------------------------------------
SUPPRESSED = Counter(
    "ingest_suppressed_events",
    "Events dropped because their contact was erased with --suppress, by provider.",
    ["provider"],
)


def render(extra: Iterable[Any] = ()) -> tuple[bytes, str]:
    """The metrics text of this process (or of all processes, in multiprocess mode), followed
    by that of the ``extra`` collectors (read at scrape time, e.g. from Redis)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        text = generate_latest(registry)
    else:
        text = generate_latest()
    extra = list(extra)
    if extra:
        registry = CollectorRegistry(auto_describe=False)
        for collector in extra:
            registry.register(collector)
        text += generate_latest(registry)
    return text, CONTENT_TYPE_LATEST


class ActivityCollector:
    """A prometheus-client collector reading :func:`ingest.deployment.read_state` at scrape
    time: activity, silence and backlog gauges (``redis``: a client, ``settings``: Settings)."""

    def __init__(self, redis: Any, settings: Any) -> None:
        self.redis = redis
        self.settings = settings

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: never call Redis at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from ingest.deployment import read_state

        up = GaugeMetricFamily("ingest_activity_redis_up",
                               "1 when /metrics could read activity and backlog from Redis.")
        try:
            state = read_state(self.redis, self.settings)
        except Exception as exc:
            logging.getLogger("ingest.activity").warning("metrics: could not read activity from Redis: %r", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        last_acc = GaugeMetricFamily(
            "ingest_last_accepted_timestamp_seconds",
            "Unix time of the provider's last accepted delivery, any acceptor.", labels=["provider"])
        last_ref = GaugeMetricFamily(
            "ingest_last_refused_timestamp_seconds",
            "Unix time of the provider's last refused request, any acceptor.", labels=["provider"])
        silent = GaugeMetricFamily(
            "ingest_provider_silent",
            "1 when an enabled provider accepted nothing for INGEST_SILENCE_AFTER.",
            labels=["provider"])
        for p in state.providers:
            if p.last_accepted is not None:
                last_acc.add_metric([p.name], p.last_accepted)
            if p.last_refused is not None:
                last_ref.add_metric([p.name], p.last_refused)
            if p.silent is not None:
                silent.add_metric([p.name], 1 if p.silent else 0)
        jobs = GaugeMetricFamily("ingest_queue_jobs", "Jobs in an RQ queue, by state.",
                                 labels=["queue", "state"])
        oldest = GaugeMetricFamily("ingest_queue_oldest_seconds",
                                   "Age of the oldest queued job (0 when none).", labels=["queue"])
        workers = GaugeMetricFamily("ingest_queue_workers", "Live RQ workers serving a queue.",
                                    labels=["queue"])
        dead = GaugeMetricFamily("ingest_dead_letters",
                                 "Jobs in a queue's failed registry (`ingest dlq list`).",
                                 labels=["sink"])
        for q in state.queues:
            for name in ("queued", "started", "scheduled", "failed"):
                jobs.add_metric([q.name, name], getattr(q, name))
            oldest.add_metric([q.name], q.oldest_seconds)
            workers.add_metric([q.name], q.workers)
            dead.add_metric([q.label], q.failed)
        yield from (last_acc, last_ref, silent, jobs, oldest, workers, dead)
