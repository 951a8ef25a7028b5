"""Per sink, how many events reached each state lately: the console's overview ("each sink's
delivered, failed and dead-lettered in the last hour").

Counted from what ``webhook_sink_outcomes`` (sinks.outcomes) holds: the latest state of each
(event, sink), by the time it was reached. An event that failed at 10:05 and was delivered at
10:20 counts once, as delivered: these are events by where they stand now, not attempts
(``ingest_sink_events_total`` counts attempts, per worker). The Postgres sink's first-attempt
deliveries have no row (their stored row is the proof: sinks.outcomes, ``DERIVED_SINK``), so
its ``delivered`` also counts the events received and stored in the window that have no row of
their own. Received, too: ``received_at`` has an index and ``stored_at`` has none (one more
index would cost every insert), and a stored event was received at most seconds before, except
when the sink was behind; an event received before the window and stored in it is then not
counted here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

__all__ = ["outcome_counts"]

_BY_STATE = ("SELECT sink, state, count(*) FROM webhook_sink_outcomes"
             " WHERE at >= %s GROUP BY sink, state")
# Received and stored in the window with no outcome row of the postgres sink: delivered at
# first attempt. Through the received_at index: the window's events only, never the table.
_STORED = ("SELECT count(*) FROM webhook_events e WHERE e.received_at >= %(since)s"
           " AND e.stored_at >= %(since)s AND NOT EXISTS"
           " (SELECT 1 FROM webhook_sink_outcomes o WHERE o.event_id = e.id"
           " AND o.sink = 'postgres')")


def outcome_counts(conn: psycopg.Connection[Any], since: datetime,
                   derived_sink: str | None = "postgres") -> dict[str, dict[str, int]]:
    """sink -> state (``delivered``, ``stale``, ``retrying``, ``dead``) -> events that reached
    it at or after ``since`` and are still there. ``derived_sink``: the enabled sink whose
    first-attempt deliveries are its stored rows (None when the postgres sink is not
    enabled: its rows then prove nothing about any sink)."""
    out: dict[str, dict[str, int]] = {}
    for sink, state, count in conn.execute(_BY_STATE, [since]).fetchall():
        out.setdefault(str(sink), {})[str(state)] = int(count)
    if derived_sink is not None:
        found = conn.execute(_STORED, {"since": since}).fetchone()
        stored = int(found[0]) if found else 0
        counts = out.setdefault(derived_sink, {})
        counts["delivered"] = counts.get("delivered", 0) + stored
    return out
