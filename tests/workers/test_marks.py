"""The per-record stale check in real Redis: order, ties, retries, expiry, one call a batch."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
from redis import Redis

from ingest.events import Delivery, Event, changes_between
from workers import marks

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
T0 = datetime(2026, 6, 4, 5, 0, tzinfo=timezone.utc)


def update(resource_id: str, seconds: int, *, key: str | None = None,
           resource_type: str | None = "prospect", kind: str = "contact.updated") -> Event:
    return Event(provider="outreach", dedup_key=key or f"{resource_id}|{seconds}",
                 event_type="prospect.updated", kind=kind, occurred_at=T0 + timedelta(seconds=seconds),
                 received_at=T0, resource_type=resource_type, resource_id=resource_id,
                 data={"id": resource_id, "at": seconds})


def stale(events: list[Event]) -> list[bool]:
    return [e.stale for e in events]


def test_an_update_older_than_one_already_processed_is_stale(runtime: Any) -> None:
    r, n = runtime.redis, runtime.names
    newer, older = update("1", 20), update("1", 10)
    assert stale(marks.mark_stale(r, n, [newer], 60)) == [False]
    assert stale(marks.mark_stale(r, n, [older], 60)) == [True]
    # Another record, and a still newer update of the first: neither is stale.
    assert stale(marks.mark_stale(r, n, [update("2", 5), update("1", 30)], 60)) == [False, False]


def test_a_retried_batch_reaches_the_same_decision_for_its_own_events(runtime: Any) -> None:
    r, n = runtime.redis, runtime.names
    batch = [update("1", 10), update("2", 10)]
    first = marks.mark_stale(r, n, batch, 60)
    assert stale(marks.mark_stale(r, n, batch, 60)) == stale(first) == [False, False]
    late = [update("3", 10)]
    marks.mark_stale(r, n, [update("3", 20)], 60)
    assert stale(marks.mark_stale(r, n, late, 60)) == stale(marks.mark_stale(r, n, late, 60))


def test_within_one_batch_only_the_newest_event_of_a_record_is_current(runtime: Any) -> None:
    r, n = runtime.redis, runtime.names
    batch = [update("1", 10), update("1", 30), update("1", 20), update("2", 1)]
    assert stale(marks.mark_stale(r, n, batch, 60)) == [True, False, True, False]
    assert stale(marks.mark_stale(r, n, list(reversed(batch)), 60)) == [False, True, False, True]


def test_ties_on_occurred_at_are_broken_by_event_id_the_same_way_everywhere(runtime: Any) -> None:
    a, b = update("1", 10, key="a"), update("1", 10, key="b")
    low, high = sorted([a, b], key=lambda e: uuid.UUID(e.id))
    assert stale(marks.mark_stale(runtime.redis, runtime.names, [high], 60)) == [False]
    assert stale(marks.mark_stale(runtime.redis, runtime.names, [low], 60)) == [True]
    # The other order, on another record: the higher id still wins.
    low2, high2 = (Event(**{**_fields(e), "resource_id": "2"}) for e in (low, high))
    assert stale(marks.mark_stale(runtime.redis, runtime.names, [low2], 60)) == [False]
    assert stale(marks.mark_stale(runtime.redis, runtime.names, [high2], 60)) == [False]
    assert marks.superseded(runtime.redis, runtime.names, [low2, high2]) == {low2.id}


def _fields(e: Event) -> dict[str, Any]:
    return {f: getattr(e, f) for f in ("provider", "dedup_key", "event_type", "kind", "occurred_at",
                                       "received_at", "resource_type", "resource_id", "data")}


def test_events_about_no_record_are_never_stale_and_touch_nothing(runtime: Any) -> None:
    r, n = runtime.redis, runtime.names
    anonymous = [update("", 10), update("1", 5, resource_type=None)]
    assert stale(marks.mark_stale(r, n, anonymous, 60)) == [False, False]
    assert not list(r.scan_iter(match=n.key("state:*")))


class CountingRedis(Redis):
    """A real client that counts the commands it sends (the server is shared: its own
    statistics count other clients too)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


def test_marks_expire_like_dedup_records_and_one_call_serves_a_batch(
        runtime: Any, redis_server: str) -> None:
    r, n = CountingRedis.from_url(redis_server), runtime.names
    r.sent = []
    batch = [update(str(i), i) for i in range(50)]
    marks.mark_stale(r, n, batch, 120)
    marks.mark_stale(r, n, batch, 120)
    assert r.sent.count("EVALSHA") == 2 and len(r.sent) <= 3, r.sent  # + one SCRIPT LOAD
    keys = list(r.scan_iter(match=n.key("state:*")))
    assert len(keys) == 50
    assert all(0 < r.ttl(k) <= 120 for k in keys)
    r.close()


def test_changes_name_what_outreach_before_update_names() -> None:
    from ingest.providers import load_providers

    body = (SAMPLES / "outreach" / "prospect_updated_v2.raw").read_text()
    delivery = Delivery(id=str(uuid.uuid4()), provider="outreach", received_at=T0, headers={},
                        body=body)
    (event,) = load_providers()["outreach"].events(delivery)
    assert event.changes == {"title": {"from": "Director of Sales Operations",
                                       "to": "Head of Revenue Operations"}}
    assert Event.from_job(orjson.loads(orjson.dumps(event.to_job()))).changes == event.changes


def test_changes_from_outcaller_previous_data_and_none_without_previous_values() -> None:
    from ingest.providers import load_providers

    providers = load_providers()
    body = (SAMPLES / "outcaller" / "call_completed_with_previous.raw").read_text()
    delivery = Delivery(id=str(uuid.uuid4()), provider="outcaller", received_at=T0, headers={},
                        body=body)
    (event,) = providers["outcaller"].events(delivery)
    assert event.changes == {"status": {"from": "in_progress", "to": "completed"}}
    body = (SAMPLES / "outcaller" / "lead_created.raw").read_text()
    (created,) = providers["outcaller"].events(
        Delivery(id=str(uuid.uuid4()), provider="outcaller", received_at=T0, headers={}, body=body))
    assert created.changes is None and created.to_dict()["changes"] is None
    assert changes_between({}, {"a": 1}) is None and changes_between(["x"], {}) is None
    assert changes_between({"gone": 1}, {}) == {"gone": {"from": 1, "to": None}}
