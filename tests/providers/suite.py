"""The shared provider suite. Each provider's test module subclasses :class:`ProviderSuite`.

It drives a real acceptor over HTTP and real RQ workers into a real Postgres, and checks what
a user relies on: a signed delivery becomes exactly one correct row; bad credentials get 401
and enqueue nothing; rotated secrets both work; copies land once; every documented event maps
to its kind, which says whether it is state or activity. A meta-test (tests/providers/test_registry.py) fails when a registered provider
has no subclass here.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import httpx
import orjson
import pytest

from ingest.events import Delivery, event_id
from ingest.kinds import is_activity, kind_class
from ingest.providers import load_providers
from ingest.providers.base import kind_classes
from tests.helpers import SECRETS, drain, rows, suites_by
from workers.normalize import normalize

SAMPLES = Path(__file__).parent.parent / "samples"
# webhook_events columns a sample's expectation must name (the contract's, minus the ones
# checked for every sample: provider, received_at, delivery_id).
EXPECTED_COLUMNS = frozenset({
    "dedup_key", "event_type", "kind", "resource_type", "resource_id", "action", "occurred_at",
    "workspace_id", "contact_email", "campaign_id", "data", "previous",
})


def classified(provider: Any, event_type: str, kind: str) -> bool:
    """True when the provider's ``kind_classes`` or the vocabulary says whether an event of
    this type and kind is state or activity (ingest.kinds), rather than the fallback."""
    overrides = kind_classes(provider)
    resource, dot, _ = event_type.partition(".")
    return (event_type in overrides or bool(dot and f"{resource}.*" in overrides)
            or kind_class(kind) is not None)


def _utc(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


def suites() -> dict[str, type[ProviderSuite]]:
    """Provider name -> its suite (tests/providers/conftest.py imports every test module)."""
    return suites_by(ProviderSuite, "provider")


def suite_of(provider: str) -> ProviderSuite:
    """An instance of the provider's suite, for tests that loop over every provider."""
    return suites()[provider]()


class ProviderSuite:
    provider: ClassVar[str]
    # sample file (under tests/samples/<provider>/) -> expected webhook_events columns
    expected: ClassVar[dict[str, dict[str, Any]]]
    # every documented event type of the provider -> the kind it must map to
    documented_kinds: ClassVar[dict[str, str]]
    # the other provider whose valid credential scheme is tried against this one
    other_provider: ClassVar[str] = "outreach"
    # stored samples whose rows the provider's module asserts in a test of its own (arrays, ...)
    samples_tested_elsewhere: ClassVar[tuple[str, ...]] = ()

    # -- what each provider module supplies ------------------------------------------------

    def sign(self, body: bytes, secret: str) -> dict[str, str]:
        """Headers that authenticate ``body`` with ``secret``."""
        raise NotImplementedError

    def body_for_event(self, event_type: str) -> bytes:
        """A body whose event type is ``event_type`` (for the table-driven kind test)."""
        raise NotImplementedError

    def headers_for_event(self, event_type: str) -> dict[str, str]:
        """Unsigned headers that name ``event_type`` where the provider sends it in a header."""
        return {}

    def unknown_delivery(self, secret: str, suffix: str) -> tuple[bytes, dict[str, str], str]:
        """A delivery authenticated with ``secret`` whose event type (ending in ``suffix``) no
        kind table knows, as if the provider sent something new: body, headers, event type
        (tests/providers/test_mixed_traffic.py)."""
        raise NotImplementedError

    def with_time(self, value: str) -> tuple[bytes, dict[str, str]]:
        """One stored sample whose optional timestamp is ``value``, and its unsigned headers
        (tests/providers/test_normalization_drift.py)."""
        raise NotImplementedError

    def reserialize(self, body: bytes) -> bytes:
        """The same event with different bytes (key order, whitespace), as a proxy might."""
        return orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)

    # -- helpers ----------------------------------------------------------------------------

    def raw(self, name: str) -> bytes:
        return (SAMPLES / self.provider / name).read_bytes()

    def sample_headers(self, name: str) -> dict[str, str]:
        """The request headers captured with a sample (``<name>.headers.json``), if any:
        live deliveries carry headers (tenant, event name) the normalizer reads."""
        path = (SAMPLES / self.provider / name).with_suffix(".headers.json")
        return orjson.loads(path.read_bytes()) if path.is_file() else {}

    @property
    def first_sample(self) -> str:
        return sorted(self.expected)[0]

    def url(self, acceptor: Any) -> str:
        return f"{acceptor.url}/webhooks/{self.provider}"

    def post(self, acceptor: Any, body: bytes, headers: dict[str, str],
             params: dict[str, str] | None = None) -> httpx.Response:
        return httpx.post(self.url(acceptor), content=body, headers=headers, params=params,
                          timeout=10)

    def events_in(self, database_url: str) -> list[dict[str, Any]]:
        return rows(database_url, "SELECT * FROM webhook_events WHERE provider = %s ORDER BY "
                                  "dedup_key", self.provider)

    # -- the suite --------------------------------------------------------------------------

    def test_expectations_name_every_contract_column(self) -> None:
        assert self.expected, "a provider suite needs at least one stored sample"
        for name, expected in self.expected.items():
            assert (SAMPLES / self.provider / name).is_file(), name
            missing = EXPECTED_COLUMNS - expected.keys()
            assert not missing, f"{name}: expectation lacks {sorted(missing)}"

    def test_every_stored_sample_is_expected_and_has_a_source(self) -> None:
        stored = {p.name for p in (SAMPLES / self.provider).glob("*.raw")}
        unexpected = stored - set(self.expected) - set(self.samples_tested_elsewhere)
        assert not unexpected, f"samples nobody asserts: {sorted(unexpected)}"
        sources = (SAMPLES / "SOURCES.md").read_text()
        for name in stored:
            assert f"{self.provider}/{name}" in sources, f"{name} is not in SOURCES.md"

    def test_valid_delivery_becomes_one_correct_row(self, acceptor: Any, runtime: Any,
                                                    database_url: str) -> None:
        before = datetime.now(timezone.utc)
        for name in sorted(self.expected):
            body = self.raw(name)
            headers = {**self.sign(body, SECRETS[self.provider][0]), **self.sample_headers(name)}
            response = self.post(acceptor, body, headers)
            assert response.status_code == 200, (name, response.text)
            assert response.json() == {"status": "accepted"}
        drain(runtime)
        stored = {r["dedup_key"]: r for r in self.events_in(database_url)}
        assert len(stored) == len(self.expected)
        for name, expected in self.expected.items():
            row = stored.get(expected["dedup_key"])
            assert row is not None, f"{name}: no row with dedup_key {expected['dedup_key']!r}"
            for column, value in expected.items():
                actual = row[column]
                if column == "occurred_at":
                    assert actual == _utc(value), (name, column)
                else:
                    assert actual == value, (name, column, actual)
            assert row["provider"] == self.provider
            assert str(row["id"]) == event_id(self.provider, expected["dedup_key"])
            assert before - timedelta(seconds=1) <= row["received_at"] <= datetime.now(timezone.utc)
            delivery = rows(database_url, "SELECT * FROM webhook_deliveries WHERE id = %s",
                            row["delivery_id"])
            assert len(delivery) == 1, name
            assert bytes(delivery[0]["body"]) == self.raw(name), "archive must keep exact bytes"
            stored_headers = " ".join(f"{k}: {v}" for k, v in delivery[0]["headers"].items())
            for secret in SECRETS[self.provider]:
                assert secret not in stored_headers
            assert "authorization" not in delivery[0]["headers"]
            kept = load_providers()[self.provider].kept_headers
            for header, value in self.sample_headers(name).items():
                if header.lower() in kept:
                    assert delivery[0]["headers"].get(header.lower()) == value, (name, header)

    def _assert_nothing_enqueued(self, runtime: Any) -> None:
        assert runtime.ingest_queue.count == 0
        assert runtime.redis.keys(f"rq:job:{runtime.names.namespace}*") == []

    def test_wrong_credential_is_401_and_enqueues_nothing(self, acceptor: Any,
                                                          runtime: Any) -> None:
        body = self.raw(self.first_sample)
        response = self.post(acceptor, body, self.sign(body, "not-the-secret-at-all"))
        assert response.status_code == 401
        assert "error" in response.json()
        self._assert_nothing_enqueued(runtime)

    def test_missing_credential_is_401(self, acceptor: Any, runtime: Any) -> None:
        body = self.raw(self.first_sample)
        response = self.post(acceptor, body, {"Content-Type": "application/json"})
        assert response.status_code == 401
        self._assert_nothing_enqueued(runtime)

    def test_other_providers_credential_is_401(self, acceptor: Any, runtime: Any) -> None:
        other = load_providers()[self.other_provider]
        body = self.raw(self.first_sample)
        # A valid credential of another provider, in that provider's own scheme.
        suite = next(c for c in ProviderSuite.__subclasses__() if c.provider == other.name)
        headers = suite().sign(body, SECRETS[other.name][0])
        response = self.post(acceptor, body, headers)
        assert response.status_code == 401
        self._assert_nothing_enqueued(runtime)

    def test_signature_over_other_bytes_is_401(self, acceptor: Any, runtime: Any) -> None:
        body = self.raw(self.first_sample)
        headers = self.sign(body, SECRETS[self.provider][0])
        response = self.post(acceptor, body + b" ", headers)
        # Token providers do not sign the body; for them, extra bytes are still authentic.
        if self.signs_body:
            assert response.status_code == 401
            self._assert_nothing_enqueued(runtime)
        else:
            assert response.status_code == 200

    @property
    def signs_body(self) -> bool:
        body = self.raw(self.first_sample)
        return self.sign(body, "k") != self.sign(body + b" ", "k")

    def test_rotated_secrets_old_and_new_both_accepted(self, acceptor: Any, runtime: Any,
                                                       database_url: str) -> None:
        body = self.raw(self.first_sample)
        for secret in SECRETS[self.provider]:
            response = self.post(acceptor, body, self.sign(body, secret))
            assert response.status_code == 200, secret
        drain(runtime)
        assert len(self.events_in(database_url)) == 1  # the same event twice: one row

    def test_twenty_concurrent_copies_yield_one_row(self, acceptor: Any, runtime: Any,
                                                    database_url: str) -> None:
        body = self.raw(self.first_sample)
        headers = self.sign(body, SECRETS[self.provider][0])

        async def fire() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as client:
                answers = await asyncio.gather(*(
                    client.post(self.url(acceptor), content=body, headers=headers)
                    for _ in range(20)))
            return [a.status_code for a in answers]

        assert asyncio.run(fire()) == [200] * 20
        drain(runtime)
        assert len(self.events_in(database_url)) == 1
        assert rows(database_url, "SELECT count(*) AS n FROM webhook_deliveries")[0]["n"] == 1

    def test_reserialized_copy_is_a_duplicate(self, acceptor: Any, runtime: Any,
                                              database_url: str) -> None:
        body = self.raw(self.first_sample)
        other = self.reserialize(body)
        assert other != body
        for payload in (body, other):
            response = self.post(acceptor, payload, self.sign(payload, SECRETS[self.provider][0]))
            assert response.status_code == 200
        drain(runtime)
        assert len(self.events_in(database_url)) == 1

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "event_type" in metafunc.fixturenames:
            table = sorted(metafunc.cls.documented_kinds.items())
            metafunc.parametrize(("event_type", "kind"), table, ids=[t for t, _ in table])

    def test_documented_event_maps_to_its_kind(self, event_type: str, kind: str) -> None:
        provider = load_providers()[self.provider]
        delivery = Delivery(id="00000000-0000-4000-8000-000000000000", provider=self.provider,
                            received_at=datetime.now(timezone.utc),
                            headers=self.headers_for_event(event_type),
                            body=self.body_for_event(event_type).decode())
        events = normalize({self.provider: provider}, delivery)
        assert events, event_type
        assert {e.kind for e in events} == {kind}, event_type
        assert all(e.event_type == event_type for e in events)
        # ... and says whether it is state or activity (a new kind needs kind_classes).
        assert classified(provider, event_type, kind), f"{event_type}: state or activity?"
        assert all(e.activity is is_activity(kind, event_type, kind_classes(provider))
                   for e in events)
