"""The normalize step: one delivery's events, by the provider installed today.

Workers (``process_batch``) and ``ingest replay`` both go through it, so an archived delivery
replays exactly as a live one is processed.
"""

from __future__ import annotations

from collections.abc import Mapping

from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError
from ingest.providers import Provider

__all__ = ["normalize"]


def normalize(providers: Mapping[str, Provider], delivery: Delivery) -> list[Event]:
    """The events of ``delivery``. Raises :class:`NormalizationError` when its provider is not
    installed, and whatever the provider raises on input it cannot read: the caller decides
    how that delivery fails alone."""
    provider = providers.get(delivery.provider)
    if provider is None:
        raise NormalizationError(f"no provider {delivery.provider!r} is installed")
    return provider.events(delivery)
