"""Redis clients with their timeouts and retries set on purpose, never library defaults.

Every client of the product comes from here, whatever ``REDIS_URL`` names:

- ``redis://`` and ``rediss://`` (TLS; ``?ssl_ca_certs=/path/ca.pem`` names the CA of a
  private certificate, ``?ssl_cert_reqs=none`` skips the check), with an ACL user as
  ``redis://user:password@host:port/db``: redis-py's own URL parsing;
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service/db``: the Sentinels
  of a primary named ``service``. The client asks them for the primary's address on every new
  connection and drops its connections when the primary it talks to turns out to be a replica
  (after a failover), so every process follows the new primary without a restart. The user
  and password are the primary's; ``?sentinel_password=...`` (and ``?sentinel_username=...``)
  are the Sentinels' own when they require one.

A plain (or TLS) client also takes a ``READONLY`` answer as a connection error and reconnects:
a managed service's endpoint that moved to the new primary after a failover is then found
again by its DNS name, instead of writing forever to the old primary turned replica.

:func:`replicated` is the ``WAIT`` that ``INGEST_REDIS_MIN_REPLICAS`` asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError, ReadOnlyError, RedisError, TimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel

from ingest import constants

__all__ = ["ReplicaShortfall", "SentinelTarget", "acceptor_async_redis", "acceptor_redis",
           "parse_sentinel_url", "redis_client", "replicated", "startup_redis", "worker_redis"]

SENTINEL_SCHEME = "redis+sentinel://"
# The errors after which a client reconnects (and, on Sentinel, asks for the primary again).
_RECONNECT_ON: list[type[Exception]] = [ConnectionError, TimeoutError, ReadOnlyError]


class ReplicaShortfall(RedisError):
    """Fewer replicas than ``INGEST_REDIS_MIN_REPLICAS`` acknowledged a write in time."""

    def __init__(self, acked: int, wanted: int, wait_ms: int) -> None:
        super().__init__(f"{acked} of {wanted} Redis replicas acknowledged the write within "
                         f"{wait_ms} ms (INGEST_REDIS_MIN_REPLICAS)")
        self.acked, self.wanted = acked, wanted


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names."""

    sentinels: list[tuple[str, int]]
    service: str
    # Connection settings of the primary: db, username, password, query options.
    options: dict[str, Any] = field(default_factory=dict)
    # The Sentinels' own credentials, when they require them.
    sentinel_options: dict[str, Any] = field(default_factory=dict)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service/db``.

    Raises ``ValueError`` saying what is wrong (never echoing the password)."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"must start with {SENTINEL_SCHEME}")
    rest = url[len(SENTINEL_SCHEME):]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), "26379"
        host = host.strip("[]")  # an IPv6 address in brackets
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {item.strip()!r} is not host:port")
        sentinels.append((host, int(port)))
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError("must name the Sentinel service after the hosts: .../service or "
                         ".../service/db (the `sentinel monitor` name)")
    service = parts[0]
    sentinel_options: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key in ("sentinel_password", "sentinel_username"):
            sentinel_options[key.removeprefix("sentinel_")] = value
        else:
            kept.append((key, value))
    # redis-py's own parser for the rest: user, password, db and the query's options.
    db = parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r} after the service name is not a number")
    plain = f"redis://{userinfo + '@' if userinfo else ''}sentinel/{db}"
    if kept:
        plain += "?" + urlencode(kept)
    options: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
    options.pop("host", None)
    return SentinelTarget(sentinels, service, options, sentinel_options)


def _sentinel_kwargs(target: SentinelTarget, timeout: float) -> dict[str, Any]:
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout,
            **target.sentinel_options}


class _SentinelRedis(Redis):
    """A primary's client that also closes its Sentinels' clients when closed."""

    watched_by: Sentinel | None = None

    def close(self) -> None:
        super().close()
        for client in self.watched_by.sentinels if self.watched_by is not None else ():
            client.close()


class _AsyncSentinelRedis(AsyncRedis):
    """:class:`_SentinelRedis` for asyncio."""

    watched_by: AsyncSentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in self.watched_by.sentinels if self.watched_by is not None else ():
            await client.aclose()


def redis_client(url: str, **options: Any) -> Redis:
    """A client of the Redis primary ``url`` names, with ``options`` (timeouts, retry)."""
    if url.startswith(SENTINEL_SCHEME):
        target = parse_sentinel_url(url)
        timeout = options.get("socket_connect_timeout") or constants.ACCEPTOR_REDIS_TIMEOUT
        sentinel = Sentinel(target.sentinels, sentinel_kwargs=_sentinel_kwargs(target, timeout))
        client: _SentinelRedis = sentinel.master_for(target.service, redis_class=_SentinelRedis,
                                                     **{**target.options, **options})
        client.watched_by = sentinel
        return client
    return Redis.from_url(url, **options)


def async_redis_client(url: str, **options: Any) -> AsyncRedis:
    """:func:`redis_client` for asyncio."""
    if url.startswith(SENTINEL_SCHEME):
        target = parse_sentinel_url(url)
        timeout = options.get("socket_connect_timeout") or constants.ACCEPTOR_REDIS_TIMEOUT
        sentinel = AsyncSentinel(target.sentinels,
                                 sentinel_kwargs=_sentinel_kwargs(target, timeout))
        client: _AsyncSentinelRedis = sentinel.master_for(
            target.service, redis_class=_AsyncSentinelRedis, **{**target.options, **options})
        client.watched_by = sentinel
        return client
    return AsyncRedis.from_url(url, **options)


# The acceptor's clients: every call answers or fails well inside a second. One immediate
# retry covers a connection the server closed while idle; more would eat into the sender's
# deadline, and the spool is the fallback anyway.
_ACCEPTOR_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": constants.ACCEPTOR_REDIS_TIMEOUT,
    "retry_on_error": _RECONNECT_ON,
    "health_check_interval": 30,
}


def acceptor_redis(url: str, wait_ms: int = 0) -> Redis:
    """For the acceptor's occasional calls (readiness, the spool drainer). ``wait_ms``: the
    longest ``WAIT`` it sends (INGEST_REDIS_WAIT_MS), on top of its usual deadline."""
    return redis_client(url, retry=Retry(NoBackoff(), retries=1),
                        socket_timeout=constants.ACCEPTOR_REDIS_TIMEOUT + wait_ms / 1000,
                        **_ACCEPTOR_OPTIONS)


def acceptor_async_redis(url: str, wait_ms: int = 0) -> AsyncRedis:
    """For group commit's writes, on the acceptor's event loop: the same settings."""
    return async_redis_client(url, retry=AsyncRetry(NoBackoff(), retries=1),
                              socket_timeout=constants.ACCEPTOR_REDIS_TIMEOUT + wait_ms / 1000,
                              **_ACCEPTOR_OPTIONS)


def worker_redis(url: str) -> Redis:
    """For workers: patient (RQ raises the socket timeout above its blocking dequeue)."""
    return redis_client(
        url,
        socket_timeout=constants.WORKER_REDIS_TIMEOUT,
        socket_connect_timeout=5,
        retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=2.0), retries=3),
        retry_on_error=_RECONNECT_ON,
        health_check_interval=30,
    )


def startup_redis(url: str, timeout: float) -> Redis:
    """A short-lived client for one bounded attempt (start-up checks): no retries."""
    return redis_client(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                        retry=Retry(NoBackoff(), 0))


# -- WAIT ---------------------------------------------------------------------------------------

# WAIT waits for what the connection it is sent on wrote. The writes a 200 or a finished job
# stands on may have gone over another connection of the pool, so this marker is written
# first on the WAIT's own connection: replicas apply the primary's writes in order, so a
# replica that acknowledged the marker holds everything written before it, by any connection.
_MARK_TTL_MS = 60_000


def replicated(redis: Redis, names: constants.Names, replicas: int, wait_ms: int) -> None:
    """Return once ``replicas`` replicas hold every write made to the primary so far; raise
    :class:`ReplicaShortfall` when fewer acknowledge within ``wait_ms``. A no-op for 0."""
    if replicas <= 0:
        return
    with redis.pipeline(transaction=False) as pipe:
        pipe.set(names.key("replicated"), b"1", px=_MARK_TTL_MS)
        pipe.execute_command("WAIT", replicas, wait_ms)  # type: ignore[no-untyped-call]
        acked = int(pipe.execute()[-1])
    if acked < replicas:
        raise ReplicaShortfall(acked, replicas, wait_ms)


def add_wait(pipe: AsyncPipeline, replicas: int, wait_ms: int) -> None:
    """Queue a ``WAIT`` at the end of ``pipe``, after the writes it carries (same connection):
    its reply, the pipeline's last, is how many replicas acknowledged them."""
    pipe.execute_command("WAIT", replicas, wait_ms)
