"""The adapters read the answers a connector kept from Outreach's API, and the fake answers in
the same shape (tests/samples/SOURCES.md says what is captured and what is documented)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson

from ingest.subscriptions.outreach import OutreachSubscriptions
from tests.subscriptions.conftest import OUTREACH_TOKEN
from tests.subscriptions.fake_apis import FakeOutreach

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "outreach_api"


def _keys(value: Any, prefix: str = "") -> set[str]:
    """Every key path of a JSON value (lists: their first element)."""
    if isinstance(value, list):
        return _keys(value[0], prefix + "[]") if value else set()
    if not isinstance(value, dict):
        return set()
    out = set()
    for key, item in value.items():
        out.add(prefix + key)
        out |= _keys(item, prefix + key + ".")
    return out


def test_the_outreach_adapter_reads_the_captured_answers() -> None:
    listed = orjson.loads((SAMPLES / "list_webhooks.json").read_bytes())
    (remote,) = [OutreachSubscriptions._remote(item) for item in listed["data"]]
    assert (remote.id, remote.topic, remote.active, remote.secret) == ("31", "*.*", True, None)
    assert remote.url.startswith("https://dev-hull-outreach.io/webhooks?")
    created = orjson.loads((SAMPLES / "create_webhook.json").read_bytes())
    assert OutreachSubscriptions._remote(created["data"]).id == "3"


def test_the_fake_outreach_answers_in_the_captured_shape(outreach_api: FakeOutreach) -> None:
    outreach_api.add("*", "*", "https://hooks.example.test/webhooks/outreach")
    answer = httpx.get(f"{outreach_api.base}/api/v2/webhooks",
                       headers={"Authorization": f"Bearer {OUTREACH_TOKEN}"}, timeout=10)
    assert answer.headers["content-type"].startswith("application/vnd.api+json")
    captured = orjson.loads((SAMPLES / "list_webhooks.json").read_bytes())
    assert _keys(captured) <= _keys(answer.json())


def test_outreach_wildcards_cover_what_they_name() -> None:
    covers = OutreachSubscriptions.covers
    assert covers(None, "*.*", "prospect.created")  # type: ignore[arg-type]
    assert covers(None, "prospect.*", "prospect.created")  # type: ignore[arg-type]
    assert covers(None, "*.created", "sequenceState.created")  # type: ignore[arg-type]
    assert not covers(None, "prospect.*", "mailing.opened")  # type: ignore[arg-type]
    assert not covers(None, "prospect.updated", "prospect.created")  # type: ignore[arg-type]
