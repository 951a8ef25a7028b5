"""``ingest replay`` against a real Postgres archive filled by the real pipeline."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ingest.commands.cli import main
from ingest.config import Settings
from ingest.rq_jobs import enqueue_batch
from ingest.commands.replay import Selection, parse_when, replay
from tests.faults.conftest import outcaller_delivery, outreach_delivery
from tests.helpers import drain, rows


def store(runtime: Any, deliveries: list[tuple[str, bytes, dict[str, str], str]],
          received_at: datetime | None = None) -> None:
    """Put deliveries through the real pipeline (as the acceptor would enqueue them)."""
    when = (received_at or datetime.now(timezone.utc)).isoformat()
    envelopes = []
    for provider, body, headers, _ in deliveries:
        kept = {k.lower(): v for k, v in headers.items()
                if k.lower() == "outreach-webhook-cleanup-token"}
        envelopes.append({"id": str(uuid.uuid4()), "provider": provider, "received_at": when,
                          "headers": kept, "body": body.decode()})
    enqueue_batch(runtime.ingest_queue, envelopes, runtime.names.job_id("batch", uuid.uuid4().hex))
    drain(runtime)


def events(database_url: str) -> dict[str, dict[str, Any]]:
    return {r["resource_id"]: r for r in rows(database_url, "SELECT * FROM webhook_events")}


def test_dry_run_shows_what_changed_and_changes_nothing_then_replay_fixes_it(
        runtime: Any, settings: Settings, database_url: str) -> None:
    store(runtime, [outcaller_delivery(n) for n in range(3)] + [outreach_delivery(11)])
    before = events(database_url)
    # As if the normalizer of the day these were stored had mapped lead_1 badly.
    with_sql(database_url, "UPDATE webhook_events SET kind = 'unknown', contact_email = NULL "
                           "WHERE resource_id = 'lead_1'")

    report = replay(settings, Selection(), dry_run=True)
    assert (report.deliveries, report.events, report.new, report.changed, report.unchanged) == \
        (4, 4, 0, 1, 3)
    (change,) = report.changes
    assert change.columns == {"kind": ("unknown", "contact.created"),
                              "contact_email": (None, "p1@example.com")}
    assert events(database_url)["lead_1"]["kind"] == "unknown"  # dry run: untouched

    report = replay(settings, Selection())
    assert report.ok and report.changed == 1 and report.sent["postgres"] == 4
    after = events(database_url)
    assert after["lead_1"]["kind"] == before["lead_1"]["kind"] == "contact.created"
    assert after["lead_1"]["contact_email"] == "p1@example.com"
    # received_at and the archive link keep their original values.
    for key in before:
        assert after[key]["received_at"] == before[key]["received_at"]
        assert after[key]["delivery_id"] == before[key]["delivery_id"]

    again = replay(settings, Selection())
    assert (again.new, again.changed, again.unchanged) == (0, 0, 4)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 4


def test_a_missing_row_is_inserted_once_and_nothing_is_doubled(
        runtime: Any, settings: Settings, database_url: str) -> None:
    store(runtime, [outcaller_delivery(n) for n in range(3)])
    with_sql(database_url, "DELETE FROM webhook_events WHERE resource_id = 'lead_2'")
    report = replay(settings, Selection())
    assert (report.new, report.unchanged) == (1, 2)
    assert sorted(events(database_url)) == ["lead_0", "lead_1", "lead_2"]
    assert len(rows(database_url, "SELECT id FROM webhook_deliveries")) == 3


def test_selection_by_provider_time_kind_and_dedup_key(
        runtime: Any, settings: Settings, database_url: str) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=3)
    store(runtime, [outcaller_delivery(1), outreach_delivery(3)], received_at=old)
    store(runtime, [outcaller_delivery(2), outreach_delivery(5)])

    def selected(selection: Selection) -> int:
        return replay(settings, selection, dry_run=True).events

    assert selected(Selection(provider="outreach")) == 2
    assert selected(Selection(since=parse_when("1d"))) == 2
    assert selected(Selection(until=parse_when("1d"))) == 2
    assert selected(Selection(provider="outcaller", since=parse_when("1d"))) == 1
    assert selected(Selection(kinds=("contact.*",))) == 4
    assert selected(Selection(kinds=("email.*",))) == 0
    key = events(database_url)["lead_2"]["dedup_key"]
    assert selected(Selection(dedup_key=key)) == 1


def test_the_command_prints_a_summary_and_refuses_a_sink_that_is_not_enabled(
        runtime: Any, settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], make_env: Callable[..., dict[str, str]]) -> None:
    store(runtime, [outcaller_delivery(1)])
    for key, value in make_env(database_url).items():
        monkeypatch.setenv(key, value)
    assert main(["replay", "--dry-run", "--provider", "outcaller"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "events selected" in out and "would go to postgres" in out
    assert main(["replay", "--sink", "nosuchsink"]) == 2
    assert "nosuchsink" in capsys.readouterr().err
    assert main(["replay", "--since", "yesterday-ish"]) == 2


def test_parse_when() -> None:
    now = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)
    assert parse_when("6h", now) == datetime(2026, 3, 10, 6, tzinfo=timezone.utc)
    assert parse_when("2w", now) == datetime(2026, 2, 24, 12, tzinfo=timezone.utc)
    assert parse_when("2026-03-01") == datetime(2026, 3, 1, tzinfo=timezone.utc)
    assert parse_when("2026-03-01T10:00:00+02:00") == datetime(2026, 3, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_when("soon")


def with_sql(database_url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql)


def test_the_report_prints_payload_text_that_looks_like_markup_as_it_is(
        capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.commands.replay import Change, ReplayReport, _print_report

    report = ReplayReport(deliveries=1, events=1, changed=1)
    report.changes.append(Change("e1", "prospect.updated|[/x]|1", {"data": ("[/x]", "[bold]b")}))
    report.not_normalized["d1"] = "NormalizationError: no [/red] here"
    report.failed["crm"] = ["1 events: receiver said [/x]"]
    _print_report(report, dry_run=False, sinks=["crm"])  # rich used to raise MarkupError here
    out = capsys.readouterr().out
    assert "prospect.updated|[/x]|1" in out and "'[bold]b'" in out
    assert "no [/red] here" in out and "receiver said [/x]" in out
