"""The Postgres sink on its own: idempotent batches, the raw archive, outage handling."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import psycopg
import pytest

from ingest.commands.embedded import free_port
from ingest.events import Delivery, Event
from ingest.exceptions import TransientSinkError
from ingest.providers import load_providers
from sinks.base import Sink
from sinks.postgres import PostgresSink
from tests.helpers import rows
from tests.sinks.conftest import enqueue, event_ids, outboundry_delivery, run_jobs
from tests.sinks.suite import (
    ErasingSinkSuite,
    ExpiringSinkSuite,
    RefusingTargetSuite,
)
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


def _outboundry_events(database_url: str, n: int) -> tuple[list, dict]:
    envelopes = [outboundry_delivery(name=f"Person {i}") for i in range(n)]
    deliveries = {e["id"]: Delivery.from_dict(e) for e in envelopes}
    events = [ev for d in deliveries.values() for ev in load_providers()["outboundry"].events(d)]
    return events, deliveries


@pytest.mark.parametrize("fault", ["index_row_too_large"])
def test_one_event_the_database_refuses_fails_alone_and_permanently(
        database_url: str, fault: str) -> None:
    import dataclasses

    from ingest.exceptions import PermanentSinkError

    events, deliveries = _outboundry_events(database_url, 4)
    bad = events[1]
    if fault == "index_row_too_large":
        # An index an operator added: past a btree entry's 2.7 KB, and incompressible, as a
        # hostile value would be (SQLSTATE 54000, a "program limit", not an outage).
        import os

        import psycopg
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE INDEX ON webhook_events (event_type)")
        bad = dataclasses.replace(bad, event_type=os.urandom(4000).hex())
    events[1] = bad
    sink = PostgresSink(database_url)
    try:
        with pytest.raises(PermanentSinkError) as info:
            sink.send(events, deliveries=deliveries)
    finally:
        sink.close()
    assert info.value.event_ids == [bad.id]
    assert "unavailable" not in str(info.value) and "SQLSTATE" in str(info.value)
    assert "\n" not in str(info.value)
    stored = {r["id"] for r in rows(database_url, "SELECT id::text FROM webhook_events")}
    assert stored == {e.id for e in events} - {bad.id}


@pytest.mark.parametrize("fault", ["nul_in_text", "nul_in_json"])
def test_an_event_postgres_would_refuse_for_a_nul_is_stored_sanitized(
        database_url: str, fault: str) -> None:
    """A U+0000 (22P05 in jsonb, refused in text) no longer fails the event: it is stored
    with U+FFFD and flagged (tests/sinks/test_storable.py has the whole pipeline)."""
    import dataclasses

    events, deliveries = _outboundry_events(database_url, 4)
    if fault == "nul_in_text":
        events[1] = dataclasses.replace(events[1], event_type="email.opened\x00")
    else:
        events[1] = dataclasses.replace(events[1], data={"x": "a\x00b"})
    sink = PostgresSink(database_url)
    try:
        sink.send(events, deliveries=deliveries)
    finally:
        sink.close()
    stored = {r["id"]: r["sanitized"] for r in rows(
        database_url, "SELECT id::text, sanitized FROM webhook_events")}
    assert stored == {e.id: e.id == events[1].id for e in events}


def test_a_long_dedup_key_is_stored_once(database_url: str) -> None:
    import dataclasses

    events, deliveries = _outboundry_events(database_url, 1)
    long = dataclasses.replace(events[0], dedup_key="k" * 10_000)
    sink = PostgresSink(database_url)
    try:
        sink.send([long], deliveries=deliveries)
        sink.send([long], deliveries=deliveries)
    finally:
        sink.close()
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 1


def test_one_row_per_provider_and_dedup_key_whatever_else_the_copies_carry(
        database_url: str) -> None:
    """The primary key alone keeps (provider, dedup_key) unique (migration 0007): the event id
    is derived from them, so a copy that differs in everything else is still the same row,
    and the same key from another provider is another event."""
    import dataclasses

    events, deliveries = _outboundry_events(database_url, 1)
    first = events[0]
    copy = dataclasses.replace(first, kind="email.bounced", data={"other": True},
                               occurred_at=first.occurred_at.replace(year=2020))
    other = dataclasses.replace(first, provider="mailstand")
    assert copy.id == first.id and other.id != first.id
    sink = PostgresSink(database_url)
    try:
        sink.send([first], deliveries=deliveries)
        sink.send([copy, other], deliveries=deliveries)
    finally:
        sink.close()
    stored = rows(database_url, "SELECT provider, kind FROM webhook_events ORDER BY provider")
    assert [(r["provider"], r["kind"]) for r in stored] == [
        ("mailstand", first.kind), ("outboundry", first.kind)]


def test_one_batch_about_one_record_several_times_stores_every_event_and_the_newest_state(
        database_url: str) -> None:
    """A batch is one statement per table: every column of every event arrives as it was
    (microseconds, nulls, nested JSON, text in any script), and of several events about one
    record the newest by (occurred_at, id) is the record's state, wherever it is in the batch."""
    from datetime import datetime, timedelta, timezone

    from ingest.events import Contact, Event

    t0 = datetime(2026, 6, 4, 5, 49, 1, 123456, tzinfo=timezone.utc)
    delivery = Delivery(id="6f2b6c1e-9a57-4c8e-9d0a-1f3b5e7c9a21", provider="outreach",
                        received_at=t0, headers={"content-type": "application/json"},
                        body='{"naïve": "ünïcode ✓", "n": 1}')

    def event(key: str, seconds: int, title: str, resource_id: str = "7") -> Event:
        return Event(provider="outreach", dedup_key=key, event_type="prospect.updated",
                     kind="contact.updated", occurred_at=t0 + timedelta(seconds=seconds),
                     received_at=t0, resource_type="prospect", resource_id=resource_id,
                     action="updated", contact=Contact(email="ada@example.com", name="Ädä ✓"),
                     data={"title": title, "nested": {"list": [1, 2.5, None, "x"]}},
                     previous=None if seconds else {"title": "none"},
                     delivery_id=delivery.id)

    events = [event("a", 10, "Middle"), event("b", 30, "Newest"), event("c", 0, "Oldest"),
              event("d", 5, "Other", resource_id="8")]
    sink = PostgresSink(database_url)
    try:
        sink.send(events, deliveries={delivery.id: delivery})
    finally:
        sink.close()
    stored = {r["dedup_key"]: r for r in rows(
        database_url, "SELECT dedup_key, occurred_at, received_at, data, previous, changes,"
        " contact_name, stale, delivery_id::text FROM webhook_events")}
    assert sorted(stored) == ["a", "b", "c", "d"]
    for e in events:
        row = stored[e.dedup_key]
        assert row["occurred_at"] == e.occurred_at and row["received_at"] == t0
        assert row["data"] == e.data and row["previous"] == e.previous
        assert row["changes"] is None and row["stale"] is False
        assert row["contact_name"] == "Ädä ✓" and row["delivery_id"] == delivery.id
    records = {r["resource_id"]: r for r in rows(
        database_url, "SELECT resource_id, data, occurred_at, event_id::text FROM webhook_records")}
    assert records["7"]["data"]["title"] == "Newest" and records["7"]["event_id"] == events[1].id
    assert records["7"]["occurred_at"] == t0 + timedelta(seconds=30)
    assert records["8"]["data"]["title"] == "Other"
    (archived,) = rows(database_url, "SELECT body, headers FROM webhook_deliveries")
    assert bytes(archived["body"]) == delivery.body.encode("utf-8")
    assert archived["headers"] == delivery.headers


class TestPostgresSuite(RefusingTargetSuite, ErasingSinkSuite,
                        ExpiringSinkSuite):
    """The shared sink contract (tests/sinks/suite.py) against a real Postgres."""

    sink = "postgres"

    @pytest.fixture
    def target(self, database_url: str) -> str:
        return database_url

    def make(self, target: str) -> PostgresSink:
        return PostgresSink(target)

    def store(self, sink: Sink, events: Sequence[Event],
              deliveries: Mapping[str, Delivery]) -> None:
        # What the workers of a deployment keep in the same database beside the events: an
        # outcome row per event (a CRM's delivery), which erase and expire remove with them.
        from datetime import datetime, timezone

        from sinks.outcomes import Outcome, write

        super().store(sink, events, deliveries)
        assert isinstance(sink, PostgresSink)
        with psycopg.connect(sink.url, autocommit=True) as conn:
            write(conn, [Outcome(event_id=e.id, sink="crm", state="delivered",
                                 at=datetime.now(timezone.utc)) for e in events])

    def held(self, target: str, events: Sequence[Event]) -> set[str]:
        # An event is held while its row or its outcome rows are.
        wanted = {e.id for e in events}
        outcomes = {r["id"] for r in rows(
            target, "SELECT event_id::text AS id FROM webhook_sink_outcomes") if r["id"] in wanted}
        return set(self.delivered(target, events)) | outcomes

    def delivered(self, target: str, events: Sequence[Event]) -> list[str]:
        wanted = {e.id for e in events}
        return [r["id"] for r in rows(target, "SELECT id::text FROM webhook_events")
                if r["id"] in wanted]

    def unreachable(self, target: str) -> PostgresSink:
        return PostgresSink(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")

    def refuse(self, target: str, event: Event) -> Event:
        # An index an operator added, and a value past a btree entry's limit (SQLSTATE 54000).
        import dataclasses
        import os

        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("CREATE INDEX ON webhook_events (event_type)")
        return dataclasses.replace(event, event_type=os.urandom(4000).hex())

    def raw_delivered(self, target: str) -> set[str]:
        return {r["id"] for r in rows(target, "SELECT id::text FROM webhook_deliveries")}
