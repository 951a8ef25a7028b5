import json
from typing import Any, ClassVar

import orjson

from tests.providers.suite import SAMPLES, ProviderSuite

# Every event OutCallerAI documents, with the call and task statuses its docs name.
DOCUMENTED = {
    "lead.created": "contact.created",
    "lead.updated": "contact.updated",
    "lead.deleted": "contact.deleted",
    "lead.bulk_deleted": "contact.deleted",
    "call.created": "call.created",
    "call.initiated": "call.initiated",
    "call.completed": "call.completed",
    "call.failed": "call.failed",
    "task.created": "task.created",
    "task.updated": "task.updated",
    "task.completed": "task.completed",
    "agent.created": "user.created",
}


class TestOutCaller(ProviderSuite):
    provider = "outcaller"
    other_provider = "outreach"
    documented_kinds: ClassVar[dict[str, str]] = DOCUMENTED
    expected: ClassVar[dict[str, dict[str, Any]]] = {
        "lead_created.raw": {
            "dedup_key": "lead.created|lead|lead_123|2026-06-04T05:49:10.221000+00:00",
            "event_type": "lead.created",
            "kind": "contact.created",
            "resource_type": "lead",
            "resource_id": "lead_123",
            "action": "created",
            "occurred_at": "2026-06-04T05:49:10.221Z",
            "workspace_id": "cmpxz43bl00032c6udndznzdg",
            "contact_email": "priya@example.com",
            "contact_name": "Priya Sharma",
            "contact_phone": "+919876543210",
            "campaign_id": "campaign_123",
            "data": orjson.loads((SAMPLES / "outcaller/lead_created.raw").read_bytes())["data"],
            "previous": None,
        },
        "call_completed_with_previous.raw": {
            # numeric data.id and a +05:30 offset: both normalized
            "dedup_key": "call.completed|call|98231|2026-06-04T05:49:10+00:00",
            "event_type": "call.completed",
            "kind": "call.completed",
            "resource_type": "call",
            "resource_id": "98231",
            "action": "completed",
            "occurred_at": "2026-06-04T05:49:10Z",
            "workspace_id": "cmpxz43bl00032c6udndznzdg",
            "contact_email": "priya@example.com",
            "campaign_id": "campaign_123",
            "data": orjson.loads(
                (SAMPLES / "outcaller/call_completed_with_previous.raw").read_bytes())["data"],
            "previous": {"status": "in_progress"},
        },
    }

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        from datetime import datetime, timezone

        event = f"voicemail.left_{suffix}"
        body = orjson.dumps({"event": event, "timestamp": datetime.now(timezone.utc).isoformat(),
                             "data": {"id": "vm_1"}})
        return body, {"Authorization": f"Bearer {secret}"}, event

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        payload = orjson.loads((SAMPLES / "outcaller/lead_created.raw").read_bytes())
        payload["timestamp"] = value
        return orjson.dumps(payload), {}

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {secret}",
                "X-Outcaller-Event": "lead.created", "X-Outcaller-Resource": "lead",
                "X-Outcaller-Action": "created",
                "X-Outcaller-Workspace-Id": "cmpxz43bl00032c6udndznzdg"}

    def body_for_event(self, event_type: str) -> bytes:
        resource, _, action = event_type.partition(".")
        return orjson.dumps({"event": event_type, "resource": resource, "action": action,
                             "workspaceId": "ws_1", "timestamp": "2026-06-04T05:49:10Z",
                             "data": {"id": f"{resource}_1"}})

    def test_token_in_query_string_is_accepted(self, acceptor: Any, runtime: Any) -> None:
        from tests.helpers import SECRETS

        body = self.raw("lead_created.raw")
        response = self.post(acceptor, body, {"Content-Type": "application/json"},
                             params={"token": SECRETS["outcaller"][1]})
        assert response.status_code == 200
        assert runtime.ingest_queue.count == 1

    def test_integers_past_64_bits_are_kept_exact(self, acceptor: Any, runtime: Any,
                                                  database_url: str) -> None:
        """A numeric id past 64 bits names its resource exactly, and every such integer in the
        payload is stored as sent, not rounded to a float."""
        from tests.helpers import SECRETS, drain

        payload = json.loads(self.raw("lead_created.raw"))
        payload["data"]["id"] = 123456789012345678901
        payload["data"]["crm_id"] = 2**64 + 1
        payload["data"]["balance"] = -(2**63) - 1
        body = json.dumps(payload).encode()
        response = self.post(acceptor, body, self.sign(body, SECRETS["outcaller"][0]))
        assert response.status_code == 200
        drain(runtime)
        (row,) = self.events_in(database_url)
        assert row["resource_id"] == "123456789012345678901"
        assert row["data"]["crm_id"] == 2**64 + 1
        assert row["data"]["id"] == 123456789012345678901
        assert row["data"]["balance"] == -(2**63) - 1
