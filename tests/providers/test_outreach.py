import hashlib
import hmac
from datetime import datetime, timezone
from typing import Any, ClassVar

import httpx
import orjson
import pytest

from ingest.events import Delivery
from ingest.providers import load_providers
from ingest.providers.outreach import OutreachProvider
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES, ProviderSuite


# The Outreach organization of the live captures (their outreach-org-id header).
ORG = "e4bf9dea-9b0a-4996-ae2a-e52856bb577c"


def _data(name: str) -> Any:
    return orjson.loads((SAMPLES / "outreach" / name).read_bytes())["data"]


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class TestOutreach(ProviderSuite):
    provider = "outreach"
    other_provider = "outcaller"
    documented_kinds: ClassVar[dict[str, str]] = dict(OutreachProvider.kinds)
    expected: ClassVar[dict[str, dict[str, Any]]] = {
        "prospect_updated_v2.raw": {
            "dedup_key": "prospect.updated|prospect|4417|2026-06-04T05:49:10.221000+00:00",
            "event_type": "prospect.updated",
            "kind": "contact.updated",
            "resource_type": "prospect",
            "resource_id": "4417",  # numeric in the payload
            "action": "updated",
            "occurred_at": "2026-06-04T05:49:10.221Z",  # sent as +02:00
            "workspace_id": None,
            "contact_email": "maria.gonzalez@example.com",
            "contact_name": "Maria Gonzalez",
            "contact_phone": "+1 415 555 0134",
            "campaign_id": "31",
            "data": orjson.loads((SAMPLES / "outreach/prospect_updated_v2.raw").read_bytes())["data"],
            "previous": {"title": "Director of Sales Operations"},
        },
        "mailing_delivered_no_updated_at.raw": {
            # No updatedAt: the key falls back to a digest of `data`, never of `meta`.
            "dedup_key": "mailing.delivered|mailing|90210|data:"
                         + hashlib.sha256(orjson.dumps(
                             {"type": "mailing", "id": "90210", "attributes": {
                                 "createdAt": "2026-06-04T05:40:00.000Z", "mailingType": "sequence",
                                 "state": "delivered", "subject": "Quick question"},
                              "relationships": {"prospect": {"data": {"type": "prospect",
                                                                      "id": 4417}}}},
                             option=orjson.OPT_SORT_KEYS)).hexdigest()[:32],
            "event_type": "mailing.delivered",
            "kind": "email.delivered",
            "resource_type": "mailing",
            "resource_id": "90210",
            "action": "delivered",
            "occurred_at": "2026-06-04T05:40:00Z",  # createdAt, as there is no updatedAt
            "workspace_id": None,
            "contact_email": None,
            "campaign_id": None,
            "data": {"type": "mailing", "id": "90210", "attributes": {
                "createdAt": "2026-06-04T05:40:00.000Z", "mailingType": "sequence",
                "state": "delivered", "subject": "Quick question"},
                "relationships": {"prospect": {"data": {"type": "prospect", "id": 4417}}}},
            "previous": None,
        },
        # -- captured from live accounts (tests/samples/SOURCES.md) --------------------------
        "sequence_created_live.raw": {
            "dedup_key": "sequence.created|sequence|42|2019-08-14T10:44:29+00:00",
            "event_type": "sequence.created",
            "kind": "sequence.created",
            "resource_type": "sequence",
            "resource_id": "42",
            "action": "created",
            "occurred_at": "2019-08-14T10:44:29Z",
            "workspace_id": ORG,  # the outreach-org-id header
            "contact_email": None,
            "contact_name": None,  # the sequence's name is not a person's
            "contact_phone": None,
            "campaign_id": "42",  # a sequence event's campaign is the sequence itself
            "data": _data("sequence_created_live.raw"),
            "previous": None,
        },
        "sequence_updated_empty_live.raw": {
            # Live: an update with "attributes": {} and "relationships": {}. No updatedAt, so
            # the key is a digest of data and the time is meta.deliveredAt (a fallback).
            "dedup_key": "sequence.updated|sequence|43|data:" + _digest(
                _data("sequence_updated_empty_live.raw")),
            "event_type": "sequence.updated",
            "kind": "sequence.updated",
            "resource_type": "sequence",
            "resource_id": "43",
            "action": "updated",
            "occurred_at": "2019-08-14T10:46:28.176Z",
            "workspace_id": ORG,
            "contact_email": None,
            "contact_name": None,
            "campaign_id": "43",
            "data": {"type": "sequence", "id": 43, "attributes": {}, "relationships": {}},
            "previous": None,
        },
        "sequence_destroyed_live.raw": {
            # The deleted sequence carries its last-known attributes: updatedAt equals
            # createdAt, 20 s before the delete. The key keeps it (stable across retries); the
            # time is the delivery's.
            "dedup_key": "sequence.destroyed|sequence|43|2019-08-14T10:46:08+00:00",
            "event_type": "sequence.destroyed",
            "kind": "sequence.deleted",
            "resource_type": "sequence",
            "resource_id": "43",
            "action": "destroyed",
            "occurred_at": "2019-08-14T10:46:28.219Z",
            "workspace_id": ORG,
            "contact_email": None,
            "contact_name": None,  # not "Delete me sequence"
            "contact_phone": None,
            "campaign_id": "43",
            "data": _data("sequence_destroyed_live.raw"),
            "previous": None,
        },
        "sequence_updated_share_type_live.raw": {
            "dedup_key": "sequence.updated|sequence|53|2019-08-14T11:46:29+00:00",
            "event_type": "sequence.updated",
            "kind": "sequence.updated",
            "resource_type": "sequence",
            "resource_id": "53",
            "action": "updated",
            "occurred_at": "2019-08-14T11:46:29Z",
            "workspace_id": ORG,
            "contact_email": None,
            "campaign_id": "53",
            "data": {"type": "sequence", "id": 53,
                     "attributes": {"updatedAt": "2019-08-14T11:46:29.000Z",
                                    "shareType": "read_only"},
                     "relationships": {}},
            "previous": None,
        },
        "account_created_bare_relationship.raw": {
            # Bare relationship shape ("owner": {"type", "id"}); an account is not a person.
            "dedup_key": "account.created|account|13|2025-11-04T09:40:36+00:00",
            "event_type": "account.created",
            "kind": "account.created",
            "resource_type": "account",
            "resource_id": "13",
            "action": "created",
            "occurred_at": "2025-11-04T09:40:36Z",
            "workspace_id": None,  # captured without its headers
            "contact_email": None,
            "contact_name": None,  # not "this is a test", the account's name
            "contact_phone": None,
            "campaign_id": None,
            "data": _data("account_created_bare_relationship.raw"),
            "previous": None,
        },
    }

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        import hashlib
        import hmac
        from datetime import datetime, timezone

        event = f"widget.exploded_{suffix}"
        now = datetime.now(timezone.utc).isoformat()
        body = orjson.dumps({"data": {"type": "widget", "id": 1, "attributes": {"updatedAt": now}},
                             "meta": {"eventName": event}})
        sig = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return body, {"Outreach-Webhook-Signature": sig}, event

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        payload = orjson.loads((SAMPLES / "outreach/prospect_updated_v2.raw").read_bytes())
        payload["data"]["attributes"]["updatedAt"] = value
        payload["meta"]["deliveredAt"] = value
        return orjson.dumps(payload), {}

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Outreach-Webhook-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            "outreach-webhook-cleanup-token": "cleanup-token-4f9a",
        }

    def body_for_event(self, event_type: str) -> bytes:
        resource = event_type.split(".")[0]
        return orjson.dumps({
            "data": {"type": resource, "id": 7, "attributes": {"updatedAt": "2026-01-01T00:00:00Z"}},
            "meta": {"eventName": event_type, "deliveredAt": "2026-01-01T00:00:01Z"},
        })

    def test_meta_differences_between_attempts_do_not_make_a_new_event(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        payload = orjson.loads(self.raw("mailing_delivered_no_updated_at.raw"))
        for delivered_at in ("2026-06-04T05:41:02.500Z", "2026-06-04T05:41:03.500Z"):
            payload["meta"]["deliveredAt"] = delivered_at  # Outreach's retry 1 s later
            body = orjson.dumps(payload)
            assert self.post(acceptor, body, self.sign(body, SECRETS["outreach"][0])).status_code == 200
        drain(runtime)
        assert len(self.events_in(database_url)) == 1

    def test_cleanup_token_is_not_kept_with_the_delivery(self, acceptor: Any, runtime: Any,
                                                         database_url: str) -> None:
        # A credential: the archive keeps no token, though sign() sends one.
        body = self.raw("prospect_updated_v2.raw")
        assert self.post(acceptor, body, self.sign(body, SECRETS["outreach"][1])).status_code == 200
        drain(runtime)
        (delivery,) = rows(database_url, "SELECT headers FROM webhook_deliveries")
        assert delivery["headers"] == {}


# -- live shapes, field by field ----------------------------------------------------------------
# Hand-made variants of the captured shapes: each is labelled with the live shape it varies.

def _event(payload: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    delivery = Delivery(id="00000000-0000-4000-8000-0000000000aa", provider="outreach",
                        received_at=datetime(2026, 6, 4, 6, 0, tzinfo=timezone.utc),
                        headers=headers or {}, body=orjson.dumps(payload).decode())
    (event,) = load_providers()["outreach"].events(delivery)
    return event


def _mailing(relationships: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "mailing", "id": 5,
                            "attributes": {"updatedAt": "2026-06-04T05:00:00.000Z",
                                           "mailingType": "sequence"}}
    if relationships is not ...:
        data["relationships"] = relationships
    return {"data": data, "meta": {"eventName": "mailing.created",
                                   "deliveredAt": "2026-06-04T05:00:01.000Z"}}


@pytest.mark.parametrize(("relationships", "campaign"), [
    ({"sequence": {"data": {"type": "sequence", "id": 2}}}, "2"),  # JSON:API, as documented
    ({"sequence": {"type": "sequence", "id": 2}}, "2"),  # bare, as live deliveries send
    ({"sequence": {"type": "sequence", "id": "2"}}, "2"),
    ({"sequence": {"id": 0}}, None),
    ({"sequence": {"id": None}}, None),
    ({"sequence": {"data": None}}, None),
    ({"sequence": {}}, None),
    ({}, None),  # live: "relationships": {}
    (..., None),  # no relationships at all
    ({"sequence": [{"type": "sequence", "id": 2}]}, None),  # not a to-one relationship
    ([], None),
])
def test_every_relationship_shape_gives_the_campaign_or_null(relationships: Any,
                                                             campaign: str | None) -> None:
    event = _event(_mailing(relationships))
    assert event.campaign_id == campaign
    assert ("campaign_id" in event.fallbacks) is (campaign is None)  # a sequence mailing


def test_sequence_events_take_the_campaign_from_the_sequence_itself() -> None:
    payload = orjson.loads((SAMPLES / "outreach/sequence_destroyed_live.raw").read_bytes())
    assert _event(payload).campaign_id == "43"
    state = {"data": {"type": "sequenceState", "id": 9, "attributes": {
        "state": "active", "updatedAt": "2026-06-04T05:00:00.000Z"},
        "relationships": {"sequence": {"type": "sequence", "id": 31},
                          "prospect": {"type": "prospect", "id": 4417}}},
        "meta": {"eventName": "sequenceState.created"}}
    event = _event(state)
    assert (event.campaign_id, event.kind) == ("31", "campaign.added")


def _state_update(state: str, before: dict[str, Any] | None) -> str:
    payload: dict[str, Any] = {
        "data": {"type": "sequenceState", "id": 9,
                 "attributes": {"state": state, "updatedAt": "2026-06-04T05:00:00.000Z"},
                 "relationships": {"sequence": {"data": {"type": "sequence", "id": 31}}}},
        "meta": {"eventName": "sequenceState.updated"}}
    if before is not None:
        payload["beforeUpdate"] = before
    return str(_event(payload).kind)


def test_active_is_a_resume_only_after_a_pause() -> None:
    paused = {"type": "sequenceState", "id": 9, "attributes": {"state": "paused"}}
    pending = {"type": "sequenceState", "id": 9, "attributes": {"state": "pending"}}
    assert _state_update("active", paused) == "campaign.resumed"
    assert _state_update("active", pending) == "campaign.updated"  # a first activation
    assert _state_update("active", None) == "campaign.updated"  # previous state unknown
    assert _state_update("active", {"attributes": {}}) == "campaign.updated"
    assert _state_update("paused", pending) == "campaign.paused"
    assert _state_update("finished", None) == "campaign.finished"


@pytest.mark.parametrize("resource", ["account", "sequence", "template", "mailbox", "user"])
def test_contact_fields_never_come_from_a_resource_that_is_not_a_person(resource: str) -> None:
    event = _event({"data": {"type": resource, "id": 3, "attributes": {
        "name": "Acme Corp", "email": "sales@acme.example", "updatedAt": "2026-06-04T05:00:00Z"}},
        "meta": {"eventName": f"{resource}.updated"}})
    assert event.contact is None
    assert "contact_email" not in event.fallbacks


def test_a_prospect_without_an_email_is_a_contact_email_fallback() -> None:
    event = _event({"data": {"type": "prospect", "id": 3, "attributes": {
        "firstName": "Ada", "updatedAt": "2026-06-04T05:00:00Z"}},
        "meta": {"eventName": "prospect.created"}})
    assert event.contact is not None and event.contact.name == "Ada"
    assert event.fallbacks == ("contact_email",)


def test_a_delete_is_dated_by_its_delivery_and_keyed_the_same_on_every_attempt() -> None:
    payload = orjson.loads((SAMPLES / "outreach/sequence_destroyed_live.raw").read_bytes())
    first = _event(payload)
    payload["meta"]["deliveredAt"] = "2019-08-14T10:46:29.219+00:00"  # Outreach's retry, 1 s on
    retry = _event(payload)
    assert first.dedup_key == retry.dedup_key and first.id == retry.id
    assert first.occurred_at == datetime(2019, 8, 14, 10, 46, 28, 219000, tzinfo=timezone.utc)
    del payload["meta"]["deliveredAt"]
    undated = _event(payload)
    assert undated.occurred_at == undated.received_at  # not the stale updatedAt
    assert undated.fallbacks == ("occurred_at",)


def test_the_tenant_is_the_outreach_org_id_header_and_it_is_kept(
        acceptor: Any, runtime: Any, database_url: str) -> None:
    body = (SAMPLES / "outreach/sequence_created_live.raw").read_bytes()
    captured = orjson.loads((SAMPLES / "outreach/sequence_created_live.headers.json").read_bytes())
    headers = {**TestOutreach().sign(body, SECRETS["outreach"][0]), **captured}
    assert httpx.post(f"{acceptor.url}/webhooks/outreach", content=body, headers=headers,
                      timeout=10).status_code == 200
    drain(runtime)
    (delivery,) = rows(database_url, "SELECT headers FROM webhook_deliveries")
    assert delivery["headers"] == {
        "outreach-org-id": ORG,
        "outreach-webhook-id": "7",
        "outreach-webhook-event-id": "675fed88-3728-49d6-95b7-99f395fdcb26",
    }
    (event,) = rows(database_url, "SELECT workspace_id FROM webhook_events")
    assert event["workspace_id"] == ORG


@pytest.mark.parametrize("blank", ["", None, 0])
def test_events_without_an_id_and_the_same_updated_at_are_two_events(blank: Any) -> None:
    """A blank data.id does not identify a resource: two such events of one second with
    different data are two events (the data's digest keys them, as for Salesloft), and the
    same one again is still one."""

    def payload(title: str) -> dict[str, Any]:
        return {"data": {"type": "prospect", "id": blank,
                         "attributes": {"title": title, "updatedAt": "2026-06-04T05:00:00Z"}},
                "meta": {"eventName": "prospect.updated",
                         "deliveredAt": "2026-06-04T05:00:01Z"}}

    first, second = _event(payload("CTO")), _event(payload("CEO"))
    assert first.dedup_key != second.dedup_key and first.id != second.id
    again = payload("CTO")
    again["meta"]["deliveredAt"] = "2026-06-04T05:00:02Z"  # a retry
    assert _event(again).id == first.id
    named = payload("CTO")
    named["data"]["id"] = 42
    assert _event(named).dedup_key == "prospect.updated|prospect|42|2026-06-04T05:00:00+00:00"
