"""Meta-tests: every built-in sink is registered like a plugin, satisfies the protocol, and
has a test module of its own."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ingest import constants
from ingest.config import Settings
from ingest.exceptions import ConfigError
from sinks.base import Sink
from sinks.registry import build_sinks, load_sink_classes

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
