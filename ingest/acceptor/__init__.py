"""The acceptor: what ``ingest serve`` runs.

``app`` verifies each delivery and answers; ``enqueue`` group-commits accepted deliveries to
Redis as RQ batch jobs; ``durable`` and ``spool`` keep a delivery on local disk while Redis is
away; ``http_limits`` bounds what the HTTP server reads. It imports the core (``ingest.*``)
only: never the commands, the workers or the sinks.
"""
