"""The upgrade path: rows stored with the previous mapping get corrected by ``ingest replay``,
and ``--dry-run`` lists each column it would change first. Real pipeline, real Postgres, the
live-captured samples."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson
import psycopg
import pytest

from ingest.commands.cli import main
from ingest.config import Settings
from ingest.commands.replay import Selection, replay
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES

ORG = "e4bf9dea-9b0a-4996-ae2a-e52856bb577c"
LIVE = ("sequence_created_live.raw", "sequence_destroyed_live.raw")


def _post(acceptor: Any, name: str) -> None:
    body = (SAMPLES / "outreach" / name).read_bytes()
    captured = orjson.loads((SAMPLES / "outreach" / name).with_suffix(".headers.json")
                            .read_bytes())
    signature = hmac.new(SECRETS["outreach"][0].encode(), body, hashlib.sha256).hexdigest()
    response = httpx.post(f"{acceptor.url}/webhooks/outreach", content=body, timeout=10,
                          headers={**captured, "Outreach-Webhook-Signature": signature})
    assert response.status_code == 200


def _by_id(database_url: str) -> dict[str, dict[str, Any]]:
    return {r["event_type"]: r for r in rows(database_url, "SELECT * FROM webhook_events")}


def _store_as_the_previous_mapping_did(database_url: str) -> None:
    # What the previous normalizer stored for these two live deliveries: the sequence's name
    # as a contact's, no campaign, no tenant, and the delete dated by its stale updatedAt.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE webhook_events SET campaign_id = NULL, workspace_id = NULL, "
                     "contact_name = 'My Public Sequence' WHERE event_type = 'sequence.created'")
        conn.execute("UPDATE webhook_events SET campaign_id = NULL, workspace_id = NULL, "
                     "contact_name = 'Delete me sequence', "
                     "occurred_at = '2019-08-14T10:46:08Z' "
                     "WHERE event_type = 'sequence.destroyed'")


def test_replay_lists_then_corrects_rows_stored_with_the_previous_mapping(
        acceptor: Any, runtime: Any, settings: Settings, database_url: str) -> None:
    for name in LIVE:
        _post(acceptor, name)
    drain(runtime)
    today = _by_id(database_url)
    _store_as_the_previous_mapping_did(database_url)

    report = replay(settings, Selection(provider="outreach"), dry_run=True)
    assert (report.events, report.new, report.changed, report.unchanged) == (2, 0, 2, 0)
    changes = {c.dedup_key.partition("|")[0]: c.columns for c in report.changes}
    assert changes["sequence.created"] == {
        "workspace_id": (None, ORG),
        "contact_name": ("My Public Sequence", None),
        "campaign_id": (None, "42"),
    }
    assert changes["sequence.destroyed"] == {
        "occurred_at": (datetime(2019, 8, 14, 10, 46, 8, tzinfo=timezone.utc),
                        datetime(2019, 8, 14, 10, 46, 28, 219000, tzinfo=timezone.utc)),
        "workspace_id": (None, ORG),
        "contact_name": ("Delete me sequence", None),
        "campaign_id": (None, "43"),
    }
    assert _by_id(database_url)["sequence.created"]["campaign_id"] is None  # dry run

    report = replay(settings, Selection(provider="outreach"))
    assert report.ok and report.changed == 2
    after = _by_id(database_url)
    for event_type, row in after.items():
        for column in ("campaign_id", "workspace_id", "contact_name", "occurred_at"):
            assert row[column] == today[event_type][column], (event_type, column)
        assert row["received_at"] == today[event_type]["received_at"]
        assert row["delivery_id"] == today[event_type]["delivery_id"]
    assert after["sequence.destroyed"]["occurred_at"] == datetime(
        2019, 8, 14, 10, 46, 28, 219000, tzinfo=timezone.utc)

    again = replay(settings, Selection(provider="outreach"))
    assert (again.new, again.changed, again.unchanged) == (0, 0, 2)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 2, "no row doubled"


def test_the_dry_run_command_prints_each_column_change(
        acceptor: Any, runtime: Any, database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], make_env: Callable[..., dict[str, str]]) -> None:
    _post(acceptor, "sequence_destroyed_live.raw")
    drain(runtime)
    _store_as_the_previous_mapping_did(database_url)
    for key, value in make_env(database_url).items():
        monkeypatch.setenv(key, value)
    assert main(["replay", "--dry-run", "--provider", "outreach"]) == 0
    out = capsys.readouterr().out
    assert "stored, normalized differently today" in out
    assert "campaign_id: None -> '43'" in out
    assert "contact_name: 'Delete me sequence' -> None" in out
    assert "occurred_at: 2019-08-14T10:46:08+00:00 -> 2019-08-14T10:46:28.219000+00:00" in out
    assert _by_id(database_url)["sequence.destroyed"]["campaign_id"] is None
