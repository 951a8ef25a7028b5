"""The Postgres sink on its own: idempotent batches, the raw archive, outage handling."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ingest.embedded import free_port
from ingest.events import Delivery
from ingest.exceptions import TransientSinkError
from ingest.providers import load_providers
from sinks.postgres import PostgresSink
from tests.helpers import rows
from tests.sinks.conftest import enqueue, event_ids, outboundry_delivery, run_jobs
from workers.runtime import Runtime


def test_a_batch_sent_twice_is_stored_once_with_its_raw_delivery(database_url: str) -> None:
    envelopes = [outboundry_delivery(name=n) for n in ("Ada One", "Alan Two")]
    deliveries = {e["id"]: Delivery.from_dict(e) for e in envelopes}
    events = [ev for d in deliveries.values() for ev in load_providers()["outboundry"].events(d)]
    sink = PostgresSink(database_url)
    try:
        sink.send(events, deliveries=deliveries)
        sink.send(events, deliveries=deliveries)  # a retried job
    finally:
        sink.close()
    stored = rows(database_url, "SELECT id::text, delivery_id::text FROM webhook_events")
    assert sorted(r["id"] for r in stored) == sorted(e.id for e in events)
    archived = rows(database_url, "SELECT id::text, body FROM webhook_deliveries")
    assert sorted(r["id"] for r in archived) == sorted(deliveries)
    for row in archived:
        assert bytes(row["body"]).decode() == deliveries[row["id"]].body  # the exact bytes


def test_a_database_that_is_away_is_a_transient_error() -> None:
    sink = PostgresSink(f"postgresql://postgres:pg-password-x@127.0.0.1:{free_port()}/nothing")
    envelope = outboundry_delivery()
    delivery = Delivery.from_dict(envelope)
    events = load_providers()["outboundry"].events(delivery)
    with pytest.raises(TransientSinkError) as info:
        sink.send(events, deliveries={delivery.id: delivery})
    assert "pg-password-x" not in str(info.value)


def test_through_workers_postgres_gets_every_event_whatever_the_other_sinks_filter(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    rt = pipeline(INGEST_SINKS="postgres")
    envelopes = [outboundry_delivery("email-opened"), outboundry_delivery("invite-sent")]
    enqueue(rt, *envelopes)
    run_jobs(rt)
    stored = rows(database_url, "SELECT id::text, kind FROM webhook_events")
    assert sorted(r["id"] for r in stored) == sorted(event_ids(*envelopes))
    assert sorted(r["kind"] for r in stored) == ["email.opened", "linkedin.invite_sent"]
