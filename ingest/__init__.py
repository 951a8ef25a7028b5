"""webhook-ingest: receive sales-engagement webhooks, never lose one, land each event once.

The package is split by where code runs, in layers (docs/architecture.md; checked by
tests/test_layout.py): core <- providers <- acceptor, workers, sinks <- commands.

- ``ingest``: the core every other part and every plugin imports (config, kinds, the Event
  model, constants, metrics, plugins, the Redis connection, subjects), with four
  sub-packages: ``ingest.providers``, ``ingest.acceptor`` (what ``ingest serve`` runs),
  ``ingest.subscriptions`` (the providers' side: their webhook-subscription APIs) and
  ``ingest.commands`` (the CLI). Only the commands import the workers and the sinks.
- ``workers``: RQ job functions (``process_batch``, ``deliver``, the daily retention run, the
  periodic subscription check) and the worker processes that run them.
- ``sinks``: destinations for normalized events (Postgres, CRM over HTTP, Slack, plugins), and
  the owners of what they store.

``ingest.providers`` and ``ingest.events`` import only the standard library and orjson, so
workers and sinks never import Starlette.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
