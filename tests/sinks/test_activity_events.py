"""Activity is never stale: through real workers, real Redis, real Postgres and real CRM and
Slack receivers, every open, click, reply and call reaches the sinks whatever order it comes in,
while state updates keep their ordering guarantees (ingest.kinds, workers.marks)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import metrics
from ingest.commands.replay import Selection, replay
from ingest.events import Delivery, Event
from ingest.kinds import ACTIVITY, STATE, is_activity, kind_class
from ingest.providers import load_providers
from ingest.providers.base import kind_classes
from tests.helpers import migrate_before, rows
from tests.sinks.conftest import (
    CrmReceiver,
    SlackReceiver,
    crm_env,
    enqueue,
    event_ids,
    run_jobs,
)
from sinks.postgres import migrate
from workers import marks
from workers.jobs import deliver
from workers.normalize import normalize
from workers.runtime import Runtime

MIGRATIONS = Path(__file__).resolve().parents[2] / "sinks" / "migrations"
T0 = datetime(2026, 6, 4, 5, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def iso(seconds: float) -> str:
    return at(seconds).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def envelope(provider: str, payload: dict[str, Any],
             headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A delivery envelope as the acceptor writes it."""
    return Delivery(id=str(uuid.uuid4()), provider=provider,
                    received_at=datetime.now(timezone.utc), headers=headers or {},
                    body=orjson.dumps(payload).decode()).to_dict()


# -- one activity delivery per provider, about one record -------------------------------------

def outreach_mailing(event: str, mailing: int, seconds: float) -> dict[str, Any]:
    return envelope("outreach", {
        "data": {"type": "mailing", "id": mailing,
                 "attributes": {"createdAt": iso(0), "updatedAt": iso(seconds),
                                "mailingType": "sequence", "subject": "Quick question"},
                 "relationships": {"prospect": {"data": {"type": "prospect", "id": 4417}}}},
        "meta": {"eventName": event, "deliveredAt": iso(seconds)}})


def salesloft_meeting(meeting: int, seconds: float, title: str) -> dict[str, Any]:
    return envelope("salesloft", {
        "id": meeting, "title": title, "status": "booked", "created_at": iso(0),
        "updated_at": iso(seconds), "person": {"id": 77, "_href": "https://x.example/77"}},
        {"x-salesloft-event": "meeting_booked"})


def outcaller_call(action: str, call: str, seconds: float) -> dict[str, Any]:
    return envelope("outcaller", {
        "event": f"call.{action}", "resource": "call", "action": action,
        "workspaceId": "cmpxz43bl00032c6udndznzdg", "timestamp": iso(seconds),
        "data": {"id": call, "status": action, "email": "priya@example.com",
                 "name": "Priya Sharma", "campaignId": "campaign_123"}})


def outboundry_lead(event: str, lead: str, seconds: float) -> dict[str, Any]:
    return envelope("outboundry", {
        "event": event, "company_id": "67787093-cc3a-44ca-8a12-5bf1afa3194c",
        "timestamp": iso(seconds),
        "data": {"actionData": {"message": f"{event} at {seconds}"},
                 "lead": {"id": lead, "name": "Rahul Sharma",
                          "email": "rahul.sharma@example.com"},
                 "campaign": {"id": "c-1", "name": "Q1 LinkedIn Outreach"}}})


def mailstand(kind: str, contact: str, seconds: float, **extra: Any) -> dict[str, Any]:
    payload = {"id": f"evt_{uuid.uuid4().hex[:20]}", "type": kind,
               "workspace_id": "space_d2n0092jd290j2d", "campaign_id": "camp_pow0dj20jc20jkd2nx",
               "contact_id": contact, "to_email": "lena.fischer@example.de",
               "created_at": int(T0.timestamp() + seconds), **extra}
    if kind == "reply":
        payload.update(from_email="lena.fischer@example.de", from_name="Lena Fischer")
    return envelope("mailstand", payload)


def newest_first(provider: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two activity deliveries about one record: the newer, then the older one."""
    record = uuid.uuid4().hex[:12]
    number = int(record, 16) % 10**9
    if provider == "outreach":
        return (outreach_mailing("mailing.replied", number, 20),
                outreach_mailing("mailing.opened", number, 10))
    if provider == "salesloft":
        return salesloft_meeting(number, 20, "Demo"), salesloft_meeting(number, 10, "Intro")
    if provider == "outcaller":
        return outcaller_call("completed", record, 20), outcaller_call("initiated", record, 10)
    if provider == "outboundry":
        return (outboundry_lead("email-clicked", record, 20),
                outboundry_lead("email-opened", record, 10))
    return mailstand("click", record, 20), mailstand("open", record, 10)


def events_of(*envelopes: dict[str, Any]) -> list[Event]:
    providers = load_providers()
    return [e for env in envelopes for e in normalize(providers, Delivery.from_dict(env))]


def stale_count(sink: str) -> float:
    return metrics.SINK_EVENTS.labels(sink, "stale")._value.get()


_DIGEST = re.compile(r"^(\d+) new events")


def slack_events(receiver: SlackReceiver) -> int:
    """How many events the Slack receiver accepted: one per message, N per digest."""
    total = 0
    for message in receiver.messages:
        found = _DIGEST.match(message["text"])
        total += int(found.group(1)) if found else 1
    return total


def all_sinks(crm_url: str, slack_url: str, **extra: str) -> dict[str, str]:
    return {"INGEST_SINKS": "postgres,crm,slack", **crm_env(crm_url),
            "SLACK_WEBHOOK_URL": slack_url, "SLACK_EVENTS": "*", **extra}


# -- through real workers ---------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["outreach", "salesloft", "outcaller", "outboundry",
                                      "mailstand"])
def test_two_activities_about_one_record_delivered_newest_first_both_reach_crm_and_slack(
        provider: str, pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        slack: tuple[SlackReceiver, str], database_url: str) -> None:
    (receiver, crm_url), (slack_receiver, slack_url) = crm, slack
    rt = pipeline(**all_sinks(crm_url, slack_url))
    skipped = stale_count("crm"), stale_count("slack")
    newer, older = newest_first(provider)
    both = events_of(newer, older)
    assert len(both) == 2 and all(e.activity for e in both)
    assert both[0].record == both[1].record and both[0].occurred_at > both[1].occurred_at
    enqueue(rt, newer)
    run_jobs(rt)
    enqueue(rt, older)
    run_jobs(rt)

    assert set(receiver.accepted) == {e.id for e in both}
    assert receiver.duplicates == 0
    assert slack_events(slack_receiver) == 2 and not slack_receiver.invalid
    assert (stale_count("crm"), stale_count("slack")) == skipped
    stored = rows(database_url, "SELECT id, stale FROM webhook_events")
    assert {str(r["id"]): r["stale"] for r in stored} == {e.id: False for e in both}
    # Activity leaves webhook_records alone: it is nobody's state.
    assert rows(database_url, "SELECT * FROM webhook_records") == []


def test_three_activities_of_the_same_second_all_reach_crm_and_slack(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        slack: tuple[SlackReceiver, str]) -> None:
    (receiver, crm_url), (slack_receiver, slack_url) = crm, slack
    rt = pipeline(**all_sinks(crm_url, slack_url))
    contact, lead = uuid.uuid4().hex[:12], uuid.uuid4().hex
    replies = [mailstand("reply", contact, 30, text=f"reply {n}") for n in range(3)]
    # Outboundry dates to the millisecond: three replies within one second.
    linkedin = [outboundry_lead("message-replied", lead, 30 + n / 10) for n in range(3)]
    for env in replies[::-1] + linkedin[::-1]:  # one batch each, newest first
        enqueue(rt, env)
    run_jobs(rt)
    assert set(receiver.accepted) == set(event_ids(*replies, *linkedin))
    assert slack_events(slack_receiver) == 6 and not slack_receiver.invalid


def test_state_updates_keep_their_order_around_activity_and_a_delete_stays_a_delete(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        database_url: str) -> None:
    receiver, crm_url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(crm_url))
    contact = uuid.uuid4().hex[:12]
    stage_new = mailstand("stage_change", contact, 30, new_stage_name="Interested")
    opened = mailstand("open", contact, 40)
    stage_old = mailstand("stage_change", contact, 20, new_stage_name="Contacted")  # late
    for env in (stage_new, opened, stage_old):
        enqueue(rt, env)
        run_jobs(rt)
    (new_id,), (open_id,), (old_id,) = (event_ids(e) for e in (stage_new, opened, stage_old))
    assert set(receiver.accepted) == {new_id, open_id}  # the late state update is skipped
    stale = {str(r["id"]): r["stale"] for r in rows(database_url,
                                                    "SELECT id, stale FROM webhook_events")}
    assert stale == {new_id: False, open_id: False, old_id: True}
    (record,) = rows(database_url, "SELECT * FROM webhook_records")
    assert str(record["event_id"]) == new_id and record["kind"] == "contact.stage_changed"

    # A delete, then activity after it, then an update older than the delete: still deleted,
    # and the activity (a fact about the past) reached the CRM without reviving the record.
    deleted = mailstand("delete", contact, 50)
    clicked = mailstand("click", contact, 60)
    late = mailstand("stage_change", contact, 45, new_stage_name="Meeting")
    for env in (deleted, clicked, late):
        enqueue(rt, env)
        run_jobs(rt)
    (record,) = rows(database_url, "SELECT * FROM webhook_records")
    assert record["deleted"] is True and str(record["event_id"]) == event_ids(deleted)[0]
    assert set(event_ids(deleted, clicked)) <= set(receiver.accepted)
    assert event_ids(late)[0] not in receiver.accepted


def test_activity_never_makes_a_later_state_event_stale(runtime: Runtime) -> None:
    """The mark of a record moves with state only: an open newer than every update leaves the
    next update current, and its own check before delivery lets it through."""
    r, n = runtime.redis, runtime.names
    contact = uuid.uuid4().hex[:12]
    opened, stage = events_of(mailstand("open", contact, 40),
                              mailstand("stage_change", contact, 30))
    assert opened.activity and not stage.activity
    assert [e.stale for e in marks.mark_stale(r, n, [opened], 60)] == [False]
    assert [e.stale for e in marks.mark_stale(r, n, [stage], 60)] == [False]
    assert marks.superseded(r, n, [opened, stage]) == set()
    older_open = events_of(mailstand("open", contact, 10))
    assert [e.stale for e in marks.mark_stale(r, n, older_open, 60)] == [False]


def test_deliver_alone_reports_how_many_stale_events_it_skipped(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str]) -> None:
    receiver, crm_url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(crm_url))
    contact = uuid.uuid4().hex[:12]
    old_stage, opened, new_stage = events_of(mailstand("stage_change", contact, 10),
                                             mailstand("open", contact, 5),
                                             mailstand("stage_change", contact, 20))
    marks.mark_stale(rt.redis, rt.names, [new_stage], 60)
    # A job written before the newer update was processed: its state event is superseded by
    # the time it runs, its activity is not.
    result = deliver("crm", [old_stage.to_job(), opened.to_job()])
    assert result == {"delivered": 1, "stale": 1}
    assert set(receiver.accepted) == {opened.id}
    assert deliver("crm", [old_stage.to_job()]) == {"delivered": 0, "stale": 1}


# -- shuffled: activity all reaches the CRM, the record ends at the newest state --------------

_KINDS = st.sampled_from(["open", "click", "reply", "pause", "stage_change", "stage_change",
                          "delete"])


def test_any_order_of_a_contacts_mixed_events_delivers_every_activity_and_the_newest_state(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        database_url: str) -> None:
    receiver, crm_url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(crm_url))

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(plan=st.lists(st.tuples(_KINDS, st.integers(0, 5)), min_size=2, max_size=8),
           order=st.randoms(use_true_random=False),
           sizes=st.lists(st.integers(1, 3), min_size=8, max_size=8))
    def check(plan: list[tuple[str, int]], order: Any, sizes: list[int]) -> None:
        contact = uuid.uuid4().hex[:12]
        # Whole seconds from a small range: ties on occurred_at happen, broken by event id.
        envelopes = [mailstand(kind, contact, second, new_stage_name=f"s{i}")
                     for i, (kind, second) in enumerate(plan)]
        events = events_of(*envelopes)
        order.shuffle(envelopes)
        for size in sizes:  # shuffled, in batches of 1 to 3 deliveries, one after the other
            if envelopes:
                enqueue(rt, *envelopes[:size])
                envelopes = envelopes[size:]
                run_jobs(rt)

        activity = {e.id for e in events if e.activity}
        states = [e for e in events if not e.activity]
        assert activity <= set(receiver.accepted)
        stored = rows(database_url, "SELECT id, stale FROM webhook_events "
                                    "WHERE data->>'contact_id' = %s", contact)
        assert len(stored) == len(events)
        assert not [r for r in stored if r["stale"] and str(r["id"]) in activity]
        found = rows(database_url, "SELECT event_id, deleted FROM webhook_records "
                                   "WHERE resource_id = %s", contact)
        if not states:
            assert found == []
            return
        newest = max(states, key=lambda e: (e.occurred_at, uuid.UUID(e.id)))
        (record,) = found
        assert str(record["event_id"]) == newest.id and record["deleted"] is newest.deletes
        assert newest.id in receiver.accepted  # the newest state is never stale

    check()


# -- the classes (each provider's table and documented events: tests/providers) -------------

def test_the_vocabulary_judges_the_kinds_the_issue_names() -> None:
    for kind in ("email.opened", "email.clicked", "email.replied", "email.bounced",
                 "call.completed", "meeting.booked", "note.created", "success.created",
                 "linkedin.message_replied"):
        assert kind_class(kind) == ACTIVITY, kind
    for kind in ("contact.updated", "task.updated", "campaign.paused", "contact.deleted",
                 "note.deleted", "call.updated", "email.updated", "account.created"):
        assert kind_class(kind) == STATE, kind
    assert kind_class("task.assigned") is None and is_activity("task.assigned")
    assert not is_activity("task.assigned", "task.assigned", {"task.*": STATE})
    # Mailstand's campaign events are about the contact: activity there, state elsewhere.
    assert is_activity("campaign.paused", "pause", kind_classes(load_providers()["mailstand"]))
    assert not is_activity("campaign.paused", "sequenceState.updated")


def test_jobs_written_before_events_carried_activity_are_judged_by_the_vocabulary() -> None:
    (opened,) = events_of(mailstand("open", "c1", 10))
    (stage,) = events_of(mailstand("stage_change", "c1", 10))
    for event in (opened, stage):
        job = event.to_job()
        assert Event.from_job(job).activity is event.activity
        del job["activity"]
        assert Event.from_job(job).activity is event.activity


# -- upgrading: rows an older release stored as stale activity --------------------------------

def test_replay_re_feeds_the_crm_with_activity_and_never_an_older_update(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        database_url: str) -> None:
    """As an older release left things: the CRM never got an open it judged stale, nor the
    older of two updates. ``ingest replay --sink crm`` sends the open only, and clears its
    stale flag in webhook_events."""
    receiver, crm_url = crm
    rt = pipeline()  # postgres only: the CRM has nothing yet
    contact = uuid.uuid4().hex[:12]
    old_stage, new_stage, opened = (mailstand("stage_change", contact, 10),
                                    mailstand("stage_change", contact, 30),
                                    mailstand("open", contact, 20))
    for env in (new_stage, old_stage, opened):
        enqueue(rt, env)
        run_jobs(rt)
    (old_id,), (new_id,), (open_id,) = (event_ids(e) for e in (old_stage, new_stage, opened))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE webhook_events SET stale = true WHERE id = %s", (open_id,))
    # The CRM already has the newest update, as it would have had.
    receiver.accepted[new_id] = {}

    crm_rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(crm_url))
    report = replay(crm_rt.settings, Selection(), ["postgres", "crm"])
    assert report.ok and report.stale["crm"] == 1 and report.changed == 1
    assert set(receiver.accepted) == {new_id, open_id}
    assert receiver.posts[old_id] == 0
    stale = {str(r["id"]): r["stale"] for r in rows(database_url,
                                                    "SELECT id, stale FROM webhook_events")}
    assert stale == {old_id: True, new_id: False, open_id: False}
    dry = replay(crm_rt.settings, Selection(), ["crm"], dry_run=True)
    assert dry.sent["crm"] == 2 and dry.stale["crm"] == 1


def _migration_function() -> str:
    text = (MIGRATIONS / "0008_activity_is_not_state.sql").read_text()
    start = text.index("CREATE FUNCTION")
    return text[start:text.index("$$;", start) + 3]


def test_the_migrations_rule_is_the_vocabularys(postgres_server: str) -> None:
    """Migration 0008 judges stored rows in SQL: the same judgement as ingest.kinds for every
    kind any built-in provider produces, and for the odd ones."""
    providers = load_providers()
    cases = {(name, event_type, kind) for name, p in providers.items()
             for event_type, kind in p.kinds.items() if not kind.endswith(".*")}
    cases |= {("outcaller", f"{resource}.{action}", f"{resource}.{action}")
              for resource in ("call", "task")
              for action in ("created", "initiated", "completed", "failed", "updated", "assigned")}
    cases |= {("mailstand", event_type, "campaign.paused") for event_type in ("pause", "x")}
    cases |= {(name, "x", kind) for name in providers
              for kind in ("unknown", "campaign.paused", "campaign.finished", "task.assigned",
                           "nodot", "a.b.c", "a.b_updated", "note.created", "note.deleted",
                           "import.finished", "email.link_swapped", "call.record_updated")}
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(_migration_function())
        for provider, event_type, kind in sorted(cases):
            (sql,) = conn.execute("SELECT pg_temp.webhook_ingest_is_activity(%s, %s, %s)",
                                  (provider, event_type, kind)).fetchone() or (None,)
            expected = is_activity(kind, event_type, kind_classes(providers[provider]))
            assert sql is expected, (provider, event_type, kind)


def test_migrating_clears_stale_activity_and_gives_records_their_newest_state(
        fresh_database: str) -> None:
    url = fresh_database
    migrate_before(url, "0008")
    with psycopg.connect(url, autocommit=True) as conn:
        # As an older release stored them: contact c1 had a stage change, then an open
        # that became its "state" and made a late stage change stale; c2 only ever had
        # activity; the Outreach prospect only state.
        stored = [("mailstand", "c1", 10, "contact.stage_changed", False, "stage_change"),
                  ("mailstand", "c1", 30, "email.opened", False, "open"),
                  ("mailstand", "c1", 20, "contact.stage_changed", True, "stage_change"),
                  ("mailstand", "c1", 25, "campaign.paused", True, "pause"),
                  ("mailstand", "c2", 5, "email.clicked", False, "click"),
                  ("outreach", "p1", 10, "contact.updated", True, "updated"),
                  ("outreach", "p1", 20, "contact.updated", False, "updated")]
        ids = {}
        for n, (provider, rid, seconds, kind, stale, action) in enumerate(stored):
            ids[n] = str(uuid.uuid4())
            conn.execute(
                "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
                "resource_type, resource_id, action, occurred_at, received_at, data, "
                "stale) VALUES (%s, %s, %s, %s, %s, 'contact', %s, %s, %s, now(), %s, %s)",
                (ids[n], provider, f"k{n}", action, kind, rid, action, at(seconds),
                 orjson.dumps({"n": n}).decode(), stale))
        for n in (1, 4, 6):  # the newest event of each record, as 0004 and the sink left it
            provider, rid, seconds, kind, _, _ = stored[n]
            conn.execute(
                "INSERT INTO webhook_records (provider, resource_type, resource_id, "
                "occurred_at, kind, event_id, data) VALUES (%s, 'contact', %s, %s, %s, "
                "%s, %s)", (provider, rid, at(seconds), kind, ids[n],
                            orjson.dumps({"n": n}).decode()))
    assert migrate(url) == sorted(m.name for m in MIGRATIONS.glob("*.sql") if m.name >= "0008")
    assert migrate(url) == []
    stale = {r["dedup_key"]: r["stale"] for r in rows(url, "SELECT * FROM webhook_events")}
    assert stale == {"k0": False, "k1": False, "k2": True, "k3": False, "k4": False,
                     "k5": True, "k6": False}
    records_after = {r["resource_id"]: (str(r["event_id"]), r["kind"], r["data"])
                     for r in rows(url, "SELECT * FROM webhook_records")}
    assert records_after == {"c1": (ids[2], "contact.stage_changed", {"n": 2}),
                             "p1": (ids[6], "contact.updated", {"n": 6})}
