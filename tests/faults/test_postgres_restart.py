"""Postgres stopped and started again under continuous traffic: sink jobs retry through it."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from pgserver._commands import pg_ctl
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from ingest.acceptor.app import create_app
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from sinks.postgres import migrate
from tests.faults.conftest import Stack, Traffic, make_stack_env
from tests.helpers import serve, wait_until, with_database

pytestmark = pytest.mark.fault


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A Postgres of this test's own (pgserver), which the test stops and starts.

    Its data directory is not under pytest's shared temp tree, which another pytest run on the
    machine may lock down (as tests/conftest.py's session servers avoid too)."""
    directory = Path(tempfile.mkdtemp(prefix="ingest-test-pg-restart-"))
    server = EmbeddedPostgres(directory / "pg").start()
    try:
        yield server
    finally:
        # pgserver only knows the postmaster it started: after a restart it would leave the
        # new one running, so stop it by its data directory first.
        with contextlib.suppress(Exception):
            _pg_ctl(server, "-m", "fast", "stop")
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _pg_ctl(server: EmbeddedPostgres, *args: str) -> None:
    pg_ctl(["-w", *args], pgdata=server.server.pgdata, user=server.server.system_user,
           timeout=60)


def with_a_host_down_first(url: str) -> str:
    """``url`` as a multi-host DATABASE_URL whose first host (127.0.0.1, a free port) is down,
    as a primary that failed over looks; libpq tries the hosts in turn and keeps the first that
    takes writes (``target_session_attrs=read-write``)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    socket_dir = query.pop("host")  # pgserver's Unix socket directory (port 5432 by default)
    query.update(host=f"127.0.0.1,{socket_dir}", port=f"{free_port()},5432",
                 target_session_attrs="read-write")
    return urlunsplit(parts._replace(query=urlencode(query, safe="/,")))


@pytest.mark.parametrize("hosts", ["one host", "two hosts, the first down"])
def test_postgres_restart_under_traffic_loses_and_doubles_nothing(
        make_env: Callable[..., dict[str, str]], own_redis: EmbeddedRedis,
        own_postgres: EmbeddedPostgres, tmp_path: Path, fault_logs: Path, hosts: str) -> None:
    with psycopg.connect(own_postgres.url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE ingest_faults")
    database_url = with_database(own_postgres.url, "ingest_faults")
    if hosts != "one host":
        database_url = with_a_host_down_first(database_url)
    migrate(database_url)
    stack = Stack(env=make_stack_env(make_env, own_redis.url, database_url, tmp_path),
                  database_url=database_url, logs=fault_logs, redis_server=own_redis)
    try:
        stack.start_workers()
        stack.wait_for_workers()
        with serve(create_app(stack.settings)) as acceptor:
            traffic = Traffic(acceptor.url)
            with traffic.flowing():
                _pg_ctl(own_postgres, "-m", "fast", "stop")
                # The acceptor does not need Postgres: deliveries keep getting 200 ...
                traffic.wait_for_accepted(len(traffic.accepted) + 30)
                # ... and sink jobs that hit the outage wait in the retry schedule.
                redis = stack.redis()
                retries = ScheduledJobRegistry(stack.names.sink_queue("postgres"),
                                               connection=redis, serializer=JSONSerializer)
                wait_until(lambda: retries.count > 0, 30, "a deliver job scheduled for retry")
                redis.close()
                _pg_ctl(own_postgres, "restart")
                traffic.wait_for_accepted(len(traffic.accepted) + 20)
            stack.wait_for_pipeline(traffic, timeout=90)
        stack.assert_invariants(traffic)
        assert "Postgres unavailable" in "".join(
            p.read_text(errors="replace") for p in fault_logs.glob("worker-*.log"))
    finally:
        stack.stop_processes()
