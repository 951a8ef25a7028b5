"""One line, never a traceback, for every failure a user can cause or meet.

Every ``ingest`` command ends in one of these exit statuses (README, "Command line"):

- ``0``: done, nothing needs attention;
- ``1``: something needs attention: ``status`` found a problem, a server does not answer, a
  sink or a replay failed;
- ``2``: usage or configuration: a wrong argument or setting, a server refusing our
  credentials, a database not migrated yet;
- ``130``: interrupted (Ctrl-C).

:func:`explain` turns an exception into the line to print and the status, or None for a
defect of ours, which keeps its traceback. ``--debug`` shows the traceback of everything.
The line names the setting or command that fixes the problem; it never holds a credential
(libpq and redis-py name hosts and users in their messages, never passwords; the line goes
through :func:`ingest.redaction.reason` anyway).
"""

from __future__ import annotations

import psycopg
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ingest.exceptions import ConfigError, PluginError, StartupError
from ingest.redaction import reason

__all__ = ["ATTENTION", "INTERRUPTED", "OK", "USAGE", "explain"]

OK = 0
ATTENTION = 1
USAGE = 2
INTERRUPTED = 130

# What Redis answers a client that must authenticate first, with the wrong password, or with
# a password where none is set.
_REDIS_AUTH = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password",
               "without any password configured")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return reason(text.splitlines()[0].rstrip(".") if text else type(exc).__name__, limit=300)


def _postgres_reason(exc: BaseException) -> str:
    # libpq's first line names the server and gives its words; its hints follow on others.
    return " ".join(_first_line(exc).removeprefix("connection failed: ").split())


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or during, outermost first."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def explain(exc: BaseException) -> tuple[str, int] | None:
    """The one line to print for ``exc`` and the exit status, or None for a defect."""
    for cause in _chain(exc):
        found = _explain_one(cause)
        if found is not None:
            return found
    return None


def _explain_one(exc: BaseException) -> tuple[str, int] | None:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", INTERRUPTED
    if isinstance(exc, (ConfigError, PluginError)):
        return f"configuration error: {exc}", USAGE
    if isinstance(exc, StartupError):
        return str(exc), ATTENTION
    if isinstance(exc, (AuthenticationError, AuthorizationError)) or (
            isinstance(exc, ResponseError) and any(s in str(exc) for s in _REDIS_AUTH)):
        return (f"Redis refused our credentials ({_first_line(exc)}): check the user and "
                "password in REDIS_URL", USAGE)
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return (f"cannot reach Redis ({_first_line(exc)}): check that Redis runs and that "
                "REDIS_URL names it", ATTENTION)
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return (f"the database has no webhook-ingest tables yet ({_postgres_reason(exc)}): "
                "run `ingest migrate`", USAGE)
    if isinstance(exc, psycopg.OperationalError):
        words = _postgres_reason(exc)
        if "FATAL:" in str(exc) and "the database system is" not in str(exc):
            # The server answered, and said no: a setting, not an outage.
            return (f"Postgres refused the connection ({words}): check the user, password "
                    "and database in DATABASE_URL", USAGE)
        return (f"cannot reach Postgres ({words}): check that Postgres runs and that "
                "DATABASE_URL names it", ATTENTION)
    if isinstance(exc, RedisError):
        return f"Redis answered an error ({_first_line(exc)})", ATTENTION
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError,
                        NotADirectoryError)):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or type(exc).__name__}{where}", ATTENTION
    return None
