from typing import Any, ClassVar

import orjson

from ingest.providers.outboundry import OutboundryProvider
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES, ProviderSuite


COMPANY = "67787093-cc3a-44ca-8a12-5bf1afa3194c"


def _data(name: str) -> Any:
    return orjson.loads((SAMPLES / "outboundry" / name).read_bytes())["data"]


class TestOutboundry(ProviderSuite):
    provider = "outboundry"
    other_provider = "mailstand"
    # Every event of the kind table, which docs/providers.md gives line for line
    # (tests/providers/test_registry.py).
    documented_kinds: ClassVar[dict[str, str]] = dict(OutboundryProvider.kinds)
    expected: ClassVar[dict[str, dict[str, Any]]] = {
        "invite_sent.raw": {
            "dedup_key": f"invite-sent|{COMPANY}|11111111-aaaa-bbbb-cccc-111111111111"
                         "|2026-03-24T10:15:00+00:00",
            "event_type": "invite-sent",
            "kind": "linkedin.invite_sent",
            "resource_type": "lead",
            "resource_id": "11111111-aaaa-bbbb-cccc-111111111111",
            "action": "invite_sent",
            "occurred_at": "2026-03-24T10:15:00Z",
            "workspace_id": COMPANY,
            "contact_email": "rahul.sharma@example.com",  # the lead, never data.sender
            "contact_name": "Rahul Sharma",
            "contact_phone": None,
            "campaign_id": "cccccccc-1111-2222-3333-cccccccccccc",
            "data": _data("invite_sent.raw"),
            "previous": None,
        },
        "email_replied_numeric_ids.raw": {
            # numeric lead and campaign ids, a +05:30 offset: all normalized
            "dedup_key": f"email-replied|{COMPANY}|33333|2026-03-24T10:45:00+00:00",
            "event_type": "email-replied",
            "kind": "email.replied",
            "resource_type": "lead",
            "resource_id": "33333",
            "action": "email_replied",
            "occurred_at": "2026-03-24T10:45:00Z",
            "workspace_id": COMPANY,
            "contact_email": "amit.joshi@example.in",
            "contact_name": "Amit Joshi",
            "campaign_id": "4021",
            "data": _data("email_replied_numeric_ids.raw"),
            "previous": None,
        },
        "message_replied_no_campaign.raw": {
            # campaign null, no sender, lead email null
            "dedup_key": f"message-replied|{COMPANY}|22222222-bbbb-cccc-dddd-222222222222"
                         "|2026-03-24T14:20:00+00:00",
            "event_type": "message-replied",
            "kind": "linkedin.message_replied",
            "resource_type": "lead",
            "resource_id": "22222222-bbbb-cccc-dddd-222222222222",
            "action": "message_replied",
            "occurred_at": "2026-03-24T14:20:00Z",
            "workspace_id": COMPANY,
            "contact_email": None,
            "contact_name": "Priya Nair",
            "campaign_id": None,
            "data": _data("message_replied_no_campaign.raw"),
            "previous": None,
        },
    }

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        from datetime import datetime, timezone

        event = f"profile-viewed-{suffix}"
        body = orjson.dumps({"event": event, "company_id": "c1",
                             "timestamp": datetime.now(timezone.utc).isoformat(),
                             "data": {"lead": {"id": "lead-1"}}})
        return body, {"Authorization": f"Bearer {secret}"}, event

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        payload = orjson.loads((SAMPLES / "outboundry/invite_sent.raw").read_bytes())
        payload["timestamp"] = value
        return orjson.dumps(payload), {}

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}

    def body_for_event(self, event_type: str) -> bytes:
        return orjson.dumps({"event": event_type, "company_id": COMPANY,
                             "timestamp": "2026-03-24T10:15:00.000Z",
                             "data": {"lead": {"id": "lead-1", "email": "lead@example.com"},
                                      "campaign": {"id": "camp-1"},
                                      "sender": {"id": "sender-1", "email": "me@example.com"}}})

    def test_token_in_query_string_is_accepted(self, acceptor: Any, runtime: Any) -> None:
        body = self.raw("invite_sent.raw")
        response = self.post(acceptor, body, {"Content-Type": "application/json"},
                             params={"token": SECRETS["outboundry"][1]})
        assert response.status_code == 200
        assert runtime.ingest_queue.count == 1

    def test_redelivery_with_a_refreshed_lead_is_still_one_event(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        # Outboundry may send an event again with the lead's current state; same event,
        # lead and timestamp: the same event.
        payload = orjson.loads(self.raw("invite_sent.raw"))
        first = orjson.dumps(payload)
        payload["data"]["lead"]["latest_status"] = "Engaged"
        payload["data"]["lead"]["activity"].append(
            {"action": "Invite Accepted", "action_time": "2026-03-24T11:30:00.000Z"})
        again = orjson.dumps(payload)
        for body in (first, again):
            assert self.post(acceptor, body, self.sign(body, SECRETS["outboundry"][0])).status_code == 200
        drain(runtime)
        assert len(self.events_in(database_url)) == 1

    def test_same_lead_other_event_or_company_is_a_new_event(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        base = orjson.loads(self.raw("invite_sent.raw"))
        variants = [base, {**base, "event": "invite-accepted"},
                    {**base, "company_id": "another-company"},
                    {**base, "timestamp": "2026-03-25T10:15:00.000Z"}]
        for payload in variants:
            body = orjson.dumps(payload)
            assert self.post(acceptor, body, self.sign(body, SECRETS["outboundry"][0])).status_code == 200
        drain(runtime)
        stored = self.events_in(database_url)
        assert len(stored) == 4
        assert {r["workspace_id"] for r in stored} == {COMPANY, "another-company"}
        assert rows(database_url, "SELECT count(*) AS n FROM webhook_deliveries")[0]["n"] == 4
