"""Everything accepted is storable: a U+0000 anywhere, or an indexed value past the btree
limit, is stored in a form Postgres accepts and flagged; the archive keeps the exact bytes;
and an event dead-lettered for it before the fix is stored by ``ingest dlq retry``."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from ingest.commands.cli import main
from ingest.events import Delivery
from sinks import postgres
from tests.helpers import drain, rows
from tests.sinks.conftest import CrmReceiver, crm_env, enqueue, event_ids, run_jobs
from ingest.commands.dlq import list_failures
from workers.runtime import Runtime


def outcaller(lead_id: str, name: str, note: str, nul: str = "\u0000") -> dict[str, Any]:
    payload = {"event": "lead.updated", "resource": "lead", "action": "updated",
               "workspaceId": "ws-1", "timestamp": "2026-06-04T05:49:10Z",
               "data": {"id": lead_id, "name": name, "email": "nul@example.com",
                        "note": note, f"tags{nul}": [f"a{nul}b"]},
               "previousData": {"note": f"old{nul}"}}
    return Delivery(id=str(uuid.uuid4()), provider="outcaller",
                    received_at=datetime.now(timezone.utc), headers={},
                    body=orjson.dumps(payload).decode()).to_dict()


def test_a_nul_bearing_event_is_stored_flagged_and_reaches_the_crm_as_sent(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str],
        database_url: str) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    envelope = outcaller("lead_\u00001", "Ada\u0000 Lovelace", "hello\u0000world")
    clean = outcaller("lead_2", "Grace Hopper", "plain", nul="")
    enqueue(rt, envelope, clean)
    run_jobs(rt)
    assert list_failures(rt.redis, rt.settings) == []
    stored = {r["resource_id"]: r for r in rows(
        database_url, "SELECT resource_id, contact_name, data, previous, sanitized"
                      " FROM webhook_events")}
    row = stored["lead_\ufffd1"]
    assert row["sanitized"] is True and stored["lead_2"]["sanitized"] is False
    assert row["contact_name"] == "Ada\ufffd Lovelace"
    assert row["data"]["note"] == "hello\ufffdworld" and row["data"]["tags\ufffd"] == ["a\ufffdb"]
    assert row["previous"] == {"note": "old\ufffd"}
    [archived] = rows(database_url, "SELECT body FROM webhook_deliveries WHERE id = %s",
                      envelope["id"])
    assert bytes(archived["body"]) == envelope["body"].encode()  # the exact bytes received
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_records")[0]["n"] == 2
    [nul_id] = event_ids(envelope)
    assert receiver.accepted[nul_id]["data"]["note"] == "hello\u0000world"


def test_an_indexed_value_past_the_btree_limit_is_stored_cut_with_its_digest(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    rt = pipeline(INGEST_SINKS="postgres")
    long_id = "lead_" + "é" * 3000  # 6,000 bytes: past any btree entry
    enqueue(rt, outcaller(long_id, "Long Id", "x", nul=""))
    drain(rt)
    assert list_failures(rt.redis, rt.settings) == []
    [row] = rows(database_url, "SELECT resource_id, sanitized, data FROM webhook_events")
    digest = hashlib.sha256(long_id.encode()).hexdigest()
    assert row["sanitized"] is True and row["data"]["id"] == long_id
    assert row["resource_id"].endswith("…sha256:" + digest)
    assert len(row["resource_id"].encode()) <= postgres.MAX_INDEXED_BYTES
    assert long_id.startswith(row["resource_id"].split("…sha256:")[0])
    [record] = rows(database_url, "SELECT resource_id FROM webhook_records")
    assert record["resource_id"] == row["resource_id"]


def test_an_event_dead_lettered_before_the_fix_is_stored_by_dlq_retry(
        pipeline: Callable[..., Runtime], database_url: str, monkeypatch: pytest.MonkeyPatch,
        make_env: Callable[..., dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    rt = pipeline(INGEST_SINKS="postgres")
    with monkeypatch.context() as before_the_fix:
        before_the_fix.setattr(postgres, "_suspect", lambda doc, rows: False)
        enqueue(rt, outcaller("lead_\u00009", "Old Nul", "n\u0000"))
        drain(rt)
    [failure] = list_failures(rt.redis, rt.settings)
    assert "22P05" in failure.reason
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_events")[0]["n"] == 0
    for key, value in make_env(database_url, INGEST_SINKS="postgres").items():
        monkeypatch.setenv(key, value)
    assert main(["dlq", "retry"]) == 0
    assert "re-queued 1" in capsys.readouterr().out
    drain(rt)
    assert list_failures(rt.redis, rt.settings) == []
    [row] = rows(database_url, "SELECT resource_id, sanitized FROM webhook_events")
    assert row == {"resource_id": "lead_\ufffd9", "sanitized": True}


def test_replay_of_a_sanitized_event_finds_nothing_changed(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    from sinks.postgres import connect, stored_differences
    from workers.normalize import normalize

    rt = pipeline(INGEST_SINKS="postgres")
    envelope = outcaller("lead_\u00007", "Re\u0000play", "r\u0000")
    enqueue(rt, envelope)
    drain(rt)
    events = normalize(rt.providers, Delivery.from_dict(envelope))
    with connect(database_url) as conn:
        assert stored_differences(conn, events) == {events[0].id: {}}
