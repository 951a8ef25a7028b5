"""Find sinks through entry points and build the enabled ones from settings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ingest import safejson
from ingest.config import Settings, parse_bool, parse_list
from ingest.constants import SINK_ENTRY_POINT_GROUP
from ingest.events import Delivery, Event
from ingest.exceptions import ConfigError, PermanentSinkError, PluginError
from ingest.plugins import load_group
from ingest.redaction import reason
from sinks.base import (
    ClosingSink,
    ErasingSink,
    ExpiringSink,
    RawSink,
    Sink,
    UpdatingSink,
    matches_any,
)

if TYPE_CHECKING:
    from ingest.subjects import Erasure

__all__ = ["EnabledSink", "build_sinks", "data_keepers", "load_sink_classes"]

# Errors of the data itself, raised by a sink that did not sort them out: permanent.
_DATA_ERRORS = (safejson.Unserializable, RecursionError, UnicodeError)


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
    """A built sink with the kinds it receives and whether it skips stale events: the one way
    workers and ``ingest replay`` call a sink.

    ``send`` hands raw deliveries only to a sink that asks for them (:class:`RawSink`), and a
    :class:`PermanentSinkError` leaves it naming exactly the events of this call that failed
    (``event_ids``: all of them when the sink named none).
    """

    __slots__ = ("batch_events", "events", "name", "needs_raw", "sink", "skip_stale")

    def __init__(self, sink: Sink, events: tuple[str, ...], skip_stale: bool = False) -> None:
        self.sink = sink
        self.name = sink.name
        self.events = events
        self.skip_stale = skip_stale
        self.needs_raw = isinstance(sink, RawSink) and sink.needs_raw is True
        # How many events one send may take: a worker joins waiting jobs up to this many
        # (workers.grouping). 0, the default, sends each job's events on their own.
        limit = getattr(sink, "batch_events", 0)
        self.batch_events = limit if isinstance(limit, int) and limit > 0 else 0

    def __repr__(self) -> str:
        stale = " skip_stale" if self.skip_stale else ""
        return f"<EnabledSink {self.name} events={','.join(self.events)}{stale}>"

    def wants(self, event: Event) -> bool:
        """True when the event's kind matches ``<NAME>_EVENTS``."""
        return matches_any(event.kind, self.events)

    def deliveries_for(self, events: Sequence[Event], deliveries: Mapping[str, Delivery] | None,
                       ) -> dict[str, Delivery] | None:
        """The raw deliveries ``events`` came from, when the sink wants them; else None."""
        if not self.needs_raw:
            return None
        used = {e.delivery_id for e in events}
        return {i: d for i, d in (deliveries or {}).items() if i in used}

    def send(self, events: Sequence[Event],
             deliveries: Mapping[str, Delivery] | None = None) -> None:
        """Hand ``events`` to the sink; ``deliveries`` (by id) go along only when it wants them,
        only those the events came from. Data no sink could write (unserializable, too deeply
        nested, not text) is a :class:`PermanentSinkError`: retrying cannot help."""
        try:
            try:
                if self.needs_raw and isinstance(self.sink, RawSink):
                    self.sink.send(events, deliveries=self.deliveries_for(events, deliveries))
                else:
                    self.sink.send(events)
            except _DATA_ERRORS as exc:
                # A sink that let it through; which event? The caller splits the batch.
                raise PermanentSinkError(reason(f"{type(exc).__name__}: {exc}")) from None
        except PermanentSinkError as exc:
            if not exc.event_ids:
                exc.event_ids = [e.id for e in events]
            raise

    def update(self, events: Sequence[Event]) -> bool:
        """Rewrite stored events with today's normalization, where the sink keeps them.
        False when it keeps nothing to update."""
        if not isinstance(self.sink, UpdatingSink):
            return False
        self.sink.update(events)
        return True

    def close(self) -> None:
        """Release what the sink holds (connections), when it says how."""
        if isinstance(self.sink, ClosingSink):
            self.sink.close()

    # -- the data it keeps (sinks.base: ErasingSink, ExpiringSink) -------------------------

    @property
    def title(self) -> str:
        """How messages name the place its data is in ("Postgres")."""
        return str(getattr(self.sink, "title", self.name))

    @property
    def erases(self) -> tuple[str, ...]:
        """The places ``erase`` reports, in print order; () when it erases nothing."""
        return tuple(self.sink.erases) if isinstance(self.sink, ErasingSink) else ()

    @property
    def erase_in_flight(self) -> bool:
        """True when its data waits to be sent (erased with the queued jobs)."""
        return getattr(self.sink, "erase_in_flight", False) is True

    def erase(self, erasure: Erasure) -> dict[str, int]:
        """Remove (dry: count) one subject's data; counts per place, {} when it keeps none."""
        if not isinstance(self.sink, ErasingSink):
            return {}
        return {str(place): int(n) for place, n in self.sink.erase(erasure).items()}

    @property
    def expires(self) -> dict[str, str]:
        """Place -> the retention that applies to it; {} when nothing of it expires."""
        return dict(self.sink.expires) if isinstance(self.sink, ExpiringSink) else {}

    def expire(self, cutoffs: Mapping[str, datetime], *, dry_run: bool = False,
               batch: int = 1000, probe: bool = False) -> Iterator[tuple[str, int]]:
        """Remove (dry: count) what is older than its retention, yielding ``(place, rows)``
        after each batch; nothing when it keeps nothing that expires."""
        if isinstance(self.sink, ExpiringSink):
            yield from self.sink.expire(cutoffs, dry_run=dry_run, batch=batch, probe=probe)


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


def data_keepers(settings: Settings, capability: str = "erase",
                 ) -> tuple[dict[str, EnabledSink], dict[str, ConfigError]]:
    """Every installed sink that keeps data it can ``capability`` (``"erase"`` or
    ``"expire"``: sinks.base), enabled or not (data
    outlives a sink being switched off), built through its ``for_stored_data(settings)``
    (else, when enabled, its ``from_settings``), in the order erasure reports them: sinks
    whose data waits to be sent first. Also, by title, those whose storage is not configured
    (the Postgres sink without DATABASE_URL): nothing of theirs could be reached."""
    keepers: dict[str, EnabledSink] = {}
    unreachable: dict[str, ConfigError] = {}
    for name, cls in sorted(load_sink_classes().items(),
                            key=lambda item: getattr(item[1], "erase_in_flight", False) is not True):
        if not callable(getattr(cls, capability, None)):
            continue
        build = getattr(cls, "for_stored_data", None)
        if not callable(build):
            if name not in settings.sinks:
                continue  # without for_stored_data, reachable only while it is enabled
            build = cls.from_settings
        try:
            sink = build(settings)
        except ConfigError as exc:
            unreachable[str(getattr(cls, "title", name))] = exc
            continue
        except Exception as exc:
            raise PluginError(name, f"cannot reach its stored data: {exc!r}") from exc
        keepers[name] = EnabledSink(sink, ())
    return keepers, unreachable
