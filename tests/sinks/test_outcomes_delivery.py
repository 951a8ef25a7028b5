"""Sink outcomes written by real RQ workers (SimpleWorker, burst) delivering to a real CRM
receiver on 127.0.0.1 and to a real Postgres: delivered, retrying then delivered, dead, stale,
and what the console reads of them (sinks.outcomes.sink_outcomes)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from ingest import metrics
from ingest.commands.dlq import list_failures, retry_failures
from sinks.outcomes import enabled_sink_globs, sink_outcomes
from sinks.postgres import connect
from tests.helpers import rows
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from tests.sinks.test_latest_state import prospect
from workers.runtime import Runtime


def outcome_rows(database_url: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(str(r["event_id"]), r["sink"]): r for r in rows(
        database_url, "SELECT * FROM webhook_sink_outcomes")}


def console_view(rt: Runtime, database_url: str, ids: list[str]) -> dict[str, Any]:
    """What the console shows: the events as stored (or not) and sink_outcomes of them."""
    stored = {str(r["id"]): r for r in rows(
        database_url, "SELECT id, kind, provider, stored_at FROM webhook_events")}
    events = [{"id": i, "kind": stored[i]["kind"] if i in stored else "email.replied",
               "provider": "outboundry", "stored_at": stored[i]["stored_at"] if i in stored
               else None} for i in ids]
    with connect(database_url) as conn:
        return sink_outcomes(conn, events, enabled_sink_globs(rt.settings))


def test_an_event_delivered_is_delivered_with_one_attempt_everywhere(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    envelope = outboundry_delivery()
    [event_id] = event_ids(envelope)
    before = datetime.now(timezone.utc)
    enqueue(rt, envelope)
    run_jobs(rt)
    assert list(receiver.accepted) == [event_id]

    kept = outcome_rows(database_url)
    # The Postgres sink's first attempt writes no row: its stored event says it.
    assert set(kept) == {(event_id, "crm")}
    row = kept[event_id, "crm"]
    assert row["state"] == "delivered" and row["attempts"] == 1 and row["reason"] is None
    assert row["at"] >= before and row["next_attempt_at"] is None
    view = console_view(rt, database_url, [event_id])[event_id]
    assert view["crm"]["state"] == "delivered" and view["crm"]["attempts"] == 1
    assert view["postgres"]["state"] == "delivered" and view["postgres"]["attempts"] == 1
    assert view["postgres"]["at"] is not None


def test_503_then_200_is_retrying_with_its_next_attempt_then_delivered_on_the_second(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    receiver.script = [(503, {})]
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    email = "wanda.retry@example.com"
    envelope = outboundry_delivery(email=email)
    [event_id] = event_ids(envelope)
    enqueue(rt, envelope)
    run_jobs(rt, rounds=0)  # the first attempt only; the retry stays scheduled

    row = outcome_rows(database_url)[event_id, "crm"]
    assert row["state"] == "retrying" and row["attempts"] == 1
    [job_id] = rt.queue(rt.names.sink_queue("crm")).scheduled_job_registry.get_job_ids()
    scheduled = rt.queue(rt.names.sink_queue("crm")).scheduled_job_registry \
        .get_scheduled_time(job_id)
    assert row["next_attempt_at"] is not None
    assert abs((row["next_attempt_at"] - scheduled).total_seconds()) < 2
    assert "503" in row["reason"] and email not in row["reason"] and "\n" not in row["reason"]

    run_jobs(rt)
    assert list(receiver.accepted) == [event_id]
    row = outcome_rows(database_url)[event_id, "crm"]
    assert row["state"] == "delivered" and row["attempts"] == 2
    assert row["reason"] is None and row["next_attempt_at"] is None


def test_a_4xx_is_dead_with_the_redacted_reason_until_the_dead_letter_is_retried(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    email = "dora.dead@example.com"
    envelope = outboundry_delivery(email=email)
    [event_id] = event_ids(envelope)
    receiver.refuse[event_id] = 422
    enqueue(rt, envelope)
    run_jobs(rt)

    [failure] = list_failures(rt.redis, rt.settings)
    row = outcome_rows(database_url)[event_id, "crm"]
    assert row["state"] == "dead" and row["attempts"] == 1
    assert failure.reason.endswith(row["reason"])  # what the failed registry says
    assert "422" in row["reason"] and email not in row["reason"]

    del receiver.refuse[event_id]
    assert retry_failures(rt.redis, rt.settings) == 1
    run_jobs(rt)
    row = outcome_rows(database_url)[event_id, "crm"]
    assert row["state"] == "delivered" and row["reason"] is None


def test_one_refused_event_of_a_batch_is_dead_alone_and_the_others_delivered(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelopes = [outboundry_delivery(name=n) for n in ("Ada Lovelace", "Bad Data", "Alan Turing")]
    ids = event_ids(*envelopes)
    receiver.refuse[ids[1]] = 422
    enqueue(rt, *envelopes)
    run_jobs(rt)
    kept = outcome_rows(database_url)
    assert {i: kept[i, "crm"]["state"] for i in ids} == {
        ids[0]: "delivered", ids[1]: "dead", ids[2]: "delivered"}


def test_a_stale_state_event_is_stale_for_the_sink_that_skips_it(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    newer = prospect(int(uuid.uuid4().int % 10**6), 20, "VP Sales", before="Head of Sales")
    pid = int(str(orjson_loads(newer["body"])["data"]["id"]))
    older = prospect(pid, 10, "Head of Sales", before="Sales Lead")
    [newer_id], [older_id] = event_ids(newer), event_ids(older)
    enqueue(rt, newer)
    run_jobs(rt)
    enqueue(rt, older)
    run_jobs(rt)
    assert list(receiver.accepted) == [newer_id]
    kept = outcome_rows(database_url)
    assert kept[older_id, "crm"]["state"] == "stale"
    assert kept[newer_id, "crm"]["state"] == "delivered"
    view = console_view(rt, database_url, [older_id])[older_id]
    # Postgres keeps the full log, stale events included: delivered there.
    assert view == {"postgres": view["postgres"], "crm": view["crm"]}
    assert view["postgres"]["state"] == "delivered" and view["crm"]["state"] == "stale"


def orjson_loads(text: str) -> Any:
    import orjson

    return orjson.loads(text)


def test_without_database_url_or_switched_off_nothing_is_kept(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", INGEST_SINK_OUTCOMES="false", **crm_env(url))
    envelope = outboundry_delivery()
    enqueue(rt, envelope)
    run_jobs(rt)
    assert list(receiver.accepted) == event_ids(envelope)
    assert not outcome_rows(database_url)
    assert not rt.outcomes.enabled


def test_postgres_refusing_the_write_fails_no_delivery_and_the_rows_land_later(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest import constants

    monkeypatch.setattr(constants, "OUTCOME_RETRY_AFTER", 0.0)
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    with connect(database_url, autocommit=True) as conn:  # as if never migrated to 0010
        conn.execute("ALTER TABLE webhook_sink_outcomes RENAME TO webhook_sink_outcomes_away")
    lost = metrics.SINK_OUTCOME_ERRORS.labels("backlogged")._value.get()
    first = outboundry_delivery()
    enqueue(rt, first)
    run_jobs(rt)
    assert list(receiver.accepted) == event_ids(first)
    assert not list_failures(rt.redis, rt.settings)
    assert rt.redis.llen(rt.names.key("outcomes:backlog")) == 1
    assert metrics.SINK_OUTCOME_ERRORS.labels("backlogged")._value.get() == lost + 1

    with connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE webhook_sink_outcomes_away RENAME TO webhook_sink_outcomes")
    second = outboundry_delivery()
    enqueue(rt, second)
    run_jobs(rt)
    kept = outcome_rows(database_url)
    assert {k: r["state"] for k, r in kept.items()} == {
        (i, "crm"): "delivered" for i in event_ids(first) + event_ids(second)}
    assert rt.redis.llen(rt.names.key("outcomes:backlog")) == 0


def test_erase_removes_the_outcomes_of_the_erased_events_only(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    from ingest.commands.erase import EmailSubject, erase

    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    jane, bob = (outboundry_delivery(email="jane.erase@example.com"),
                 outboundry_delivery(email="bob.keep@example.com"))
    [jane_id], [bob_id] = event_ids(jane), event_ids(bob)
    enqueue(rt, jane, bob)
    run_jobs(rt)
    assert set(outcome_rows(database_url)) == {(jane_id, "crm"), (bob_id, "crm")}

    # Rows waiting in the workers' backlog (Postgres was away when they were reached): the
    # erased event's would bring its row back at the next write.
    from sinks.outcomes import Outcome
    from workers.outcomes import backlog_key

    key = backlog_key(rt.names)
    waiting = [Outcome(i, "slack", "delivered", datetime.now(timezone.utc)).to_dict()
               for i in (jane_id, bob_id)]
    rt.redis.rpush(key, *[orjson.dumps(row) for row in waiting])

    dry = erase(rt.settings, EmailSubject("jane.erase@example.com"), dry_run=True)
    assert dry.counts["webhook_sink_outcomes"] == 1
    assert dry.counts["sink outcomes waiting in redis"] == 1
    assert len(outcome_rows(database_url)) == 2 and rt.redis.llen(key) == 2
    report = erase(rt.settings, EmailSubject("jane.erase@example.com"))
    assert report.counts["webhook_sink_outcomes"] == 1
    assert report.counts["sink outcomes waiting in redis"] == 1
    assert set(outcome_rows(database_url)) == {(bob_id, "crm")}
    assert [orjson.loads(row)["event_id"] for row in rt.redis.lrange(key, 0, -1)] == [bob_id]


def test_retention_removes_outcomes_with_their_events_and_by_their_own_age(
        database_url: str, make_env: Callable[..., dict[str, str]]) -> None:
    from datetime import timedelta

    from ingest.config import Settings
    from sinks.outcomes import Outcome, write
    from workers import retention

    now = datetime.now(timezone.utc)
    old_event, new_event, crm_only_old, crm_only_new = (str(uuid.uuid4()) for _ in range(4))
    with connect(database_url, autocommit=True) as conn:
        for event_id, days in ((old_event, 40), (new_event, 1)):
            conn.execute(
                "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind,"
                " occurred_at, received_at, data) VALUES (%s, 'outboundry', %s, 'x',"
                " 'email.replied', %s, %s, '{}')",
                [event_id, event_id, now - timedelta(days=days), now - timedelta(days=days)])
        write(conn, [
            # Delivered recently (a long retry), yet its event expired: it goes with it.
            Outcome(old_event, "crm", "delivered", now - timedelta(days=2), attempts=8),
            Outcome(new_event, "crm", "delivered", now - timedelta(hours=20)),
            # Events stored nowhere (no Postgres sink): by when their state was reached.
            Outcome(crm_only_old, "crm", "dead", now - timedelta(days=35), reason="CRM 410"),
            Outcome(crm_only_new, "crm", "delivered", now - timedelta(days=3)),
        ])
    settings = Settings.from_env(make_env(database_url, INGEST_EVENTS_RETENTION_DAYS="30"))
    # Counted both ways alike: the expired event's outcome (taken along) and the old one.
    dry = retention.run_retention(settings, dry_run=True)
    assert dry["webhook_events"] == 1 and dry["webhook_sink_outcomes"] == 2
    removed = retention.run_retention(settings, batch=1000)
    assert removed["webhook_events"] == 1 and removed["webhook_sink_outcomes"] == 2
    assert set(outcome_rows(database_url)) == {(new_event, "crm"), (crm_only_new, "crm")}
