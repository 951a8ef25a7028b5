"""``python -m bench --search``: the console's searches (sinks.browse) at 10 million events,
and what their indexes cost the Postgres sink. Opt in: filling the table takes minutes.

1. ``webhook_events`` is filled server-side with ``--search-rows`` events over 30 days, with
   the spread of a real archive (bench.lifecycle's filler, ``spread``: five providers, the
   kinds in everyday proportions, 2,000,000 records, 1,000,000 contacts in mixed case, 20 hot
   contacts with thousands of events each), under the indexes of the release before
   migration 0011 (loaded first, indexed after, as a bulk load is).
2. The sink's insert rate (bench.lifecycle's window: ``PostgresSink.send``, 64 events with
   their raw deliveries per transaction) under those indexes; then migration 0011 itself,
   timed (how long it holds its lock on a table this size); then the rate again, under the
   new indexes, and once more without them and with them (interleaved): the same table, the
   same run.
3. Every search the console offers, ``--search-runs`` times each with varied values (a
   contact, a hot contact, a record, an event, a delivery, a provider, a kind or a glob, a
   time range, and their combinations; first pages and deep pages, 5,000 rows in, through a
   cursor): p50, p95 and max of the call as the console makes it (``search_events``,
   connection open), against the 300 ms target.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import psycopg

from bench.lifecycle import fill_events, window
from sinks.browse import get_event, record_timeline, search_events
from sinks.postgres import connect

__all__ = ["render", "run"]

TARGET_MS = 300.0
DAYS = 30
# The indexes migration 0011 replaces, as the release before it had them.
_BEFORE = (
    "CREATE INDEX IF NOT EXISTS webhook_events_contact_email ON webhook_events "
    "(lower(contact_email)) WHERE contact_email IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS webhook_events_resource ON webhook_events "
    "(provider, resource_type, resource_id)",
)
_NEW = ("webhook_events_contact_received", "webhook_events_resource_received",
        "webhook_events_provider_received")
_SECONDARY = ("webhook_events_kind_occurred", "webhook_events_received",
              "webhook_events_delivery")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _disk() -> str:
    usage = shutil.disk_usage("/")
    return f"{usage.free / 2**30:.0f} GiB free of {usage.total / 2**30:.0f}"


def _secondary_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index "
        "WHERE indrelid = 'webhook_events'::regclass AND NOT indisprimary").fetchall()]


def _timed(conn: psycopg.Connection[Any], statements: list[str]) -> float:
    started = time.monotonic()
    for statement in statements:
        conn.execute(statement)
    return time.monotonic() - started


def _without_new(conn: psycopg.Connection[Any]) -> None:
    """The table's indexes as the release before migration 0011 had them."""
    for name in _NEW:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    for statement in _BEFORE:
        conn.execute(statement)


def _migration_0011() -> str:
    return (resources.files("sinks.migrations") / "0011_search_indexes.sql").read_text()


def _deep_cursor(conn: psycopg.Connection[Any], depth: int, **filters: Any) -> str | None:
    """The cursor ``depth`` rows into a search (pages of 500), as a user paging would hold."""
    cursor: str | None = None
    for _ in range(depth // 500):
        _, cursor = search_events(conn, limit=500, after=cursor, **filters)
        if cursor is None:
            break
    return cursor


def _shapes(conn: psycopg.Connection[Any], rng: random.Random, runs: int,
            ) -> dict[str, list[Callable[[], Any]]]:
    """Each search shape: ``runs`` calls, each with its own values (drawn before timing)."""
    now = datetime.now(timezone.utc)
    sample = conn.execute(
        "SELECT id::text, delivery_id::text, contact_email, resource_id, provider"
        " FROM webhook_events TABLESAMPLE SYSTEM (0.05) WHERE contact_email IS NOT NULL"
        " LIMIT %s", [runs * 4]).fetchall()
    rng.shuffle(sample)
    rows = [sample[i % len(sample)] for i in range(runs)]
    providers = ["outreach", "salesloft", "outcaller", "outboundry", "mailstand"]
    kinds = ["email.opened", "email.replied", "meeting.booked", "contact.deleted",
             "linkedin.invite_accepted"]
    globs = ["email.*", "linkedin.*", "meeting.*", "*_replied", "call.*"]

    def day() -> tuple[datetime, datetime]:
        since = now - timedelta(days=rng.uniform(1, DAYS - 1))
        return since, since + timedelta(days=1)

    def week() -> tuple[datetime, datetime]:
        since = now - timedelta(days=rng.uniform(7, DAYS))
        return since, since + timedelta(days=7)

    def hot() -> str:
        return f"HOT{rng.randrange(20)}@example.com"

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
        return lambda: fn(conn, *args, **kwargs)

    shapes: dict[str, list[Callable[[], Any]]] = {}

    def add(name: str, make: Callable[[int], Callable[[], Any]]) -> None:
        shapes[name] = [make(i) for i in range(runs)]

    add("email", lambda i: call(search_events, email=rows[i][2].upper()))
    add("email, hot contact", lambda i: call(search_events, email=hot()))
    add("resource_id", lambda i: call(search_events, resource_id=rows[i][3]))
    add("event_id", lambda i: call(search_events, event_id=rows[i][0]))
    add("delivery_id", lambda i: call(search_events, delivery_id=rows[i][1]))
    add("provider", lambda i: call(search_events, provider=providers[i % 5]))
    add("kind", lambda i: call(search_events, kind=kinds[i % len(kinds)]))
    add("kind glob", lambda i: call(search_events, kind=globs[i % len(globs)]))
    rare = ["contact.del*", "*.deleted", "meeting.*", "nothing.*"]
    add("kind glob, rare or none", lambda i: call(search_events, kind=rare[i % len(rare)]))
    def ranged(span: Callable[[], tuple[datetime, datetime]],
               **filters: Any) -> Callable[[], Any]:
        since, until = span()
        return call(search_events, since=since, until=until, **filters)

    add("time range (a day)", lambda i: ranged(day))
    add("nothing (newest)", lambda i: call(search_events))
    add("email + week + kind glob",
        lambda i: ranged(week, email=hot(), kind=globs[i % len(globs)]))
    add("resource_id + week + kind",
        lambda i: ranged(week, resource_id=rows[i][3], kind=kinds[i % len(kinds)]))
    add("provider + day + kind glob",
        lambda i: ranged(day, provider=providers[i % 5], kind=globs[i % len(globs)]))
    add("provider + day + rare kind",
        lambda i: ranged(day, provider=providers[i % 5], kind=kinds[2 + i % 2]))
    # Deep pages: 5,000 rows in, through the cursor a user paging there would hold.
    _log("  searching: cursors 5,000 rows deep")
    deep: list[tuple[dict[str, Any], str | None]] = []
    for i in range(runs):
        filters: dict[str, Any] = [
            {"provider": providers[i % 5]},
            {"email": hot()},
            {"provider": providers[i % 5], "kind": globs[i % 2]},
            {},
        ][i % 4]
        deep.append((filters, _deep_cursor(conn, 5000, **filters)))
    shapes["deep page (5,000 in): provider / hot email / provider + glob / none"] = [
        call(search_events, after=cursor, **filters) for filters, cursor in deep]
    since_deep = [week() for _ in range(runs)]
    deep_combo = [({"email": hot(), "since": s, "until": u, "kind": "email.*"}) for s, u in
                  since_deep]
    shapes["deep page: hot email + week + glob"] = [
        call(search_events, after=_deep_cursor(conn, 1000, **f), **f) for f in deep_combo]
    add("get_event (with its delivery)", lambda i: call(get_event, rows[i][0]))
    add("record_timeline", lambda i: call(record_timeline, rows[i][4], "prospect", rows[i][3]))
    return shapes


def _measure(shapes: dict[str, list[Callable[[], Any]]]) -> dict[str, dict[str, float]]:
    """Every shape's calls, shapes interleaved (round robin), so a slow minute on a shared
    machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in shapes}
    count = max(len(calls) for calls in shapes.values())
    for i in range(count):
        for name, calls in shapes.items():
            if i < len(calls):
                started = time.perf_counter()
                calls[i]()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: {"p50": _pct(t, 0.5), "p95": _pct(t, 0.95), "max": max(t), "runs": len(t)}
            for name, t in times.items()}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(db_url: str, rows: int, runs: int, duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows, "runs": runs, "disk_before": _disk()}
    with connect(db_url, autocommit=True) as conn:
        # Bulk load: the table with its primary key only, then the other indexes built.
        before = _secondary_indexes(conn)
        for name in (*_NEW, *_SECONDARY):
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        started = time.monotonic()
        fill_events(conn, rows, days_ago=DAYS, tag="s-", spread=True, days=DAYS)
        out["fill_seconds"] = time.monotonic() - started
        _log(f"  filled in {out['fill_seconds']:.0f} s; disk {_disk()}; building indexes")
        started = time.monotonic()
        for statement in before:
            if not any(f" {name} " in statement for name in _NEW):
                conn.execute(statement.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
        _without_new(conn)
        out["index_seconds"] = time.monotonic() - started
        conn.execute("VACUUM ANALYZE webhook_events")
        conn.execute("CHECKPOINT")
        _log(f"  indexed in {out['index_seconds']:.0f} s; measuring the sink without 0011")
        out["without"] = window(db_url, _lifecycle_for(duration))
        # Migration 0011 as `ingest migrate` runs it: one transaction, timed.
        with conn.transaction():
            out["migration_seconds"] = _timed(conn, [_migration_0011()])
        conn.execute("ANALYZE webhook_events")
        conn.execute("CHECKPOINT")
        _log(f"  migration 0011 took {out['migration_seconds']:.0f} s; the sink with it")
        out["with"] = window(db_url, _lifecycle_for(duration))
        out["indexes"] = [{"name": r[0], "mb": r[1] / 2**20} for r in conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = 'webhook_events'::regclass ORDER BY 1").fetchall()]
        out["table_mb"] = (conn.execute("SELECT pg_relation_size('webhook_events')")
                           .fetchone() or [0])[0] / 2**20
        out["settings"] = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
            "('shared_buffers', 'work_mem', 'effective_cache_size', 'random_page_cost') "
            "ORDER BY name").fetchall())
        _log("  searching")
        rng = random.Random(11)
        shapes = _shapes(conn, rng, runs)
        # One untimed round: the first touch of each index is a cold read from disk.
        out["searches_cold"] = _measure({k: v[:1] for k, v in shapes.items()})
        out["searches"] = _measure(shapes)
        # And the sink once more without the new indexes (a second pair, same table).
        _without_new(conn)
        conn.execute("CHECKPOINT")
        out["without_again"] = window(db_url, _lifecycle_for(duration))
        with conn.transaction():
            out["migration_again_seconds"] = _timed(conn, [_migration_0011()])
        conn.execute("CHECKPOINT")
        out["with_again"] = window(db_url, _lifecycle_for(duration))
        out["disk_after"] = _disk()
    return out


def _lifecycle_for(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


def render(r: dict[str, Any]) -> str:
    lines = [f"Console search at {r['rows']:,} events ({r['runs']} calls per shape, values "
             f"varied; target p95 <= {TARGET_MS:.0f} ms)", "",
             "| search | p50 ms | p95 ms | max ms | first call (cold) ms | target |",
             "|---|---|---|---|---|---|"]
    for name, s in r["searches"].items():
        cold = r["searches_cold"].get(name, {}).get("max", 0.0)
        ok = "ok" if s["p95"] <= TARGET_MS else "MISSED"
        lines.append(f"| {name} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']:.1f} | "
                     f"{cold:.1f} | {ok} |")
    w, n, a, n2 = r["without"], r["with"], r["without_again"], r["with_again"]
    base = (w["rate"] + a["rate"]) / 2 or 1.0
    lines += [
        "",
        "| Postgres sink into the filled table | events/s | batch p50 / p99 ms |",
        "|---|---|---|",
        f"| indexes before 0011 | {w['rate']:,.0f} | {w['p50_ms']:.1f} / {w['p99_ms']:.1f} |",
        f"| with 0011's indexes | {n['rate']:,.0f} | {n['p50_ms']:.1f} / {n['p99_ms']:.1f} |",
        f"| before 0011 again | {a['rate']:,.0f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} |",
        f"| with 0011's indexes again | {n2['rate']:,.0f} | {n2['p50_ms']:.1f} / "
        f"{n2['p99_ms']:.1f} |",
        "",
        f"With 0011's indexes the sink stores {(n['rate'] + n2['rate']) / 2 / base:.0%} of the "
        f"rate without them (means of the two windows each, interleaved). WAL per event: "
        f"{_wal_kb(w):.1f} KB before, {_wal_kb(n):.1f} KB with.",
        f"Fill: {r['fill_seconds']:.0f} s, the indexes before 0011: {r['index_seconds']:.0f} s; "
        f"migration 0011 (holding its lock on webhook_events): {r['migration_seconds']:.0f} s "
        f"(again, later: {r['migration_again_seconds']:.0f} s).",
        f"Table {r['table_mb']:,.0f} MB; indexes with 0011: " + ", ".join(
            f"{i['name']} {i['mb']:,.0f} MB" for i in r["indexes"]) + ".",
        "Server: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        + f". Disk: {r['disk_before']} before, {r['disk_after']} after.",
    ]
    return "\n".join(lines)


def _wal_kb(w: dict[str, Any]) -> float:
    events = w["rate"] * w["seconds"]
    return float(w["server"]["wal_mb"]) * 1024 / events if events else 0.0
