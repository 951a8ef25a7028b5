"""Outboundry: LinkedIn and email campaign events about one lead, authenticated by a token.

Payload::

    {"event": "invite-sent", "company_id": "67787093-cc3a-44ca-8a12-5bf1afa3194c",
     "timestamp": "2026-03-24T10:15:00.000Z",
     "data": {"actionData": {"message": "Invitation Sent Successfully", ...},
              "lead": {"id": "1111...", "name": "Rahul Sharma", "email": "rahul@example.com",
                       "profile_url": "https://linkedin.com/in/rahulsharma", ...},
              "campaign": {"id": "cccc...", "name": "Q1 LinkedIn Outreach", ...},
              "sender": {"id": "aaaa...", "name": "Ravi Mehta", "email": "ravi@acme.example"}}}

Outboundry documents no signature: the user pastes the webhook URL with ``?token=`` (or adds
``Authorization: Bearer <token>`` where its settings allow headers).

Dedup key: event + company_id + lead id + timestamp. Outboundry may deliver an event more than
once and keeps its timestamp; two different events about one lead differ in event or time.
When the lead id or the timestamp is missing, a digest of ``data`` stands in for it.

The contact is always the lead: ``data.sender`` is the user's own LinkedIn or mailbox account,
and reporting it as the contact would attribute every reply to the salesperson.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import ClassVar

import orjson

from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.providers.base import (
    Sample,
    TokenProvider,
    as_id,
    canonical_digest,
    contact,
    iso_ms,
    load_object,
    missing,
    obj,
    parse_time,
    recent,
    text,
    time_key,
)


# Outboundry: "event", kebab-case.
KINDS: dict[str, str] = {
    "invite-sent": "linkedin.invite_sent",
    "invite-accepted": "linkedin.invite_accepted",
    "message-sent": "linkedin.message_sent",
    "message-replied": "linkedin.message_replied",
    "inmail-sent": "linkedin.inmail_sent",
    "inmail-replied": "linkedin.inmail_replied",
    "email-sent": "email.sent",
    "email-opened": "email.opened",
    "email-clicked": "email.clicked",
    "email-replied": "email.replied",
}


class OutboundryProvider(TokenProvider):
    name: ClassVar[str] = "outboundry"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    secret_setting: ClassVar[str] = "OUTBOUNDRY_WEBHOOK_TOKENS"
    kept_headers: ClassVar[frozenset[str]] = frozenset()

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        event_type = text(payload.get("event"))
        if not event_type:
            raise NormalizationError("Outboundry delivery has no event name")
        data = obj(payload.get("data"))
        lead = obj(data.get("lead"))
        lead_id = as_id(lead.get("id"))
        company_id = as_id(payload.get("company_id"))
        timestamp = time_key(payload.get("timestamp"))

        parts = [event_type, company_id or "", lead_id or "", timestamp or ""]
        if not lead_id or not timestamp:
            parts.append(f"data:{canonical_digest(data)}")
        when = parse_time(payload.get("timestamp"))
        found = contact(email=lead.get("email"), name=lead.get("name"), phone=lead.get("phone"))
        return [
            self.event(
                delivery,
                dedup_key="|".join(parts),
                event_type=event_type,
                occurred_at=when,
                resource_type="lead",
                resource_id=lead_id,
                # "invite-sent" is what happened to the lead: action "invite_sent".
                action=event_type.replace("-", "_"),
                workspace_id=company_id,
                contact=found,
                campaign_id=as_id(obj(data.get("campaign")).get("id")),
                data=data,
                # Every event is about a lead; a lead without an email is worth seeing.
                fallbacks=missing(occurred_at=when is None,
                                  contact_email=not (found and found.email)),
            )
        ]

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A realistic, correctly signed delivery (``ingest send``, bench)."""
        event = rng.choice(["invite-sent", "invite-accepted", "message-sent", "message-replied",
                            "inmail-sent", "email-sent", "email-opened", "email-replied"])
        first = rng.choice(["Rahul", "Priya", "Amit", "Sofia", "Tomas"])
        lead_id = str(uuid.UUID(int=rng.getrandbits(128)))
        payload = {
            "event": event,
            "company_id": "67787093-cc3a-44ca-8a12-5bf1afa3194c",
            "timestamp": iso_ms(recent(rng)),
            "data": {
                "actionData": {"message": "Hi, wanted to connect!"},
                "lead": {"id": lead_id, "name": f"{first} Sample",
                         "profile_url": f"https://linkedin.com/in/{first.lower()}{rng.randint(1, 9999)}",
                         "email": f"{first.lower()}.{rng.randint(1, 9999)}@example.com",
                         "latest_status": "Contacted", "activity": [],
                         "company_name": "Infosys", "job_title": "Engineering Manager"},
                "campaign": {"id": "cccccccc-1111-2222-3333-cccccccccccc",
                             "name": "Q1 LinkedIn Outreach", "campaign_type": "linkedin"},
                "sender": {"id": "aaaaaaaa-1111-2222-3333-aaaaaaaaaaaa", "name": "Ravi Mehta",
                           "email": "ravi.mehta@acme-sales.example"},
            },
        }
        return orjson.dumps(payload), {"Content-Type": "application/json",
                                       "Authorization": f"Bearer {secret}"}
