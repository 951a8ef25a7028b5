"""Waiting for Redis and Postgres while a process starts.

Processes and the servers they need usually start together (docker-compose, a Procfile
platform, a host after a reboot), and a server that reports healthy may still refuse TCP
connections for a moment: the official Postgres image, for one, first runs a socket-only server
while it creates the database. So ``ingest migrate`` and ``ingest worker`` try again, with
backoff, for up to ``INGEST_STARTUP_WAIT`` seconds (60 by default), logging what they wait for,
instead of failing at the first refused connection; after that they stop with a message that
says what to check.

Only a server that cannot be reached, or says it is not ready yet, is waited for. One that
answers with a refusal (wrong password, no such database or role) is reported at once: waiting
cannot fix a setting.

``ingest serve`` does not wait: it accepts deliveries while Redis is away (into the spool),
which is better than refusing connections until Redis comes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import psycopg
from redis.exceptions import AuthenticationError, AuthorizationError, RedisError

from ingest import constants
from ingest.exceptions import StartupError
from ingest.redis_conn import startup_redis

__all__ = ["StartupError", "redis_problem", "server_address", "wait_for",
           "wait_for_postgres", "wait_for_redis"]

log = logging.getLogger("ingest.startup")

T = TypeVar("T")

# Seconds one attempt to reach Redis may take (the wait as a whole is INGEST_STARTUP_WAIT).
_REDIS_ATTEMPT_TIMEOUT = 2.0
# What Postgres says while it starts, stops or recovers (class 57P03, "cannot connect now"),
# or when it is full for a moment: worth waiting for. Any other answer is final.
_POSTGRES_NOT_READY = ("the database system is", "too many clients")


def server_address(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis or Postgres URL, never its credentials."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    if "," in parts.netloc:  # several hosts: Redis Sentinels, Postgres hosts tried in turn
        return parts.netloc.rpartition("@")[2]
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "localhost"
    return f"{host}:{port}" if port else host


def wait_for(what: str, setting: str, url: str, attempt: Callable[[], T],
             retryable: Callable[[BaseException], bool], describe: Callable[[BaseException], str],
             timeout: float) -> T:
    """Call ``attempt`` until it returns, for up to ``timeout`` seconds.

    An exception ``retryable`` accepts is logged (the first one, then every
    STARTUP_LOG_EVERY seconds) and retried with backoff; any other ends the wait at once. Both
    endings raise :class:`StartupError` naming the server (``what`` at its address) and the
    setting (``setting``) to check.
    """
    where = server_address(url)
    started = time.monotonic()
    deadline = started + timeout
    delay = 0.25
    next_log = started
    waited = False
    while True:
        try:
            result = attempt()
        except Exception as exc:
            reason = describe(exc)
            if not retryable(exc):
                raise StartupError(
                    f"{what} at {where} refused the connection: {reason}. Check the user, "
                    f"password and database in {setting}.") from exc
            now = time.monotonic()
            if now >= deadline:
                raise StartupError(
                    f"{what} at {where} did not answer within {timeout:g} s (last error: "
                    f"{reason}). Check that {what} is running and reachable from here at the "
                    f"host and port {setting} names; if it is only slow to start, raise "
                    f"INGEST_STARTUP_WAIT.") from exc
            if now >= next_log:
                if not waited:
                    log.warning("waiting for %s at %s (%s); trying again for up to %.0f s",
                                what, where, reason, deadline - now)
                else:
                    log.warning("still waiting for %s at %s after %.0f s (%s)",
                                what, where, now - started, reason)
                next_log = now + constants.STARTUP_LOG_EVERY
            waited = True
            time.sleep(max(0.0, min(delay, deadline - now)))
            delay = min(delay * 2, constants.STARTUP_RETRY_MAX)
            continue
        if waited:
            log.info("%s at %s answers, after %.1f s", what, where, time.monotonic() - started)
        return result


# -- Redis ------------------------------------------------------------------------------------


def _redis_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return False
    return isinstance(exc, (RedisError, OSError))


def _redis_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _ping(url: str) -> None:
    # Its own short-lived client: each attempt is bounded, and no retry policy of a long-lived
    # client stretches it.
    client = startup_redis(url, _REDIS_ATTEMPT_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def wait_for_redis(url: str, timeout: float) -> None:
    """Return once Redis at ``url`` answers a PING; :class:`StartupError` after ``timeout``."""
    wait_for("Redis", "REDIS_URL", url, lambda: _ping(url), _redis_retryable, _redis_reason,
             timeout)


def redis_problem(url: str) -> str | None:
    """Why Redis at ``url`` does not answer one PING right now, or None when it does."""
    try:
        _ping(url)
    except (RedisError, OSError) as exc:
        return _redis_reason(exc)
    return None


# -- Postgres ---------------------------------------------------------------------------------


def _postgres_reason(exc: BaseException) -> str:
    """The server's or the network's own words, without libpq's framing (which names the
    host we already name) or its hints."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    _, _, tail = first.rpartition(" failed: ")
    return (tail or first).removeprefix("FATAL:").strip()


def _postgres_retryable(exc: BaseException) -> bool:
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc)
    # No "FATAL:" means the server never answered (refused, timed out, name not resolved yet).
    return "FATAL:" not in text or any(s in text for s in _POSTGRES_NOT_READY)


def wait_for_postgres(url: str, connect: Callable[[], T], timeout: float) -> T:
    """``connect()`` once Postgres at ``url`` takes connections; :class:`StartupError` after
    ``timeout`` seconds, or at once when the server refuses us."""
    return wait_for("Postgres", "DATABASE_URL", url, connect, _postgres_retryable,
                    _postgres_reason, timeout)
