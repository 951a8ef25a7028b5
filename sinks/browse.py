"""Reading stored events back: the console's search, one event with its raw delivery, and a
record's timeline. Read-only; every query is one statement through an index (migrations/0011).

>>> events, cursor = search_events(conn, email="Jane@Example.com", kind="email.*", limit=20)
>>> more, cursor = search_events(conn, email="Jane@Example.com", kind="email.*", limit=20,
...                              after=cursor)

Newest first by (``received_at``, ``id``): ``id`` breaks ties, so events received in the same
microsecond come in one fixed order and a page boundary between them loses or repeats none.
The cursor is opaque to callers (URL-safe base64 of the last row's ``received_at`` and
``id``); each page starts right after it (keyset pagination: a deep page costs what the first
does, and rows stored meanwhile do not shift later pages).

An event is returned as the normalized event (:meth:`ingest.events.Event.to_dict`, the shape
sinks receive) plus ``delivery_id`` and ``stored_at``, JSON-ready (times ISO 8601 UTC with a
``Z``, ids as text). Values are as stored: a row marked ``sanitized`` (sinks.postgres) holds
the form Postgres accepted.

Bad input raises ValueError whose message says what to send instead, and never echoes a value
the operator typed (it may be someone's address).
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ingest.events import isoformat
from ingest.providers.base import is_credential_header
from ingest.subjects import normalized_address
from sinks.postgres import storable_text

__all__ = ["MAX_LIMIT", "MAX_TIMELINE", "get_event", "parse_cursor", "record_timeline",
           "search_events"]

# Most events one search page returns.
MAX_LIMIT = 500
# Most events a record's timeline returns.
MAX_TIMELINE = 5000
# Longest kind pattern taken: stored kinds are at most 100 characters (sinks.postgres).
_MAX_KIND_CHARS = 200

_COLUMNS = ("e.id, e.provider, e.event_type, e.kind, e.resource_type, e.resource_id, e.action,"
            " e.occurred_at, e.received_at, e.workspace_id, e.contact_email, e.contact_name,"
            " e.contact_phone, e.campaign_id, e.data, e.previous, e.changes, e.stale,"
            " e.delivery_id, e.stored_at")
# LIKE's own characters, and the escape character itself.
_LIKE_SPECIAL = re.compile(r"([\\%_])")


def search_events(conn: psycopg.Connection[Any], *, email: str | None = None,
                  resource_id: str | None = None, event_id: str | None = None,
                  delivery_id: str | None = None, provider: str | None = None,
                  kind: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: int = 50,
                  after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the events matching every filter given, newest first, and the cursor of
    the next page (None on the last).

    ``email``: the contact's address, compared as ``ingest erase`` compares it (NFKC,
    case-insensitively, whole). ``kind``: a kind (``email.opened``) or a glob where ``*``
    stands for any text (``email.*``, ``*_replied``); no other character is special.
    ``since`` (included) and ``until`` (excluded) bound ``received_at`` and must carry a time
    zone. ``after``: the cursor a previous page returned, with the same filters."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    where: list[str] = []
    params: list[Any] = []
    if email is not None:
        address = normalized_address(email)
        if not address:
            raise ValueError("email must not be empty")
        where.append("lower(e.contact_email) = %s AND e.contact_email IS NOT NULL")
        params.append(storable_text(address, indexed=True))
    if resource_id is not None:
        if not resource_id:
            raise ValueError("resource_id must not be empty")
        where.append("e.resource_id = %s")
        params.append(storable_text(resource_id, indexed=True))
    if event_id is not None:
        where.append("e.id = %s")
        params.append(_uuid(event_id, "event_id"))
    if delivery_id is not None:
        where.append("e.delivery_id = %s")
        params.append(_uuid(delivery_id, "delivery_id"))
    if provider is not None:
        if not provider:
            raise ValueError("provider must not be empty")
        where.append("e.provider = %s")
        params.append(provider)
    if kind is not None:
        kinds = _kinds(conn, kind)
        if kinds is not None and not kinds:
            return [], None  # no stored kind matches: nothing to read
        where.append("e.kind = ANY(%s)" if kinds is not None else "e.kind LIKE %s ESCAPE '\\'")
        params.append(kinds if kinds is not None else _like(kind))
    _check_time(since, "since")
    _check_time(until, "until")
    if since is not None and until is not None and since > until:
        raise ValueError("since must not be later than until")
    if since is not None:
        where.append("e.received_at >= %s")
        params.append(since)
    if until is not None:
        where.append("e.received_at < %s")
        params.append(until)
    if after is not None:
        at, last = parse_cursor(after)
        where.append("(e.received_at, e.id) < (%s, %s)")
        params += [at, last]
    # One row more than the page: whether there is a next page, without a count.
    rows = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_COLUMNS} FROM webhook_events e"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY e.received_at DESC, e.id DESC LIMIT %s", [*params, limit + 1]).fetchall()
    page = rows[:limit]
    cursor = _cursor(page[-1]["received_at"], page[-1]["id"]) if len(rows) > limit else None
    return [_event(r) for r in page], cursor


def get_event(conn: psycopg.Connection[Any], event_id: str) -> dict[str, Any] | None:
    """The event with this id plus ``delivery``: the raw delivery it came from (``id``,
    ``received_at``, ``headers`` without any credential, ``body`` as text, and
    ``erased_at``, set when ``ingest erase`` rewrote the body), or None when the archive no
    longer holds it. None when there is no such event."""
    found = conn.cursor(row_factory=dict_row).execute(
        f"SELECT {_COLUMNS}, d.id AS d_id, d.received_at AS d_received_at,"
        " d.headers AS d_headers, convert_from(d.body, 'UTF8') AS d_body,"
        " d.erased_at AS d_erased_at"
        " FROM webhook_events e LEFT JOIN webhook_deliveries d ON d.id = e.delivery_id"
        " WHERE e.id = %s", [_uuid(event_id, "event id")]).fetchone()
    if found is None:
        return None
    event = _event(found)
    event["delivery"] = None if found["d_id"] is None else {
        "id": str(found["d_id"]),
        "received_at": isoformat(found["d_received_at"]),
        # The acceptor keeps no credential in the archive; rows written by older releases,
        # or by hand, are filtered again on the way out.
        "headers": {k: v for k, v in (found["d_headers"] or {}).items()
                    if not is_credential_header(k)},
        "body": found["d_body"],
        "erased_at": isoformat(found["d_erased_at"]) if found["d_erased_at"] else None,
    }
    return event


def record_timeline(conn: psycopg.Connection[Any], provider: str, resource_type: str,
                    resource_id: str, limit: int = 500,
                    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A record's row in ``webhook_records`` (its latest state; None when it has none: only
    activity was seen, or it was erased) and the events about it, oldest first by
    (``occurred_at``, ``id``), the order its state is decided in: the newest ``limit`` of
    them when there are more."""
    if not 1 <= limit <= MAX_TIMELINE:
        raise ValueError(f"limit must be between 1 and {MAX_TIMELINE}")
    if not (provider and resource_type and resource_id):
        raise ValueError("a record needs a provider, a resource type and a resource id")
    key = [provider, storable_text(resource_type, indexed=True),
           storable_text(resource_id, indexed=True)]
    cur = conn.cursor(row_factory=dict_row)
    record = cur.execute(
        "SELECT provider, resource_type, resource_id, occurred_at, kind, event_id, data,"
        " deleted, updated_at FROM webhook_records"
        " WHERE provider = %s AND resource_type = %s AND resource_id = %s", key).fetchone()
    rows = cur.execute(
        f"SELECT * FROM (SELECT {_COLUMNS} FROM webhook_events e WHERE e.resource_id = %s"
        " AND e.provider = %s AND e.resource_type = %s"
        " ORDER BY e.occurred_at DESC, e.id DESC LIMIT %s) newest"
        " ORDER BY occurred_at, id", [key[2], key[0], key[1], limit]).fetchall()
    if record is not None:
        record = dict(record, occurred_at=isoformat(record["occurred_at"]),
                      event_id=str(record["event_id"]),
                      updated_at=isoformat(record["updated_at"]))
    return record, [_event(r) for r in rows]


def parse_cursor(text: str) -> tuple[datetime, str]:
    """(received_at, event id) of the last event of a page, from the cursor
    :func:`search_events` returned."""
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))
        at, _, last = raw.decode("ascii").partition("|")
        received_at = datetime.fromisoformat(at)
        event_id = str(uuid.UUID(last))
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError("bad cursor: pass the 'next' value of the previous page as it is, "
                         "or leave it out to start from the newest event") from None
    if received_at.tzinfo is None:
        raise ValueError("bad cursor: pass the 'next' value of the previous page as it is, "
                         "or leave it out to start from the newest event")
    return received_at, event_id


def _cursor(received_at: datetime, event_id: Any) -> str:
    raw = f"{received_at.isoformat()}|{event_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _uuid(text: str, what: str) -> str:
    try:
        return str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{what} must be a UUID such as "
                         "6f2b6c1e-9a57-4c8e-9d0a-1f3b5e7c9a21") from None


def _check_time(value: datetime | None, what: str) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{what} needs a time zone, e.g. 2024-05-01T00:00:00Z")


# Most distinct kinds a glob is matched against one by one (see _kinds).
_MAX_KINDS = 1000
# The distinct stored kinds, one probe of the kind index each (a loose index scan: Postgres
# has no skip scan), instead of reading every row.
_STORED_KINDS = """
WITH RECURSIVE k(kind) AS (
    SELECT min(kind) FROM webhook_events
    UNION ALL
    SELECT (SELECT min(e.kind) FROM webhook_events e WHERE e.kind > k.kind)
    FROM k WHERE k.kind IS NOT NULL
)
SELECT kind FROM k WHERE kind IS NOT NULL LIMIT %s
"""


def _kinds(conn: psycopg.Connection[Any], pattern: str) -> list[str] | None:
    """The kinds a kind or glob (``*``: any text) stands for: the kind itself, or the stored
    kinds the glob matches (``kind = ANY(...)`` is what the kind index and the planner's
    statistics serve; ``LIKE`` with a leading or inner ``*`` is neither, and a glob matching
    few rows would read the table newest first until it found a page). None: more distinct
    kinds are stored than is worth listing; the caller matches with LIKE."""
    if not pattern or len(pattern) > _MAX_KIND_CHARS:
        raise ValueError(f"kind must be a kind such as email.opened or a pattern such as "
                         f"email.* (1 to {_MAX_KIND_CHARS} characters)")
    if "*" not in pattern:
        return [pattern]
    stored = [r[0] for r in conn.execute(
        _STORED_KINDS + " ", [_MAX_KINDS + 1]).fetchall()]
    if len(stored) > _MAX_KINDS:
        return None
    glob = re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)
    return [k for k in stored if glob.fullmatch(k)]


def _like(pattern: str) -> str:
    """A glob as a LIKE pattern: ``*`` is any text, LIKE's own characters are themselves."""
    return "%".join(_LIKE_SPECIAL.sub(r"\\\1", part) for part in pattern.split("*"))


def _event(row: dict[str, Any]) -> dict[str, Any]:
    email, name, phone = row["contact_email"], row["contact_name"], row["contact_phone"]
    return {
        "id": str(row["id"]),
        "provider": row["provider"],
        "event_type": row["event_type"],
        "kind": row["kind"],
        "resource_type": row["resource_type"],
        "resource_id": row["resource_id"],
        "action": row["action"],
        "occurred_at": isoformat(row["occurred_at"]),
        "received_at": isoformat(row["received_at"]),
        "workspace_id": row["workspace_id"],
        # As Event.to_dict: null when the provider named nobody.
        "contact": ({"email": email, "name": name, "phone": phone}
                    if email or name or phone else None),
        "campaign_id": row["campaign_id"],
        "data": row["data"],
        "previous": row["previous"],
        "changes": row["changes"],
        "stale": row["stale"],
        "delivery_id": str(row["delivery_id"]) if row["delivery_id"] is not None else None,
        "stored_at": isoformat(row["stored_at"]),
    }
