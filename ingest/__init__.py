"""webhook-ingest: receive sales-engagement webhooks, never lose one, land each event once.

The package is split by where code runs:

- ``ingest``: the core every other part and every plugin imports (config, providers, kinds,
  the Event model, constants, metrics, plugins, the Redis connection), with three sub-packages:
  ``ingest.acceptor`` (what ``ingest serve`` runs), ``ingest.commands`` (the CLI) and
  ``ingest.subscriptions`` (the providers' side: their webhook-subscription APIs). The core
  and the acceptor never import the commands, the workers or the sinks.
- ``workers``: RQ job functions (``process_batch``, ``deliver``, the daily retention run, the
  periodic subscription check) and worker start-up.
- ``sinks``: destinations for normalized events (Postgres, CRM over HTTP, Slack, plugins).

``ingest.providers`` and ``ingest.events`` import only the standard library and orjson, so
workers and sinks never import Starlette.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
