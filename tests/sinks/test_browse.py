"""Finding stored events (sinks.browse): every filter, pages, bad input, one event with its raw
delivery, a record's timeline, and the plans of the console's searches. Events are stored by
the real Postgres sink."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from ingest.events import Contact, Delivery, Event
from sinks import browse
from sinks.postgres import PostgresSink, connect

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


def make_event(n: int, *, provider: str = "outreach", kind: str = "email.opened",
               email: str | None = "ada@example.com", resource_id: str | None = None,
               resource_type: str = "prospect", received: datetime | None = None,
               occurred: datetime | None = None, activity: bool = True,
               delivery_id: str | None = None) -> Event:
    received = received or T0 + timedelta(minutes=n)
    return Event(provider=provider, dedup_key=f"k{n}", event_type=kind.replace(".", "-"),
                 kind=kind, occurred_at=occurred or received, received_at=received,
                 resource_type=resource_type, resource_id=resource_id or f"r{n}",
                 action=kind.rpartition(".")[2],
                 contact=Contact(email=email, name="Ada L") if email else None,
                 data={"n": n}, delivery_id=delivery_id or str(uuid.uuid4()), activity=activity)


def store(url: str, events: list[Event], headers: dict[str, str] | None = None,
          archive: bool = True) -> None:
    deliveries = {e.delivery_id: Delivery(id=e.delivery_id, provider=e.provider,
                                          received_at=e.received_at, headers=headers or {},
                                          body='{"n": %d}' % e.data["n"])
                  for e in events if e.delivery_id}
    sink = PostgresSink(url)
    try:
        sink.send(events, deliveries=deliveries)
    finally:
        sink.close()
    if not archive:
        with connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM webhook_deliveries")


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with connect(database_url, autocommit=True) as c:
        yield c


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events]


def test_an_event_comes_back_in_the_normalized_shape(database_url: str,
                                                     conn: psycopg.Connection[Any]) -> None:
    event = make_event(1)
    store(database_url, [event])
    found, cursor = browse.search_events(conn)
    assert cursor is None
    expected = event.to_dict()
    got = found[0]
    assert {k: got[k] for k in expected} == expected
    assert got["delivery_id"] == event.delivery_id
    assert got["stored_at"].endswith("Z")
    assert got["contact"] == {"email": "ada@example.com", "name": "Ada L", "phone": None}


def test_each_filter_alone_and_combined(database_url: str,
                                        conn: psycopg.Connection[Any]) -> None:
    a = make_event(1, email="Ada@Example.com", resource_id="p-1", kind="email.opened")
    b = make_event(2, email="bob@example.com", resource_id="p-1", kind="email.replied",
                   provider="salesloft")
    c = make_event(3, email="ada@example.com", resource_id="p-2", kind="call.completed")
    d = make_event(4, email=None, resource_id="p-3", kind="email.clicked")
    store(database_url, [a, b, c, d])

    def search(**kw: Any) -> list[str]:
        return ids(browse.search_events(conn, **kw)[0])

    assert search() == [d.id, c.id, b.id, a.id]  # newest first
    assert search(email="ada@example.com") == [c.id, a.id]
    assert search(resource_id="p-1") == [b.id, a.id]
    assert search(event_id=c.id) == [c.id]
    assert search(delivery_id=b.delivery_id) == [b.id]
    assert search(provider="salesloft") == [b.id]
    assert search(kind="email.opened") == [a.id]
    assert search(kind="email.*") == [d.id, b.id, a.id]
    assert search(since=T0 + timedelta(minutes=2), until=T0 + timedelta(minutes=4)) == [c.id, b.id]
    assert search(email="ada@example.com", kind="email.*") == [a.id]
    assert search(resource_id="p-1", provider="outreach") == [a.id]
    assert search(provider="outreach", kind="*", since=T0 + timedelta(minutes=3)) == [d.id, c.id]
    assert search(email="ada@example.com", since=T0 + timedelta(minutes=2)) == [c.id]
    assert search(email="nobody@example.com") == []
    assert search(event_id=str(uuid.uuid4())) == []


def test_email_is_matched_as_erase_matches_it(database_url: str,
                                              conn: psycopg.Connection[Any]) -> None:
    stored = make_event(1, email="Jane.Doe@Example.COM")
    other = make_event(2, email="mary.jane.doe@example.com")
    store(database_url, [stored, other])
    for typed in ("jane.doe@example.com", "  JANE.DOE@EXAMPLE.COM ", "jane.doe＠example.com"):
        assert ids(browse.search_events(conn, email=typed)[0]) == [stored.id], typed


@pytest.mark.parametrize("listed", [True, False], ids=["stored kinds", "LIKE"])
def test_kind_globs_and_like_characters_are_literal(
        database_url: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch,
        listed: bool) -> None:
    # A glob is matched against the stored kinds, or, when there are too many of those to
    # list, with LIKE: the same answers either way.
    if not listed:
        monkeypatch.setattr(browse, "_MAX_KINDS", 2)
    events = {k: make_event(i, kind=k) for i, k in enumerate(
        ["email.opened", "emailXopened", "email.open_d", "email.open%", "linkedin.inmail_replied",
         "a\\b.x"], start=1)}
    store(database_url, list(events.values()))

    def kinds(pattern: str) -> set[str]:
        return {e["kind"] for e in browse.search_events(conn, kind=pattern)[0]}

    assert kinds("email.opened") == {"email.opened"}  # "." is no wildcard
    assert kinds("email.open_d") == {"email.open_d"}  # "_" neither
    assert kinds("email.open%") == {"email.open%"}  # nor "%"
    assert kinds("email.open_*") == {"email.open_d"}
    assert kinds("email.*") == {"email.opened", "email.open_d", "email.open%"}
    assert kinds("*_replied") == {"linkedin.inmail_replied"}
    assert kinds("*.open*") == {"email.opened", "email.open_d", "email.open%"}
    assert kinds("a\\b.*") == {"a\\b.x"}
    assert kinds("*") == set(events)
    assert kinds("nothing.*") == set() and kinds("email.opene") == set()


def test_pages_cover_every_event_once_when_many_share_a_time(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    # 23 events in three instants (ties broken by id), paged 5 at a time.
    events = [make_event(i, received=T0 + timedelta(seconds=i % 3)) for i in range(23)]
    store(database_url, events)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        page, cursor = browse.search_events(conn, email="ada@example.com", limit=5, after=cursor)
        seen += page
        pages += 1
        assert len(page) == 5 or cursor is None
        if cursor is None:
            break
    assert pages == 5
    assert sorted(ids(seen)) == sorted(e.id for e in events)
    assert len(set(ids(seen))) == 23
    order = [(e["received_at"], uuid.UUID(e["id"])) for e in seen]
    assert order == sorted(order, reverse=True)
    # A page that ends exactly at the last event says there is no next page.
    page, cursor = browse.search_events(conn, limit=23)
    assert len(page) == 23 and cursor is None


def test_a_cursor_keeps_its_place_when_newer_events_arrive(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    store(database_url, [make_event(i) for i in range(6)])
    first, cursor = browse.search_events(conn, limit=3)
    store(database_url, [make_event(100 + i, received=T0 + timedelta(days=1, minutes=i))
                         for i in range(2)])
    second, cursor = browse.search_events(conn, limit=3, after=cursor)
    assert cursor is None
    assert [e["data"]["n"] for e in first + second] == [5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize("kwargs, message", [
    ({"event_id": "not-a-uuid"}, "event_id must be a UUID"),
    ({"delivery_id": "123"}, "delivery_id must be a UUID"),
    ({"limit": 0}, "limit must be between 1 and 500"),
    ({"limit": 501}, "limit must be between 1 and 500"),
    ({"since": T0, "until": T0 - timedelta(seconds=1)}, "since must not be later than until"),
    ({"since": datetime(2024, 5, 1)}, "since needs a time zone"),
    ({"after": "garbage!"}, "bad cursor"),
    ({"after": "MjAyNC0wNS0wMXxub3BlCg"}, "bad cursor"),
    ({"kind": ""}, "kind must be"),
    ({"email": "  "}, "email must not be empty"),
])
def test_bad_input_is_refused_with_what_to_do(conn: psycopg.Connection[Any],
                                              kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        browse.search_events(conn, **kwargs)


def test_parse_cursor_round_trips_and_refuses_others(database_url: str,
                                                     conn: psycopg.Connection[Any]) -> None:
    store(database_url, [make_event(i) for i in range(3)])
    _, cursor = browse.search_events(conn, limit=1)
    assert cursor is not None
    at, last = browse.parse_cursor(cursor)
    assert at == T0 + timedelta(minutes=2)
    for bad in ("", "====", "bm8gdGltZQ", cursor[:-4]):
        with pytest.raises(ValueError, match="previous page"):
            browse.parse_cursor(bad)


def test_get_event_with_its_delivery_and_never_a_credential(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    event = make_event(1)
    store(database_url, [event], headers={"x-outreach-event": "prospect.updated"})
    # A row as an older release (or a hand) may have written it: credentials in the headers.
    conn.execute("UPDATE webhook_deliveries SET headers = headers || %s::jsonb",
                 ['{"Authorization": "Bearer tok-123456", "x-api-key": "k", '
                  '"x-outreach-signature": "s", "x-cleanup-token": "t"}'])
    found = browse.get_event(conn, event.id)
    assert found is not None
    assert found["id"] == event.id and found["kind"] == "email.opened"
    delivery = found["delivery"]
    assert delivery == {"id": event.delivery_id, "received_at": "2024-05-01T12:01:00Z",
                        "headers": {"x-outreach-event": "prospect.updated"},
                        "body": '{"n": 1}', "erased_at": None}
    assert browse.get_event(conn, str(uuid.uuid4())) is None
    with pytest.raises(ValueError, match="UUID"):
        browse.get_event(conn, "nope")


def test_get_event_whose_delivery_is_no_longer_archived(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    event = make_event(1)
    store(database_url, [event], archive=False)
    found = browse.get_event(conn, event.id)
    assert found is not None and found["delivery"] is None
    assert found["delivery_id"] == event.delivery_id


def test_record_timeline_oldest_first_with_the_record(
        database_url: str, conn: psycopg.Connection[Any]) -> None:
    # Received out of order: the timeline follows when things happened.
    updates = [make_event(i, kind="contact.updated", resource_id="42", activity=False,
                          occurred=T0 + timedelta(hours=10 - i)) for i in range(4)]
    opened = make_event(9, kind="email.opened", resource_id="42", occurred=T0 + timedelta(hours=20))
    elsewhere = make_event(10, kind="contact.updated", resource_id="42", provider="salesloft",
                           activity=False)
    store(database_url, [*updates, opened, elsewhere])
    record, events = browse.record_timeline(conn, "outreach", "prospect", "42")
    assert [e["id"] for e in events] == [*(e.id for e in reversed(updates)), opened.id]
    assert record is not None
    newest_state = updates[0]  # the latest occurred_at among state events
    assert record["event_id"] == newest_state.id and record["kind"] == "contact.updated"
    assert record["occurred_at"] == "2024-05-01T22:00:00Z" and record["deleted"] is False
    # The newest `limit`, still oldest first.
    _, last_two = browse.record_timeline(conn, "outreach", "prospect", "42", limit=2)
    assert [e["id"] for e in last_two] == [updates[0].id, opened.id]
    # Only activity: events, no record.
    store(database_url, [make_event(20, kind="email.clicked", resource_id="77")])
    record, events = browse.record_timeline(conn, "outreach", "prospect", "77")
    assert record is None and len(events) == 1
    assert browse.record_timeline(conn, "outreach", "prospect", "missing") == (None, [])
    with pytest.raises(ValueError, match="limit"):
        browse.record_timeline(conn, "outreach", "prospect", "42", limit=0)


# -- plans ------------------------------------------------------------------------------------

def _scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    found = [(plan["Node Type"], plan.get("Index Name") or plan.get("Relation Name") or "")]
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


def test_every_search_shape_reads_an_index(database_url: str) -> None:
    """The console's searches, planned against a table of 60,000 events with realistic spread
    (each value a small share of the rows): each reads its index, none the whole table."""
    with connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, resource_type,"
            " resource_id, occurred_at, received_at, contact_email, data)"
            " SELECT gen_random_uuid(), (ARRAY['outreach','salesloft','outcaller','outboundry',"
            "'mailstand'])[1 + g %% 5], 'k' || g, 'x', (ARRAY['email.opened','email.clicked',"
            "'email.replied','call.completed','contact.updated','linkedin.invite_sent'])"
            "[1 + g %% 6], 'prospect', (g %% 20000)::text, t, t,"
            " 'P' || (g %% 10000) || '@example.com', '{}'"
            " FROM generate_series(1, 60000) g,"
            " LATERAL (SELECT %s::timestamptz + make_interval(secs => g) AS t) a", [T0])
        conn.execute("ANALYZE webhook_events")
        since, until = T0 + timedelta(hours=2), T0 + timedelta(hours=10)
        cursor = browse._cursor(T0 + timedelta(hours=5), uuid.uuid4())
        shapes: list[tuple[dict[str, Any], str]] = [
            ({"email": "p7@example.com"}, "webhook_events_contact_received"),
            ({"resource_id": "7"}, "webhook_events_resource_received"),
            ({"event_id": str(uuid.uuid4())}, "webhook_events_pkey"),
            ({"delivery_id": str(uuid.uuid4())}, "webhook_events_delivery"),
            ({"email": "p7@example.com", "since": since, "until": until, "kind": "email.*",
              "after": cursor}, "webhook_events_contact_received"),
            ({"resource_id": "7", "since": since, "until": until, "kind": "email.opened",
              "after": cursor}, "webhook_events_resource_received"),
        ]
        for kwargs, index in shapes:
            nodes = _explain(conn, kwargs)
            assert index in [name for _, name in nodes], (kwargs, nodes)
            assert not [n for n in nodes if n[0] == "Seq Scan"], (kwargs, nodes)
        # Wide filters (a provider, a kind, a time range, nothing): whichever index Postgres
        # picks, never the whole table.
        for kwargs in ({"provider": "salesloft"}, {"kind": "email.*"}, {},
                       {"provider": "outreach", "since": since, "until": until,
                        "kind": "call.*", "after": cursor},
                       {"since": since, "until": until}, {"kind": "call.completed"}):
            nodes = _explain(conn, kwargs)
            assert not [n for n in nodes if n[0] == "Seq Scan"], (kwargs, nodes)
            # Nor a sort of every matching row (a Seq Scan's cost, hidden behind an index):
            # the page comes off an index in received_at order.
            assert "Sort" not in [t for t, _ in nodes], (kwargs, nodes)


def _explain(conn: psycopg.Connection[Any], kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """The plan of the statement search_events runs, captured by running it under EXPLAIN."""
    captured: list[tuple[str, list[Any]]] = []

    class Recording(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
            captured.append((query, params))
            return super().execute(query, params, **kw)

    conn.cursor_factory = Recording
    try:
        browse.search_events(conn, **kwargs)
    finally:
        conn.cursor_factory = psycopg.Cursor
    query, params = captured[-1]
    row = conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchone()
    assert row is not None
    return _scans(row[0][0]["Plan"])
