"""The ``ingest`` command line: one module per command or group of commands.

``cli`` builds the parser (the console script ``ingest`` is ``ingest.commands.cli:main``);
``devserver`` runs ``ingest dev`` on ``embedded`` servers; ``replay``, ``send``, ``erase`` and
``status`` are commands of their own, ``samples`` builds the signed deliveries ``send`` posts,
``subjects`` is how ``erase`` recognizes whom it erases and rewrites a delivery without them.
Commands may import the core, the acceptor, the workers and the sinks; nothing imports them.
"""
