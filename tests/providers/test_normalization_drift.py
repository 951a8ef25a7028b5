"""Drift shows up: unreadable optional timestamps fall back instead of failing the delivery,
and every fallback a new event needed is counted in ingest_normalization_fallbacks_total."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timezone
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from ingest.events import Delivery
from ingest.providers import load_providers
from ingest.providers.base import parse_time
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES, suite_of

RECEIVED = datetime(2026, 6, 4, 6, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("value", [
    "²",  # str.isdigit() is true for it, float() refuses it
    "١٢٣",  # Arabic-Indic digits: isdigit() again
    "0001-01-01T00:00:00+05:00",  # year 1 east of UTC: before datetime.min in UTC
    "9999-12-31T23:59:59-05:00",  # year 9999 west of UTC: after datetime.max in UTC
    "9" * 400,  # a number too large for a timestamp
    "not a time", "", "   ", None, True, [], {}, float("nan"), float("inf"), 10**30,
])
def test_unreadable_timestamps_are_none_never_an_exception(value: Any) -> None:
    assert parse_time(value) is None


def test_readable_timestamps_still_parse() -> None:
    assert parse_time("2026-06-04T07:49:10.221+02:00") == datetime(
        2026, 6, 4, 5, 49, 10, 221000, tzinfo=timezone.utc)
    assert parse_time("1654703617") == datetime(2022, 6, 8, 15, 53, 37, tzinfo=timezone.utc)
    assert parse_time(1654710817000) == datetime(2022, 6, 8, 17, 53, 37, tzinfo=timezone.utc)
    assert parse_time("0001-01-01T00:00:00Z") == datetime(1, 1, 1, tzinfo=timezone.utc)


# One delivery per provider whose optional timestamp is unreadable (hand-made from each stored
# sample); each must land, dated by its receipt, with an occurred_at fallback.
BAD_TIMES = ["²", "0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"]


def _with_time(provider: str, value: str) -> tuple[bytes, dict[str, str]]:
    return suite_of(provider).with_time(value)  # ProviderSuite.with_time


@pytest.mark.parametrize("value", BAD_TIMES)
@pytest.mark.parametrize("provider", sorted(load_providers()))
def test_an_unreadable_timestamp_falls_back_to_the_receipt_time(provider: str, value: str) -> None:
    body, headers = _with_time(provider, value)
    delivery = Delivery(id="00000000-0000-4000-8000-0000000000cc", provider=provider,
                        received_at=RECEIVED, headers=headers, body=body.decode())
    (event,) = load_providers()[provider].events(delivery)
    assert event.occurred_at == RECEIVED
    assert "occurred_at" in event.fallbacks


def _count(provider: str, field: str) -> float:
    return REGISTRY.get_sample_value("ingest_normalization_fallbacks_total",
                                     {"provider": provider, "field": field}) or 0.0


def _post_outreach(acceptor: Any, body: bytes) -> None:
    signature = hmac.new(SECRETS["outreach"][0].encode(), body, hashlib.sha256).hexdigest()
    response = httpx.post(f"{acceptor.url}/webhooks/outreach", content=body, timeout=10,
                          headers={"Content-Type": "application/json",
                                   "Outreach-Webhook-Signature": signature})
    assert response.status_code == 200


def test_the_fallback_counter_moves_when_a_sample_lacks_the_field(
        acceptor: Any, runtime: Any, database_url: str) -> None:
    before = {f: _count("outreach", f) for f in ("occurred_at", "contact_email", "campaign_id")}
    # Live: a sequence update with "attributes": {}: no updatedAt, dated by meta.deliveredAt.
    _post_outreach(acceptor, (SAMPLES / "outreach/sequence_updated_empty_live.raw").read_bytes())
    drain(runtime)
    assert _count("outreach", "occurred_at") == before["occurred_at"] + 1
    assert _count("outreach", "contact_email") == before["contact_email"]
    assert _count("outreach", "campaign_id") == before["campaign_id"]

    # A sample that carries every field moves nothing.
    _post_outreach(acceptor, (SAMPLES / "outreach/prospect_updated_v2.raw").read_bytes())
    # A prospect without its emails and a sequence state without its sequence (hand-made).
    prospect = orjson.loads((SAMPLES / "outreach/prospect_updated_v2.raw").read_bytes())
    del prospect["data"]["attributes"]["emails"]
    prospect["data"]["attributes"]["updatedAt"] = "2026-06-04T08:00:00Z"
    _post_outreach(acceptor, orjson.dumps(prospect))
    _post_outreach(acceptor, orjson.dumps({
        "data": {"type": "sequenceState", "id": 8, "attributes": {
            "state": "active", "updatedAt": "2026-06-04T08:00:00Z"}, "relationships": {}},
        "meta": {"eventName": "sequenceState.created"}}))
    drain(runtime)
    assert _count("outreach", "occurred_at") == before["occurred_at"] + 1
    assert _count("outreach", "contact_email") == before["contact_email"] + 1
    assert _count("outreach", "campaign_id") == before["campaign_id"] + 1
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 4, "every one landed"

    # A copy is not a new event: counted once, not per delivery.
    _post_outreach(acceptor, (SAMPLES / "outreach/sequence_updated_empty_live.raw").read_bytes())
    drain(runtime)
    assert _count("outreach", "occurred_at") == before["occurred_at"] + 1
