"""Outreach: JSON:API envelopes signed with a hex HMAC-SHA256 of the raw body.

Payload (version 2 adds ``beforeUpdate`` on updates)::

    {"data": {"type": "prospect", "id": 123,
              "attributes": {"emails": ["a@b.c"], "updatedAt": "2026-01-02T03:04:05.000Z"},
              "relationships": {"sequence": {"data": {"type": "sequence", "id": 9}}}},
     "beforeUpdate": {"type": "prospect", "id": 123, "attributes": {"title": "old"}},
     "meta": {"eventName": "prospect.updated", "deliveredAt": "2026-01-02T03:04:06.000Z"}}

Live deliveries write relationships bare, without the JSON:API ``data`` level
(``"owner": {"type": "owner", "id": 2}``), and send ``"attributes": {}, "relationships": {}`` on
some updates; both shapes are read.

Headers: ``Outreach-Webhook-Signature`` (HMAC-SHA256 hex of the body keyed by the webhook's
secret). Kept with the archived delivery: ``outreach-org-id`` (the Outreach organization, our
``workspace_id``), ``outreach-webhook-id`` and ``outreach-webhook-event-id``. Never kept:
``outreach-webhook-cleanup-token``, a credential (it deregisters the webhook even after API
access is revoked).

Dedup key: event name + resource type + id + ``attributes.updatedAt``; without ``updatedAt`` or
without an id (blank, 0 or null), a digest of ``data`` (never of ``meta``: ``deliveredAt``
changes between attempts). A destroyed
resource carries its last-known attributes, so its ``updatedAt`` is stale (seen live: 20 s
before the delete): it still keys the event (stable across retries), but ``occurred_at`` is
``meta.deliveredAt``.

Outreach answers any non-2xx as acknowledged and never retries it, but retries network
failures 4 times, 1 s apart: so when a delivery cannot be made durable we drop the connection.
"""

from __future__ import annotations

import hmac
import random
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import orjson

from ingest.events import Contact, Delivery, Event, changes_between
from ingest.exceptions import NormalizationError
from ingest.kinds import lookup
from ingest.providers.base import (
    Sample,
    SignedProvider,
    as_id,
    canonical_digest,
    contact,
    first,
    iso_ms,
    load_object,
    missing,
    obj,
    parse_time,
    recent,
    relationship_id,
    text,
    time_key,
)

ORG_HEADER = "outreach-org-id"

# sequenceState.updated says more when we look at the new state. "active" is a resume only
# after "paused" (see _sequence_state_kind): a first activation is not.
_SEQUENCE_STATE_KINDS = {
    "paused": "campaign.paused",
    "finished": "campaign.finished",
}
_RESUMED = "campaign.resumed"
# The only resources that are people: contact fields never come from an account's,
# sequence's, template's or mailbox's "name".
_PEOPLE = frozenset({"prospect"})
# Resources that always belong to a sequence, so a missing campaign_id is a fallback.
_IN_A_SEQUENCE = frozenset({"sequence", "sequenceState"})


def _sequence_state_kind(kind: str, attributes: dict[str, Any], before: dict[str, Any]) -> str:
    state = text(attributes.get("state")) or ""
    if state == "active":
        was = text(obj(before.get("attributes")).get("state"))
        return _RESUMED if was == "paused" else kind
    return _SEQUENCE_STATE_KINDS.get(state, kind)


def _campaign_id(resource_type: str | None, resource_id: str | None,
                 data: dict[str, Any]) -> str | None:
    if resource_type == "sequence":
        return resource_id
    return relationship_id(data, "sequence")


def _contact(resource_type: str | None, attributes: dict[str, Any]) -> Contact | None:
    if resource_type not in _PEOPLE:
        return None
    name = text(attributes.get("name")) or " ".join(
        p for p in (text(attributes.get("firstName")), text(attributes.get("lastName"))) if p
    )
    phone = (first(attributes.get("mobilePhones")) or first(attributes.get("workPhones"))
             or first(attributes.get("homePhones")) or first(attributes.get("otherPhones")))
    return contact(email=first(attributes.get("emails")) or attributes.get("email"),
                   name=name, phone=phone)


# Outreach: meta.eventName, "<resource>.<action>" in camelCase.
KINDS: dict[str, str] = {
    "prospect.created": "contact.created",
    "prospect.updated": "contact.updated",
    "prospect.destroyed": "contact.deleted",
    "mailing.created": "mailing.created",
    "mailing.updated": "mailing.updated",
    "mailing.destroyed": "mailing.deleted",
    "mailing.delivered": "email.delivered",
    "mailing.opened": "email.opened",
    "mailing.replied": "email.replied",
    "mailing.bounced": "email.bounced",
    "sequenceState.created": "campaign.added",
    "sequenceState.updated": "campaign.updated",
    "sequenceState.destroyed": "campaign.removed",
    "sequenceState.advanced": "campaign.advanced",
    "sequenceState.finished": "campaign.finished",
    "sequence.created": "sequence.created",
    "sequence.updated": "sequence.updated",
    "sequence.destroyed": "sequence.deleted",
    "call.created": "call.created",
    "call.updated": "call.updated",
    "call.destroyed": "call.deleted",
    "task.created": "task.created",
    "task.updated": "task.updated",
    "task.destroyed": "task.deleted",
    "task.completed": "task.completed",
    "account.created": "account.created",
    "account.updated": "account.updated",
    "account.destroyed": "account.deleted",
    "opportunity.created": "opportunity.created",
    "opportunity.updated": "opportunity.updated",
    "opportunity.destroyed": "opportunity.deleted",
    "opportunityProspectRole.created": "opportunity_prospect_role.created",
    "opportunityProspectRole.updated": "opportunity_prospect_role.updated",
    "opportunityProspectRole.destroyed": "opportunity_prospect_role.deleted",
    "emailAddress.created": "email_address.created",
    "emailAddress.updated": "email_address.updated",
    "emailAddress.destroyed": "email_address.deleted",
    "import.created": "import.created",
    "import.finished": "import.finished",
    "kaiaRecording.created": "recording.created",
    "user.created": "user.created",
    "user.updated": "user.updated",
}


class OutreachProvider(SignedProvider):
    name: ClassVar[str] = "outreach"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    secret_setting: ClassVar[str] = "OUTREACH_WEBHOOK_SECRETS"
    signature_header: ClassVar[str] = "outreach-webhook-signature"
    digestmod: ClassVar[str] = "sha256"
    kept_headers: ClassVar[frozenset[str]] = frozenset({
        ORG_HEADER, "outreach-webhook-id", "outreach-webhook-event-id",
    })
    retries_network_errors: ClassVar[bool] = True

    def subscriptions(self, settings: Any, redis: Any) -> Any:
        """Its webhook subscriptions API (ingest.subscriptions.outreach), or None unconfigured."""
        from ingest.subscriptions.outreach import OutreachSubscriptions

        return OutreachSubscriptions.from_settings(settings, redis)

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
        action = event_type.rpartition(".")[2] or None

        updated_at = time_key(attributes.get("updatedAt"))
        # Without an id, updatedAt does not tell two resources apart (two blank-id events of one
        # second would share a key, and the second be dropped as a copy): the data decides, as
        # for Salesloft.
        identified = resource_id not in (None, "", "0")  # Outreach ids start at 1
        version = (updated_at if identified and updated_at
                   else f"data:{canonical_digest(data)}")
        dedup_key = "|".join([event_type, resource_type or "", resource_id or "", version])

        delivered_at = parse_time(meta.get("deliveredAt"))
        if action == "destroyed":
            # Last-known attributes: their times predate the delete; the delivery is the delete.
            when = delivered_at
        else:
            when = parse_time(attributes.get("updatedAt")) or parse_time(
                attributes.get("createdAt"))
        occurred_at = when or delivered_at or delivery.received_at

        before = obj(payload.get("beforeUpdate"))
        previous = obj(before.get("attributes")) if before else None
        kind = lookup(self.kinds, event_type)
        if event_type == "sequenceState.updated":
            kind = _sequence_state_kind(kind, attributes, before)

        found = _contact(resource_type, attributes)
        campaign_id = _campaign_id(resource_type, resource_id, data)
        wants_campaign = resource_type in _IN_A_SEQUENCE or (
            resource_type == "mailing" and text(attributes.get("mailingType")) == "sequence")
        return [
            self.event(
                delivery,
                dedup_key=dedup_key,
                event_type=event_type,
                kind=kind,
                occurred_at=occurred_at,
                resource_type=resource_type,
                resource_id=resource_id,
                action=action,
                workspace_id=text(delivery.headers.get(ORG_HEADER)),
                contact=found,
                campaign_id=campaign_id,
                data=data,
                previous=previous,
                changes=changes_between(previous, attributes),
                fallbacks=missing(
                    occurred_at=when is None,
                    contact_email=resource_type in _PEOPLE and not (found and found.email),
                    campaign_id=wants_campaign and campaign_id is None,
                ),
            )
        ]

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A realistic, correctly signed delivery (``ingest send``, bench)."""
        event = rng.choice(["prospect.updated", "mailing.replied", "mailing.opened",
                            "sequenceState.created", "prospect.created"])
        resource = event.split(".")[0]
        updated = recent(rng)
        attributes: dict[str, Any] = {"updatedAt": iso_ms(updated),
                                      "createdAt": iso_ms(updated - timedelta(days=3))}
        if resource == "prospect":
            given = rng.choice(["Ada", "Grace", "Alan", "Edsger", "Barbara"])
            attributes.update({"emails": [f"{given.lower()}.{rng.randint(1, 9999)}@example.com"],
                               "firstName": given, "lastName": "Sample", "title": "VP Engineering"})
        elif resource == "mailing":
            attributes.update({"state": "replied" if "replied" in event else "delivered",
                               "subject": "Quick question"})
        payload: dict[str, Any] = {
            "data": {
                "type": resource,
                "id": rng.randint(1, 10**9),
                "attributes": attributes,
                "relationships": {"sequence": {"data": {"type": "sequence",
                                                        "id": rng.randint(1, 500)}}},
            },
            "meta": {"deliveredAt": iso_ms(datetime.now(timezone.utc)), "eventName": event},
        }
        if event.endswith(".updated"):
            payload["beforeUpdate"] = {"type": resource, "id": payload["data"]["id"],
                                       "attributes": {"title": "Director of Engineering"}}
        body = orjson.dumps(payload)
        signature = hmac.new(secret.encode(), body, self.digestmod).hexdigest()
        # Live deliveries name the organization and the webhook in headers, not in the body.
        return body, {"Content-Type": "application/json",
                      "Outreach-Webhook-Signature": signature,
                      "outreach-webhook-cleanup-token": "cleanup-" + uuid.uuid4().hex[:16],
                      "outreach-org-id": "0d6f3a52-8c1e-4b7a-9f20-5e4c3b2a1908",
                      "outreach-webhook-id": "7",
                      "outreach-webhook-event-id": str(uuid.uuid4())}
