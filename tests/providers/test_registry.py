"""Meta-tests: every registered provider is tested, and every kind is in the vocabulary."""

from __future__ import annotations

import pytest

from ingest.kinds import KIND_TABLES, UNKNOWN, is_known_kind, lookup
from ingest.providers import Provider, load_providers
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


def test_every_builtin_with_a_kind_table_is_registered() -> None:
    assert set(KIND_TABLES) <= set(load_providers())


@pytest.mark.parametrize("provider", sorted(KIND_TABLES))
def test_every_kind_in_the_tables_is_a_known_kind(provider: str) -> None:
    for event_type, kind in KIND_TABLES[provider].items():
        # "call.*" -> "call.*" keeps the provider's action: check it with one filled in.
        concrete = kind[:-1] + "completed" if kind.endswith(".*") else kind
        assert is_known_kind(concrete), (provider, event_type, kind)
        assert kind != UNKNOWN


@pytest.mark.parametrize("provider", sorted(KIND_TABLES))
def test_each_documented_event_is_a_line_of_its_kind_table(provider: str) -> None:
    # The kind comes from the data table, not from code: a documented event that only maps
    # through a refinement in the provider module would hide a missing table line.
    table = KIND_TABLES[provider]
    for event_type, kind in _suites()[provider].documented_kinds.items():
        assert lookup(table, event_type) == kind, (provider, event_type)
