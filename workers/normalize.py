"""The normalize step: one delivery's events, by the provider installed today.

Workers (``process_batch``) and ``ingest replay`` both go through it, so an archived delivery
replays exactly as a live one is processed.
"""

from __future__ import annotations

from collections.abc import Mapping

from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.kinds import is_activity
from ingest.providers import Provider
from ingest.providers.base import kind_classes

__all__ = ["normalize"]


def normalize(providers: Mapping[str, Provider], delivery: Delivery) -> list[Event]:
    """The events of ``delivery``. Raises :class:`NormalizationError` when its provider is not
    installed, and whatever the provider raises on input it cannot read: the caller decides
    how that delivery fails alone. Each event says whether it is activity (``ingest.kinds``),
    by the vocabulary and the provider's own ``kind_classes``: events made with
    ``Provider.event`` (ingest.providers.base.MakesEvents) already do; one a provider built
    itself gets the flag here."""
    provider = providers.get(delivery.provider)
    if provider is None:
        raise NormalizationError(f"no provider {delivery.provider!r} is installed")
    overrides = kind_classes(provider)
    out = provider.events(delivery)
    for event in out:
        activity = is_activity(event.kind, event.event_type, overrides)
        if activity != event.activity:
            # A provider that built the event itself (not through Provider.event) just made it
            # and nothing else holds it yet: set the flag in place. dataclasses.replace would build it again (its id is a uuid5), which cost
            # 15 µs an event, more than the stale check itself.
            object.__setattr__(event, "activity", activity)
    return out
