"""Mailstand: flat email campaign events with their own event id, authenticated by a token.

Payload (its docs print these as JavaScript objects with unquoted keys; the wire is JSON)::

    {"id": "evt_sdn02n0d209dj2pk2d2d", "type": "send", "workspace_id": "space_d2n0092jd290j2d",
     "msg": "msg_2er3g4rdwefrgfdf", "cnv": "cnv_098h2dh209jd209j",
     "campaign_id": "camp_pow0dj20jc20jkd2nx", "campaign_name": "My First Campaign",
     "mailbox_id": "mailbox_asnsd209j2jd22", "mailbox_email": "me@sender.example",
     "to": "contact_abcjsod20d20kd2", "to_email": "lead@example.com",
     "subject": "Quick Question", "text": "...", "html": "...", "created_at": 1654703617}

Replies carry ``from``/``from_email``/``from_name`` (the contact who wrote) instead of
``to``/``to_email``; contact-level events (pause, resume, stage_change, delete, campaign
membership) carry ``contact_id`` and ``email``.

Mailstand documents no signature: the user pastes the webhook URL with ``?token=`` (or sends
``Authorization: Bearer <token>``).

Dedup key: ``id`` (always ``evt_…``), which Mailstand keeps across its retries, as it keeps
``created_at``. Two opens of one email are two events with two ids, and stay two rows.

The contact is never ``mailbox_email``: that is the user's own sending mailbox.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.kinds import ACTIVITY
from ingest.providers.base import (
    Sample,
    TokenProvider,
    as_id,
    contact,
    load_object,
    missing,
    parse_time,
    recent,
    text,
)

# On a reply the contact is the sender; on everything else, the recipient.
_REPLY = "reply"
# Message events name their recipient (or sender) and their campaign; a missing one is a
# fallback. Stage changes and pauses may legitimately carry neither.
_MESSAGE_EVENTS = frozenset({"send", "reply", "bounce", "open", "click", "unsubscribe"})
_CAMPAIGN_EVENTS = frozenset({"send", "reply", "bounce", "open", "click", "added_to_campaign",
                              "removed_from_campaign"})


# Mailstand: "type".
KINDS: dict[str, str] = {
    "send": "email.sent",
    "reply": "email.replied",
    "bounce": "email.bounced",
    "open": "email.opened",
    "click": "email.clicked",
    "unsubscribe": "email.unsubscribed",
    "pause": "campaign.paused",
    "resume": "campaign.resumed",
    "stage_change": "contact.stage_changed",
    "added_to_campaign": "campaign.added",
    "removed_from_campaign": "campaign.removed",
    "delete": "contact.deleted",
}
# Mailstand reports every event against the contact. Its campaign events say what happened to
# the contact in a campaign, they are not a new version of the contact (nor of a membership,
# which Mailstand never names): activity, so a pause never makes the contact's stage change
# stale. Its other kinds the vocabulary judges: stage_change and delete are the contact's state.
KIND_CLASSES: dict[str, str] = {
    "pause": ACTIVITY,
    "resume": ACTIVITY,
    "added_to_campaign": ACTIVITY,
    "removed_from_campaign": ACTIVITY,
}


class MailstandProvider(TokenProvider):
    name: ClassVar[str] = "mailstand"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    kind_classes: ClassVar[Mapping[str, str]] = KIND_CLASSES
    secret_setting: ClassVar[str] = "MAILSTAND_WEBHOOK_TOKENS"
    kept_headers: ClassVar[frozenset[str]] = frozenset()

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        event_id = as_id(payload.get("id"))
        event_type = text(payload.get("type"))
        if not event_id or not event_type:
            raise NormalizationError("Mailstand delivery lacks its event id or its type")

        if event_type == _REPLY:
            contact_id = as_id(payload.get("contact_id")) or as_id(payload.get("from"))
            email = text(payload.get("from_email")) or payload.get("email")
            name = payload.get("from_name")
        else:
            contact_id = as_id(payload.get("contact_id")) or as_id(payload.get("to"))
            email = text(payload.get("to_email")) or payload.get("email")
            name = None
        when = parse_time(payload.get("created_at"))
        found = contact(email=email, name=name)
        campaign_id = as_id(payload.get("campaign_id"))
        return [
            self.event(
                delivery,
                dedup_key=event_id,
                event_type=event_type,
                occurred_at=when,
                resource_type="contact",
                resource_id=contact_id,
                action=event_type,
                workspace_id=as_id(payload.get("workspace_id")),
                contact=found,
                campaign_id=campaign_id,
                data=payload,
                fallbacks=missing(
                    occurred_at=when is None,
                    contact_email=event_type in _MESSAGE_EVENTS and not (found and found.email),
                    campaign_id=event_type in _CAMPAIGN_EVENTS and campaign_id is None,
                ),
            )
        ]

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A realistic, correctly signed delivery (``ingest send``, bench)."""
        kind = rng.choice(["send", "open", "click", "reply", "bounce", "pause", "stage_change"])
        contact_id = f"contact_{rng.getrandbits(64):016x}"
        email = f"lead.{rng.randint(1, 9999)}@example.com"
        payload: dict[str, Any] = {
            "id": f"evt_{rng.getrandbits(80):020x}", "type": kind,
            "workspace_id": "space_d2n0092jd290j2d", "campaign_id": "camp_pow0dj20jc20jkd2nx",
            "created_at": int(recent(rng).timestamp()),
        }
        if kind in ("pause", "stage_change"):
            payload.update({"contact_id": contact_id, "email": email})
            if kind == "stage_change":
                payload.update({"new_stage_id": "stage_ds2wvg4543cv44v", "new_stage_name": "Interested"})
        else:
            payload.update({"msg": f"msg_{rng.getrandbits(48):012x}", "cnv": "cnv_098h2dh209jd209j",
                            "campaign_name": "My First Campaign", "mailbox_id": "mailbox_asnsd209j2jd22",
                            "mailbox_email": "sam@acme-sales.example", "subject": "Quick Question",
                            "text": "This is the text of the email"})
            if kind == "reply":
                payload.update({"from": contact_id, "from_email": email, "from_name": "Lead Sample"})
            else:
                payload.update({"to": contact_id, "to_email": email})
        return orjson.dumps(payload), {"Content-Type": "application/json",
                                       "Authorization": f"Bearer {secret}"}
