"""The sink protocol.

A sink has a ``name``, is built from configuration by ``from_settings``, and has
``send(events)``, which must be idempotent on ``event.id`` (a batch may be sent again after a
crash or a retry) and must raise :class:`TransientSinkError` when retrying may help or
:class:`PermanentSinkError` when it cannot. A sink that also wants the raw deliveries the
events came from sets ``needs_raw = True`` (:class:`RawSink`) and receives ``deliveries`` (by
delivery id). A sink that keeps rows a replay may correct in place has ``update(events)``
(:class:`UpdatingSink`). Workers and ``ingest replay`` call every sink through
:class:`sinks.registry.EnabledSink`, which decides all of this once.

Its settings come from its own prefix: the sink ``crm`` reads ``CRM_*`` variables or the
``[sinks.crm]`` TOML table through ``settings.section("crm")``; ``<NAME>_EVENTS`` (globs over
``kind``) chooses which events it receives.

A sink is built once per worker process and kept: connections it opens (an HTTP client, a
database connection) are reused across jobs. A sink that needs Redis (the Slack sink paces
all workers through it) opens its own, lazily, from ``settings.require_redis()``, with keys
under ``settings.names.key(...)`` so ``INGEST_NAMESPACE`` keeps deployments apart. An
optional ``close()`` is called when the worker stops. A permanent error may name, in
``event_ids``, the only events of the batch that failed: each gets a job of its own that ends
in the failed registry, and the others count as delivered.

A sink whose ``send`` costs less per event for more events at once (one transaction, one
request) may set ``batch_events`` (an int): when deliver jobs wait in its queue, a worker
then takes several of them into one ``send`` of up to about that many events. If that send
raises, each of those jobs runs again on its own, exactly as without grouping, so the sink
sees the same events again (``send`` is idempotent anyway). Without ``batch_events`` each
job's events are sent on their own.

A sink that keeps data (rows, messages waiting to be sent) takes part in ``ingest erase`` and
in retention through two optional capabilities, reached through
:class:`sinks.registry.EnabledSink` like ``send``:

- ``erase(erasure)`` (:class:`ErasingSink`): remove one subject's data (``erasure.subject``
  recognizes it: ``in_event``, ``in_value``, ``might_be_in``; ``erasure.delivery(envelope)``
  rewrites a raw delivery that also holds other people's events), or with
  ``erasure.dry_run`` only count it; return the counts per place, the places named in its
  ``erases`` (in print order). ``erase_in_flight = True`` says its data is waiting to be sent
  (an outbox): it is erased with the queued jobs, before and after the running jobs end, so
  none of it goes out meanwhile; otherwise once, last, after they ended.
- ``expire(cutoffs, dry_run=, batch=, probe=)`` (:class:`ExpiringSink`): remove what was received
  before the cutoff of its retention (``"deliveries"``: ``INGEST_RETENTION_DAYS``,
  ``"events"``: ``INGEST_EVENTS_RETENTION_DAYS``), ``batch`` rows at a time, yielding
  ``(place, rows)`` after each batch (the retention run paces itself between them and may stop
  between two); dry, one ``(place, rows that would go)`` per place, and with ``probe`` only
  whether any would (1 or 0: a cheap look, after each slice of the daily run). ``expires`` maps each of
  its places to the retention that applies to it.

Data outlives the sink being enabled (a person's rows must be erasable after the sink is
switched off), so both reach every *installed* sink that has them, through the class's
optional ``for_stored_data(settings)``: a sink built from only what reaching its data needs
(the Postgres sink: ``DATABASE_URL``; the Slack sink: Redis, no webhook URL). It raises
:class:`ingest.exceptions.ConfigError` when that is not configured; ``title`` names the place
in messages ("Postgres").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ingest.config import Settings
    from ingest.events import Delivery, Event
    from ingest.subjects import Erasure

__all__ = ["ClosingSink", "ErasingSink", "ExpiringSink", "RawSink", "Sink", "UpdatingSink",
           "matches_any"]


@runtime_checkable
class Sink(Protocol):
    name: ClassVar[str]
    # Globs over kind used when <NAME>_EVENTS is not set.
    default_events: ClassVar[tuple[str, ...]]

    @classmethod
    def from_settings(cls, settings: Settings) -> Sink: ...

    def send(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class RawSink(Protocol):
    """A sink that receives the raw deliveries its events came from, when ``needs_raw`` is
    true (the Postgres sink archives them)."""

    needs_raw: ClassVar[bool]

    def send(
        self, events: Sequence[Event], deliveries: Mapping[str, Delivery] | None = None
    ) -> None: ...


@runtime_checkable
class UpdatingSink(Protocol):
    """A sink that keeps the events it was sent and can rewrite the ones it already has with
    today's normalization (``ingest replay``); ``send`` leaves stored events alone."""

    def update(self, events: Sequence[Event]) -> None: ...


@runtime_checkable
class ClosingSink(Protocol):
    """A sink holding something to release (a connection) when the worker stops."""

    def close(self) -> None: ...


@runtime_checkable
class ErasingSink(Protocol):
    """A sink that keeps data about people and removes one subject's (``ingest erase``)."""

    # The places it reports, in print order (e.g. its tables).
    erases: ClassVar[tuple[str, ...]]

    def erase(self, erasure: Erasure) -> Mapping[str, int]: ...


@runtime_checkable
class ExpiringSink(Protocol):
    """A sink whose stored data expires (``INGEST_RETENTION_DAYS``,
    ``INGEST_EVENTS_RETENTION_DAYS``): retention removes it in paced batches."""

    # Place -> the retention that applies to it ("deliveries" or "events").
    expires: ClassVar[Mapping[str, str]]

    def expire(self, cutoffs: Mapping[str, datetime], *, dry_run: bool = False,
               batch: int = 1000, probe: bool = False) -> Iterator[tuple[str, int]]: ...


def matches_any(kind: str, patterns: Iterable[str]) -> bool:
    """True when ``kind`` matches one of the globs (``email.replied``, ``linkedin.*_replied``)."""
    return any(fnmatchcase(kind, pattern) for pattern in patterns)
