from typing import Any, ClassVar

import orjson

from ingest.providers.mailstand import MailstandProvider
from tests.helpers import SECRETS, drain
from tests.providers.suite import SAMPLES, ProviderSuite


def _body(name: str) -> Any:
    return orjson.loads((SAMPLES / "mailstand" / name).read_bytes())


class TestMailstand(ProviderSuite):
    provider = "mailstand"
    other_provider = "salesloft"
    # Every event of the kind table, which docs/providers.md gives line for line
    # (tests/providers/test_registry.py).
    documented_kinds: ClassVar[dict[str, str]] = dict(MailstandProvider.kinds)
    expected: ClassVar[dict[str, dict[str, Any]]] = {
        "send.raw": {
            "dedup_key": "evt_sdn02n0d209dj2pk2d2d",
            "event_type": "send",
            "kind": "email.sent",
            "resource_type": "contact",
            "resource_id": "contact_abcjsod20d20kd2",  # from "to"
            "action": "send",
            "occurred_at": "2022-06-08T15:53:37Z",  # unix seconds 1654703617
            "workspace_id": "space_d2n0092jd290j2d",
            "contact_email": "lena.fischer@example.de",  # to_email, never mailbox_email
            "contact_name": None,
            "contact_phone": None,
            "campaign_id": "camp_pow0dj20jc20jkd2nx",
            "data": _body("send.raw"),
            "previous": None,
        },
        "reply_unknown_contact.raw": {
            # "from": null (contact not found), created_at as a string, and a to_email that is
            # the user's own mailbox: the contact is the sender of the reply.
            "dedup_key": "evt_r3p1y0000000000000001",
            "event_type": "reply",
            "kind": "email.replied",
            "resource_type": "contact",
            "resource_id": None,
            "action": "reply",
            "occurred_at": "2022-06-08T16:53:37Z",
            "workspace_id": "space_d2n0092jd290j2d",
            "contact_email": "john.smith@example.com",
            "contact_name": "John Smith",
            "campaign_id": "camp_pow0dj20jc20jkd2nx",
            "data": _body("reply_unknown_contact.raw"),
            "previous": None,
        },
        "stage_change.raw": {
            # created_at in milliseconds
            "dedup_key": "evt_5tag3ch4ng3000000002",
            "event_type": "stage_change",
            "kind": "contact.stage_changed",
            "resource_type": "contact",
            "resource_id": "contact_abcjsod20d20kd2",  # contact_id
            "action": "stage_change",
            "occurred_at": "2022-06-08T17:53:37Z",
            "workspace_id": "space_d2n0092jd290j2d",
            "contact_email": "lena.fischer@example.de",
            "campaign_id": "camp_pow0dj20jc20jkd2nx",
            "data": _body("stage_change.raw"),
            "previous": None,
        },
    }

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        from datetime import datetime, timezone

        event = f"spam_report_{suffix}"
        body = orjson.dumps({"id": f"evt_{suffix}", "type": event,
                             "created_at": int(datetime.now(timezone.utc).timestamp())})
        return body, {"Authorization": f"Bearer {secret}"}, event

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        payload = orjson.loads((SAMPLES / "mailstand/send.raw").read_bytes())
        payload["created_at"] = value
        return orjson.dumps(payload), {}

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Authorization": f"Bearer {secret}"}

    def body_for_event(self, event_type: str) -> bytes:
        return orjson.dumps({"id": f"evt_{event_type}", "type": event_type,
                             "workspace_id": "space_1", "contact_id": "contact_1",
                             "email": "lead@example.com", "created_at": 1654703617})

    def test_token_in_query_string_is_accepted(self, acceptor: Any, runtime: Any) -> None:
        body = self.raw("send.raw")
        response = self.post(acceptor, body, {"Content-Type": "application/json"},
                             params={"token": SECRETS["mailstand"][0]})
        assert response.status_code == 200
        assert runtime.ingest_queue.count == 1

    def test_retry_with_the_same_id_is_one_event_two_opens_are_two(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        send = _body("send.raw")
        opened = {**send, "type": "open", "id": "evt_open000000000000001"}
        retry = {**opened, "debug_attempt": 2}  # a retry keeps id and created_at
        second_open = {**opened, "id": "evt_open000000000000002", "created_at": 1654707217}
        for payload in (opened, retry, second_open):
            body = orjson.dumps(payload)
            assert self.post(acceptor, body, self.sign(body, SECRETS["mailstand"][0])).status_code == 200
        drain(runtime)
        stored = self.events_in(database_url)
        assert [r["dedup_key"] for r in stored] == ["evt_open000000000000001",
                                                    "evt_open000000000000002"]
        assert {r["kind"] for r in stored} == {"email.opened"}
