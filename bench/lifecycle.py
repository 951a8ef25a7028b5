"""``python -m bench --lifecycle``: the Postgres sink against a large archive, and during a
retention run. Opt in: filling the tables takes minutes.

1. The sink's insert rate (``PostgresSink.send``, 64 events with their raw deliveries per
   transaction, one sender) into an empty ``webhook_events``, then into one that already
   holds ``--lifecycle-rows`` rows (filled server-side with ``INSERT ... SELECT
   generate_series``, as fast as COPY and without shipping the rows). Target: within 20%.
2. The sink while ``ingest retention`` (another process) removes ``--retention-rows`` expired
   deliveries and as many events, against the sink just before and just after the run (after:
   autovacuum cleans up the deleted rows, a cost of the run too). Twice: the sink saturated
   (its rate shows any CPU or I/O the run takes from it), then at a fixed offered load,
   ``--lifecycle-load`` of the saturated rate (the everyday case: does it keep up, and what
   happens to its batch latency, measured from when each batch was due).
3. The retention runs' own pace (rows/s, share of the time deleting, batches after which it
   backed off, from the command's summary line) and what the server did meanwhile (WAL,
   checkpoints, autovacuum runs).

Each window lasts ``--duration`` seconds (the one during retention: as long as the run), on
the same server, in the same run. The median and p99 are of the sink's batch times.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
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

__all__ = ["fill_events", "run", "window"]

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


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _stats(batches: list[tuple[str, float, float, int]], offered: float | None,
           state: str | None = None) -> dict[str, Any]:
    """Of the batches (state, seconds since the previous batch ended, latency, events) in
    ``state`` (else all): events/s over the time they took, and latency percentiles."""
    mine = [b for b in batches if state is None or b[0] == state]
    seconds = sum(b[1] for b in mine)
    latencies = [b[2] for b in mine]
    return {"rate": sum(b[3] for b in mine) / seconds if seconds else 0.0, "seconds": seconds,
            "batches": len(mine), "p50_ms": _pct(latencies, 0.5) * 1000,
            "p99_ms": _pct(latencies, 0.99) * 1000,
            "max_ms": max(latencies, default=0.0) * 1000,
            # A batch a second late: the sink fell behind the offered load.
            "kept_up": offered is None or max(latencies, default=0.0) < 1.0}


def _rate(db_url: str, until: Any, offered: float | None = None,
          state: Any = None) -> list[tuple[str, float, float, int]]:
    """The sink storing batches, one sender, until ``until()`` is true: saturated (the next
    batch as soon as the last is stored) or, with ``offered`` events/s, open loop (batch i is
    due at i * BATCH / offered seconds). Latency: from when a batch was due (saturated: sent)
    to its commit, so an offered load it cannot keep up with shows as a growing latency. Each
    batch is labelled with ``state()`` at its start."""
    sink = PostgresSink(db_url)
    prepared = [_batch() for _ in range(20)]  # built ahead: measure Postgres, not us
    out: list[tuple[str, float, float, int]] = []
    started = last = time.perf_counter()
    i = 0
    try:
        while not until():
            events, deliveries = prepared[i] if i < len(prepared) else _batch()
            due = time.perf_counter()
            if offered is not None:
                due = started + i * BATCH / offered
                ahead = due - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            label = state() if state is not None else ""
            sink.send(events, deliveries=deliveries)
            end = time.perf_counter()
            out.append((label, end - last, end - due, len(events)))
            last = end
            i += 1
    finally:
        sink.close()
    return out


def _server(conn: psycopg.Connection[Any]) -> dict[str, float]:
    """The server's counters: WAL written, checkpoints, autovacuum and autoanalyze runs."""
    row = conn.execute(
        "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn, "
        "(SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), "
        "(SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables), "
        "(SELECT coalesce(sum(autoanalyze_count), 0) FROM pg_stat_user_tables)").fetchone()
    assert row is not None
    return {"wal_mb": float(row[0]) / 2**20, "checkpoints": float(row[1]),
            "autovacuums": float(row[2]), "autoanalyzes": float(row[3])}


def window(db_url: str, until: Any, offered: float | None = None) -> dict[str, Any]:
    """:func:`_rate`, with what the server did meanwhile."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        before = _server(conn)
        out = _stats(_rate(db_url, until, offered), offered)
        after = _server(conn)
    out["server"] = {k: after[k] - before[k] for k in before}
    return out


def _for(seconds: float) -> Any:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end


# The spread of a realistic archive (bench.search): five providers of unequal volume, the
# kinds in their everyday proportions (opens and sends most, deletes and meetings rare),
# 2,000,000 records, 1,000,000 contacts written in mixed case (one event in ten names
# nobody), and 20 hot contacts (a shared inbox, a test address) that together get 1% of all
# events. Every value comes from a hash of the row number, so a fill is the same every run.
_PROVIDERS = ["outreach"] * 4 + ["salesloft"] * 3 + ["outcaller"] * 2 + ["outboundry"] * 3 \
    + ["mailstand"]
_KINDS = (["email.sent"] * 8 + ["email.delivered"] * 6 + ["email.opened"] * 10
          + ["email.clicked"] * 3 + ["email.replied"] * 2 + ["email.bounced", "email.unsubscribed"]
          + ["linkedin.invite_sent"] * 2 + ["linkedin.invite_accepted", "linkedin.message_sent",
             "linkedin.message_replied", "call.completed", "call.completed", "task.created",
             "task.completed", "contact.created", "contact.stage_changed", "campaign.added",
             "campaign.removed", "meeting.booked"] + ["contact.updated"] * 4)
_SPREAD = {
    "provider": "(%s::text[])[1 + h %% {providers}]",
    "kind": "CASE WHEN h %% 1000 = 7 THEN 'contact.deleted' "
            "ELSE (%s::text[])[1 + (h >> 8) %% {kinds}] END",
    "resource_id": "((h >> 4) %% 2000000)::text",
    "contact_email": "CASE WHEN h %% 10 = 3 THEN NULL "
                     "WHEN h %% 100 = 42 THEN 'hot' || ((h >> 12) %% 20) || '@example.com' "
                     "WHEN h %% 2 = 0 THEN 'P' || ((h >> 3) %% 1000000) || '@Example.com' "
                     "ELSE 'p' || ((h >> 3) %% 1000000) || '@example.com' END",
}


def fill_events(conn: psycopg.Connection[Any], rows: int, days_ago: int, tag: str,
                 spread: bool = False, days: int = 1) -> None:
    """``rows`` events received over ``days`` days from ``days_ago`` days ago, in order of
    arrival as the sink appends them (so a day's rows lie together in the table, as in a real
    one). ``spread``: with the providers, kinds, records and contacts of a real archive (see
    _SPREAD), each with its delivery id and a resource object of a realistic size; else one
    provider and kind, as the sink's insert rate needs no more."""
    step = 1_000_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if spread:
            conn.execute(
                "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
                "resource_type, resource_id, action, occurred_at, received_at, contact_email, "
                "contact_name, data, delivery_id) "
                f"SELECT gen_random_uuid(), p, %s || g, k, k, 'prospect', "
                f"{_SPREAD['resource_id']}, split_part(k, '.', 2), "
                "t - make_interval(secs => h %% 600), t, "
                f"{_SPREAD['contact_email']}, 'Pat Doe', "
                "jsonb_build_object('id', g, 'title', 'Head of Operations', 'company', "
                "'Example Corp', 'stage', 'engaged', 'tags', jsonb_build_array('q3', 'emea')), "
                "gen_random_uuid() "
                "FROM generate_series(%s::bigint, %s::bigint) g, "
                "LATERAL (SELECT (g * 2654435761) %% 4294967296 AS h) hh, "
                "LATERAL (SELECT now() - make_interval(days => %s) "
                "+ make_interval(secs => g * 86400.0 * %s / %s) AS t, "
                f"{_SPREAD['provider'].format(providers=len(_PROVIDERS))} AS p, "
                f"{_SPREAD['kind'].format(kinds=len(_KINDS))} AS k) a",
                [tag, start, start + n - 1, days_ago, days, rows, _PROVIDERS, _KINDS])
        else:
            conn.execute(
                "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
                "resource_type, resource_id, occurred_at, received_at, contact_email, data) "
                "SELECT gen_random_uuid(), 'outreach', %s || g, 'x', 'email.replied', "
                "'prospect', (g %% 1000000)::text, t, t, "
                "'p' || (g %% 500000) || '@example.com', '{\"id\": 1}' "
                "FROM generate_series(%s::bigint, %s::bigint) g, LATERAL (SELECT now() "
                "- make_interval(days => %s) + make_interval(secs => g * 86400.0 / %s) AS t) a",
                [tag, start, start + n - 1, days_ago, rows])
        print(f"  filled {start + n:,} of {rows:,} events", file=sys.stderr, flush=True)


def _fill_expired(conn: psycopg.Connection[Any], rows: int, tag: str) -> None:
    """Deliveries and events 400 days old, for a retention run to remove."""
    conn.execute(
        "INSERT INTO webhook_deliveries (id, provider, received_at, body) "
        "SELECT gen_random_uuid(), 'outreach', now() - make_interval(days => 400) "
        "+ make_interval(secs => g * 86400.0 / %s), convert_to(repeat('x', 400), 'UTF8') "
        "FROM generate_series(1, %s::bigint) g", [rows, rows])
    fill_events(conn, rows, days_ago=400, tag=tag)
    conn.execute("VACUUM ANALYZE")
    # The fill's dirty pages written now, not during the windows compared.
    conn.execute("CHECKPOINT")


_SUMMARY = re.compile(r"(\d+) rows in ([\d.]+) s \((\d+) rows/s\), deleting (\d+)% of the time"
                      r"(?:; backed off after (\d+) of (\d+) batches)?")


def _with_retention(db_url: str, rows: int, duration: float,
                    offered: float | None) -> dict[str, Any]:
    """The sink before, during and after ``ingest retention`` removes ``rows`` expired
    deliveries and as many events; ``offered``: events/s of a fixed load, else saturated.

    During the run the bench lets the retention process go on for ``duration / 2`` seconds,
    then stops it (SIGSTOP) for ``duration / 4``, in turns, and compares the sink's batches
    while it runs with those while it is stopped: the same minutes, so the same checkpoints and the
    same load from whatever else the machine runs, which a before/after comparison on a shared
    machine cannot promise."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        _fill_expired(conn, rows, tag=f"old-{uuid.uuid4().hex[:6]}-")
    out: dict[str, Any] = {"offered": offered, "rows": rows}
    out["before"] = window(db_url, _for(duration), offered)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "REDIS_URL"))}
    env.update(DATABASE_URL=db_url, INGEST_RETENTION_DAYS="30",
               INGEST_EVENTS_RETENTION_DAYS="30", COLUMNS="300")
    conn = psycopg.connect(db_url, autocommit=True)
    server = _server(conn)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "retention"], env=env,
                            stdout=subprocess.PIPE, text=True)
    done = threading.Event()
    printed: list[str] = []
    turn: dict[str, Any] = {"state": "running", "running_s": 0.0}

    def wait() -> None:
        printed.append(proc.communicate()[0])
        done.set()

    def alternate() -> None:
        since = time.monotonic()
        while not done.wait(duration / 2 if turn["state"] == "running" else duration / 4):
            now = time.monotonic()
            if turn["state"] == "running":
                turn["running_s"] += now - since
                turn["state"] = "stopped"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGSTOP)
            else:
                turn["state"] = "running"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
            since = now
        if turn["state"] == "running":
            turn["running_s"] += time.monotonic() - since

    threading.Thread(target=wait, daemon=True).start()
    switch = threading.Thread(target=alternate, daemon=True)
    switch.start()
    try:
        batches = _rate(db_url, done.is_set, offered, state=lambda: turn["state"])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
    switch.join()
    out["retention_seconds"] = time.monotonic() - started
    out["running_seconds"] = turn["running_s"]
    out["retention_ok"] = proc.returncode == 0
    out["during"] = _stats(batches, offered, "running")
    out["stopped"] = _stats(batches, offered, "stopped")
    after = _server(conn)
    conn.close()
    out["during"]["server"] = {k: after[k] - server[k] for k in server}
    # Autovacuum cleans up the deleted rows after the run: that is a cost of it too.
    out["after"] = window(db_url, _for(duration), offered)
    match = _SUMMARY.search(" ".join("".join(printed).split()))
    if match:
        out["pace"] = {"rows": int(match[1]), "duty": int(match[4]) / 100,
                       "backed_off": int(match[5] or 0), "batches": int(match[6] or 0),
                       # Over the time it was let run, not the time it was stopped.
                       "rows_per_s": int(match[1]) / float(turn["running_s"] or 1)}
    with psycopg.connect(db_url) as check:
        left = check.execute("SELECT (SELECT count(*) FROM webhook_events WHERE received_at < "
                             "now() - interval '30 days') + (SELECT count(*) FROM "
                             "webhook_deliveries WHERE received_at < now() - interval '30 days')"
                             ).fetchone()
        out["expired_left"] = int(left[0]) if left else -1
    return out


def run(db_url: str, rows: int, retention_rows: int, duration: float,
        load: float = 0.5) -> dict[str, Any]:
    out: dict[str, Any] = {"load": load}
    with psycopg.connect(db_url, autocommit=True) as conn:
        out["empty"] = window(db_url, _for(duration))
        started = time.monotonic()
        fill_events(conn, rows, days_ago=1, tag="fill-")
        conn.execute("VACUUM ANALYZE webhook_events")
        conn.execute("CHECKPOINT")
        out["fill_seconds"] = time.monotonic() - started
        out["full"] = window(db_url, _for(duration))
        out["rows"] = rows
        out["indexes"] = [{"name": r[0], "mb": r[1] / 2**20} for r in conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = 'webhook_events'::regclass ORDER BY 1").fetchall()]
        out["settings"] = dict(conn.execute(
            "SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
            "('shared_buffers', 'max_wal_size', 'wal_compression', 'checkpoint_timeout') "
            "ORDER BY name").fetchall())
    if not retention_rows:  # --retention-rows 0: the table's size alone
        out["retention_ok"] = True
        return out
    out["saturated"] = _with_retention(db_url, retention_rows, duration, None)
    offered = out["saturated"]["before"]["rate"] * load
    out["fixed"] = _with_retention(db_url, retention_rows, duration, offered)
    out["retention_ok"] = all(out[m]["retention_ok"] and out[m]["expired_left"] == 0
                              for m in ("saturated", "fixed"))
    return out


def render(r: dict[str, Any]) -> str:
    full = r["full"]["rate"] / r["empty"]["rate"]
    lines = [
        "| measurement | events/s | batch p50 / p99 ms | ratio | target |",
        "|---|---|---|---|---|",
        f"| sink into an empty webhook_events | {r['empty']['rate']:,.0f} | "
        f"{r['empty']['p50_ms']:.1f} / {r['empty']['p99_ms']:.1f} | | |",
        f"| sink into webhook_events holding {r['rows']:,} rows (filled in "
        f"{r['fill_seconds']:.0f} s) | {r['full']['rate']:,.0f} | {r['full']['p50_ms']:.1f} / "
        f"{r['full']['p99_ms']:.1f} | {full:.0%} of empty | >= 80% "
        f"{'ok' if full >= 0.8 else 'MISSED'} |",
    ]
    modes = [mode for mode in ("saturated", "fixed") if mode in r]
    for mode in modes:
        m = r[mode]
        what = ("saturated" if m["offered"] is None else
                f"offered {m['offered']:,.0f} events/s ({r['load']:.0%} of saturated)")
        label = {"before": "before the run",
                 "stopped": "while the run is stopped (SIGSTOP)",
                 "during": f"while it runs ({m['running_seconds']:.0f} of "
                           f"{m['retention_seconds']:.0f} s)",
                 "after": "after it (autovacuum cleaning up)"}
        for when in ("before", "stopped", "during", "after"):
            w = m[when]
            ratio = target = ""
            if when == "during":
                ratio = f"{w['rate'] / m['stopped']['rate']:.0%} of stopped" \
                    if m["stopped"]["rate"] else ""
                if m["offered"] is not None:
                    target = "kept up" if w["kept_up"] and w["rate"] >= 0.95 * m["offered"] \
                        else "FELL BEHIND"
            lines.append(f"| {what}, {label[when]} | {w['rate']:,.0f} | {w['p50_ms']:.1f} / "
                         f"{w['p99_ms']:.1f} | {ratio} | {target} |")
    if modes:
        lines.append("")
        lines.append("| retention run | rows removed | rows/s | deleting | backed off | WAL MB "
                     "during | checkpoints | autovacuums during / after | left |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        m = r[mode]
        p = m.get("pace", {})
        d, a = m["during"]["server"], m["after"]["server"]
        lines.append(
            f"| with the sink {mode} | {p.get('rows', '?')} | {p.get('rows_per_s', 0):,.0f} | "
            f"{p.get('duty', 0):.0%} of the time | {p.get('backed_off', 0)} of "
            f"{p.get('batches', '?')} batches | {d['wal_mb']:,.0f} | {d['checkpoints']:.0f} | "
            f"{d['autovacuums']:.0f} / {a['autovacuums']:.0f} | {m['expired_left']} "
            f"{'ok' if m['expired_left'] == 0 and m['retention_ok'] else 'MISSED'} |")
    lines.append("")
    lines.append("Server: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items()))
    lines.append(f"webhook_events indexes at {r['rows']:,} rows: " + ", ".join(
                     f"{i['name']} {i['mb']:,.0f} MB" for i in r["indexes"]))
    per_event = {k: r[k]["server"]["wal_mb"] * 1024 / (r[k]["rate"] * r[k]["seconds"])
                 for k in ("empty", "full") if r[k]["rate"]}
    lines.append(f"WAL per stored event: into the empty table {per_event.get('empty', 0):.1f} "
                 f"KB, into the full one {per_event.get('full', 0):.1f} KB (checkpoints "
                 f"meanwhile: {r['empty']['server']['checkpoints']:.0f} and "
                 f"{r['full']['server']['checkpoints']:.0f})")
    return "\n".join(lines)
