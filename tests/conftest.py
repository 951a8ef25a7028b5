"""Fixtures: real Redis and Postgres, from REDIS_URL/DATABASE_URL when set, else embedded.

Every test gets its own Redis namespace (keys and queues) and its own Postgres database, and
both are removed afterwards. No test flushes a server it did not start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis import Redis

from ingest.config import Settings
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis
from sinks.postgres import migrate
from tests.helpers import SECRETS, serve, with_database
from workers.runtime import Runtime, install_runtime


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    directory = Path(tempfile.mkdtemp(prefix="ingest-test-redis-"))
    server = EmbeddedRedis(directory, appendonly=False).start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's basetemp: another pytest run on the machine may reset that tree's
    # permissions, which crashes a Postgres still using it.
    directory = Path(tempfile.mkdtemp(prefix="ingest-test-pg-"))
    server = EmbeddedPostgres(directory / "pg").start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def namespace(redis_server: str) -> Iterator[str]:
    ns = "t" + uuid.uuid4().hex[:10]
    yield ns
    client = Redis.from_url(redis_server)
    try:
        keys = list(client.scan_iter(match=f"*{ns}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        # RQ also lists every queue it saw in one shared set.
        ours = [q for q in client.smembers("rq:queues") if ns.encode() in q]
        if ours:
            client.srem("rq:queues", *ours)
    finally:
        client.close()


@pytest.fixture
def database_url(postgres_server: str) -> Iterator[str]:
    name = "wi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(postgres_server, name)
    migrate(url)
    yield url
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fresh_database(postgres_server: str) -> Iterator[str]:
    """An empty database (no schema yet: not migrated), dropped afterwards."""
    name = "wi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(postgres_server, name)
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_env(redis_server: str, namespace: str, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """The environment a deployment would have; every provider enabled with two secrets."""

    def make(database_url: str | None = None, **overrides: str) -> dict[str, str]:
        env = {
            "REDIS_URL": redis_server,
            "INGEST_NAMESPACE": namespace,
            "INGEST_SPOOL_DIR": str(tmp_path / "spool"),
            "INGEST_SINKS": "postgres",
        }
        if database_url:
            env["DATABASE_URL"] = database_url
        from ingest.providers import load_providers

        for name, provider in load_providers().items():
            if name in SECRETS:
                env[provider.secret_setting] = ",".join(SECRETS[name])
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    return make


@pytest.fixture
def settings(make_env: Callable[..., dict[str, str]], database_url: str) -> Settings:
    return Settings.from_env(make_env(database_url))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    previous = install_runtime(rt)
    try:
        yield rt
    finally:
        install_runtime(previous)
        rt.close()


@pytest.fixture
def acceptor(settings: Settings) -> Iterator[Any]:
    """A real acceptor (uvicorn, real Redis) on 127.0.0.1; yields the running server."""
    from ingest.acceptor.app import create_app

    with serve(create_app(settings)) as server:
        yield server
