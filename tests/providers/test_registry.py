"""Meta-tests: every registered provider is tested, every kind is in the vocabulary and says
whether it is state or activity, and docs/providers.md gives every table as the code has it."""

from __future__ import annotations

import random
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ingest.events import Delivery

from ingest.kinds import ACTIVITY, STATE, UNKNOWN, is_activity, is_known_kind, kind_class, lookup
from ingest.providers import Provider, load_providers
from ingest.providers.base import KindTable, SampleSource, kind_classes
from tests.providers.suite import ProviderSuite, classified, suites

DOCS = Path(__file__).resolve().parents[2] / "docs" / "providers.md"


def _suites() -> dict[str, type[ProviderSuite]]:
    return suites()


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
def test_every_kind_in_the_tables_says_state_or_activity(provider: str) -> None:
    table = _tables()[provider]
    unclassified = [(event_type, kind) for event_type, kind in table.kinds.items()
                    if not classified(table, event_type, kind)]
    assert not unclassified, f"say state or activity for these (kind_classes): {unclassified}"
    assert set(kind_classes(table).values()) <= {STATE, ACTIVITY}
    assert kind_class(UNKNOWN) == ACTIVITY


_SECTIONS = {"Outreach": "outreach", "Salesloft": "salesloft", "OutCallerAI": "outcaller",
             "Outboundry": "outboundry", "Mailstand": "mailstand"}
_ROW = re.compile(r"^\| `([^`]+)` \| `([^`]+)` \| (state|activity)\b")


def test_the_docs_give_every_event_its_kind_and_class() -> None:
    """docs/providers.md's "event | kind | class" tables are the code's tables, line for line."""
    documented: dict[str, dict[str, tuple[str, str]]] = {}
    provider = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            provider = _SECTIONS.get(line[3:].strip())
        found = _ROW.match(line)
        if provider and found:
            event_type, kind, cls = found.groups()
            documented.setdefault(provider, {})[event_type] = (kind, cls)
    providers = load_providers()
    assert set(documented) == set(_SECTIONS.values())
    for name, rows in documented.items():
        table = _tables()[name]
        assert set(rows) == set(table.kinds), name
        for event_type, (kind, cls) in rows.items():
            assert table.kinds[event_type] == kind, (name, event_type)
            activity = is_activity(kind, event_type, kind_classes(providers[name]))
            assert cls == (ACTIVITY if activity else STATE), (name, event_type)


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


def test_the_example_plugin_in_the_docs_is_the_tested_one() -> None:
    """docs/providers.md shows tests/plugins/example_provider's module as it is, verbatim."""
    module = (Path(__file__).resolve().parents[1] / "plugins" / "example_provider"
              / "acme_webhooks" / "__init__.py").read_text()
    shown = DOCS.read_text().split("# acme_webhooks/__init__.py\n", 1)[1].split("\n```", 1)[0]
    assert shown.rstrip("\n") == module.rstrip("\n")
