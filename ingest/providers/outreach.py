"""Outreach: JSON:API envelopes signed with a hex HMAC-SHA256 of the raw body.

Payload (version 2 adds ``beforeUpdate`` on updates)::

    {"data": {"type": "prospect", "id": 123,
              "attributes": {"emails": ["a@b.c"], "updatedAt": "2026-01-02T03:04:05.000Z"},
              "relationships": {"sequence": {"data": {"type": "sequence", "id": 9}}}},
     "beforeUpdate": {"type": "prospect", "id": 123, "attributes": {"title": "old"}},
     "meta": {"eventName": "prospect.updated", "deliveredAt": "2026-01-02T03:04:06.000Z"}}

Headers: ``Outreach-Webhook-Signature`` (HMAC-SHA256 hex of the body keyed by the webhook's
secret) and ``outreach-webhook-cleanup-token`` (kept: it lets the user deregister the webhook
even after API access is revoked).

Dedup key: event name + resource type + id + ``attributes.updatedAt``; without ``updatedAt``, a
digest of ``data`` (never of ``meta``: ``deliveredAt`` changes between attempts).

Outreach answers any non-2xx as acknowledged and never retries it, but retries network
failures 4 times, 1 s apart: so when a delivery cannot be made durable we drop the connection.
"""

from __future__ import annotations

from typing import ClassVar

from ingest.events import Delivery, Event, changes_between
from ingest.exceptions import NormalizationError
from ingest.kinds import KIND_TABLES, lookup
from ingest.providers.base import (
    SignedProvider,
    as_id,
    canonical_digest,
    contact,
    first,
    load_object,
    obj,
    parse_time,
    relationship_id,
    text,
    time_key,
)

# sequenceState.updated says more when we look at the new state.
_SEQUENCE_STATE_KINDS = {
    "paused": "campaign.paused",
    "active": "campaign.resumed",
    "finished": "campaign.finished",
}


class OutreachProvider(SignedProvider):
    name: ClassVar[str] = "outreach"
    secret_setting: ClassVar[str] = "OUTREACH_WEBHOOK_SECRETS"
    signature_header: ClassVar[str] = "outreach-webhook-signature"
    digestmod: ClassVar[str] = "sha256"
    kept_headers: ClassVar[frozenset[str]] = frozenset({"outreach-webhook-cleanup-token"})
    retries_network_errors: ClassVar[bool] = True

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        meta = obj(payload.get("meta"))
        data = obj(payload.get("data"))
        event_type = text(meta.get("eventName"))
        resource_type = text(data.get("type"))
        resource_id = as_id(data.get("id"))
        if not event_type or not data:
            raise NormalizationError("Outreach delivery has no meta.eventName or no data object")
        attributes = obj(data.get("attributes"))

        updated_at = time_key(attributes.get("updatedAt"))
        version = updated_at or f"data:{canonical_digest(data)}"
        dedup_key = "|".join([event_type, resource_type or "", resource_id or "", version])

        occurred_at = (
            parse_time(attributes.get("updatedAt"))
            or parse_time(attributes.get("createdAt"))
            or parse_time(meta.get("deliveredAt"))
            or delivery.received_at
        )
        kind = lookup(KIND_TABLES["outreach"], event_type)
        if event_type == "sequenceState.updated":
            kind = _SEQUENCE_STATE_KINDS.get(text(attributes.get("state")) or "", kind)

        name = text(attributes.get("name")) or " ".join(
            p for p in (text(attributes.get("firstName")), text(attributes.get("lastName"))) if p
        )
        phone = first(attributes.get("mobilePhones")) or first(attributes.get("workPhones"))
        before = obj(payload.get("beforeUpdate"))
        previous = obj(before.get("attributes")) if before else None

        return [
            Event(
                provider=self.name,
                dedup_key=dedup_key,
                event_type=event_type,
                kind=kind,
                occurred_at=occurred_at,
                received_at=delivery.received_at,
                resource_type=resource_type,
                resource_id=resource_id,
                action=event_type.rpartition(".")[2] or None,
                workspace_id=None,
                contact=contact(
                    email=first(attributes.get("emails")) or attributes.get("email"),
                    name=name,
                    phone=phone,
                ),
                campaign_id=relationship_id(data, "sequence"),
                data=data,
                previous=previous,
                changes=changes_between(previous, attributes),
                delivery_id=delivery.id,
            )
        ]
