"""Salesloft: REST-shaped resources signed with a hex HMAC-SHA1 of the raw body.

Salesloft publishes no fixed payload schema: the body mirrors the affected resource as its REST
API returns it, and the event name travels in the ``x-salesloft-event`` header. Three shapes
are accepted, because all three are seen or documented::

    {"id": 1042, "updated_at": "2026-06-04T07:49:10.221+02:00", "email_address": "a@b.c",
     "cadence": {"id": 5, "_href": "https://api.salesloft.com/v2/cadences/5"}, ...}
                                                       # the bare resource (seen in the wild)
    {"event_type": "person_updated", "data": {...}}     # the documented wrapper
    {"event_type": "person_updated", "data": [{...}, {...}]}   # several resources at once

Headers: ``x-salesloft-signature`` (HMAC-SHA1 hex of the body keyed by the subscription's
callback token) and ``x-salesloft-event`` (kept: without it a bare resource has no event name).

Dedup key, per resource: event name + resource ``id`` + ``updated_at``. An update is a new
version of the resource, so each ``updated_at`` is a new event; an array element that repeats
an earlier delivery's element is a duplicate on its own, whatever else the array holds.
Without ``updated_at`` (or an id) a digest of the resource stands in: a retry sends the same
resource, a new change does not.
"""

from __future__ import annotations

import hmac
import random
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import orjson

from ingest.events import Contact, Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.kinds import lookup
from ingest.providers.base import (
    Sample,
    SignedProvider,
    as_id,
    canonical_digest,
    contact,
    load_object,
    missing,
    obj,
    parse_time,
    recent,
    text,
    time_key,
)

EVENT_HEADER = "x-salesloft-event"

# Event names whose resource and action the "<resource>_<action>" rule would get wrong.
_SPECIAL_NAMES: dict[str, tuple[str, str]] = {
    "email_with_body_and_subject_updated": ("email", "updated"),
    "link_swap": ("link", "swapped"),
}

# email_updated fires for every change to an email (each open bumps its counts), so only the
# one terminal, unambiguous state refines its kind.
_BOUNCED = "email.bounced"
# Salesloft has no cadence_membership_deleted: leaving a cadence is an update whose
# current_state says how. "active" is left alone: it follows "staged" as often as "paused".
_MEMBERSHIP_STATE_KINDS = {
    "paused": "campaign.paused",
    "completed": "campaign.finished",
    "removed": "campaign.removed",
}


def split_event_name(event_type: str) -> tuple[str, str | None]:
    """``cadence_membership_created`` -> (``cadence_membership``, ``created``)."""
    if event_type in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[event_type]
    resource, sep, action = event_type.rpartition("_")
    if not sep or not resource:
        return event_type, None
    return resource, action


def resources(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The resource objects a body carries, whichever of the three shapes it has."""
    data = payload.get("data")
    if isinstance(data, list):
        found = [element for element in data if isinstance(element, dict) and element]
        if not found:
            raise NormalizationError("Salesloft delivery has a data array with no resource")
        return found
    if isinstance(data, dict) and ("event_type" in payload or "id" not in payload):
        return [data]
    return [payload]


# Resources that are not people: their email_address, name or phone is a rep's, a company's or
# nobody's, never the contact's.
_NOT_PEOPLE = frozenset({"account", "cadence", "step", "user", "bulk_job", "success"})
# Resources that name the person they are about, so a missing contact_email is a fallback.
_ABOUT_A_PERSON = frozenset({"person", "email", "meeting"})
# Resources that belong to a cadence, so a missing campaign_id is a fallback.
_IN_A_CADENCE = frozenset({"cadence", "cadence_membership"})
# Embedded objects that may be the full person the resource is about (REST shapes embed only
# {"id", "_href"}; those give nothing here and the person stays unknown).
_EMBEDDED_PEOPLE = ("person", "recipient", "prospect")


def _campaign_id(resource_type: str, resource: dict[str, Any]) -> str | None:
    if resource_type == "cadence":
        return as_id(resource.get("id"))
    # REST shape: "cadence": {"id": 5, "_href": ...} (null when there is none); some payloads
    # flatten it to cadence_id.
    return as_id(obj(resource.get("cadence")).get("id")) or as_id(resource.get("cadence_id"))


def _full_name(resource: dict[str, Any]) -> str | None:
    return text(resource.get("display_name")) or text(" ".join(
        p for p in (text(resource.get("first_name")), text(resource.get("last_name"))) if p))


def _phone(resource: dict[str, Any]) -> str | None:
    return (text(resource.get("phone")) or text(resource.get("mobile_phone"))
            or text(resource.get("home_phone")))


def _contact(resource_type: str, resource: dict[str, Any]) -> Contact | None:
    """Whichever field this resource type names its person with: people have email_address,
    emails recipient_email_address and recipient_name, meetings recipient_email, calls the
    dialled number in ``to``; some resources embed the whole person."""
    if resource_type in _NOT_PEOPLE:
        return None
    embedded = next((obj(resource.get(k)) for k in _EMBEDDED_PEOPLE
                     if text(obj(resource.get(k)).get("email_address"))), {})
    email = (text(resource.get("email_address")) or text(resource.get("recipient_email_address"))
             or text(resource.get("recipient_email")) or text(embedded.get("email_address")))
    name = (text(resource.get("recipient_name")) or _full_name(resource)
            or (_full_name(embedded) if embedded else None))
    phone = (_phone(resource)
             or (text(resource.get("to")) if resource_type in ("call", "call_data_record") else None)
             or _phone(embedded))
    return contact(email=email, name=name, phone=phone)


def _sample_resource(rng: random.Random, event: str) -> dict[str, Any]:
    updated = recent(rng)
    href = "https://api.salesloft.com/v2"
    resource: dict[str, Any] = {"id": rng.randint(1, 10**9),
                                "created_at": (updated - timedelta(days=2)).isoformat(),
                                "updated_at": updated.isoformat()}
    cadence = rng.randint(1, 500)
    if event.startswith("person_"):
        first = rng.choice(["Maria", "Ben", "Lena", "Kenji", "Amara"])
        resource.update({"first_name": first, "last_name": "Sample",
                         "display_name": f"{first} Sample",
                         "email_address": f"{first.lower()}.{rng.randint(1, 9999)}@example.com",
                         "phone": "+1 415 555 0134", "title": "VP Sales",
                         "owner": {"_href": f"{href}/users/9", "id": 9}})
    elif event.startswith("cadence_membership_"):
        person = rng.randint(1, 10**9)
        resource.update({"current_state": "staged", "currently_on_cadence": True,
                         "cadence": {"_href": f"{href}/cadences/{cadence}", "id": cadence},
                         "person": {"_href": f"{href}/people/{person}", "id": person}})
    elif event.startswith("email_"):
        resource.update({"status": "sent", "bounced": rng.random() < 0.1,
                         "recipient_email_address": f"lead.{rng.randint(1, 9999)}@example.com",
                         "cadence": {"_href": f"{href}/cadences/{cadence}", "id": cadence},
                         "counts": {"views": rng.randint(0, 5), "clicks": 0, "replies": 0}})
    elif event.startswith("meeting_"):
        resource.update({"title": "Intro call", "status": "booked",
                         "start_time": (updated + timedelta(days=3)).isoformat()})
    return resource


# Salesloft: the x-salesloft-event header, snake_case.
KINDS: dict[str, str] = {
    "person_created": "contact.created",
    "person_updated": "contact.updated",
    "person_deleted": "contact.deleted",
    "cadence_membership_created": "campaign.added",
    "cadence_membership_updated": "campaign.updated",
    "cadence_created": "cadence.created",
    "cadence_updated": "cadence.updated",
    "cadence_deleted": "cadence.deleted",
    "email_updated": "email.updated",
    "email_with_body_and_subject_updated": "email.updated",
    "link_swap": "email.link_swapped",
    "meeting_booked": "meeting.booked",
    "meeting_updated": "meeting.updated",
    "call_created": "call.created",
    "call_updated": "call.updated",
    "call_data_record_created": "call.recorded",
    "call_data_record_updated": "call.record_updated",
    "conversation_created": "conversation.created",
    "conversation_recording_created": "conversation.recording_created",
    "conversation_transcript_created": "conversation.transcript_created",
    "task_created": "task.created",
    "task_updated": "task.updated",
    "task_completed": "task.completed",
    "task_deleted": "task.deleted",
    "account_created": "account.created",
    "account_updated": "account.updated",
    "account_deleted": "account.deleted",
    "note_created": "note.created",
    "note_updated": "note.updated",
    "note_deleted": "note.deleted",
    "step_created": "step.created",
    "step_updated": "step.updated",
    "step_deleted": "step.deleted",
    "user_created": "user.created",
    "user_updated": "user.updated",
    "success_created": "success.created",
    "bulk_job_completed": "bulk_job.completed",
}


class SalesloftProvider(SignedProvider):
    name: ClassVar[str] = "salesloft"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    secret_setting: ClassVar[str] = "SALESLOFT_WEBHOOK_SECRETS"
    signature_header: ClassVar[str] = "x-salesloft-signature"
    digestmod: ClassVar[str] = "sha1"
    kept_headers: ClassVar[frozenset[str]] = frozenset({EVENT_HEADER})

    def subscriptions(self, settings: Any, redis: Any) -> Any:
        """Its webhook subscriptions API (ingest.subscriptions.salesloft), or None unconfigured."""
        from ingest.subscriptions.salesloft import SalesloftSubscriptions

        return SalesloftSubscriptions.from_settings(settings, redis)

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        # The body's event_type is covered by the signature, the header is not: prefer it.
        event_type = text(payload.get("event_type")) or text(delivery.headers.get(EVENT_HEADER))
        if not event_type:
            raise NormalizationError(
                f"Salesloft delivery names no event: no {EVENT_HEADER} header, no event_type"
            )
        resource_type, action = split_event_name(event_type)
        base_kind = lookup(self.kinds, event_type)
        return [
            self._event(delivery, event_type, resource_type, action, base_kind, resource)
            for resource in resources(payload)
        ]

    def _event(self, delivery: Delivery, event_type: str, resource_type: str,
               action: str | None, kind: str, resource: dict[str, Any]) -> Event:
        resource_id = as_id(resource.get("id"))
        updated_at = time_key(resource.get("updated_at"))
        if resource_id and updated_at:
            version = updated_at
        else:
            version = f"data:{canonical_digest(resource)}"
        dedup_key = "|".join([event_type, resource_id or "", version])
        if kind == "email.updated" and (
            resource.get("bounced") is True or text(resource.get("status")) == "bounced"
        ):
            kind = _BOUNCED
        elif event_type == "cadence_membership_updated":
            kind = _MEMBERSHIP_STATE_KINDS.get(text(resource.get("current_state")) or "", kind)
        # A creation happened when the resource was created (a later updated_at is another
        # change); anything else when it was last updated.
        created, updated = parse_time(resource.get("created_at")), parse_time(
            resource.get("updated_at"))
        when = (created or updated) if action == "created" else (updated or created)
        found = _contact(resource_type, resource)
        campaign_id = _campaign_id(resource_type, resource)
        return self.event(
            delivery,
            dedup_key=dedup_key,
            event_type=event_type,
            kind=kind,
            occurred_at=when,
            resource_type=resource_type,
            resource_id=resource_id,
            action=action,
            contact=found,
            campaign_id=campaign_id,
            data=resource,
            fallbacks=missing(
                occurred_at=when is None,
                contact_email=resource_type in _ABOUT_A_PERSON and not (found and found.email),
                campaign_id=resource_type in _IN_A_CADENCE and campaign_id is None,
            ),
        )

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A realistic, correctly signed delivery (``ingest send``, bench)."""
        event = rng.choice(["person_updated", "person_created", "cadence_membership_created",
                            "email_updated", "meeting_booked"])
        payload: dict[str, Any]
        if event == "cadence_membership_created":
            # Several memberships in one delivery: one event per element.
            payload = {"event_type": event,
                       "data": [_sample_resource(rng, event) for _ in range(rng.randint(1, 3))]}
        elif event == "email_updated":
            payload = {"event_type": event, "data": _sample_resource(rng, event)}
        else:
            payload = _sample_resource(rng, event)  # the bare resource, as seen in the wild
        body = orjson.dumps(payload)
        signature = hmac.new(secret.encode(), body, self.digestmod).hexdigest()
        return body, {"Content-Type": "application/json", "x-salesloft-event": event,
                      "x-salesloft-signature": signature}
