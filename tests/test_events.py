"""The event id: stable across versions, because stored rows and sink receivers key on it."""

from __future__ import annotations

import random
import uuid

from ingest.events import event_id

_NAMESPACE = uuid.UUID("6f2b6c1e-9a57-4c8e-9d0a-1f3b5e7c9a21")


def test_event_id_is_the_uuid5_rows_were_stored_under() -> None:
    # Pinned: webhook_events.id, the CRM's webhook-id and every dedup decision hang on it.
    assert event_id("outreach", "prospect.updated:42:2026-12-03T10:00:00Z") == \
        "c0cb5e6a-cfde-5e05-9b96-568320884980"


def test_event_id_equals_uuid5_of_provider_and_key() -> None:
    rng = random.Random(1234)
    alphabet = "abcXYZ019:-_./ \u00e9\u4e2d\U0001f600\0"
    keys = ["", "x", "a" * 10_000] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(2000)]
    for key in keys:
        for provider in ("outreach", "salesloft", "my-plugin"):
            assert event_id(provider, key) == str(uuid.uuid5(_NAMESPACE, f"{provider}:{key}"))
