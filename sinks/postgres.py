"""The Postgres sink: the raw archive and one row per event, in one transaction per batch.

Events go in first with ``ON CONFLICT DO NOTHING RETURNING delivery_id`` (one row per provider
and dedup key: a unique index on a digest of the key, migrations/0003, so a key of any length
fits); only deliveries that produced a new row are archived, in the same transaction.
Sending the same batch twice changes nothing. Each table takes a batch in one statement
whose rows are one JSON document (``jsonb_to_recordset``): three statements per batch, not
three per event.

Everything accepted is storable. Postgres refuses U+0000 in text and jsonb (22P05), and an
index entry past the btree limit (54000): such an event is stored in a form Postgres accepts
and flagged ``sanitized`` (migrations/0009): each U+0000, in any string of any column (jsonb
keys included), becomes U+FFFD, and an indexed value (``resource_type``, ``resource_id``,
``contact_email``; ``webhook_records``' key) longer than ``MAX_INDEXED_BYTES`` becomes its start
and the SHA-256 of the whole (:func:`storable_text`). The raw archive keeps the exact bytes
(``webhook_deliveries.body`` is bytea), and the other sinks get the event as it was. A batch
pays for this only when its JSON document holds an escaped U+0000 or a long indexed value.

Data the database still refuses (other SQLSTATE classes 22, data exceptions, and 54, limits),
or that cannot be written as JSON, is a permanent error of the event that carries it, never
"Postgres unavailable": a batch with such an event is written again event by event, and the
error names only the events at fault, so the deliver job dead-letters them alone and the
rest of the batch is stored.
``delivery_id`` has no foreign key (see migrations/0002): this module is what keeps every
stored event's delivery in the archive.
In the same transaction, ``webhook_records`` takes the newest state of each record the events
are about (see ``_UPSERT_RECORD``).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ingest import safejson
from ingest.config import Settings
from ingest.events import Delivery, Event
from ingest.exceptions import PermanentSinkError, TransientSinkError
from ingest.redaction import reason
from sinks import postgres_data

if TYPE_CHECKING:
    from ingest.subjects import Erasure

__all__ = [
    "EVENT_COLUMNS",
    "NORMALIZED_COLUMNS",
    "ArchiveQuery",
    "MigrationError",
    "PostgresSink",
    "archived_deliveries",
    "connect",
    "count_archived",
    "migrate",
    "normalized_values",
    "stored_differences",
    "superseded_in_records",
]

log = logging.getLogger("sinks.postgres")

# Serializes concurrent `ingest migrate` runs (docker-compose may start several).
_MIGRATION_LOCK = 7_201_514_101

# The columns of webhook_events that normalization decides: what a replay compares with today's
# normalizers and, when they differ, updates in place (received_at, delivery_id, stored_at and
# stale keep their original values, except that an activity event is never stale: a row stored
# stale by a release that judged activity like state is cleared).
NORMALIZED_COLUMNS = (
    "event_type", "kind", "resource_type", "resource_id", "action", "occurred_at",
    "workspace_id", "contact_email", "contact_name", "contact_phone", "campaign_id",
    "data", "previous", "changes",
)
# Every column an insert writes (the order of the table).
_EVENT_COLUMNS = ("id", "provider", "dedup_key", *NORMALIZED_COLUMNS[:6], "received_at",
                  *NORMALIZED_COLUMNS[6:13], "delivery_id", "stale", NORMALIZED_COLUMNS[13],
                  "sanitized")

# Public for the bench's ceiling of one-row inserts (bench.ceilings.pg_inserts).
EVENT_COLUMNS = _EVENT_COLUMNS

# The same insert for a whole batch in one statement, its rows one JSON array (written by
# orjson in one call, read by Postgres in C), in array order. One statement per batch instead
# of one per event costs Postgres one parse, plan and executor start-up per batch instead of
# 64, and psycopg one parameter instead of 20 per event (psycopg adapts arrays in Python,
# slower than the per-row statements; a JSON document costs it nothing).
# Each column's type as jsonb_to_recordset reads it; a column not named here is text.
_EVENT_TYPES = {"id": "uuid", "occurred_at": "timestamptz", "received_at": "timestamptz",
                "data": "jsonb", "previous": "jsonb", "changes": "jsonb",
                "delivery_id": "uuid", "stale": "boolean", "sanitized": "boolean"}
_INSERT_EVENTS = f"""
INSERT INTO webhook_events ({", ".join(_EVENT_COLUMNS)})
SELECT {", ".join(_EVENT_COLUMNS)} FROM jsonb_to_recordset(%s::jsonb)
    AS t({", ".join(f"{c} {_EVENT_TYPES.get(c, 'text')}" for c in _EVENT_COLUMNS)})
ON CONFLICT DO NOTHING
RETURNING delivery_id
"""

_UPDATE_NORMALIZED = ("UPDATE webhook_events SET "
                      + ", ".join(f"{c} = %({c})s" for c in NORMALIZED_COLUMNS)
                      + ", sanitized = %(sanitized)s"
                      + ", stale = stale AND NOT %(activity)s WHERE id = %(id)s")

# The body is the exact text received (UTF-8, checked by the acceptor): its bytes again.
_INSERT_DELIVERIES = """
INSERT INTO webhook_deliveries (id, provider, received_at, headers, body, erased_at)
SELECT id, provider, received_at, headers, convert_to(body, 'UTF8'), erased_at
FROM jsonb_to_recordset(%s::jsonb)
    AS t(id uuid, provider text, received_at timestamptz, headers jsonb, body text,
         erased_at timestamptz)
ON CONFLICT (id) DO NOTHING
"""

# The latest state per record: only an event newer by (occurred_at, event_id), the order every
# worker agrees on, replaces the stored one; the same event again rewrites it (a replay
# brings today's normalization), which a retried batch does harmlessly. One statement for a
# batch's records, at most one row per record (a statement may not update a row twice).
_UPSERT_RECORD = """
INSERT INTO webhook_records AS r (
    provider, resource_type, resource_id, occurred_at, kind, event_id, data, deleted, updated_at)
SELECT provider, resource_type, resource_id, occurred_at, kind, event_id, data, deleted, now()
FROM jsonb_to_recordset(%s::jsonb) AS t(provider text, resource_type text, resource_id text,
    occurred_at timestamptz, kind text, event_id uuid, data jsonb, deleted boolean)
ON CONFLICT (provider, resource_type, resource_id) DO UPDATE SET
    occurred_at = excluded.occurred_at, kind = excluded.kind, event_id = excluded.event_id,
    data = excluded.data, deleted = excluded.deleted, updated_at = excluded.updated_at
WHERE r.event_id = excluded.event_id
   OR (excluded.occurred_at, excluded.event_id) > (r.occurred_at, r.event_id)
"""


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection that fails fast when the server is away, and says who we are."""
    kwargs.setdefault("connect_timeout", 5)
    kwargs.setdefault("application_name", "webhook-ingest")
    return psycopg.connect(url, **kwargs)


class MigrationError(Exception):
    """The database cannot take the schema as it is; the message says how to fix it."""


def migrate(url: str, wait: float = 0.0) -> list[str]:
    """Apply every migration not applied yet, under an advisory lock. Returns what ran.

    ``wait`` > 0: a server that does not answer yet is tried again for that many seconds
    (``ingest.startup``) before :class:`ingest.startup.StartupError` is raised. A database
    whose encoding is not UTF8 raises :class:`MigrationError` before anything is written.
    """
    files = sorted(
        (f for f in resources.files("sinks.migrations").iterdir() if f.name.endswith(".sql")),
        key=lambda f: f.name,
    )
    applied: list[str] = []
    if wait > 0:
        from ingest.startup import wait_for_postgres

        conn = wait_for_postgres(url, lambda: connect(url, autocommit=True), wait)
    else:
        conn = connect(url, autocommit=True)
    with conn:
        _require_utf8(conn)
        # Several `ingest migrate` may start at once (one per container, or per host): the
        # lock makes them run one after the other, and the later ones find nothing to do.
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS webhook_ingest_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT name FROM webhook_ingest_migrations")}
            for f in files:
                if f.name in done:
                    continue
                with conn.transaction():
                    conn.execute(f.read_text())
                    conn.execute("INSERT INTO webhook_ingest_migrations (name) VALUES (%s)",
                                 (f.name,))
                applied.append(f.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


def _require_utf8(conn: psycopg.Connection[Any]) -> None:
    """Refuse a database that cannot hold every name and message as sent.

    Events carry names and message text in any language. A LATIN1 (or other one-byte)
    database refuses many of them; a SQL_ASCII one stores bytes unchecked and hands text back
    as bytes, so even the names of applied migrations would never match again.
    """
    encoding = conn.info.parameter_status("server_encoding") or "unknown"
    if encoding.upper() in ("UTF8", "UTF-8"):
        return
    name = conn.info.dbname
    raise MigrationError(
        f"database {name!r} has encoding {encoding}; webhook-ingest needs UTF8 (names and "
        f"message text come in every language). Create the database as UTF8, e.g. "
        f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0 (with data already "
        f"in it: pg_dump it, create it again as UTF8, pg_restore), then run `ingest migrate`.")


# SQLSTATE classes of errors in the data itself: data exceptions and program limits.
_DATA_CLASSES = ("22", "54")
# Longest kind stored as is (characters); a longer one is no kind of our vocabulary (the
# provider's own name stays whole in event_type) and would only bloat the kind index.
_MAX_KIND_CHARS = 100


# Longest value (UTF-8 bytes) an indexed text column stores as it is: three of them in one
# index entry stay well under the btree limit (about 2,700 bytes).
MAX_INDEXED_BYTES = 800
# The columns of webhook_events (and webhook_records' key) that an index holds.
_INDEXED = ("resource_type", "resource_id", "contact_email")
# Where a cut indexed value's digest starts.
_CUT = "…sha256:"
_NUL = "\x00"
_REPLACEMENT = "\ufffd"


def storable_text(value: str | None, indexed: bool = False) -> str | None:
    """``value`` as Postgres stores it: U+0000 as U+FFFD and, for an indexed column, at most
    ``MAX_INDEXED_BYTES`` bytes (its start, ``…sha256:`` and the hex SHA-256 of the whole, so
    two long values stay apart)."""
    if value is None:
        return None
    if _NUL in value:
        value = value.replace(_NUL, _REPLACEMENT)
    if indexed and len(value) * 4 > MAX_INDEXED_BYTES:
        raw = value.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_INDEXED_BYTES:
            digest = hashlib.sha256(raw).hexdigest()
            room = MAX_INDEXED_BYTES - len((_CUT + digest).encode())
            value = raw[:room].decode("utf-8", "ignore") + _CUT + digest
    return value


def _storable_json(value: Any) -> Any:
    """A JSON value with U+0000 replaced in every string and key."""
    if isinstance(value, str):
        return value.replace(_NUL, _REPLACEMENT) if _NUL in value else value
    if isinstance(value, dict):
        return {(k.replace(_NUL, _REPLACEMENT) if isinstance(k, str) else k): _storable_json(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_storable_json(v) for v in value]
    return value


def _storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """An event's (or record's) row in a form Postgres accepts, ``sanitized`` set when that
    changed anything."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if isinstance(value, str):
            out[column] = storable_text(value, column in _INDEXED)
        elif isinstance(value, (dict, list)):
            out[column] = _storable_json(value)
        else:
            out[column] = value
    if "sanitized" in row:
        out["sanitized"] = row["sanitized"] or any(out[c] != row[c] for c in row)
    return out


def _suspect(doc: str, rows: Sequence[dict[str, Any]]) -> bool:
    """Whether a batch's rows may hold something Postgres refuses: an escaped U+0000 in their
    JSON document (orjson writes U+0000 as ``\\u0000``), or a long indexed value."""
    return "\\u0000" in doc or any(
        isinstance(row.get(c), str) and len(row[c]) * 4 > MAX_INDEXED_BYTES
        for row in rows for c in _INDEXED)


def _storable_doc(rows: list[dict[str, Any]]) -> str:
    """The JSON document of a batch's rows, each in a form Postgres accepts."""
    doc = _json_rows(rows)
    if _suspect(doc, rows):
        doc = _json_rows([_storable_row(row) for row in rows])
    return doc


def _json(value: Any) -> bytes:
    """The jsonb columns, written with orjson (several times faster than the standard
    library, which psycopg uses by default); what orjson refuses, the standard library writes."""
    return safejson.dumps(value)


def _stored_kind(e: Event) -> str:
    return e.kind if len(e.kind) <= _MAX_KIND_CHARS else "unknown"


def _normalized(e: Event, adapt: bool) -> tuple[Any, ...]:
    """The event's NORMALIZED_COLUMNS, in order; ``adapt``: as psycopg parameters (jsonb
    wrapped, written with orjson), else as Python values. A tuple: this runs for every
    stored event."""
    c = e.contact
    data: Any = e.data
    previous: Any = e.previous
    changes: Any = e.changes
    if adapt:
        # "data" is always written (an object at least); the other jsonb columns may be NULL.
        data = Jsonb(data, dumps=_json)
        previous = Jsonb(previous, dumps=_json) if previous is not None else None
        changes = Jsonb(changes, dumps=_json) if changes is not None else None
    return (
        e.event_type, _stored_kind(e), e.resource_type, e.resource_id, e.action, e.occurred_at,
        e.workspace_id, c.email if c else None, c.name if c else None, c.phone if c else None,
        e.campaign_id, data, previous, changes,
    )


def normalized_values(e: Event) -> dict[str, Any]:
    """The event's normalized columns of webhook_events as stored (in the form Postgres
    accepts: :func:`storable_text`), as Python values (jsonb decoded)."""
    row = dict(zip(NORMALIZED_COLUMNS, _normalized(e, adapt=False)))
    return {c: v for c, v in _storable_row(row).items()}


def _json_rows(rows: list[dict[str, Any]]) -> str:
    """A batch's rows as the JSON text jsonb_to_recordset reads (timestamps already ISO 8601
    text, so the standard library can write what orjson refuses)."""
    return _json(rows).decode("utf-8")


def _event_values(e: Event) -> dict[str, Any]:
    """One event's row for _INSERT_EVENTS: _EVENT_COLUMNS and their values."""
    row = dict(zip(NORMALIZED_COLUMNS, _normalized(e, adapt=False)))
    row.update(id=e.id, provider=e.provider, dedup_key=e.dedup_key,
               occurred_at=e.occurred_at.isoformat(), received_at=e.received_at.isoformat(),
               delivery_id=e.delivery_id, stale=e.stale, sanitized=False)
    return row


# -- the archive, for ingest replay ------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveQuery:
    """Which archived deliveries to read: by provider, receive time, the dedup key of an
    event one of them produced, or the delivery's id."""

    provider: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    dedup_key: str | None = None
    delivery_id: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.provider:
            clauses.append("d.provider = %s")
            params.append(self.provider)
        if self.since:
            clauses.append("d.received_at >= %s")
            params.append(self.since)
        if self.until:
            clauses.append("d.received_at < %s")
            params.append(self.until)
        if self.dedup_key:
            clauses.append("d.id IN (SELECT delivery_id FROM webhook_events WHERE dedup_key = %s)")
            params.append(self.dedup_key)
        if self.delivery_id:
            clauses.append("d.id = %s")
            params.append(self.delivery_id)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def count_archived(conn: psycopg.Connection[Any], query: ArchiveQuery) -> int:
    where, params = query.where()
    found = conn.execute(f"SELECT count(*) FROM webhook_deliveries d{where}", params).fetchone()
    return int(found[0]) if found else 0


def archived_deliveries(conn: psycopg.Connection[Any], query: ArchiveQuery,
                        batch: int) -> Iterator[list[Delivery]]:
    """The selected archive rows, oldest first, ``batch`` at a time (keyset pagination: no
    long transaction, no OFFSET rescans)."""
    where, params = query.where()
    last: tuple[datetime, str] | None = None
    while True:
        page_where, page_params = where, list(params)
        if last is not None:
            page_where += (" AND " if where else " WHERE ") + "(d.received_at, d.id) > (%s, %s)"
            page_params += [last[0], last[1]]
        found = conn.execute(
            "SELECT d.id, d.provider, d.received_at, d.headers, d.body, d.erased_at"
            " FROM webhook_deliveries d"
            f"{page_where} ORDER BY d.received_at, d.id LIMIT {int(batch)}", page_params).fetchall()
        if not found:
            return
        last = (found[-1][2], str(found[-1][0]))
        yield [Delivery(id=str(r[0]), provider=r[1], received_at=r[2], headers=dict(r[3] or {}),
                        body=bytes(r[4]).decode("utf-8"), erased_at=r[5]) for r in found]


def stored_differences(conn: psycopg.Connection[Any], events: Sequence[Event],
                       ) -> dict[str, dict[str, tuple[Any, Any]]]:
    """For each event already in webhook_events, by id: the normalized columns whose stored
    value differs from the event's, as (stored, event's), and ``stale`` for an activity event
    stored stale (see NORMALIZED_COLUMNS). Empty: unchanged. Events not stored yet are
    absent."""
    if not events:
        return {}
    found = conn.cursor(row_factory=dict_row).execute(
        "SELECT id, stale, " + ", ".join(NORMALIZED_COLUMNS) + " FROM webhook_events "
        "WHERE id = ANY(%s::uuid[])", [[e.id for e in events]]).fetchall()
    stored = {str(r["id"]): r for r in found}
    out: dict[str, dict[str, tuple[Any, Any]]] = {}
    for e in events:
        row = stored.get(e.id)
        if row is None:
            continue
        today = normalized_values(e)
        # Timestamps compare as instants (aware datetimes), jsonb columns as decoded JSON.
        out[e.id] = {c: (row[c], today[c]) for c in NORMALIZED_COLUMNS if row[c] != today[c]}
        if e.activity and row["stale"]:
            out[e.id]["stale"] = (True, False)
    return out


def superseded_in_records(conn: psycopg.Connection[Any], events: Sequence[Event]) -> set[str]:
    """Ids of the state ``events`` whose record in webhook_records holds a newer event, by
    the order every worker uses (occurred_at, then event id): what a replay must not hand to a
    sink that skips stale events. One query."""
    about = [(e, r) for e in events if (r := e.state_record) is not None]
    if not about:
        return set()
    about = [(e, _stored_record(r)) for e, r in about]
    keys = sorted({r for _, r in about})
    found = conn.execute(
        "SELECT r.provider, r.resource_type, r.resource_id, r.occurred_at, r.event_id"
        " FROM webhook_records r JOIN unnest(%s::text[], %s::text[], %s::text[])"
        " AS k(provider, resource_type, resource_id)"
        " USING (provider, resource_type, resource_id)",
        [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]]).fetchall()
    stored = {(p, t, i): (at, str(event_id)) for p, t, i, at, event_id in found}
    out: set[str] = set()
    for event, record in about:
        mark = stored.get(record)
        if mark is not None and (mark[0], uuid.UUID(mark[1])) > (event.occurred_at,
                                                                  uuid.UUID(event.id)):
            out.add(event.id)
    return out


def _stored_record(record: tuple[str, str, str]) -> tuple[str, str, str]:
    """A record's key as webhook_records stores it (:func:`storable_text`)."""
    provider, resource_type, resource_id = record
    return (storable_text(provider) or "", storable_text(resource_type, True) or "",
            storable_text(resource_id, True) or "")


def _upsert_records(cur: psycopg.Cursor[Any], events: Sequence[Event]) -> None:
    """Bring webhook_records up to date with ``events``, inside the caller's transaction.
    Rows are written in key order, so two batches touching the same records lock them in the
    same order instead of deadlocking."""
    newest: dict[tuple[str, str, str], Event] = {}
    for e in events:
        record = e.state_record  # activity is a fact of its own, not a record's state
        if record is not None:
            seen = newest.get(record)
            if seen is None or (e.occurred_at, e.id) > (seen.occurred_at, seen.id):
                newest[record] = e
    # Of a batch's events about one record, only the newest can be the record's state once
    # they are all applied in (occurred_at, id) order: it is the only one written.
    if newest:
        rows = [{"provider": record[0], "resource_type": record[1], "resource_id": record[2],
                 "occurred_at": e.occurred_at.isoformat(), "kind": _stored_kind(e),
                 "event_id": e.id, "data": e.data, "deleted": e.deletes}
                for record, e in newest.items()]
        doc = _json_rows(rows)
        if _suspect(doc, rows):
            rows = [_storable_row(row) for row in rows]
        # In the order of the stored keys (those of long ids are cut), see above.
        rows.sort(key=lambda r: (r["provider"], r["resource_type"], r["resource_id"]))
        cur.execute(_UPSERT_RECORD, [_json_rows(rows)])


def _update_params(e: Event) -> dict[str, Any]:
    """The parameters of _UPDATE_NORMALIZED for one event, in the form Postgres accepts."""
    raw = dict(zip(NORMALIZED_COLUMNS, _normalized(e, adapt=False)), sanitized=False)
    row = _storable_row(raw)
    for column in ("data", "previous", "changes"):
        if row[column] is not None or column == "data":
            row[column] = Jsonb(row[column], dumps=_json)
    return dict(row, id=e.id, activity=e.activity)


class PostgresSink:
    name: ClassVar[str] = "postgres"
    default_events: ClassVar[tuple[str, ...]] = ("*",)
    # The full log keeps stale events; webhook_records takes only newer data anyway.
    skip_stale_default: ClassVar[bool] = False
    needs_raw: ClassVar[bool] = True
    # One transaction takes this many events as well as 64, for less per event: a worker
    # joins waiting deliver jobs into one send up to this many (workers.grouping).
    batch_events: ClassVar[int] = 256
    # What it keeps, for `ingest erase` and retention (sinks.postgres_data).
    title: ClassVar[str] = "Postgres"
    erases: ClassVar[tuple[str, ...]] = postgres_data.ERASES
    expires: ClassVar[Mapping[str, str]] = postgres_data.EXPIRES

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresSink:
        return cls(settings.require_database())

    @classmethod
    def for_stored_data(cls, settings: Settings) -> PostgresSink:
        """The sink for erasing and expiring what it stored, enabled or not: DATABASE_URL."""
        return cls(settings.require_database())

    def erase(self, erasure: Erasure) -> dict[str, int]:
        """Remove one subject's rows, in one transaction (sinks.postgres_data.erase)."""
        return postgres_data.erase(self.url, erasure)

    def expire(self, cutoffs: Mapping[str, datetime], *, dry_run: bool = False,
               batch: int = 1000, probe: bool = False) -> Iterator[tuple[str, int]]:
        """Remove expired rows in batches (sinks.postgres_data.expire)."""
        return postgres_data.expire(self.url, cutoffs, dry_run=dry_run, batch=batch,
                                    probe=probe)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url)
        return self._conn

    def send(self, events: Sequence[Event],
             deliveries: Mapping[str, Delivery] | None = None) -> None:
        try:
            self._send(events, deliveries)
        except PermanentSinkError as exc:
            if len(events) <= 1 or exc.event_ids:
                raise
            # Which event is at fault? Each in a transaction of its own: the others are stored.
            refused: dict[str, str] = {}
            for event in events:
                try:
                    self._send([event], deliveries)
                except PermanentSinkError as one:
                    refused[event.id] = str(one)
            if refused:
                first = next(iter(refused.values()))
                raise PermanentSinkError(
                    first if len(refused) == 1 else
                    f"{len(refused)} of {len(events)} events refused; first: {first}",
                    event_ids=list(refused)) from None

    def _send(self, events: Sequence[Event],
              deliveries: Mapping[str, Delivery] | None = None) -> None:
        deliveries = deliveries or {}
        try:
            conn = self._connection()
            # In pipeline mode: BEGIN and the events and records statements go out together,
            # then the deliveries (which depend on the events' reply) with the COMMIT: two
            # round trips to Postgres per batch instead of five.
            with conn.pipeline(), conn.transaction(), conn.cursor() as cur, \
                    conn.cursor() as records:
                cur.execute(_INSERT_EVENTS, [_storable_doc([_event_values(e) for e in events])])
                _upsert_records(records, events)
                new_deliveries = {str(row[0]) for row in cur.fetchall() if row[0] is not None}
                missing = new_deliveries - deliveries.keys()
                if missing:
                    raise PermanentSinkError(
                        f"raw deliveries {sorted(missing)} were not handed to the sink")
                if new_deliveries:
                    cur.execute(_INSERT_DELIVERIES, [_json_rows([
                        {"id": d.id, "provider": d.provider,
                         "received_at": d.received_at.isoformat(), "headers": d.headers,
                         "body": d.body,
                         "erased_at": d.erased_at.isoformat() if d.erased_at else None}
                        for d in (deliveries[i] for i in sorted(new_deliveries))])])
        except (safejson.Unserializable, RecursionError) as exc:
            raise PermanentSinkError(f"event data cannot be stored: {reason(exc)}") from None
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.DataError) or (exc.sqlstate or "")[:2] in _DATA_CLASSES:
                # Before OperationalError: class 54 (an index row too large) is one of them,
                # and it is about this data, not about the database being away.
                raise PermanentSinkError(
                    f"Postgres refused the data (SQLSTATE {exc.sqlstate}): {reason(exc)}"
                ) from None
            if isinstance(exc, (psycopg.OperationalError, psycopg.errors.AdminShutdown)):
                self.close()
                raise TransientSinkError(f"Postgres unavailable: {reason(exc)}") from exc
            if isinstance(exc, psycopg.errors.UndefinedTable):
                raise TransientSinkError(
                    f"schema missing, run `ingest migrate`: {reason(exc)}") from exc
            raise

    def update(self, events: Sequence[Event]) -> None:
        """Rewrite the normalized columns of events already stored (``ingest replay``, after a
        normalizer changed), in one transaction. Events not stored yet are left to ``send``."""
        if not events:
            return
        try:
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPDATE_NORMALIZED, [_update_params(e) for e in events])
        except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
            self.close()
            raise TransientSinkError(f"Postgres unavailable: {exc}") from exc
        except psycopg.Error as exc:
            raise PermanentSinkError(f"Postgres refused the update: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
