"""Realistic, correctly signed sample deliveries, built from each provider's documented payloads.

Used by ``ingest send`` (and so by ``ingest dev``'s sample command and bench/). Ids and
timestamps vary per call, so each sample is a new event unless sent again on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

__all__ = ["SAMPLES", "Sample", "build_sample"]

Sample = tuple[bytes, dict[str, str]]  # (body, headers), signed


def _now(rng: random.Random) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=rng.randint(0, 3600))


def _iso_ms(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _outreach(rng: random.Random, secret: str) -> Sample:
    event = rng.choice(["prospect.updated", "mailing.replied", "mailing.opened",
                        "sequenceState.created", "prospect.created"])
    resource = event.split(".")[0]
    updated = _now(rng)
    attributes: dict[str, Any] = {"updatedAt": _iso_ms(updated),
                                  "createdAt": _iso_ms(updated - timedelta(days=3))}
    if resource == "prospect":
        first = rng.choice(["Ada", "Grace", "Alan", "Edsger", "Barbara"])
        attributes.update({"emails": [f"{first.lower()}.{rng.randint(1, 9999)}@example.com"],
                           "firstName": first, "lastName": "Sample", "title": "VP Engineering"})
    elif resource == "mailing":
        attributes.update({"state": "replied" if "replied" in event else "delivered",
                           "subject": "Quick question"})
    payload: dict[str, Any] = {
        "data": {
            "type": resource,
            "id": rng.randint(1, 10**9),
            "attributes": attributes,
            "relationships": {"sequence": {"data": {"type": "sequence", "id": rng.randint(1, 500)}}},
        },
        "meta": {"deliveredAt": _iso_ms(datetime.now(timezone.utc)), "eventName": event},
    }
    if event.endswith(".updated"):
        payload["beforeUpdate"] = {"type": resource, "id": payload["data"]["id"],
                                   "attributes": {"title": "Director of Engineering"}}
    body = orjson.dumps(payload)
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json",
                  "Outreach-Webhook-Signature": signature,
                  "outreach-webhook-cleanup-token": "cleanup-" + uuid.uuid4().hex[:16]}


def _outcaller(rng: random.Random, secret: str) -> Sample:
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
        "timestamp": _now(rng).isoformat(),
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


SAMPLES: dict[str, Callable[[random.Random, str], Sample]] = {
    "outreach": _outreach,
    "outcaller": _outcaller,
}


def build_sample(provider: str, secret: str, rng: random.Random | None = None) -> Sample:
    try:
        builder = SAMPLES[provider]
    except KeyError:
        raise ValueError(f"no sample payloads for provider {provider!r} "
                         f"(have: {', '.join(sorted(SAMPLES))})") from None
    return builder(rng or random.Random(), secret)
