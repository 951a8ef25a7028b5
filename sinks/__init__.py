"""Sinks: where normalized events go. Postgres, a CRM over HTTP, Slack, and plugins.

Every sink, built-in or third-party, registers under the ``webhook_ingest.sinks`` entry point
group and satisfies :class:`sinks.base.Sink`.
"""

from sinks.base import Sink, matches_any
from sinks.registry import build_sinks, load_sink_classes

__all__ = ["Sink", "build_sinks", "load_sink_classes", "matches_any"]
