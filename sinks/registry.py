"""Find sinks through entry points and build the enabled ones from settings."""

from __future__ import annotations

from typing import Any

from ingest.config import Settings, parse_bool, parse_list
from ingest.constants import SINK_ENTRY_POINT_GROUP
from ingest.exceptions import ConfigError, PluginError
from ingest.plugins import load_group
from sinks.base import Sink

__all__ = ["EnabledSink", "build_sinks", "load_sink_classes"]


def load_sink_classes() -> dict[str, Any]:
    classes = load_group(SINK_ENTRY_POINT_GROUP)
    for name, cls in classes.items():
        if getattr(cls, "name", None) != name:
            raise PluginError(name, f"its class says name={getattr(cls, 'name', None)!r}; "
                                    "they must agree")
        if not callable(getattr(cls, "from_settings", None)) or not callable(
            getattr(cls, "send", None)
        ):
            raise PluginError(name, "is not a sink: it needs name, from_settings() and send()")
    return classes


class EnabledSink:
    """A built sink with the kinds it receives, and whether it skips stale events."""

    __slots__ = ("events", "name", "sink", "skip_stale")

    def __init__(self, sink: Sink, events: tuple[str, ...], skip_stale: bool = False) -> None:
        self.sink = sink
        self.name = sink.name
        self.events = events
        self.skip_stale = skip_stale

    def __repr__(self) -> str:
        stale = " skip_stale" if self.skip_stale else ""
        return f"<EnabledSink {self.name} events={','.join(self.events)}{stale}>"


def sink_event_globs(settings: Settings, cls: Any) -> tuple[str, ...]:
    raw = settings.section(cls.name).get("EVENTS")
    globs = parse_list(raw) if raw is not None else tuple(getattr(cls, "default_events", ("*",)))
    if not globs:
        raise ConfigError(f"{cls.name.upper()}_EVENTS", "names no event kinds")
    return globs


def sink_skips_stale(settings: Settings, cls: Any) -> bool:
    """``<NAME>_SKIP_STALE``, else the class's ``skip_stale_default`` (plugins without one get
    every event, stale ones flagged, as before the flag existed)."""
    return parse_bool(settings.section(cls.name).get("SKIP_STALE"),
                      f"{cls.name.upper().replace('-', '_')}_SKIP_STALE",
                      bool(getattr(cls, "skip_stale_default", False)))


def build_sinks(settings: Settings) -> dict[str, EnabledSink]:
    """The sinks named in INGEST_SINKS, built and validated. Fails naming the culprit."""
    classes = load_sink_classes()
    built: dict[str, EnabledSink] = {}
    for name in settings.sinks:
        cls = classes.get(name)
        if cls is None:
            raise ConfigError(
                "INGEST_SINKS",
                f"no sink named {name!r} is installed (installed: {', '.join(sorted(classes))})",
            )
        try:
            sink = cls.from_settings(settings)
        except ConfigError:
            raise
        except Exception as exc:
            raise PluginError(name, f"cannot be built from settings: {exc!r}") from exc
        if not isinstance(sink, Sink):
            raise PluginError(name, "from_settings() did not return a sink")
        built[name] = EnabledSink(sink, sink_event_globs(settings, cls),
                                  sink_skips_stale(settings, cls))
    return built
