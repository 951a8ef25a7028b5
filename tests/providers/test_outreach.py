import hashlib
import hmac
from typing import Any, ClassVar

import orjson

from ingest.kinds import KIND_TABLES
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES, ProviderSuite


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

    def test_cleanup_token_is_not_kept_with_the_delivery(self, acceptor: Any, runtime: Any,
                                                         database_url: str) -> None:
        # A credential: the archive keeps no token, though sign() sends one.
        body = self.raw("prospect_updated_v2.raw")
        assert self.post(acceptor, body, self.sign(body, SECRETS["outreach"][1])).status_code == 200
        drain(runtime)
        (delivery,) = rows(database_url, "SELECT headers FROM webhook_deliveries")
        assert delivery["headers"] == {}
