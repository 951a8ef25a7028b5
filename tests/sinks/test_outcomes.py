"""sinks.outcomes: the table of what each sink did with each event, and the console's reader
(pending and left-out rules, the Postgres sink's derived "delivered", rows that never move
back in time), against a real Postgres migrated to the current schema."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ingest.config import Settings
from ingest.kinds import UNKNOWN
from sinks.outcomes import Outcome, enabled_sink_globs, sink_outcomes, write
from sinks.postgres import connect
from sinks.registry import build_sinks
from tests.sinks.conftest import crm_env

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _event(kind: str, stored_at: datetime | None = None) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "kind": kind, "provider": "outboundry",
            "stored_at": stored_at}


@pytest.fixture
def three_sinks(make_env: Callable[..., dict[str, str]], database_url: str) -> Settings:
    return Settings.from_env(make_env(
        database_url, INGEST_SINKS="postgres,crm,slack",
        SLACK_WEBHOOK_URL="http://127.0.0.1:9/services/T000/B000/XXXXSECRETXXXX",
        **crm_env("http://127.0.0.1:9/hook", CRM_EVENTS="email.*,linkedin.*_replied")))


def test_enabled_sink_globs_agree_with_the_sinks_the_workers_build(three_sinks: Settings) -> None:
    globs = enabled_sink_globs(three_sinks)
    built = build_sinks(three_sinks)
    assert list(globs) == list(built) == ["postgres", "crm", "slack"]
    assert globs["crm"] == ("email.*", "linkedin.*_replied")
    assert all(globs[name] == enabled.events for name, enabled in built.items())
    kinds = ["email.replied", "email.opened", "linkedin.message_replied", "meeting.booked",
             "contact.updated", UNKNOWN, "Email.Replied"]
    for kind in kinds:
        event = _event(kind, stored_at=T0)
        with connect(three_sinks.require_database()) as conn:
            taken = set(sink_outcomes(conn, [event], globs)[event["id"]])
        wanted = {name for name, enabled in built.items() if _wants(enabled, kind)}
        assert taken == wanted, kind


def _wants(enabled: Any, kind: str) -> bool:
    from ingest.events import Event

    event = Event.__new__(Event)
    object.__setattr__(event, "kind", kind)
    return bool(enabled.wants(event))


def test_a_sink_with_no_row_is_pending_and_one_not_taking_the_event_is_left_out(
        three_sinks: Settings) -> None:
    globs = enabled_sink_globs(three_sinks)
    reply, update = _event("email.replied"), _event("contact.updated")
    with connect(three_sinks.require_database(), autocommit=True) as conn:
        write(conn, [Outcome(reply["id"], "crm", "retrying", T0, attempts=1,
                             next_attempt_at=T0 + timedelta(seconds=15),
                             reason="CRM answered 503")])
        got = sink_outcomes(conn, [reply, update], globs)
    assert got[reply["id"]] == {
        "postgres": {"state": "pending", "at": None, "attempts": 0, "reason": None,
                     "next_attempt_at": None},
        "crm": {"state": "retrying", "at": T0, "attempts": 1, "reason": "CRM answered 503",
                "next_attempt_at": T0 + timedelta(seconds=15)},
        "slack": {"state": "pending", "at": None, "attempts": 0, "reason": None,
                  "next_attempt_at": None},
    }
    # contact.updated: neither the CRM (email.*, linkedin.*_replied) nor Slack takes it.
    assert list(got[update["id"]]) == ["postgres"]
    assert got[update["id"]]["postgres"]["state"] == "pending"


def test_the_postgres_sinks_delivered_is_its_stored_row(three_sinks: Settings) -> None:
    globs = {"postgres": ("*",)}
    stored, retried, unstored = (_event("email.sent", T0), _event("email.sent", T0),
                                 _event("email.sent"))
    later = T0 + timedelta(minutes=1)
    with connect(three_sinks.require_database(), autocommit=True) as conn:
        write(conn, [
            # An earlier attempt's row does not hide that the event is stored now.
            Outcome(stored["id"], "postgres", "dead", T0 - timedelta(minutes=5),
                    reason="Postgres refused the data"),
            # Delivered after a retry: the row says which attempt.
            Outcome(retried["id"], "postgres", "delivered", later, attempts=3),
            Outcome(unstored["id"], "postgres", "retrying", T0, attempts=2,
                    next_attempt_at=later, reason="Postgres unavailable"),
        ])
        got = sink_outcomes(conn, [stored, retried, unstored], globs)
    assert got[stored["id"]]["postgres"] == {"state": "delivered", "at": T0, "attempts": 1,
                                             "reason": None, "next_attempt_at": None}
    assert got[retried["id"]]["postgres"]["attempts"] == 3
    assert got[retried["id"]]["postgres"]["at"] == later
    assert got[unstored["id"]]["postgres"]["state"] == "retrying"


def test_a_row_never_moves_back_in_time_and_a_dead_letter_retried_overwrites_dead(
        database_url: str) -> None:
    event = _event("email.replied")
    key = event["id"].upper()  # ids compare as uuids, whatever their case
    with connect(database_url, autocommit=True) as conn:
        write(conn, [Outcome(event["id"], "crm", "delivered", T0, attempts=2)])
        # A worker that ran late writes an older state: ignored.
        write(conn, [Outcome(event["id"], "crm", "retrying", T0 - timedelta(seconds=1),
                             next_attempt_at=T0, reason="CRM answered 503")])
        assert sink_outcomes(conn, [dict(event, id=key)], {"crm": ("*",)})[key]["crm"][
            "state"] == "delivered"
        write(conn, [Outcome(event["id"], "crm", "dead", T0 + timedelta(hours=1), attempts=8,
                             reason="CRM answered 410")])
        write(conn, [Outcome(event["id"], "crm", "delivered", T0 + timedelta(hours=2))])
        # Several rows of one job for one (event, sink): the newest goes.
        write(conn, [Outcome(event["id"], "slack", "stale", T0 + timedelta(seconds=2)),
                     Outcome(event["id"], "slack", "retrying", T0 + timedelta(seconds=1))])
        got = sink_outcomes(conn, [event], {"crm": ("*",), "slack": ("email.*",)})
    assert got[event["id"]]["crm"]["state"] == "delivered"
    assert got[event["id"]]["crm"]["reason"] is None
    assert got[event["id"]]["slack"]["state"] == "stale"


def test_the_table_takes_only_the_four_states(database_url: str) -> None:
    import psycopg

    with pytest.raises(ValueError, match="pending"):
        Outcome(str(uuid.uuid4()), "crm", "pending", T0)
    with connect(database_url, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("INSERT INTO webhook_sink_outcomes (event_id, sink, state, at)"
                     " VALUES (%s, 'crm', 'pending', now())", [uuid.uuid4()])


def test_an_outcome_survives_its_json_form() -> None:
    o = Outcome(str(uuid.uuid4()), "crm", "retrying", T0, attempts=2,
                next_attempt_at=T0 + timedelta(seconds=5), reason="CRM answered 503")
    assert Outcome.from_dict(o.to_dict()) == o
