import hashlib
import hmac
from typing import Any, ClassVar

import orjson

from ingest.kinds import KIND_TABLES
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
    documented_kinds: ClassVar[dict[str, str]] = dict(KIND_TABLES["outreach"])
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

    def test_cleanup_token_is_kept_with_the_delivery(self, acceptor: Any, runtime: Any,
                                                     database_url: str) -> None:
        body = self.raw("prospect_updated_v2.raw")
        assert self.post(acceptor, body, self.sign(body, SECRETS["outreach"][1])).status_code == 200
        drain(runtime)
        (delivery,) = rows(database_url, "SELECT headers FROM webhook_deliveries")
        assert delivery["headers"] == {"outreach-webhook-cleanup-token": "cleanup-token-4f9a"}
