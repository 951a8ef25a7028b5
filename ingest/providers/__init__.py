"""Providers: one module each, loaded through the ``webhook_ingest.providers`` entry points.

The built-ins register exactly like third-party plugins (see pyproject.toml), so
``load_providers()`` is the only way the rest of the code finds a provider, and ``Provider``
and ``SubscriptionSource`` (the optional webhook-subscription capability) what it may know of
one.
"""

from __future__ import annotations

from ingest.providers.base import Provider, SubscriptionSource
from ingest.providers.registry import load_providers

__all__ = ["Provider", "SubscriptionSource", "load_providers"]
