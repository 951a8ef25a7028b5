"""Loading plugins from entry points, failing loudly with the plugin's name.

Built-in providers and sinks are registered in pyproject.toml under the same groups a
third-party package uses, so there is one code path for both.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ingest.exceptions import PluginError

__all__ = ["load_group"]


@functools.cache
def load_group(group: str) -> dict[str, Any]:
    """Every object registered under ``group``, by entry point name.

    A plugin that cannot be imported raises :class:`PluginError` naming it and the reason:
    a half-loaded set of plugins would silently drop deliveries, so start-up stops instead.
    """
    loaded: dict[str, Any] = {}
    seen: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        if ep.name in seen and seen[ep.name].value != ep.value:
            raise PluginError(
                ep.name, f"registered twice in {group}: {seen[ep.name].value} and {ep.value}"
            )
        seen[ep.name] = ep
        try:
            loaded[ep.name] = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginError(ep.name, f"cannot load {ep.value}: {exc!r}") from exc
    return loaded
