"""What each sink did with each event, kept in ``webhook_sink_outcomes`` (migrations/0010).

One row per (event, sink) once that sink's delivery of the event reached a state:

- ``delivered``: the sink took it (``attempts``: which attempt of its job did);
- ``stale``: skipped as stale (``<SINK>_SKIP_STALE``), when processed or just before sending;
- ``retrying``: the job failed and RQ runs it again at ``next_attempt_at``; ``reason`` why;
- ``dead``: no retries left, or the sink refused it for good: in the failed registry.

A sink that takes the event (its ``<NAME>_EVENTS`` globs match the kind) and has no row is
``pending``: nothing is written before a job runs. Rows only move forward in time: a write
replaces a row only when its ``at`` is not older (a slow worker's late "retrying" never hides
a "delivered"); a dead letter retried later writes its new state over ``dead``.

The Postgres sink's own ``delivered`` is derived, not written, when its first attempt
succeeds: the event's row in ``webhook_events`` is the proof, ``stored_at`` the time
(docs/sinks.md, "Outcomes": this saves a row per stored event). Its other states, and a
``delivered`` after a retry (the attempt count), are rows like any sink's.

The workers write (workers.outcomes: one statement per job, a Redis backlog while Postgres is
away); the console reads with :func:`sink_outcomes`; retention and ``ingest erase`` remove rows
with their events (sinks.postgres_data).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from ingest.config import Settings
from ingest.exceptions import ConfigError
from sinks.base import matches_any
from sinks.registry import load_sink_classes, sink_event_globs

__all__ = ["DERIVED_SINK", "DISCARDED", "PENDING", "STATES", "Outcome", "dead_letters_discarded",
           "dead_letters_retried", "enabled_sink_globs", "sink_outcomes", "write"]

# The states a row holds; "pending" is the absence of one.
STATES = ("delivered", "stale", "retrying", "dead")
PENDING = "pending"
# The sink whose first-attempt "delivered" is its stored row (webhook_events.stored_at).
DERIVED_SINK = "postgres"

_COLUMNS = ("event_id", "sink", "state", "attempts", "at", "next_attempt_at", "reason")
_TYPES = {"event_id": "uuid", "attempts": "integer", "at": "timestamptz",
          "next_attempt_at": "timestamptz"}
# A job's rows in one statement (one JSON document, as the Postgres sink writes events): one
# round trip, autocommit. Only a row not older than the stored one replaces it.
_UPSERT = f"""
INSERT INTO webhook_sink_outcomes AS o ({", ".join(_COLUMNS)})
SELECT {", ".join(_COLUMNS)} FROM jsonb_to_recordset(%s::jsonb)
    AS t({", ".join(f"{c} {_TYPES.get(c, 'text')}" for c in _COLUMNS)})
ON CONFLICT (event_id, sink) DO UPDATE SET
    state = excluded.state, attempts = excluded.attempts, at = excluded.at,
    next_attempt_at = excluded.next_attempt_at, reason = excluded.reason
WHERE excluded.at >= o.at
"""
# What a "dead" row's reason starts with once someone discarded the dead letter.
DISCARDED = "discarded from the dead letters"
# A dead letter retried: its "dead" row goes, so the event shows "pending" until its job runs
# (only "dead" rows: a worker that already ran the job wrote something newer).
_RETRIED = ("DELETE FROM webhook_sink_outcomes WHERE sink = %s AND event_id = ANY(%s::uuid[])"
            " AND state = 'dead'")
# A dead letter discarded: the event stays "dead" (it will never reach the sink), and says so.
_DISCARDED = ("UPDATE webhook_sink_outcomes SET at = greatest(at, %s),"
              " reason = left(%s || coalesce(': ' || reason, ''), 1000)"
              " WHERE sink = %s AND event_id = ANY(%s::uuid[]) AND state = 'dead'"
              " AND (reason IS NULL OR reason NOT LIKE %s)")
_SELECT = ("SELECT event_id, sink, state, attempts, at, next_attempt_at, reason"
           " FROM webhook_sink_outcomes WHERE event_id = ANY(%s::uuid[]) AND sink = ANY(%s)")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One sink's state for one event. ``reason`` must already be redacted
    (ingest.redaction.reason): it is stored and shown as given."""

    event_id: str
    sink: str
    state: str
    at: datetime
    attempts: int = 1
    next_attempt_at: datetime | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"outcome state {self.state!r} is not one of {', '.join(STATES)}")
        if self.at.tzinfo is None:
            raise ValueError("an outcome's time must be timezone-aware")
        if self.attempts < 0:
            raise ValueError(f"attempts must be >= 0, not {self.attempts}")

    def to_dict(self) -> dict[str, Any]:
        """Its JSON form (the statement's rows, and the Redis backlog's entries)."""
        return {"event_id": self.event_id, "sink": self.sink, "state": self.state,
                "attempts": self.attempts, "at": self.at.isoformat(),
                "next_attempt_at": self.next_attempt_at.isoformat()
                if self.next_attempt_at else None,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        nxt = data.get("next_attempt_at")
        return cls(event_id=str(data["event_id"]), sink=str(data["sink"]),
                   state=str(data["state"]), at=datetime.fromisoformat(data["at"]),
                   attempts=int(data.get("attempts", 1)),
                   next_attempt_at=datetime.fromisoformat(nxt) if nxt else None,
                   reason=data.get("reason"))


def write(conn: psycopg.Connection[Any], outcomes: Iterable[Outcome]) -> int:
    """Write ``outcomes`` in one statement (``conn`` in autocommit: one round trip). Of several
    rows for one (event, sink), the newest goes. Returns how many rows were sent."""
    newest: dict[tuple[str, str], Outcome] = {}
    for o in outcomes:
        key = (o.event_id, o.sink)
        old = newest.get(key)
        if old is None or o.at >= old.at:
            newest[key] = o
    if not newest:
        return 0
    # In key order: two workers upserting overlapping rows lock them in the same order.
    rows = [newest[k].to_dict() for k in sorted(newest)]
    conn.execute(_UPSERT, [orjson.dumps(rows).decode()])
    return len(rows)


def dead_letters_retried(conn: psycopg.Connection[Any], sink: str,
                         event_ids: Sequence[str]) -> int:
    """Events of ``sink`` put back on its queue from the dead letters: "pending" again, until
    their job writes what happened. Call it before re-queueing. Returns rows changed."""
    if not event_ids:
        return 0
    return conn.execute(_RETRIED, [sink, sorted({_key(i) for i in event_ids})]).rowcount


def dead_letters_discarded(conn: psycopg.Connection[Any], sink: str,
                           event_ids: Sequence[str], at: datetime) -> int:
    """Events of ``sink`` whose dead letters were discarded: still "dead", the reason now
    starting with :data:`DISCARDED` (the console shows who gave up: nobody will retry them).
    Returns rows changed."""
    if not event_ids:
        return 0
    return conn.execute(_DISCARDED, [at, DISCARDED, sink, sorted({_key(i) for i in event_ids}),
                                     DISCARDED + "%"]).rowcount


def enabled_sink_globs(settings: Settings) -> dict[str, tuple[str, ...]]:
    """The enabled sinks (``INGEST_SINKS``, in order) and the kinds each takes
    (``<NAME>_EVENTS``, else the sink's default): what the workers match events against
    (sinks.registry.build_sinks), without building the sinks."""
    classes = load_sink_classes()
    out: dict[str, tuple[str, ...]] = {}
    for name in settings.sinks:
        cls = classes.get(name)
        if cls is None:
            raise ConfigError(
                "INGEST_SINKS",
                f"no sink named {name!r} is installed (installed: {', '.join(sorted(classes))})")
        out[name] = sink_event_globs(settings, cls)
    return out


def _key(event_id: Any) -> str:
    return str(uuid.UUID(str(event_id)))


def sink_outcomes(conn: psycopg.Connection[Any], events: Sequence[Mapping[str, Any]],
                  sinks: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, dict[str, Any]]]:
    """events: rows with at least "id" (str uuid), "kind", "provider", "stored_at"
    (datetime|None). sinks: the enabled sinks' names -> their event globs
    (:func:`enabled_sink_globs`). Returns event id -> sink name -> {"state": "pending" |
    "delivered" | "stale" | "retrying" | "dead", "at": datetime|None, "attempts": int,
    "reason": str|None, "next_attempt_at": datetime|None}. A sink whose globs do not take
    the event is left out; a sink with no row is "pending". One query."""
    taking = {str(e["id"]): [s for s, globs in sinks.items() if matches_any(str(e["kind"]), globs)]
              for e in events}
    ids = sorted({_key(e["id"]) for e in events if taking[str(e["id"])]})
    rows: dict[tuple[str, str], tuple[Any, ...]] = {}
    if ids:
        for row in conn.execute(_SELECT, [ids, list(sinks)]):
            rows[_key(row[0]), row[1]] = row
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for e in events:
        event_id = str(e["id"])
        key = _key(event_id)
        per_sink: dict[str, dict[str, Any]] = {}
        for sink in taking[event_id]:
            row = rows.get((key, sink))
            stored_at = e.get("stored_at")
            if sink == DERIVED_SINK and stored_at is not None and (
                    row is None or row[2] != "delivered"):
                # Stored is delivered, whatever an earlier attempt wrote (docs/sinks.md).
                per_sink[sink] = {"state": "delivered", "at": stored_at, "attempts": 1,
                                  "reason": None, "next_attempt_at": None}
            elif row is None:
                per_sink[sink] = {"state": PENDING, "at": None, "attempts": 0,
                                  "reason": None, "next_attempt_at": None}
            else:
                per_sink[sink] = {"state": row[2], "at": row[4], "attempts": row[3],
                                  "reason": row[6], "next_attempt_at": row[5]}
        out[event_id] = per_sink
    return out
