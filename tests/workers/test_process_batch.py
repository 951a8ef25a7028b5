"""process_batch and deliver with real RQ workers, real Redis and real Postgres."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
from rq import Queue
from rq.registry import FailedJobRegistry

from ingest.rq_jobs import enqueue_batch
from ingest.events import Delivery
from tests.helpers import drain, rows
from workers import dedup


def envelope(provider: str, payload: dict[str, Any] | bytes, **headers: str) -> dict[str, Any]:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return {"id": str(uuid.uuid4()), "provider": provider,
            "received_at": datetime.now(timezone.utc).isoformat(), "headers": headers,
            "body": body.decode()}


def lead(n: int, event: str = "lead.created") -> dict[str, Any]:
    return {"event": event, "resource": "lead", "action": event.split(".")[1],
            "workspaceId": "ws", "timestamp": f"2026-06-04T05:49:{n % 60:02d}Z",
            "data": {"id": f"lead_{n}", "email": f"p{n}@example.com"}}


def enqueue(runtime: Any, envelopes: list[dict[str, Any]]) -> None:
    enqueue_batch(runtime.ingest_queue, envelopes, runtime.names.job_id("batch", uuid.uuid4().hex))


def test_a_poison_delivery_fails_alone_and_the_rest_of_its_batch_is_stored(
        runtime: Any, database_url: str) -> None:
    good = [envelope("outcaller", lead(i)) for i in range(5)]
    # No data.id and no timestamp: no dedup key can be formed.
    poison = envelope("outcaller", {"event": "lead.created", "data": {}})
    enqueue(runtime, good[:2] + [poison] + good[2:])
    drain(runtime)

    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 5
    failed = FailedJobRegistry(queue=runtime.ingest_queue)
    assert failed.count == 1
    job = runtime.ingest_queue.fetch_job(failed.get_job_ids()[0])
    assert job.args[0] == [poison], "the failed job holds the poison delivery alone"
    reason = job.latest_result().exc_string
    assert "NormalizationError" in reason and "dedup key" in reason


def test_copies_inside_one_batch_collapse_to_one_row(runtime: Any, database_url: str) -> None:
    same = lead(7)
    enqueue(runtime, [envelope("outcaller", same) for _ in range(10)])
    drain(runtime)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 1
    assert len(rows(database_url, "SELECT id FROM webhook_deliveries")) == 1


def test_a_redelivery_after_processing_is_dropped(runtime: Any, database_url: str) -> None:
    enqueue(runtime, [envelope("outcaller", lead(1))])
    drain(runtime)
    enqueue(runtime, [envelope("outcaller", lead(1)), envelope("outcaller", lead(2))])
    drain(runtime)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 2
    # Only deliveries that produced a new event are archived.
    assert len(rows(database_url, "SELECT id FROM webhook_deliveries")) == 2


def test_unknown_event_types_are_stored_as_unknown(runtime: Any, database_url: str) -> None:
    enqueue(runtime, [envelope("outcaller", lead(3, event="lead.teleported")),
                      envelope("outcaller", lead(4))])
    drain(runtime)
    kinds = {r["event_type"]: r["kind"] for r in rows(
        database_url, "SELECT event_type, kind FROM webhook_events")}
    assert kinds == {"lead.teleported": "unknown", "lead.created": "contact.created"}


def test_a_retried_batch_recognises_its_own_claims(runtime: Any) -> None:
    """A job that died after claiming must, when RQ retries it (same job id), still deliver."""
    provider = runtime.providers["outcaller"]
    events = provider.events(Delivery.from_dict(envelope("outcaller", lead(9))))
    assert dedup.claim(runtime.redis, runtime.names, "job-A", events) == [True]
    assert dedup.claim(runtime.redis, runtime.names, "job-A", events) == [True]  # its retry
    assert dedup.claim(runtime.redis, runtime.names, "job-B", events) == [False]  # a copy
    dedup.mark_done(runtime.redis, runtime.names, events, ttl=60)
    assert dedup.claim(runtime.redis, runtime.names, "job-A", events) == [False]


def test_events_go_only_to_sinks_whose_filter_matches(make_env: Any, database_url: str) -> None:
    from ingest.config import Settings
    from workers.runtime import Runtime, install_runtime

    settings = Settings.from_env(make_env(database_url, POSTGRES_EVENTS="contact.*"))
    rt = Runtime(settings)
    previous = install_runtime(rt)
    try:
        enqueue(rt, [envelope("outcaller", lead(1)),
                     envelope("outcaller", lead(2, event="call.completed"))])
        drain(rt)
    finally:
        install_runtime(previous)
        rt.close()
    assert [r["kind"] for r in rows(database_url, "SELECT kind FROM webhook_events")] == [
        "contact.created"]


def test_deliver_jobs_are_not_enqueued_twice_for_the_same_events(runtime: Any) -> None:
    from workers.jobs import enqueue_deliveries

    provider = runtime.providers["outcaller"]
    delivery = Delivery.from_dict(envelope("outcaller", lead(5)))
    events = provider.events(delivery)
    assert enqueue_deliveries(runtime, events, {delivery.id: delivery}) == 1
    assert enqueue_deliveries(runtime, events, {delivery.id: delivery}) == 0
    assert Queue(runtime.names.sink_queue("postgres"), connection=runtime.redis).count == 1


def test_signed_outreach_body_survives_the_job_byte_for_byte(runtime: Any,
                                                             database_url: str) -> None:
    body = b'{"data": {"type": "prospect", "id": 5, "attributes": {"emails": ["\\u00e9@x.io"],' \
           b' "updatedAt": "2026-01-01T00:00:00Z"}}, "meta": {"eventName": "prospect.created"}}'
    signature = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    enqueue(runtime, [envelope("outreach", body)])
    drain(runtime)
    (archived,) = rows(database_url, "SELECT body FROM webhook_deliveries")
    assert bytes(archived["body"]) == body
    assert hmac.new(b"k", bytes(archived["body"]), hashlib.sha256).hexdigest() == signature
