"""Latest state per record through real workers, real Redis, real Postgres and a real CRM
receiver: out-of-order updates never put older data back, and the CRM never gets an older
update after a newer one."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from ingest import metrics
from ingest.config import Settings
from ingest.events import Delivery
from ingest.exceptions import ConfigError
from ingest.commands.replay import Selection, replay
from sinks.postgres import migrate
from sinks.registry import build_sinks, sink_skips_stale
from tests.helpers import migrate_before, rows
from tests.sinks.conftest import CrmReceiver, crm_env, enqueue, run_jobs
from workers.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 6, 4, 5, 0, tzinfo=timezone.utc)


def prospect(pid: int, seconds: int, title: str, *, event: str = "prospect.updated",
             before: str | None = None) -> dict[str, Any]:
    """An Outreach delivery envelope (payload version 2) as the acceptor writes it, delivered
    as soon as it happened (a delete is dated by its delivery)."""
    at = (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    payload: dict[str, Any] = {
        "data": {"type": "prospect", "id": pid,
                 "attributes": {"title": title, "updatedAt": at,
                                "emails": [f"p{pid}@example.com"]}},
        "meta": {"eventName": event, "deliveredAt": at},
    }
    if before is not None:
        payload["beforeUpdate"] = {"type": "prospect", "id": pid,
                                   "attributes": {"title": before}}
    return Delivery(id=str(uuid.uuid4()), provider="outreach",
                    received_at=datetime.now(timezone.utc), headers={},
                    body=orjson.dumps(payload).decode()).to_dict()


def stale_count(sink: str) -> float:
    return metrics.SINK_EVENTS.labels(sink, "stale")._value.get()


def record(database_url: str, pid: int) -> dict[str, Any]:
    (row,) = rows(database_url, "SELECT * FROM webhook_records WHERE provider = 'outreach' "
                                "AND resource_type = 'prospect' AND resource_id = %s", str(pid))
    return row


def titles_received(receiver: CrmReceiver, pid: int) -> list[str]:
    """The titles the CRM accepted for one prospect, in the order they arrived."""
    return [e["data"]["attributes"]["title"] for e in receiver.accepted.values()
            if e["resource_id"] == str(pid)]


def test_two_updates_delivered_newest_first_leave_the_newer_data_everywhere(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    skipped = stale_count("crm")
    newer = prospect(7, 20, "VP Sales", before="Head of Sales")
    older = prospect(7, 10, "Head of Sales", before="Sales Lead")
    enqueue(rt, newer)
    run_jobs(rt)
    enqueue(rt, older)
    run_jobs(rt)

    rec = record(database_url, 7)
    assert rec["data"]["attributes"]["title"] == "VP Sales" and rec["deleted"] is False
    assert rec["kind"] == "contact.updated" and rec["occurred_at"] == T0 + timedelta(seconds=20)
    events = {r["data"]["attributes"]["title"]: r for r in rows(
        database_url, "SELECT data, stale, changes, id FROM webhook_events")}
    assert events["Head of Sales"]["stale"] is True and events["VP Sales"]["stale"] is False
    assert str(rec["event_id"]) == str(events["VP Sales"]["id"])
    # Postgres keeps the full log, stale events included; the CRM got the newer one only.
    assert len(events) == 2
    assert titles_received(receiver, 7) == ["VP Sales"]
    assert stale_count("crm") - skipped == 1
    assert events["VP Sales"]["changes"] == {"title": {"from": "Head of Sales", "to": "VP Sales"}}
    body = next(iter(receiver.accepted.values()))
    assert body["stale"] is False and body["changes"] == events["VP Sales"]["changes"]


def test_a_delete_followed_by_a_stale_update_keeps_the_record_deleted(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    rt = pipeline()
    enqueue(rt, prospect(8, 10, "Head of Sales"))
    run_jobs(rt)
    enqueue(rt, prospect(8, 30, "Head of Sales", event="prospect.destroyed"))
    run_jobs(rt)
    assert record(database_url, 8)["deleted"] is True
    enqueue(rt, prospect(8, 20, "VP Sales", before="Head of Sales"))  # late, older than delete
    run_jobs(rt)
    rec = record(database_url, 8)
    assert rec["deleted"] is True and rec["kind"] == "contact.deleted"
    assert rec["data"]["attributes"]["title"] == "Head of Sales"
    (late,) = rows(database_url, "SELECT stale FROM webhook_events WHERE occurred_at = %s",
                   T0 + timedelta(seconds=20))
    assert late["stale"] is True
    # A newer update (the record re-created upstream) clears the flag.
    enqueue(rt, prospect(8, 40, "CRO"))
    run_jobs(rt)
    rec = record(database_url, 8)
    assert rec["deleted"] is False and rec["data"]["attributes"]["title"] == "CRO"


def test_from_two_workers_at_once_the_newer_update_wins_everywhere(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str], database_url: str,
        make_env: Callable[..., dict[str, str]]) -> None:
    receiver, url = crm
    overrides = {"INGEST_SINKS": "postgres,crm", **crm_env(url)}
    rt = pipeline(**overrides)
    pairs = 30
    for pid in range(pairs):  # each update its own batch; the two race on two workers
        enqueue(rt, prospect(100 + pid, 20, f"new-{pid}", before=f"old-{pid}"))
        enqueue(rt, prospect(100 + pid, 10, f"old-{pid}"))
    env = make_env(database_url, **overrides)
    for queue in (rt.names.ingest_queue, rt.names.sink_queue("postgres"),
                  rt.names.sink_queue("crm")):
        workers = [subprocess.Popen([sys.executable, "-m", "ingest.commands.cli",
                   "worker", "--queue",
                                     queue, "--burst"], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for _ in range(2)]
        for w in workers:
            _, err = w.communicate(timeout=120)
            assert w.returncode == 0, err.decode()[-2000:]
    run_jobs(rt)  # anything left (there should be nothing)

    stored = rows(database_url, "SELECT resource_id, data, stale FROM webhook_events")
    assert len(stored) == 2 * pairs
    for pid in range(pairs):
        assert record(database_url, 100 + pid)["data"]["attributes"]["title"] == f"new-{pid}"
        # The newer update is never stale; the older is unless it was processed first.
        # Either way the CRM, served after both were processed, only has the newer one.
        assert titles_received(receiver, 100 + pid) == [f"new-{pid}"]
    assert not [r for r in stored if r["stale"] and r["data"]["attributes"]["title"][:3] == "new"]
    assert receiver.duplicates == 0


def test_a_sink_can_keep_stale_events_and_a_malformed_setting_names_itself(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str], database_url: str,
        make_env: Callable[..., dict[str, str]]) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url, CRM_SKIP_STALE="false"))
    enqueue(rt, prospect(9, 20, "VP Sales"))
    run_jobs(rt)
    enqueue(rt, prospect(9, 10, "Head of Sales"))
    run_jobs(rt)
    got = [(e["data"]["attributes"]["title"], e["stale"]) for e in receiver.accepted.values()]
    assert got == [("VP Sales", False), ("Head of Sales", True)]

    enabled = build_sinks(Settings.from_env(make_env(database_url, POSTGRES_SKIP_STALE="yes")))
    assert enabled["postgres"].skip_stale is True
    defaults = Settings.from_env(make_env(database_url, INGEST_SINKS="crm", **crm_env(url)))
    assert build_sinks(defaults)["crm"].skip_stale is True

    class Plugin:  # a plugin sink written before stale existed
        name = "legacy"

    assert sink_skips_stale(defaults, Plugin) is False
    assert sink_skips_stale(Settings.from_env(make_env(LEGACY_SKIP_STALE="on")), Plugin) is True
    with pytest.raises(ConfigError, match="CRM_SKIP_STALE"):
        build_sinks(Settings.from_env(make_env(database_url, INGEST_SINKS="crm",
                                               **crm_env(url, CRM_SKIP_STALE="maybe"))))


def test_postgres_skipping_stale_events_stores_only_current_ones(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    rt = pipeline(POSTGRES_SKIP_STALE="true")
    enqueue(rt, prospect(10, 20, "VP Sales"))
    run_jobs(rt)
    enqueue(rt, prospect(10, 10, "Head of Sales"))
    run_jobs(rt)
    titles = [r["data"]["attributes"]["title"] for r in rows(database_url,
                                                             "SELECT data FROM webhook_events")]
    assert titles == ["VP Sales"]


def test_replay_recomputes_webhook_records_from_the_events_it_replays(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    rt = pipeline()
    enqueue(rt, prospect(11, 10, "Head of Sales"), prospect(12, 10, "CTO"))
    run_jobs(rt)
    enqueue(rt, prospect(11, 20, "VP Sales", before="Head of Sales"))
    run_jobs(rt)
    before = {r["resource_id"]: r for r in rows(database_url, "SELECT * FROM webhook_records")}
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DELETE FROM webhook_records WHERE resource_id = '12'")
        conn.execute("UPDATE webhook_records SET data = '{}' WHERE resource_id = '11'")
        # As stored before events had changes: replay fills them in.
        conn.execute("UPDATE webhook_events SET changes = NULL")
    report = replay(rt.settings, Selection())
    assert report.ok and report.changed == 1
    (changes,) = [r["changes"] for r in rows(database_url, "SELECT changes FROM webhook_events")
                  if r["changes"] is not None]
    assert changes == {"title": {"from": "Head of Sales", "to": "VP Sales"}}
    after = {r["resource_id"]: r for r in rows(database_url, "SELECT * FROM webhook_records")}
    assert after["11"]["data"]["attributes"]["title"] == "VP Sales"
    assert after["12"]["data"] == before["12"]["data"]
    assert {k: r["event_id"] for k, r in after.items()} == \
        {k: r["event_id"] for k, r in before.items()}


def test_migrating_a_database_that_has_rows_loses_nothing_and_fills_the_records(
        fresh_database: str) -> None:
    url = fresh_database
    migrations = sorted((ROOT / "sinks" / "migrations").glob("*.sql"))
    migrate_before(url, "0004")
    with psycopg.connect(url, autocommit=True) as conn:
        for n, (rid, seconds, kind, action) in enumerate([
                ("1", 10, "contact.updated", "updated"), ("1", 20, "contact.updated", "updated"),
                ("2", 10, "contact.created", "created"), ("2", 30, "contact.deleted", "destroyed"),
                (None, 5, "email.delivered", "delivered")]):
            delivery = str(uuid.uuid4())
            conn.execute("INSERT INTO webhook_deliveries (id, provider, received_at, body) "
                         "VALUES (%s, 'outreach', now(), %s)", (delivery, b"{}"))
            conn.execute(
                "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
                "resource_type, resource_id, action, occurred_at, received_at, data, "
                "delivery_id) VALUES (%s, 'outreach', %s, 'x', %s, %s, %s, %s, %s, now(), "
                "%s, %s)",
                (str(uuid.uuid4()), f"k{n}", kind, "prospect" if rid else None, rid, action,
                 T0 + timedelta(seconds=seconds), orjson.dumps({"n": n}).decode(), delivery))
    assert migrate(url) == [m.name for m in migrations if m.name >= "0004"]
    assert migrate(url) == []
    events = rows(url, "SELECT stale, changes FROM webhook_events")
    assert len(events) == 5 and all(e["stale"] is False and e["changes"] is None
                                    for e in events)
    assert len(rows(url, "SELECT id FROM webhook_deliveries")) == 5
    got = {r["resource_id"]: (r["data"], r["deleted"]) for r in rows(
        url, "SELECT resource_id, data, deleted FROM webhook_records")}
    assert got == {"1": ({"n": 1}, False), "2": ({"n": 3}, True)}
