"""``python -m bench --lifecycle``: the Postgres sink against a large archive, and during a
retention run. Opt in: filling the tables takes minutes.

1. The sink's insert rate (``PostgresSink.send``, 64 events with their raw deliveries per
   transaction, one sender) into an empty ``webhook_events``, then into one that already
   holds ``--lifecycle-rows`` rows (filled server-side with ``INSERT ... SELECT
   generate_series``, as fast as COPY and without shipping the rows). Target: within 20%.
2. The same sink rate while ``ingest retention`` (another process) removes
   ``--retention-rows`` expired deliveries and events, against the rate just before it.

Each rate is measured for ``--duration`` seconds (the retention one: for as long as the
retention run lasts), on the same server, in the same run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import psycopg

from ingest.events import Contact, Delivery, Event
from sinks.postgres import PostgresSink

__all__ = ["run"]

BATCH = 64


def _batch() -> tuple[list[Event], dict[str, Delivery]]:
    now = datetime.now(timezone.utc)
    events, deliveries = [], {}
    for _ in range(BATCH):
        token = uuid.uuid4().hex
        body = orjson.dumps({"event": "email-replied", "lead": {
            "id": token, "email": f"p{token[:8]}@example.com", "name": "Pat Doe"},
            "message": "Thanks, yes: can we talk Tuesday?" * 4}).decode()
        d = Delivery(id=str(uuid.uuid4()), provider="outboundry", received_at=now, headers={},
                     body=body)
        deliveries[d.id] = d
        events.append(Event(provider="outboundry", dedup_key=token, event_type="email-replied",
                            kind="email.replied", occurred_at=now, received_at=now,
                            resource_type="lead", resource_id=token,
                            contact=Contact(email=f"p{token[:8]}@example.com", name="Pat Doe"),
                            data={"id": token, "message": "Thanks"}, delivery_id=d.id))
    return events, deliveries


def _rate(db_url: str, until: Any) -> float:
    """Events per second the sink stores, one sender, until ``until()`` is true."""
    sink = PostgresSink(db_url)
    batches = [_batch() for _ in range(20)]  # built ahead: measure Postgres, not us
    stored, started, i = 0, time.perf_counter(), 0
    try:
        while not until():
            events, deliveries = batches[i % len(batches)] if i < len(batches) else _batch()
            sink.send(events, deliveries=deliveries)
            stored += len(events)
            i += 1
    finally:
        sink.close()
    return stored / (time.perf_counter() - started)


def _for(seconds: float) -> Any:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def _fill_events(conn: psycopg.Connection[Any], rows: int, days_ago: int, tag: str) -> None:
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        conn.execute(
            "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
            "resource_type, resource_id, occurred_at, received_at, contact_email, data) "
            "SELECT gen_random_uuid(), 'outreach', %s || g, 'x', 'email.replied', 'prospect', "
            "(g %% 1000000)::text, now() - make_interval(days => %s, secs => g %% 86400), "
            "now() - make_interval(days => %s, secs => g %% 86400), "
            "'p' || (g %% 500000) || '@example.com', '{\"id\": 1}' "
            "FROM generate_series(%s, %s) g", [tag, days_ago, days_ago, start, start + n - 1])
        print(f"  filled {start + n:,} of {rows:,} events", file=sys.stderr, flush=True)


def run(db_url: str, rows: int, retention_rows: int, duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with psycopg.connect(db_url, autocommit=True) as conn:
        out["empty"] = _rate(db_url, _for(duration))
        started = time.monotonic()
        _fill_events(conn, rows, days_ago=1, tag="fill-")
        conn.execute("VACUUM ANALYZE webhook_events")
        out["fill_seconds"] = time.monotonic() - started
        out["full"] = _rate(db_url, _for(duration))
        out["rows"] = rows
        # Expired rows for the retention run: deliveries and events 400 days old.
        conn.execute(
            "INSERT INTO webhook_deliveries (id, provider, received_at, body) "
            "SELECT gen_random_uuid(), 'outreach', now() - make_interval(days => 400, "
            "secs => g), convert_to(repeat('x', 400), 'UTF8') FROM generate_series(1, %s) g",
            [retention_rows])
        _fill_events(conn, retention_rows, days_ago=400, tag="old-")
        conn.execute("VACUUM ANALYZE")
    out["before_retention"] = _rate(db_url, _for(duration))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(DATABASE_URL=db_url, INGEST_RETENTION_DAYS="30",
               INGEST_EVENTS_RETENTION_DAYS="30")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "retention"], env=env,
                            stdout=subprocess.DEVNULL)
    done = threading.Event()
    threading.Thread(target=lambda: (proc.wait(), done.set()), daemon=True).start()
    out["during_retention"] = _rate(db_url, done.is_set)
    out["retention_seconds"] = time.monotonic() - started
    out["retention_rows"] = retention_rows
    out["retention_ok"] = proc.returncode == 0
    with psycopg.connect(db_url) as conn:
        left = conn.execute("SELECT (SELECT count(*) FROM webhook_events WHERE received_at < "
                            "now() - interval '30 days') + (SELECT count(*) FROM "
                            "webhook_deliveries WHERE received_at < now() - interval '30 days')"
                            ).fetchone()
        out["expired_left"] = int(left[0]) if left else -1
    return out


def render(r: dict[str, Any]) -> str:
    full, retention = r["full"] / r["empty"], r["during_retention"] / r["before_retention"]
    lines = [
        "| measurement | result | ratio | target |",
        "|---|---|---|---|",
        f"| sink into an empty webhook_events | {r['empty']:,.0f} events/s | | |",
        f"| sink into webhook_events holding {r['rows']:,} rows (filled in "
        f"{r['fill_seconds']:.0f} s) | {r['full']:,.0f} events/s | {full:.0%} of empty | "
        f">= 80% {'ok' if full >= 0.8 else 'MISSED'} |",
        f"| sink before the retention run | {r['before_retention']:,.0f} events/s | | |",
        f"| sink during `ingest retention` removing {r['retention_rows']:,} deliveries and "
        f"{r['retention_rows']:,} events ({r['retention_seconds']:.0f} s) | "
        f"{r['during_retention']:,.0f} events/s | {retention:.0%} of before | |",
        f"| expired rows left after the run | {r['expired_left']} | | 0 "
        f"{'ok' if r['expired_left'] == 0 and r['retention_ok'] else 'MISSED'} |",
    ]
    return "\n".join(lines)
