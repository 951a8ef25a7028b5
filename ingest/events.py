"""The one normalized event shape every provider produces and every sink receives.

Imports only the standard library, ingest.safejson (orjson) and ingest.kinds: workers and
sinks use it without Starlette.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ingest import safejson
from ingest.kinds import is_activity

__all__ = ["DELETE_ACTIONS", "Contact", "Delivery", "Event", "changes_between", "event_id",
           "isoformat"]

# Namespace of the stable event ids (uuid5 of "provider:dedup_key").
_EVENT_ID_NAMESPACE = uuid.UUID("6f2b6c1e-9a57-4c8e-9d0a-1f3b5e7c9a21")
# SHA-1 already fed with the namespace: uuid5 is SHA-1 of namespace bytes + name.
_EVENT_ID_HASH = hashlib.sha1(_EVENT_ID_NAMESPACE.bytes, usedforsecurity=False)


# Actions (an event's ``action``) that remove the record they are about; ``kind``s ending in
# ``.deleted`` do too. Migration 0004 spells the same rule in SQL for rows stored before it.
# The normalized fields whose fallbacks are counted (ingest_normalization_fallbacks_total):
# occurred_at taken from the delivery or receipt time; contact_email or campaign_id absent
# where the resource type should carry it. A closed set, so the metric's labels stay bounded.
# (Providers import them from ingest.providers.base, as before.)
OCCURRED_AT = "occurred_at"
CONTACT_EMAIL = "contact_email"
CAMPAIGN_ID = "campaign_id"
FALLBACK_FIELDS = frozenset({OCCURRED_AT, CONTACT_EMAIL, CAMPAIGN_ID})

DELETE_ACTIONS = frozenset({"deleted", "destroyed", "bulk_deleted"})


def event_id(provider: str, dedup_key: str) -> str:
    """The stable id of an event: the same provider and dedup key always give the same id.

    ``str(uuid.uuid5(_EVENT_ID_NAMESPACE, f"{provider}:{dedup_key}"))``, written out: without
    the UUID object in between it costs half as much, and every event's id is computed twice
    (when a worker makes the event and when a sink's job reads it back)."""
    sha = _EVENT_ID_HASH.copy()
    sha.update(f"{provider}:{dedup_key}".encode())
    raw = bytearray(sha.digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x50  # version 5
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = raw.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def isoformat(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, the one timestamp format sinks see."""
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def changes_between(before: Any, after: Any) -> dict[str, dict[str, Any]] | None:
    """``{field: {"from": old, "to": new}}`` for every field the provider sent a previous
    value of (``before``), against the values it sends now (``after``); None when it sent none.

    The provider decides what changed (Outreach's ``beforeUpdate`` names only changed
    attributes), so every named field is kept, even one whose new value is absent (``to``
    is then null)."""
    if not isinstance(before, dict) or not before:
        return None
    current = after if isinstance(after, dict) else {}
    return {str(name): {"from": old, "to": current.get(name)} for name, old in before.items()}


def _parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Delivery:
    """One HTTP delivery as the acceptor received it: what a worker needs, no credentials.

    ``body`` is the exact text received (bodies are validated as UTF-8 JSON before this exists),
    unless ``erased_at`` is set: then ``ingest erase`` rewrote the body at that time without
    one person's events (the others' are still in it), so it is no longer the bytes the
    provider signed. Nothing downstream verifies signatures (the acceptor did, on receipt), so
    such a delivery is processed and replayed like any other.
    """

    id: str
    provider: str
    received_at: datetime
    headers: dict[str, str]
    body: str
    erased_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.received_at.tzinfo is None:
            raise ValueError("Delivery.received_at must be timezone-aware")
        if self.erased_at is not None and self.erased_at.tzinfo is None:
            raise ValueError("Delivery.erased_at must be timezone-aware")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "provider": self.provider,
            "received_at": isoformat(self.received_at),
            "headers": self.headers,
            "body": self.body,
        }
        if self.erased_at is not None:  # absent otherwise: envelopes keep the shape they had
            out["erased_at"] = isoformat(self.erased_at)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Delivery:
        erased_at = data.get("erased_at")
        return cls(
            id=data["id"],
            provider=data["provider"],
            received_at=_parse_iso(data["received_at"]),
            headers=dict(data.get("headers") or {}),
            body=data["body"],
            erased_at=_parse_iso(erased_at) if erased_at else None,
        )

    @property
    def body_digest(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    def __repr__(self) -> str:
        erased = " erased" if self.erased_at is not None else ""
        return f"<Delivery {self.provider} {self.id} {len(self.body)} bytes{erased}>"


@dataclass(frozen=True, slots=True)
class Contact:
    """Who the event is about, when the provider says."""

    email: str | None = None
    name: str | None = None
    phone: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"email": self.email, "name": self.name, "phone": self.phone}

    def __bool__(self) -> bool:
        return bool(self.email or self.name or self.phone)


@dataclass(frozen=True, slots=True)
class Event:
    """One normalized event. ``id`` is derived from ``provider`` and ``dedup_key``.

    ``data`` is the resource object the event is about (for a Salesloft array, its element);
    ``previous`` holds prior values when the provider sends them, and ``changes`` the same as
    ``{field: {"from": old, "to": new}}`` (see :func:`changes_between`). ``activity`` says
    whether the event is a fact of its own (an open, a reply, a call) rather than a new version
    of its record (``ingest.kinds``; set from the provider's tables by ``Provider.event``, or,
    for a provider that builds its events itself, by the normalize step).
    ``stale`` is set by the worker (workers.marks): a state event about the same record that
    happened later was already processed. An activity event is never stale.
    """

    provider: str
    dedup_key: str
    event_type: str
    kind: str
    occurred_at: datetime
    received_at: datetime
    resource_type: str | None = None
    resource_id: str | None = None
    action: str | None = None
    workspace_id: str | None = None
    contact: Contact | None = None
    campaign_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] | None = None
    delivery_id: str | None = None
    changes: dict[str, dict[str, Any]] | None = None
    stale: bool = False
    activity: bool = False
    # Normalized fields this event had to fall back on (FALLBACK_FIELDS),
    # counted by the worker; not part of the public shape.
    fallbacks: tuple[str, ...] = field(default=(), compare=False)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.dedup_key:
            raise ValueError("Event.dedup_key must not be empty")
        if self.occurred_at.tzinfo is None or self.received_at.tzinfo is None:
            raise ValueError("Event timestamps must be timezone-aware")
        object.__setattr__(self, "id", event_id(self.provider, self.dedup_key))

    def to_dict(self) -> dict[str, Any]:
        """The public shape: what sinks see and what the CRM receives as its JSON body."""
        return {
            "id": self.id,
            "provider": self.provider,
            "event_type": self.event_type,
            "kind": self.kind,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "action": self.action,
            "occurred_at": isoformat(self.occurred_at),
            "received_at": isoformat(self.received_at),
            "workspace_id": self.workspace_id,
            "contact": self.contact.to_dict() if self.contact else None,
            "campaign_id": self.campaign_id,
            "data": self.data,
            "previous": self.previous,
            "changes": self.changes,
            "stale": self.stale,
        }

    def to_json(self) -> bytes:
        return safejson.dumps(self.to_dict())

    def to_job(self) -> dict[str, Any]:
        """The public shape plus what a worker needs to find the row again, and whether the
        event is activity."""
        out = self.to_dict()
        out["dedup_key"] = self.dedup_key
        out["delivery_id"] = self.delivery_id
        out["activity"] = self.activity
        return out

    @classmethod
    def from_job(cls, data: dict[str, Any]) -> Event:
        contact = data.get("contact")
        event = cls(
            provider=data["provider"],
            dedup_key=data["dedup_key"],
            event_type=data["event_type"],
            kind=data["kind"],
            occurred_at=_parse_iso(data["occurred_at"]),
            received_at=_parse_iso(data["received_at"]),
            resource_type=data.get("resource_type"),
            resource_id=data.get("resource_id"),
            action=data.get("action"),
            workspace_id=data.get("workspace_id"),
            contact=Contact(**contact) if contact else None,
            campaign_id=data.get("campaign_id"),
            data=data.get("data") or {},
            previous=data.get("previous"),
            delivery_id=data.get("delivery_id"),
            changes=data.get("changes"),
            stale=bool(data.get("stale", False)),
            # Jobs written before events carried it: the vocabulary's judgement of the kind.
            activity=bool(data["activity"]) if "activity" in data else is_activity(data["kind"]),
        )
        if data.get("id") not in (None, event.id):
            raise ValueError(f"event id {data['id']} does not match its provider and dedup key")
        return event

    @property
    def record(self) -> tuple[str, str, str] | None:
        """(provider, resource_type, resource_id) of the record this event is about, or None
        when the provider did not say."""
        if not self.resource_type or not self.resource_id:
            return None
        return (self.provider, self.resource_type, self.resource_id)

    @property
    def state_record(self) -> tuple[str, str, str] | None:
        """:attr:`record` for a state event, the record it is a new version of; None for an
        activity event, which is never a version of anything (``ingest.kinds``)."""
        return None if self.activity else self.record

    @property
    def deletes(self) -> bool:
        """True when the event removes its record (a ``*.deleted`` kind, or a delete action)."""
        return self.kind.endswith(".deleted") or (self.action or "") in DELETE_ACTIONS

    def __repr__(self) -> str:
        return f"<Event {self.provider} {self.event_type} -> {self.kind} {self.id}>"
