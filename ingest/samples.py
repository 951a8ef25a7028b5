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
    # Live deliveries name the organization and the webhook in headers, not in the body.
    return body, {"Content-Type": "application/json",
                  "Outreach-Webhook-Signature": signature,
                  "outreach-webhook-cleanup-token": "cleanup-" + uuid.uuid4().hex[:16],
                  "outreach-org-id": "0d6f3a52-8c1e-4b7a-9f20-5e4c3b2a1908",
                  "outreach-webhook-id": "7",
                  "outreach-webhook-event-id": str(uuid.uuid4())}


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


def _salesloft_resource(rng: random.Random, event: str) -> dict[str, Any]:
    updated = _now(rng)
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


def _salesloft(rng: random.Random, secret: str) -> Sample:
    event = rng.choice(["person_updated", "person_created", "cadence_membership_created",
                        "email_updated", "meeting_booked"])
    payload: dict[str, Any]
    if event == "cadence_membership_created":
        # Several memberships in one delivery: one event per element.
        payload = {"event_type": event,
                   "data": [_salesloft_resource(rng, event) for _ in range(rng.randint(1, 3))]}
    elif event == "email_updated":
        payload = {"event_type": event, "data": _salesloft_resource(rng, event)}
    else:
        payload = _salesloft_resource(rng, event)  # the bare resource, as seen in the wild
    body = orjson.dumps(payload)
    signature = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    return body, {"Content-Type": "application/json", "x-salesloft-event": event,
                  "x-salesloft-signature": signature}


def _outboundry(rng: random.Random, secret: str) -> Sample:
    event = rng.choice(["invite-sent", "invite-accepted", "message-sent", "message-replied",
                        "inmail-sent", "email-sent", "email-opened", "email-replied"])
    first = rng.choice(["Rahul", "Priya", "Amit", "Sofia", "Tomas"])
    lead_id = str(uuid.UUID(int=rng.getrandbits(128)))
    payload = {
        "event": event,
        "company_id": "67787093-cc3a-44ca-8a12-5bf1afa3194c",
        "timestamp": _iso_ms(_now(rng)),
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


def _mailstand(rng: random.Random, secret: str) -> Sample:
    kind = rng.choice(["send", "open", "click", "reply", "bounce", "pause", "stage_change"])
    contact_id = f"contact_{rng.getrandbits(64):016x}"
    email = f"lead.{rng.randint(1, 9999)}@example.com"
    payload: dict[str, Any] = {
        "id": f"evt_{rng.getrandbits(80):020x}", "type": kind,
        "workspace_id": "space_d2n0092jd290j2d", "campaign_id": "camp_pow0dj20jc20jkd2nx",
        "created_at": int(_now(rng).timestamp()),
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


SAMPLES: dict[str, Callable[[random.Random, str], Sample]] = {
    "outreach": _outreach,
    "outcaller": _outcaller,
    "salesloft": _salesloft,
    "outboundry": _outboundry,
    "mailstand": _mailstand,
}


def build_sample(provider: str, secret: str, rng: random.Random | None = None) -> Sample:
    try:
        builder = SAMPLES[provider]
    except KeyError:
        raise ValueError(f"no sample payloads for provider {provider!r} "
                         f"(have: {', '.join(sorted(SAMPLES))})") from None
    return builder(rng or random.Random(), secret)
