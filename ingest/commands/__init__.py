"""The ``ingest`` command line: one module per command or group of commands.

``cli`` builds the parser (the console script ``ingest`` is ``ingest.commands.cli:main``);
``devserver`` runs ``ingest dev`` on ``embedded`` servers; ``replay``, ``send``, ``erase``,
``retention``, ``dlq``, ``status`` and ``query`` (events, sql) are commands of their own,
``samples`` builds the signed deliveries ``send`` posts, ``metrics_server`` serves ``ingest
worker``'s metrics. Commands are the top layer (docs/architecture.md): the only code that
imports the workers and the sinks; nothing imports them.
"""
