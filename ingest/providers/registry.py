"""Find every provider: built-ins and plugins alike, through entry points."""

from __future__ import annotations

import functools

from ingest.constants import PROVIDER_ENTRY_POINT_GROUP
from ingest.exceptions import PluginError
from ingest.plugins import load_group
from ingest.providers.base import Provider

__all__ = ["load_providers"]


@functools.cache
def load_providers() -> dict[str, Provider]:
    """Every registered provider, instantiated, by URL segment."""
    providers: dict[str, Provider] = {}
    for name, factory in load_group(PROVIDER_ENTRY_POINT_GROUP).items():
        try:
            provider = factory()
        except Exception as exc:
            raise PluginError(name, f"cannot be constructed: {exc!r}") from exc
        if not isinstance(provider, Provider):
            raise PluginError(
                name,
                "is not a provider: it needs name, secret_setting, kept_headers, "
                "retries_network_errors, verify() and events()",
            )
        if provider.name != name:
            raise PluginError(name, f"its class says name={provider.name!r}; they must agree")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise PluginError(name, "provider names are URL segments: letters, digits, _ and -")
        providers[name] = provider
    return providers
