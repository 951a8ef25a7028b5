"""What the Postgres sink does with the data it already holds: erase one subject's, expire old
rows. :class:`sinks.postgres.PostgresSink` offers both (``erase``, ``expire``); ``ingest
erase`` and retention reach them through :class:`sinks.registry.EnabledSink`.

Erasing, in one transaction: ``webhook_events`` (``contact_email`` equal to the address,
case-insensitively, through its index, or the address anywhere in the row), the
``webhook_deliveries`` those events came from and any archived delivery whose body or headers
mention it (a delivery that also holds other people's events is rewritten without the
subject's and marked ``erased_at``), and the ``webhook_records`` that mention it. A row goes
into ``webhook_erasures`` with the whole erasure's counts.

Expiring: rows go a thousand at a time, each batch its own short transaction found through
the ``received_at`` index, so no lock is held for long, writers never wait on it, and
autovacuum keeps up (workers.retention paces the batches). Each batch deletes by ``ctid``
(the rows' places in the table), in ``received_at`` order from where the last one stopped:
no lookup per row through the primary key, and no walk over the index entries of rows
already deleted. (Monthly partitions dropped whole would be cheaper still, but the sink's
``ON CONFLICT`` needs the primary key, ``id`` (which keeps ``(provider, dedup_key)`` unique
too), over the whole table, which a partitioned table only allows when it includes the
partition key.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ingest.events import Delivery

if TYPE_CHECKING:
    from ingest.subjects import Erasure

__all__ = ["DELETE_BATCH", "DELIVERIES", "ERASES", "EVENTS_BY_INDEX", "EXPIRES", "erase",
           "EXAMPLE_QUERY", "expire", "newest_events"]


# The example ``ingest sql --help`` shows.
EXAMPLE_QUERY = "select kind, count(*) from webhook_events group by 1"


def newest_events(provider: str | None, limit: int) -> tuple[str, list[Any]]:
    """``ingest events``' read-only query (newest first) and its parameters."""
    where = "WHERE provider = %s " if provider else ""
    return ("SELECT received_at, provider, kind, contact_email AS contact, resource_id, stale "
            f"FROM webhook_events {where}ORDER BY received_at DESC, id LIMIT %s",
            [*([provider] if provider else []), limit])

# -- erasing ----------------------------------------------------------------------------------

# The places an erasure reports, in print order.
ERASES = ("webhook_events", "webhook_deliveries", "webhook_deliveries rewritten",
          "webhook_records", "webhook_sink_outcomes")

# A row's text, computed once per row (OFFSET 0 keeps Postgres from inlining it into each use).
_TEXT = "CROSS JOIN LATERAL (SELECT lower({row}) AS x OFFSET 0) t"
# The subject's events found through an index (by contact, or by record); tests/test_scale.py
# checks the plan.
EVENTS_BY_INDEX = "SELECT e.id, e.delivery_id FROM webhook_events e WHERE {events}"
# The deliveries the erased events came from (by primary key), and those whose body or headers
# may mention the subject (a scan, for an address; nothing for a record).
DELIVERIES = (
    "SELECT d.id, d.provider, d.received_at, d.headers, convert_from(d.body, 'UTF8'),"
    " d.erased_at FROM webhook_deliveries d "
    + _TEXT.format(row="convert_from(d.body, 'UTF8') || ' ' || d.headers::text")
    + " WHERE d.id = ANY(%(deliveries)s::uuid[]) OR {mentions}")


def erase(url: str, erasure: Erasure) -> dict[str, int]:
    """Erase (or, dry, count) the subject's rows; returns the counts per place (ERASES)."""
    import psycopg
    from psycopg.types.json import Jsonb

    from sinks.postgres import connect

    subject = erasure.subject
    match = subject.sql()
    counts: dict[str, int] = {}
    with connect(url) as conn, conn.transaction():
        # Events: by contact through the index, then (for an address) anywhere else in a row,
        # each candidate confirmed on its decoded values.
        events: dict[Any, Any] = dict(conn.execute(
            EVENTS_BY_INDEX.format(events=match.events), match.params).fetchall())
        if match.text is not None:
            for event_id, delivery_id, row in conn.execute(
                    "SELECT e.id, e.delivery_id, to_jsonb(e) FROM webhook_events e "
                    + _TEXT.format(row="e::text")
                    + f" WHERE ({match.events}) IS NOT TRUE AND {match.mentions('t.x')}",
                    match.params):
                if subject.in_value(row):
                    events[event_id] = delivery_id
        linked = {str(d) for d in events.values() if d is not None}
        params = dict(match.params, events=list(events), deliveries=sorted(linked))
        # Deliveries: those the events came from, and any whose body or headers may mention
        # the subject; each is kept, removed, or rewritten without the subject's events.
        removed: list[Any] = []
        rewritten: list[tuple[str, str, Any]] = []
        for row in conn.execute(DELIVERIES.format(mentions=match.mentions("t.x")), params):
            envelope = Delivery(id=str(row[0]), provider=row[1], received_at=row[2],
                                headers=dict(row[3] or {}), body=row[4],
                                erased_at=row[5]).to_dict()
            new = erasure.delivery(envelope)
            if new is envelope:
                if envelope["id"] in linked:
                    # It does not name the subject, yet an erased event came from it:
                    # replaying it would bring that event back.
                    removed.append(row[0])
                continue  # the text test matched someone else (mary.jane@ for jane@)
            if new is None:
                removed.append(row[0])
            else:
                rewritten.append((new["body"], new["erased_at"], row[0]))
        records = [tuple(r[:3]) for r in conn.execute(
            "SELECT r.provider, r.resource_type, r.resource_id,"
            f" r.event_id = ANY(%(events)s::uuid[]) OR ({match.records}) IS TRUE,"
            " to_jsonb(r) FROM webhook_records r " + _TEXT.format(row="r::text")
            + f" WHERE r.event_id = ANY(%(events)s::uuid[]) OR {match.records}"
            f" OR {match.mentions('t.x')}", params)
            if r[3] or subject.in_value(r[4])]
        counts["webhook_events"] = len(events)
        counts["webhook_deliveries"] = len(removed)
        counts["webhook_deliveries rewritten"] = len(rewritten)
        counts["webhook_records"] = len(records)
        # What the sinks did with the erased events (no personal data, but keyed by events
        # that no longer exist).
        row = conn.execute("SELECT count(*) FROM webhook_sink_outcomes"
                           " WHERE event_id = ANY(%s::uuid[])", [list(events)]).fetchone()
        counts["webhook_sink_outcomes"] = int(row[0]) if row else 0
        erasure.erased_events.update(str(e) for e in events)
        if erasure.dry_run:
            raise psycopg.Rollback()
        conn.execute("DELETE FROM webhook_events WHERE id = ANY(%s::uuid[])", [list(events)])
        conn.execute("DELETE FROM webhook_sink_outcomes WHERE event_id = ANY(%s::uuid[])",
                     [list(events)])
        conn.execute("DELETE FROM webhook_deliveries WHERE id = ANY(%s::uuid[])", [removed])
        with conn.cursor() as cur:
            cur.executemany("UPDATE webhook_deliveries SET body = convert_to(%s, 'UTF8'),"
                            " erased_at = %s::timestamptz WHERE id = %s", rewritten)
            cur.executemany("DELETE FROM webhook_records WHERE provider = %s AND "
                            "resource_type = %s AND resource_id = %s", records)
        conn.execute("INSERT INTO webhook_erasures (subject_sha256, counts) VALUES (%s, %s)",
                     (subject.sha256, Jsonb(erasure.summary(counts))))
    return counts


# -- expiring ---------------------------------------------------------------------------------

# Each table and the retention that applies to it (workers.retention.cutoffs), in the order
# reports print them.
EXPIRES = {"webhook_deliveries": "deliveries", "webhook_events": "events",
           "webhook_sink_outcomes": "events"}
# The time a table's rows expire by: when they were received, or, for an outcome (whose event
# may be stored nowhere: a CRM-only deployment), when its state was reached.
_EXPIRES_BY = {"webhook_sink_outcomes": "at"}

# The oldest rows first, from where the last batch stopped (received_at >= its newest): the
# index scan does not walk again over the entries of rows deleted earlier in the run, which
# stay in the index until vacuum. The rows are locked in the subquery (SKIP LOCKED: a row a
# replay or an erase is changing now waits for the next run) and deleted by ctid, so the
# delete finds them without a lookup per row through the primary key.
DELETE_BATCH = ("DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                "WHERE {at} >= %s AND {at} < %s ORDER BY {at} LIMIT %s "
                "FOR UPDATE SKIP LOCKED)) RETURNING {at}")
# An events batch takes its events' outcome rows along, in the same statement: an outcome
# reached after the cutoff (a late delivery) goes with its event, not days later.
_DELETE_EVENTS_BATCH = ("WITH gone AS (" + DELETE_BATCH.replace("RETURNING {at}",
                                                               "RETURNING id, {at}")
                        + "), outcomes AS (DELETE FROM webhook_sink_outcomes"
                        " WHERE event_id IN (SELECT id FROM gone) RETURNING 1)"
                        " SELECT {at}, (SELECT count(*) FROM outcomes) FROM gone")
# What a dry run counts for the outcomes: those reached before the cutoff, and those of the
# events that go (the events batches take them along).
_OUTCOMES_EXPIRING = ("FROM webhook_sink_outcomes o WHERE o.at < %s OR o.event_id IN"
                      " (SELECT id FROM webhook_events WHERE received_at < %s)")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def expire(url: str, cutoffs: Mapping[str, datetime], *, dry_run: bool = False,
           batch: int = 1000, probe: bool = False) -> Iterator[tuple[str, int]]:
    """Remove rows received before their table's cutoff, ``batch`` at a time, yielding
    ``(table, rows)`` after each batch, until a batch finds fewer than ``batch``. Dry: one
    ``(table, rows that would go)`` per table; ``probe`` (dry): 1 or 0, whether any would."""
    from sinks.postgres import connect

    with connect(url, autocommit=True) as conn:
        for table, retention in EXPIRES.items():
            cutoff = cutoffs.get(retention)
            if cutoff is None:
                continue
            at = _EXPIRES_BY.get(table, "received_at")
            if dry_run:
                where, params = f"FROM {table} WHERE {at} < %s", [cutoff]
                if table == "webhook_sink_outcomes" and cutoffs.get(EXPIRES["webhook_events"]):
                    where = _OUTCOMES_EXPIRING
                    params = [cutoff, cutoffs[EXPIRES["webhook_events"]]]
                query = (f"SELECT count(*) FROM (SELECT 1 {where} LIMIT 1) s" if probe
                         else f"SELECT count(*) {where}")
                row = conn.execute(query, params).fetchone()
                yield table, int(row[0]) if row else 0
                continue
            since = _EPOCH
            while True:
                events = table == "webhook_events"
                statement = _DELETE_EVENTS_BATCH if events else DELETE_BATCH
                cur = conn.execute(statement.format(table=table, at=at), [since, cutoff, batch])
                fetched = cur.fetchall()
                got = [r[0] for r in fetched]
                if got:
                    since = max(got)
                yield table, len(got)
                if events and fetched and fetched[0][1]:
                    yield "webhook_sink_outcomes", int(fetched[0][1])  # taken along
                if len(got) < batch:
                    break
