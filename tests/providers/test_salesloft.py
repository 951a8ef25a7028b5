import hashlib
import hmac
from datetime import datetime, timezone
from typing import Any, ClassVar

import orjson
import pytest
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from ingest.providers.salesloft import SalesloftProvider
from ingest.events import Delivery
from ingest.exceptions import NormalizationError
from ingest.providers import load_providers
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import SAMPLES, ProviderSuite


ARRAY = orjson.loads((SAMPLES / "salesloft/cadence_membership_created_array.raw").read_bytes())


def _sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def _membership(member_id: int, person_id: int, updated_at: str) -> dict[str, Any]:
    return {"id": member_id, "created_at": updated_at, "updated_at": updated_at,
            "current_state": "staged", "currently_on_cadence": True,
            "cadence": {"_href": "https://api.salesloft.com/v2/cadences/12", "id": 12},
            "person": {"_href": f"https://api.salesloft.com/v2/people/{person_id}",
                       "id": person_id}}


def _raw(name: str) -> Any:
    return orjson.loads((SAMPLES / "salesloft" / name).read_bytes())


class TestSalesloft(ProviderSuite):
    provider = "salesloft"
    other_provider = "outreach"
    # Every event of the kind table, which docs/providers.md gives line for line
    # (tests/providers/test_registry.py).
    documented_kinds: ClassVar[dict[str, str]] = dict(SalesloftProvider.kinds)
    expected: ClassVar[dict[str, dict[str, Any]]] = {
        "person_updated_bare.raw": {
            # The bare resource: numeric id, a +02:00 offset; event name from the header.
            "dedup_key": "person_updated|1042|2026-06-04T05:49:10.221000+00:00",
            "event_type": "person_updated",
            "kind": "contact.updated",
            "resource_type": "person",
            "resource_id": "1042",
            "action": "updated",
            "occurred_at": "2026-06-04T05:49:10.221Z",
            "workspace_id": None,
            "contact_email": "maria.gonzalez@example.com",
            "contact_name": "Maria Gonzalez",
            "contact_phone": "+1 415 555 0134",
            "campaign_id": None,
            "data": orjson.loads((SAMPLES / "salesloft/person_updated_bare.raw").read_bytes()),
            "previous": None,
        },
        "email_updated_bounced_wrapper.raw": {
            # The {"event_type", "data"} wrapper; bounced refines email.updated.
            "dedup_key": "email_updated|88312|2026-06-04T05:41:12.500000+00:00",
            "event_type": "email_updated",
            "kind": "email.bounced",
            "resource_type": "email",
            "resource_id": "88312",
            "action": "updated",
            "occurred_at": "2026-06-04T05:41:12.5Z",
            "workspace_id": None,
            "contact_email": "ben.okafor@example.org",
            "contact_name": None,
            "campaign_id": "5",  # "cadence": {"_href": ..., "id": 5}
            "data": orjson.loads(
                (SAMPLES / "salesloft/email_updated_bounced_wrapper.raw").read_bytes())["data"],
            "previous": None,
        },
        # -- captured from live accounts (tests/samples/SOURCES.md) --------------------------
        "task_created_bare.raw": {
            # A creation is dated by created_at; the person is only referenced, so no contact.
            "dedup_key": "task_created|721356732|2026-01-22T06:22:45.587713+00:00",
            "event_type": "task_created",
            "kind": "task.created",
            "resource_type": "task",
            "resource_id": "721356732",
            "action": "created",
            "occurred_at": "2026-01-22T06:22:45.587713Z",  # sent as -05:00
            "workspace_id": None,
            "contact_email": None,
            "contact_name": None,
            "contact_phone": None,
            "campaign_id": None,
            "data": _raw("task_created_bare.raw"),
            "previous": None,
        },
        "task_updated_bare.raw": {
            "dedup_key": "task_updated|721356732|2026-01-22T07:31:27.782586+00:00",
            "event_type": "task_updated",
            "kind": "task.updated",
            "resource_type": "task",
            "resource_id": "721356732",
            "action": "updated",
            "occurred_at": "2026-01-22T07:31:27.782586Z",  # updated_at, not created_at
            "workspace_id": None,
            "contact_email": None,
            "campaign_id": None,
            "data": _raw("task_updated_bare.raw"),
            "previous": None,
        },
        "task_updated_example.raw": {
            "dedup_key": "task_updated|693873531|2025-11-20T12:21:16.193200+00:00",
            "event_type": "task_updated",
            "kind": "task.updated",
            "resource_type": "task",
            "resource_id": "693873531",
            "action": "updated",
            "occurred_at": "2025-11-20T12:21:16.1932Z",
            "workspace_id": None,
            "contact_email": None,
            "campaign_id": None,
            "data": _raw("task_updated_example.raw"),
            "previous": None,
        },
        "account_deleted_bare.raw": {
            # An account is not a person: its "name" (Puma) and "phone" are not a contact's.
            "dedup_key": "account_deleted|48371772|2026-01-22T07:45:21.340083+00:00",
            "event_type": "account_deleted",
            "kind": "account.deleted",
            "resource_type": "account",
            "resource_id": "48371772",
            "action": "deleted",
            "occurred_at": "2026-01-22T07:45:21.340083Z",
            "workspace_id": None,
            "contact_email": None,
            "contact_name": None,
            "contact_phone": None,
            "campaign_id": None,
            "data": _raw("account_deleted_bare.raw"),
            "previous": None,
        },
        "account_updated_bare.raw": {
            "dedup_key": "account_updated|75464484|2026-01-29T23:20:20.346346+00:00",
            "event_type": "account_updated",
            "kind": "account.updated",
            "resource_type": "account",
            "resource_id": "75464484",
            "action": "updated",
            "occurred_at": "2026-01-29T23:20:20.346346Z",
            "workspace_id": None,
            "contact_email": None,
            "contact_name": None,
            "campaign_id": None,
            "data": _raw("account_updated_bare.raw"),
            "previous": None,
        },
    }
    samples_tested_elsewhere = ("cadence_membership_created_array.raw",)

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        import hashlib
        import hmac
        from datetime import datetime, timezone

        event = f"opportunity_stage_changed_{suffix}"
        body = orjson.dumps({"id": 1, "updated_at": datetime.now(timezone.utc).isoformat()})
        sig = hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
        return body, {"x-salesloft-signature": sig, "x-salesloft-event": event}, event

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        payload = orjson.loads((SAMPLES / "salesloft/person_updated_bare.raw").read_bytes())
        payload["updated_at"] = payload["created_at"] = value
        return orjson.dumps(payload), {"x-salesloft-event": "person_updated"}

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        try:
            event = orjson.loads(body).get("event_type") or "person_updated"
        except orjson.JSONDecodeError:
            event = "person_updated"
        return {"Content-Type": "application/json", "x-salesloft-event": event,
                "x-salesloft-signature": _sign(body, secret)}

    def body_for_event(self, event_type: str) -> bytes:
        return orjson.dumps({"id": 7, "updated_at": "2026-01-01T00:00:00Z"})

    def headers_for_event(self, event_type: str) -> dict[str, str]:
        return {"x-salesloft-event": event_type}

    def post_array(self, acceptor: Any, elements: list[dict[str, Any]]) -> None:
        body = orjson.dumps({"event_type": "cadence_membership_created", "data": elements})
        response = self.post(acceptor, body, self.sign(body, SECRETS["salesloft"][0]))
        assert response.status_code == 200

    def test_stored_array_sample_gives_one_full_row_per_element(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        body = self.raw("cadence_membership_created_array.raw")
        assert self.post(acceptor, body, self.sign(body, SECRETS["salesloft"][1])).status_code == 200
        drain(runtime)
        stored = self.events_in(database_url)
        assert [r["dedup_key"] for r in stored] == [
            "cadence_membership_created|9001|2026-06-04T05:00:00+00:00",
            "cadence_membership_created|9002|2026-06-04T05:00:01+00:00",  # sent as +05:30
        ]
        for row, element in zip(stored, ARRAY["data"]):
            assert row["event_type"] == "cadence_membership_created"
            assert row["kind"] == "campaign.added"
            assert (row["resource_type"], row["action"]) == ("cadence_membership", "created")
            assert row["resource_id"] == str(element["id"])
            assert row["campaign_id"] == "5"
            assert row["contact_email"] is None and row["workspace_id"] is None
            assert row["data"] == element, "data is the element, not the whole array"
            assert row["previous"] is None
        assert len({r["delivery_id"] for r in stored}) == 1

    def test_array_of_three_then_redelivery_with_one_new_adds_only_that_one(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        first = [_membership(100 + i, 500 + i, f"2026-06-04T06:0{i}:00Z") for i in range(3)]
        self.post_array(acceptor, first)
        drain(runtime)
        before = {r["dedup_key"]: r for r in self.events_in(database_url)}
        assert len(before) == 3
        assert {r["resource_id"] for r in before.values()} == {"100", "101", "102"}

        newcomer = _membership(103, 503, "2026-06-04T06:09:00Z")
        # The same three (in another order) and one new element, in one new delivery.
        self.post_array(acceptor, [first[2], newcomer, first[0], first[1]])
        drain(runtime)
        after = {r["dedup_key"]: r for r in self.events_in(database_url)}
        assert len(after) == 4
        (added,) = set(after) - set(before)
        assert after[added]["resource_id"] == "103"
        assert after[added]["data"] == newcomer
        for key, row in before.items():
            assert after[key]["delivery_id"] == row["delivery_id"], "old rows are untouched"
        assert after[added]["delivery_id"] not in {r["delivery_id"] for r in before.values()}

    def test_event_header_is_kept_and_signature_is_not(self, acceptor: Any, runtime: Any,
                                                      database_url: str) -> None:
        body = self.raw("person_updated_bare.raw")
        assert self.post(acceptor, body, self.sign(body, SECRETS["salesloft"][0])).status_code == 200
        drain(runtime)
        (delivery,) = rows(database_url, "SELECT headers FROM webhook_deliveries")
        assert delivery["headers"] == {"x-salesloft-event": "person_updated"}

    def test_bare_resource_without_event_header_fails_alone_with_the_reason(
        self, acceptor: Any, runtime: Any, database_url: str
    ) -> None:
        body = self.raw("person_updated_bare.raw")
        headers = {"x-salesloft-signature": _sign(body, SECRETS["salesloft"][0])}
        assert self.post(acceptor, body, headers).status_code == 200  # authentic, so durable
        drain(runtime)
        assert self.events_in(database_url) == []
        # Kept with its reason: in the failed registry, or (while the batch job's own retries
        # last) scheduled to run again. Never dropped.
        queue = runtime.ingest_queue
        kept = (FailedJobRegistry(queue=queue).get_job_ids()
                + ScheduledJobRegistry(queue=queue).get_job_ids())  # type: ignore[no-untyped-call]
        assert len(kept) == 1, "an event that cannot be identified is never dropped silently"
        job = queue.fetch_job(kept[0])
        assert [Delivery.from_dict(e).body for e in job.args[0]] == [body.decode()]
        with pytest.raises(NormalizationError, match="x-salesloft-event"):
            load_providers()["salesloft"].events(Delivery.from_dict(job.args[0][0]))

    def _kinds(self, event_type: str, resource: dict[str, Any]) -> list[str]:
        delivery = Delivery(id="00000000-0000-4000-8000-000000000001", provider="salesloft",
                            received_at=datetime.now(timezone.utc),
                            headers={"x-salesloft-event": event_type},
                            body=orjson.dumps(resource).decode())
        return [e.kind for e in load_providers()["salesloft"].events(delivery)]

    def test_email_updated_is_refined_only_by_a_bounce(self) -> None:
        email = {"id": 1, "updated_at": "2026-06-04T05:41:12Z", "status": "sent"}
        assert self._kinds("email_updated", email) == ["email.updated"]
        assert self._kinds("email_updated", {**email, "bounced": True}) == ["email.bounced"]
        assert self._kinds("email_updated", {**email, "status": "bounced"}) == ["email.bounced"]

    def test_cadence_membership_update_is_refined_by_its_state(self) -> None:
        member = _membership(1, 2, "2026-06-04T05:41:12Z")
        for state, kind in [("paused", "campaign.paused"), ("completed", "campaign.finished"),
                            ("removed", "campaign.removed"), ("active", "campaign.updated")]:
            assert self._kinds("cadence_membership_updated",
                               {**member, "current_state": state}) == [kind], state

    def test_unknown_event_name_is_kept_as_unknown(self) -> None:
        assert self._kinds("opportunity_stage_changed", {"id": 3}) == ["unknown"]


# -- live shapes, field by field ----------------------------------------------------------------
# Hand-made resources in the REST shapes Salesloft's webhooks mirror; no live capture of a
# meeting, call or embedded person was found (tests/samples/SOURCES.md).

def _one(event_type: str, resource: dict[str, Any]) -> Any:
    delivery = Delivery(id="00000000-0000-4000-8000-0000000000bb", provider="salesloft",
                        received_at=datetime(2026, 6, 4, 6, 0, tzinfo=timezone.utc),
                        headers={"x-salesloft-event": event_type},
                        body=orjson.dumps(resource).decode())
    (event,) = load_providers()["salesloft"].events(delivery)
    return event


BASE = {"id": 77, "created_at": "2026-06-04T05:00:00.000000Z",
        "updated_at": "2026-06-04T05:30:00.000000Z"}


def test_meeting_booked_names_its_attendee() -> None:
    event = _one("meeting_booked", {**BASE, "recipient_email": "ada@example.com",
                                    "recipient_name": "Ada Lovelace", "title": "Intro call",
                                    "cadence": {"_href": "https://api.salesloft.com/v2/cadences/5",
                                                "id": 5},
                                    "person": {"_href": "https://api.salesloft.com/v2/people/1",
                                               "id": 1}})
    assert (event.contact.email, event.contact.name) == ("ada@example.com", "Ada Lovelace")
    assert event.campaign_id == "5"
    assert event.fallbacks == ()


def test_an_email_names_its_recipient() -> None:
    event = _one("email_updated", {**BASE, "recipient_email_address": "ben@example.org",
                                   "recipient_name": "Ben Okafor", "cadence": None})
    assert (event.contact.email, event.contact.name) == ("ben@example.org", "Ben Okafor")
    assert event.campaign_id is None  # "cadence": null


def test_an_embedded_person_gives_the_contact() -> None:
    person = {"id": 1, "email_address": "cy@example.com", "first_name": "Cy",
              "last_name": "Young", "home_phone": "+1 555 0100"}
    event = _one("cadence_membership_updated", {**BASE, "person": person,
                                                "cadence": {"id": 12}, "current_state": "active"})
    assert event.contact.to_dict() == {"email": "cy@example.com", "name": "Cy Young",
                                       "phone": "+1 555 0100"}
    assert event.campaign_id == "12"


def test_phone_from_phone_mobile_home_or_a_calls_number() -> None:
    assert _one("person_updated", {**BASE, "mobile_phone": "+1 2"}).contact.phone == "+1 2"
    assert _one("person_updated", {**BASE, "home_phone": "+1 3"}).contact.phone == "+1 3"
    call = _one("call_created", {**BASE, "to": "+44 20 7946 0000", "duration": 31})
    assert call.contact.phone == "+44 20 7946 0000"
    # An account's phone is the company's, not a contact's; a user is a rep, not a contact.
    assert _one("account_updated", {**BASE, "phone": "+1 4", "name": "Acme"}).contact is None
    assert _one("user_updated", {**BASE, "email_address": "rep@acme.example"}).contact is None


def test_creations_are_dated_by_created_at_and_updates_by_updated_at() -> None:
    assert _one("person_created", BASE).occurred_at == datetime(2026, 6, 4, 5, tzinfo=timezone.utc)
    assert _one("person_updated", BASE).occurred_at == datetime(2026, 6, 4, 5, 30,
                                                               tzinfo=timezone.utc)
    undated = _one("person_updated", {"id": 77, "email_address": "a@b.example"})
    assert undated.occurred_at == undated.received_at
    assert undated.fallbacks == ("occurred_at",)


def test_missing_fields_a_resource_type_should_carry_are_fallbacks() -> None:
    assert _one("meeting_booked", BASE).fallbacks == ("contact_email",)
    assert _one("cadence_membership_created", {**BASE, "cadence": None}).fallbacks == (
        "campaign_id",)
    assert _one("task_created", BASE).fallbacks == ()  # a task need not name either
