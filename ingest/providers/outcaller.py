"""OutCallerAI: workspace events authenticated by a header the user configures.

Payload::

    {"event": "lead.created", "resource": "lead", "action": "created",
     "workspaceId": "ws_1", "timestamp": "2026-06-04T05:49:10.221000+00:00",
     "data": {"id": "lead_123", "campaignId": "campaign_123", "name": "Priya Sharma",
              "phone": "+919876543210", "email": "priya@example.com"},
     "previousData": {...},            # on some updates
     "metadata": {"source": "google_drive_sync"}}

OutCallerAI signs nothing: the user adds ``Authorization: Bearer <token>`` under "Webhook
Headers (JSON)" (or puts ``?token=`` in the URL). It also sends ``X-Outcaller-Event``,
``-Resource``, ``-Action`` and ``-Workspace-Id``, which we keep and fall back on.

Dedup key: event + resource + data.id + timestamp, the tuple its docs recommend. It waits
10 s and never retries, so a lost delivery is lost for good: answer fast, spool when needed.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from ingest.events import Delivery, Event, changes_between
from ingest.exceptions import NormalizationError
from ingest.kinds import STATE
from ingest.providers.base import (
    Sample,
    TokenProvider,
    as_id,
    contact,
    load_object,
    missing,
    obj,
    parse_time,
    recent,
    text,
    time_key,
)


# OutCallerAI: "event", "<resource>.<action>"; call and task actions are open-ended statuses.
# Keys ending in ".*" match any action (see ingest.kinds.lookup).
KINDS: dict[str, str] = {
    "lead.created": "contact.created",
    "lead.updated": "contact.updated",
    "lead.deleted": "contact.deleted",
    "lead.bulk_deleted": "contact.deleted",
    "call.*": "call.*",
    "task.*": "task.*",
    "agent.created": "user.created",
    "agent.updated": "user.updated",
    "agent.deleted": "user.deleted",
}
# Every task event is about the task record (created, updated, ...): state, whatever action a
# new one names. Calls need no entry: the vocabulary judges call.* (a call that happened is
# activity, an update of its record state).
KIND_CLASSES: dict[str, str] = {"task.*": STATE}


class OutCallerProvider(TokenProvider):
    name: ClassVar[str] = "outcaller"
    kinds: ClassVar[Mapping[str, str]] = KINDS
    kind_classes: ClassVar[Mapping[str, str]] = KIND_CLASSES
    secret_setting: ClassVar[str] = "OUTCALLER_WEBHOOK_TOKENS"
    kept_headers: ClassVar[frozenset[str]] = frozenset(
        {
            "x-outcaller-event",
            "x-outcaller-resource",
            "x-outcaller-action",
            "x-outcaller-workspace-id",
        }
    )

    def events(self, delivery: Delivery) -> list[Event]:
        payload = load_object(delivery)
        headers = delivery.headers
        data = obj(payload.get("data"))
        event_type = text(payload.get("event")) or text(headers.get("x-outcaller-event"))
        resource = (
            text(payload.get("resource"))
            or text(headers.get("x-outcaller-resource"))
            or (event_type.partition(".")[0] if event_type else None)
        )
        action = (
            text(payload.get("action"))
            or text(headers.get("x-outcaller-action"))
            or (event_type.partition(".")[2] if event_type else None)
        )
        resource_id = as_id(data.get("id"))
        timestamp = time_key(payload.get("timestamp"))
        if not event_type or not resource_id or not timestamp:
            raise NormalizationError(
                "OutCallerAI delivery lacks one of event, data.id, timestamp (its dedup key)"
            )
        dedup_key = "|".join([event_type, resource or "", resource_id, timestamp])
        previous = payload.get("previousData")
        when = parse_time(payload.get("timestamp"))
        found = contact(email=data.get("email"), name=data.get("name"), phone=data.get("phone"))
        return [
            self.event(
                delivery,
                dedup_key=dedup_key,
                event_type=event_type,
                occurred_at=when,
                resource_type=resource,
                resource_id=resource_id,
                action=action,
                workspace_id=as_id(payload.get("workspaceId"))
                or as_id(data.get("workspaceId"))
                or text(headers.get("x-outcaller-workspace-id")),
                contact=found,
                campaign_id=as_id(data.get("campaignId")),
                data=data,
                previous=previous if isinstance(previous, dict) else None,
                changes=changes_between(previous, data),
                fallbacks=missing(
                    occurred_at=when is None,
                    contact_email=resource == "lead" and not (found and found.email),
                ),
            )
        ]

    def sample(self, rng: random.Random, secret: str) -> Sample:
        """A realistic, correctly signed delivery (``ingest send``, bench)."""
        event = rng.choice(["lead.created", "lead.updated", "call.completed", "task.created"])
        resource, action = event.split(".")
        workspace = "cmpxz43bl00032c6udndznzdg"
        data: dict[str, Any] = {"id": f"{resource}_{uuid.uuid4().hex[:12]}", "workspaceId": workspace,
                                "campaignId": f"campaign_{rng.randint(1, 99)}"}
        if resource == "lead":
            data.update({"name": "Priya Sharma", "phone": "+919876543210",
                         "email": f"priya.{rng.randint(1, 9999)}@example.com", "status": "new"})
        elif resource == "call":
            data.update({"status": action, "durationSeconds": rng.randint(5, 900),
                         "email": f"lead.{rng.randint(1, 9999)}@example.com"})
        payload: dict[str, Any] = {
            "event": event, "resource": resource, "action": action, "workspaceId": workspace,
            "timestamp": recent(rng).isoformat(),
            "data": data, "metadata": {"source": "webhook-ingest sample"},
        }
        if event == "lead.updated":
            payload["previousData"] = {"status": "contacted"}
        return orjson.dumps(payload), {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {secret}",
            "X-Outcaller-Event": event, "X-Outcaller-Resource": resource,
            "X-Outcaller-Action": action, "X-Outcaller-Workspace-Id": workspace,
        }
