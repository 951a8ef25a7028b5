"""``ingest console``: a web console to find any delivery in seconds (docs/console.md).

Its own process and port (``INGEST_CONSOLE_HOST``, default 127.0.0.1; ``INGEST_CONSOLE_PORT``,
default 8001): overview, events search, one event (with each sink's outcome and a replay to
one sink), one record's timeline, dead letters (retry, discard), refused requests, and the
same data as JSON under ``/api``. It lives among the commands because it uses what they use
(status, dlq, replay) and reads what the sinks store (sinks.browse, sinks.outcomes).

Without ``INGEST_CONSOLE_TOKEN`` it starts only on a loopback address; see
:mod:`ingest.commands.console.security` for the access model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ingest.config import Settings
from ingest.exceptions import ConfigError

__all__ = ["add_command", "check_access", "cmd_console"]


def check_access(settings: Settings, host: str) -> None:
    """A console reachable from other machines must have a token: a :class:`ConfigError`
    naming the fix otherwise."""
    from ingest.commands.console.security import is_loopback

    if settings.console_token is None and not is_loopback(host):
        raise ConfigError("INGEST_CONSOLE_TOKEN",
                          f"is required when the console listens on {host}, which is not a "
                          "loopback address: set a token of at least 16 characters, or "
                          "INGEST_CONSOLE_HOST=127.0.0.1")


def cmd_console(args: argparse.Namespace) -> int:
    import signal

    import uvicorn

    from ingest.commands.cli import _setup_logging, _stopped
    from ingest.commands.console.app import create_console

    # As `ingest serve`: a SIGTERM ends it with status 0 (see cmd_serve).
    signal.signal(signal.SIGTERM, _stopped)
    settings = Settings.from_env()
    host = args.host or settings.console_host
    port = args.port if args.port is not None else settings.console_port
    check_access(settings, host)
    settings.require_redis()
    settings.require_database()
    _setup_logging(settings)
    app = create_console(settings)
    # uvicorn's access log would print every URL with its query string: the console logs
    # its own line per request, naming the route's pattern only (security.SecurityHeaders).
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                timeout_graceful_shutdown=5, server_header=False)
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest console`` (called by ingest.commands.cli)."""
    p = add("console", cmd_console, "the web console: search events, see each sink's "
                                    "outcome, retry dead letters")
    p.add_argument("--host", default=None,
                   help="default: $INGEST_CONSOLE_HOST, else 127.0.0.1")
    p.add_argument("--port", type=int, default=None,
                   help="default: $INGEST_CONSOLE_PORT, else 8001")
