"""Shared test helpers: real servers, real workers, real HTTP. No mocks of Redis or Postgres."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import rq
import uvicorn
from redis import Redis
from rq import Worker

from ingest.commands.embedded import free_port
from ingest.rq_jobs import FastJSONSerializer
from workers.runtime import Runtime
from workers.worker import StopsPromptly

# Secrets the tests configure for each provider; rotation tests use both of a pair.
def suites_by(base: type, attribute: str) -> dict[str, type]:
    """Every subclass of ``base`` (a shared suite) that sets ``attribute`` itself, by its
    value: the provider's or the sink's name."""
    found: dict[str, type] = {}
    pending = list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if attribute in cls.__dict__:
            found[cls.__dict__[attribute]] = cls
    return found


def secrets_for(provider: str) -> tuple[str, str]:
    """The test secrets of a provider (an old and a new one: rotation), from its name alone."""
    return f"{provider}-secret-old-0001", f"{provider}-secret-new-0002"


def _secrets() -> dict[str, tuple[str, str]]:
    from ingest.providers import load_providers

    return {name: secrets_for(name) for name in load_providers()}


# Every registered provider's (a new provider needs no entry here).
SECRETS: dict[str, tuple[str, str]] = _secrets()


class SimpleWorker(StopsPromptly, rq.SimpleWorker):
    """RQ's SimpleWorker, whose teardown never waits a minute for its command listener
    (workers/worker.py says when RQ's does): tests run many burst workers."""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.1) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_for_queue_workers(redis_url: str, queues: Iterable[str], timeout: float = 60.0) -> None:
    """Until every one of ``queues`` has a worker registered in Redis."""
    wanted = set(queues)
    from ingest.redis_conn import redis_client

    redis = redis_client(redis_url)
    try:
        wait_until(lambda: wanted <= {q for w in Worker.all(connection=redis)
                                      for q in w.queue_names()},
                   timeout, "a worker on every queue", interval=0.2)
    finally:
        redis.close()


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def migrate_before(database_url: str, first_skipped: str) -> None:
    """Give an empty database the schema of an older release: the migrations named before
    ``first_skipped`` (``"0008"``), recorded as ``ingest migrate`` records them."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "sinks" / "migrations"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE webhook_ingest_migrations (name text PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for migration in sorted(folder.glob("*.sql")):
            if migration.name < first_skipped:
                conn.execute(migration.read_text())
                conn.execute("INSERT INTO webhook_ingest_migrations (name) VALUES (%s)",
                             (migration.name,))


def rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        return list(conn.execute(sql, params).fetchall())


def drain(rt: Runtime, rounds: int = 4) -> None:
    """Run real RQ SimpleWorkers in burst mode, queue by queue in pipeline order, until every
    queue is empty (a few rounds: sink jobs appear while ingest jobs run). They read jobs with
    the serializer ``ingest worker`` reads them with."""
    for _ in range(rounds):
        busy = False
        for name in rt.queue_names():
            queue = rt.queue(name)
            if queue.count == 0:
                continue
            busy = True
            worker = SimpleWorker([queue], connection=rt.redis, serializer=FastJSONSerializer,
                                  log_job_description=False)
            worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
        if not busy:
            return


class ServerThread:
    """A real uvicorn server for an ASGI app, on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app: Any, port: int | None = None, http: Any = None) -> None:
        self.port = port or free_port()
        from ingest.acceptor.http_limits import LimitedHttpToolsProtocol

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                http=http or LimitedHttpToolsProtocol,
                                access_log=False, loop="asyncio", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextmanager
def serve(app: Any, http: Any = None) -> Iterator[ServerThread]:
    """``app`` under uvicorn; ``http``: a protocol class other than the acceptor's default."""
    server = ServerThread(app, http=http).start()
    try:
        yield server
    finally:
        server.stop()


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def redis_values(redis: Redis, namespace: str) -> Iterator[tuple[bytes, list[bytes]]]:
    """(key, every value it holds, whatever its type) for each key of the namespace: what a
    test searches to tell that nothing in Redis still holds some data."""
    for key in redis.scan_iter(match=f"*{namespace}*", count=1000):
        kind = redis.type(key)
        values: list[bytes] = []
        if kind == b"string":
            values = [redis.get(key) or b""]
        elif kind == b"hash":
            values = [v for pair in redis.hgetall(key).items() for v in pair]
        elif kind == b"list":
            values = redis.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(redis.smembers(key))
        elif kind == b"zset":
            values = redis.zrange(key, 0, -1)
        elif kind == b"stream":
            values = [v for _, entry in redis.xrange(key) for pair in entry.items() for v in pair]
        yield key, values
