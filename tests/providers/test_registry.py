"""Meta-tests: every registered provider is tested, and every kind is in the vocabulary."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from ingest.events import Delivery

from ingest.kinds import UNKNOWN, is_known_kind, lookup
from ingest.providers import Provider, load_providers
from ingest.providers.base import KindTable, SampleSource
from tests.providers.suite import ProviderSuite


def _suites() -> dict[str, type[ProviderSuite]]:
    found: dict[str, type[ProviderSuite]] = {}
    pending = list(ProviderSuite.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "provider" in cls.__dict__:
            found[cls.provider] = cls
    return found


def test_every_registered_provider_has_a_provider_suite() -> None:
    # tests/providers/conftest.py imports every test module, so this holds for any selection.
    missing = sorted(set(load_providers()) - set(_suites()))
    assert not missing, f"registered providers without a ProviderSuite subclass: {missing}"


def test_every_suite_tests_a_registered_provider() -> None:
    stale = sorted(set(_suites()) - set(load_providers()))
    assert not stale, f"suites for providers that are not registered: {stale}"


def test_registered_providers_satisfy_the_protocol() -> None:
    for name, provider in load_providers().items():
        assert isinstance(provider, Provider), name
        assert provider.name == name
        assert provider.secret_setting.isupper() and provider.secret_setting.startswith(
            name.upper()), name


def _tables() -> dict[str, KindTable]:
    return {name: p for name, p in load_providers().items() if isinstance(p, KindTable)}


def test_every_builtin_holds_its_own_kind_table_and_sample_builder() -> None:
    # A built-in looks like the plugin it asks others to write: one module, its own table and
    # samples, registered through an entry point.
    builtins = {name: p for name, p in load_providers().items()
                if type(p).__module__.startswith("ingest.providers.")}
    assert {"outreach", "salesloft", "outcaller", "outboundry", "mailstand"} <= set(builtins)
    for name, provider in builtins.items():
        assert isinstance(provider, KindTable) and provider.kinds, name
        assert isinstance(provider, SampleSource), name
        assert type(provider).__module__ == f"ingest.providers.{name}", name


@pytest.mark.parametrize("provider", sorted(_tables()))
def test_every_kind_in_the_tables_is_a_known_kind(provider: str) -> None:
    for event_type, kind in _tables()[provider].kinds.items():
        # "call.*" -> "call.*" keeps the provider's action: check it with one filled in.
        concrete = kind[:-1] + "completed" if kind.endswith(".*") else kind
        assert is_known_kind(concrete), (provider, event_type, kind)
        assert kind != UNKNOWN


@pytest.mark.parametrize("provider", sorted(_tables()))
def test_each_documented_event_is_a_line_of_its_kind_table(provider: str) -> None:
    # The kind comes from the data table, not from code: a documented event that only maps
    # through a refinement in the provider module would hide a missing table line.
    table = _tables()[provider].kinds
    for event_type, kind in _suites()[provider].documented_kinds.items():
        assert lookup(table, event_type) == kind, (provider, event_type)


@pytest.mark.parametrize("provider", sorted(n for n, p in load_providers().items()
                                            if isinstance(p, SampleSource)))
def test_every_sample_builder_makes_deliveries_its_provider_verifies_and_maps(
        provider: str) -> None:
    source = load_providers()[provider]
    assert isinstance(source, SampleSource)
    rng = random.Random(7)
    for n in range(20):
        body, headers = source.sample(rng, "sample-secret")
        lowered = {k.lower(): v for k, v in headers.items()}
        source.verify(lowered, body, ["sample-secret"], {})
        delivery = Delivery(id=f"d{n}", provider=provider, received_at=datetime.now(timezone.utc),
                            headers={k: v for k, v in lowered.items() if k in source.kept_headers},
                            body=body.decode())
        events = source.events(delivery)
        assert events and all(e.kind != UNKNOWN for e in events), (provider, body)
