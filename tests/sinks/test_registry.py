"""Meta-tests: every built-in sink is registered like a plugin, satisfies the protocol, and
has a test module of its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import pytest

from ingest import constants
from ingest.config import Settings
from ingest.events import Delivery, Event
from ingest.exceptions import ConfigError, PermanentSinkError
from sinks.base import Sink
from sinks.registry import EnabledSink, build_sinks, load_sink_classes

HERE = Path(__file__).parent


def _built_in() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=constants.SINK_ENTRY_POINT_GROUP)
                  if ep.dist is not None and ep.dist.name == "webhook-ingest")


def test_the_built_in_sinks_are_registered_through_entry_points() -> None:
    assert _built_in() == ["crm", "postgres", "slack"]
    classes = load_sink_classes()
    for name in _built_in():
        assert classes[name].name == name
        assert all(isinstance(g, str) and g for g in classes[name].default_events)


def _suites() -> dict[str, type]:
    """Sink name -> its SinkSuite subclass, in every test module of this folder."""
    import importlib

    from tests.helpers import suites_by
    from tests.sinks.suite import SinkSuite

    for path in sorted(HERE.glob("test_*.py")):
        importlib.import_module(f"tests.sinks.{path.stem}")
    return suites_by(SinkSuite, "sink")


def test_every_registered_sink_and_the_example_plugin_run_the_shared_suite() -> None:
    suites = _suites()
    missing = sorted(set(load_sink_classes()) - set(suites))
    assert not missing, f"registered sinks without a SinkSuite subclass: {missing}"
    assert "jsonl" in suites  # the example plugin (tests/plugins/example_sink)


def _example_plugin_sink() -> type:
    """The example plugin's sink class, from its source (the suite itself pip-installs it)."""
    import importlib.util

    path = HERE.parent / "plugins" / "example_sink" / "webhook_ingest_jsonl" / "__init__.py"
    spec = importlib.util.spec_from_file_location("example_jsonl_source", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.JsonlSink  # type: ignore[no-any-return]


def test_every_suite_tests_each_capability_its_sink_offers_and_no_other() -> None:
    from tests.sinks.suite import ErasingSinkSuite, ExpiringSinkSuite

    classes = {**load_sink_classes(), "jsonl": _example_plugin_sink()}
    for name, suite in _suites().items():
        sink = classes[name]
        for capability, mixin in (("erase", ErasingSinkSuite), ("expire", ExpiringSinkSuite)):
            offers = callable(getattr(sink, capability, None))
            assert issubclass(suite, mixin) is offers, (
                f"{suite.__name__}: the {name} sink {'offers' if offers else 'has no'} "
                f"{capability}(): {'subclass' if offers else 'do not subclass'} {mixin.__name__}")


@pytest.mark.parametrize("name", _built_in())
def test_every_built_in_sink_has_its_own_test_module(name: str) -> None:
    assert (HERE / f"test_{name}.py").is_file(), f"sink {name!r} has no tests/sinks/test_{name}.py"


def test_built_sinks_satisfy_the_protocol_and_events_globs_are_read() -> None:
    settings = Settings.from_env({
        "INGEST_SINKS": "crm,slack", "REDIS_URL": "redis://127.0.0.1:1/0",
        "CRM_WEBHOOK_URL": "https://crm.example/hook",
        "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "CRM_EVENTS": "email.*, meeting.booked",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/X"})
    built = build_sinks(settings)
    assert all(isinstance(b.sink, Sink) for b in built.values())
    assert built["crm"].events == ("email.*", "meeting.booked")
    assert built["slack"].events == ("email.replied", "linkedin.*_replied", "meeting.booked")
    with pytest.raises(ConfigError) as info:
        build_sinks(Settings.from_env({"INGEST_SINKS": "crm", "CRM_EVENTS": " , ",
                                       "CRM_WEBHOOK_URL": "https://crm.example/hook",
                                       "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}))
    assert info.value.variable == "CRM_EVENTS"


# -- EnabledSink: the one way a sink is called ------------------------------------------------


class _Recording:
    """A sink that keeps what it was handed (and can refuse some events)."""

    name: ClassVar[str] = "recording"
    default_events: ClassVar[tuple[str, ...]] = ("*",)

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str] | None]] = []
        self.refuse: list[str] | None = None
        self.closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> _Recording:
        return cls()

    def send(self, events: Sequence[Event]) -> None:
        self.calls.append(([e.id for e in events], None))
        if self.refuse is not None:
            raise PermanentSinkError("refused", event_ids=self.refuse or None)

    def close(self) -> None:
        self.closed = True


class _Raw(_Recording):
    needs_raw: ClassVar[bool] = True

    def send(self, events: Sequence[Event],  # type: ignore[override]
             deliveries: Mapping[str, Delivery] | None = None) -> None:
        self.calls.append(([e.id for e in events],
                           None if deliveries is None else sorted(deliveries)))


class _RawOff(_Raw):
    needs_raw: ClassVar[bool] = False


def _events() -> tuple[list[Event], dict[str, Delivery]]:
    from ingest.providers import load_providers
    from tests.sinks.conftest import outboundry_delivery

    deliveries = [Delivery.from_dict(outboundry_delivery(event)) for event in
                  ("email-replied", "invite-sent", "message-replied")]
    provider = load_providers()["outboundry"]
    return ([e for d in deliveries for e in provider.events(d)],
            {d.id: d for d in deliveries} | {"unrelated": deliveries[0]})


def test_enabled_sink_hands_raw_deliveries_only_to_a_sink_that_asks_for_them() -> None:
    events, deliveries = _events()
    used = sorted(e.delivery_id for e in events[:2])
    for cls, expected in ((_Recording, None), (_Raw, used), (_RawOff, None)):
        sink = cls()
        EnabledSink(sink, ("*",)).send(events[:2], deliveries)
        # The raw deliveries go along only those the events came from; a sink that does not
        # want them is called with the events alone (its send takes no second argument).
        assert sink.calls == [([e.id for e in events[:2]], expected)], cls.__name__


def test_enabled_sink_filters_by_kind_and_closes_the_sink() -> None:
    events, _ = _events()
    sink = _Recording()
    enabled = EnabledSink(sink, ("linkedin.*",))
    assert [e.kind for e in events if enabled.wants(e)] == ["linkedin.invite_sent",
                                                           "linkedin.message_replied"]
    assert enabled.update(events) is False  # it keeps nothing to rewrite
    enabled.close()
    assert sink.closed


def test_a_permanent_error_always_names_the_failed_events() -> None:
    events, _ = _events()
    sink = _Recording()
    enabled = EnabledSink(sink, ("*",))
    sink.refuse = [events[1].id]
    with pytest.raises(PermanentSinkError) as info:
        enabled.send(events)
    assert info.value.event_ids == [events[1].id]
    sink.refuse = []  # the sink named none: the whole batch failed
    with pytest.raises(PermanentSinkError) as info:
        enabled.send(events)
    assert info.value.event_ids == [e.id for e in events]
