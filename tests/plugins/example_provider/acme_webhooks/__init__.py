"""Acme CRM webhooks for webhook-ingest: a complete third-party provider plugin.

Acme posts ``{"id": "evt_…", "type": "deal.won", "occurred_at": "…", "workspace": "…",
"contact": {"email": …, "name": …}, "deal": {"id": …, "pipeline": …}}`` with
``Authorization: Bearer <token>``. The token is read from ``ACME_WEBHOOK_TOKENS``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import ClassVar

import orjson

from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.kinds import STATE
from ingest.providers.base import (
    Sample,
    TokenProvider,
    as_id,
    contact,
    load_object,
    obj,
    parse_time,
    recent,
    text,
)

__all__ = ["AcmeProvider"]

# Acme's event types -> the shared vocabulary; anything else is stored as "unknown".
KINDS = {
    "contact.created": "contact.created",
    "contact.updated": "contact.updated",
    "deal.won": "deal.won",
    "deal.lost": "deal.lost",
}
# Which of them are a new version of their record (state) rather than a fact of its own
# (activity), where the vocabulary cannot tell from the name (ingest.kinds): a deal's outcome
# is its state, so a late "won" never overwrites a newer "lost".
KIND_CLASSES = {"deal.won": STATE, "deal.lost": STATE}


class AcmeProvider(TokenProvider):
    name: ClassVar[str] = "acme"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    kind_classes: ClassVar[Mapping[str, str]] = KIND_CLASSES
    secret_setting: ClassVar[str] = "ACME_WEBHOOK_TOKENS"
    kept_headers: ClassVar[frozenset[str]] = frozenset()

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        event_id, event_type = as_id(payload.get("id")), text(payload.get("type"))
        if not event_id or not event_type:
            raise NormalizationError("Acme delivery lacks id or type")
        resource_type, _, action = event_type.partition(".")
        resource = obj(payload.get(resource_type))
        person = obj(payload.get("contact"))
        return [
            # provider, kind (from KINDS), received_at, delivery_id and the activity flag
            # (from KIND_CLASSES) are filled in by the base class; occurred_at falls back on
            # the receipt time.
            self.event(
                delivery,
                dedup_key=event_id,  # Acme keeps the id across its retries
                event_type=event_type,
                occurred_at=parse_time(payload.get("occurred_at")),
                resource_type=resource_type,
                resource_id=as_id(resource.get("id")),
                action=action or None,
                workspace_id=as_id(payload.get("workspace")),
                contact=contact(email=person.get("email"), name=person.get("name")),
                campaign_id=as_id(resource.get("pipeline")),
                data=resource or payload,
            )
        ]

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A signed delivery for ``ingest send acme`` (optional: without it, no samples)."""
        event_type = rng.choice(sorted(self.kinds))
        resource_type = event_type.partition(".")[0]
        payload = {"id": f"evt_{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}",
                   "type": event_type, "occurred_at": recent(rng).isoformat(),
                   "workspace": "ws_77",
                   "contact": {"email": f"lead.{rng.randint(1, 9999)}@example.com"},
                   resource_type: {"id": rng.randint(1, 10**6), "pipeline": "enterprise"}}
        return orjson.dumps(payload), {"Content-Type": "application/json",
                                       "Authorization": f"Bearer {secret}"}
