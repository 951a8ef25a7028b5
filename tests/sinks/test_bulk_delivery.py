"""The audit's bulk delivery: a validly signed Salesloft delivery whose ``data`` array holds
15,500 resources. It reaches Postgres and the CRM exactly once per event, in bounded jobs
(workers.fanout), and the good deliveries around it wait their own share, not the import's.

Times are printed, never asserted (a shared machine); bench/bulk.py measures them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson
from rq import SimpleWorker

from ingest.events import Delivery
from ingest.rq_jobs import FastJSONSerializer
from tests.helpers import drain
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from workers import fanout
from workers.runtime import Runtime

RESOURCES = 15_500


def salesloft_bulk(count: int) -> dict[str, Any]:
    """A Salesloft ``person_updated`` delivery with ``count`` people in its ``data`` array,
    as a bulk import sends it (under the 1 MiB body limit at 15,500)."""
    data = [{"id": 900_000 + n, "updated_at": "2026-06-04T09:49:10Z",
             "stage": "a"} for n in range(count)]
    body = orjson.dumps({"event_type": "person_updated", "data": data}).decode()
    return Delivery(id=str(uuid.uuid4()), provider="salesloft",
                    received_at=datetime.now(timezone.utc),
                    headers={"x-salesloft-event": "person_updated"}, body=body).to_dict()


def run_queue(rt: Runtime, queue: str, max_jobs: int | None = None) -> None:
    worker = SimpleWorker([rt.queue(queue)], connection=rt.redis,
                          serializer=FastJSONSerializer, log_job_description=False)
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING", max_jobs=max_jobs)


def test_a_15500_resource_delivery_lands_once_and_good_events_keep_their_place(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    # CRM_TIMEOUT 2 s: jobs of 75 events (150 s of deadlines), fewer jobs for the suite's time.
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url, CRM_TIMEOUT="2"))
    bound = fanout.job_events(rt.sinks["crm"])
    assert bound == 75
    bulk = salesloft_bulk(RESOURCES)
    assert len(bulk["body"]) < 1024 * 1024
    before = [outboundry_delivery(name=f"Early {n}") for n in range(10)]
    after = [outboundry_delivery(name=f"Late {n}") for n in range(10)]
    bulk_ids = event_ids(bulk)
    early_ids, late_ids = event_ids(*before), event_ids(*after)

    started = time.monotonic()
    enqueue(rt, *before[:5], bulk, *before[5:])  # batched with it, as in the audit
    run_queue(rt, rt.names.ingest_queue)
    crm_queue = rt.sink_queue("crm")
    waiting = crm_queue.count + crm_queue.deferred_job_registry.count
    assert crm_queue.count <= 2, "the bulk delivery's chunks wait deferred, not queued"
    run_queue(rt, rt.names.sink_queue("postgres"))
    stored_in = time.monotonic() - started
    with rt.sinks["postgres"].sink._connection() as conn:  # type: ignore[attr-defined]
        stored = conn.execute("SELECT count(*), count(DISTINCT id) FROM webhook_events"
                              ).fetchone()
    assert stored == (RESOURCES + 10, RESOURCES + 10)

    # The CRM takes a few chunks; then a good delivery arrives.
    run_queue(rt, crm_queue.name, max_jobs=6)
    posted_before_late = len(receiver.posts)
    late_at = time.monotonic()
    enqueue(rt, *after)
    run_queue(rt, rt.names.ingest_queue)
    # At most the two chunks queued before it, then its own job.
    run_queue(rt, crm_queue.name, max_jobs=3)
    late_in = time.monotonic() - late_at
    assert all(i in receiver.posts for i in late_ids)
    run_queue(rt, crm_queue.name)
    drain(rt)
    crm_done = time.monotonic() - started

    order = list(receiver.posts)  # first post of each event, in arrival order
    assert len(order) == RESOURCES + 20
    assert all(n == 1 for n in receiver.posts.values()), "an event was posted twice"
    assert receiver.duplicates == 0 and receiver.unverified == 0
    assert set(order) == set(bulk_ids) | set(early_ids) | set(late_ids)
    # The good events batched with the bulk go first; the late ones wait for at most the
    # chunks already queued (two) and their own job, never for the rest of the import.
    assert max(order.index(i) for i in early_ids) < 10 + 2 * bound
    late_positions = [order.index(i) for i in late_ids]
    assert max(late_positions) < posted_before_late + 2 * bound + len(late_ids)
    assert not rt.redis.exists(crm_queue.deferred_job_registry.key)
    print(f"\n{RESOURCES} resources: {waiting} CRM jobs of <= {bound} events; Postgres had "
          f"every row {stored_in:.1f} s after the batch was queued; the CRM every event after "
          f"{crm_done:.1f} s; the late delivery's events reached the CRM "
          f"{late_in:.2f} s after they were queued, at "
          f"positions {min(late_positions)}-{max(late_positions)} of {len(order)} "
          f"({posted_before_late} posted before they came)")


def test_a_deliver_job_written_before_jobs_were_bounded_is_split_when_it_runs(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str]) -> None:
    """A 400-event CRM job from before (or one re-queued from the dead letters) does not post
    400 events in one job: it becomes bounded jobs, each event still posted once."""
    from ingest.providers import load_providers
    from ingest.rq_jobs import deliver_retry, enqueue_new

    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelope = salesloft_bulk(400)
    events = load_providers()["salesloft"].events(Delivery.from_dict(envelope))
    enqueue_new(rt.sink_queue("crm"), "workers.jobs.deliver",
                ("crm", [e.to_job() for e in events], None),
                rt.names.job_id("deliver-crm", "old"), deliver_retry(), "old job")
    run_jobs(rt)
    assert len(receiver.posts) == 400 and set(receiver.posts.values()) == {1}
    finished = rt.sink_queue("crm").finished_job_registry.get_job_ids()
    assert len(finished) == 1 + -(-400 // fanout.job_events(rt.sinks["crm"]))
