"""Sink outcomes while the workers' Postgres is stopped (not refusing: gone), then back.

The CRM delivery goes on without Postgres; what the worker could not write waits in the Redis
backlog (workers.outcomes) and lands with the first write after Postgres is back. The
recorder's pause after a failure (``OUTCOME_RETRY_AFTER``) is moved on with a clock the test
holds, so nothing here waits for it to run out.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pgserver._commands import pg_ctl

from ingest import constants, metrics
from ingest.commands.dlq import list_failures
from ingest.commands.embedded import EmbeddedPostgres, free_port
from ingest.config import Settings
from sinks.postgres import migrate
from tests.helpers import ServerThread, rows
from tests.sinks.conftest import CrmReceiver, crm_env, enqueue, event_ids, outboundry_delivery, \
    run_jobs
from workers import outcomes as worker_outcomes
from workers.runtime import Runtime, install_runtime

pytestmark = pytest.mark.fault


class TcpPostgres:
    """A pgserver Postgres of this test's own, listening on 127.0.0.1 only, on a free port
    (no Unix socket), which the test stops and starts with pg_ctl (bounded waits)."""

    def __init__(self, directory: Path) -> None:
        self.embedded = EmbeddedPostgres(directory).start()
        self.port = free_port()
        self.stop()  # pgserver started it on a Unix socket: start it again on TCP
        self.start()

    def _pg_ctl(self, *args: str) -> None:
        server = self.embedded.server
        pg_ctl(["-w", *args], pgdata=server.pgdata, user=server.system_user, timeout=60)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._pg_ctl("-o", f"-h 127.0.0.1 -p {self.port} -k ''", "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def close(self) -> None:
        # pgserver knows only the postmaster it started: stop ours by its data directory.
        with contextlib.suppress(Exception):
            self.stop()
        self.embedded.stop()


@pytest.fixture
def tcp_postgres() -> Iterator[TcpPostgres]:
    directory = Path(tempfile.mkdtemp(prefix="ingest-test-pg-outcomes-"))
    server = TcpPostgres(directory / "pg")
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


class Clock:
    """The recorder's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_outcomes_wait_in_redis_while_postgres_is_down_and_land_when_it_is_back(
        tcp_postgres: TcpPostgres, make_env: Callable[..., dict[str, str]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(worker_outcomes, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    name = "wi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(tcp_postgres.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = tcp_postgres.url(name)
    migrate(database_url)

    receiver = CrmReceiver()
    server = ServerThread(receiver.app()).start()
    rt = Runtime(Settings.from_env(make_env(database_url, INGEST_SINKS="crm",
                                            **crm_env(f"{server.url}/hook"))))
    previous = install_runtime(rt)
    backlog = rt.names.key("outcomes:backlog")

    def states() -> dict[str, str]:
        return {str(r["event_id"]): r["state"] for r in rows(
            database_url, "SELECT event_id, state FROM webhook_sink_outcomes WHERE sink = 'crm'")}

    def deliver(name: str) -> str:
        envelope = outboundry_delivery(name=name)
        [event_id] = event_ids(envelope)
        enqueue(rt, envelope)
        run_jobs(rt)
        assert receiver.posts[event_id] == 1, "sent once, never again because of Postgres"
        assert event_id in receiver.accepted
        assert not list_failures(rt.redis, rt.settings)
        for queue_name in rt.queue_names():
            queue = rt.queue(queue_name)
            assert (queue.count, queue.scheduled_job_registry.count) == (0, 0), queue_name
        return event_id

    try:
        # Postgres up: the row is written, and the worker keeps its connection open.
        before = deliver("Ada Lovelace")
        assert states() == {before: "delivered"}

        tcp_postgres.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(database_url, connect_timeout=3).close()
        backlogged = metrics.SINK_OUTCOME_ERRORS.labels("backlogged")._value.get()
        with caplog.at_level(logging.WARNING, logger="workers.outcomes"):
            during = deliver("Grace Hopper")
        assert rt.redis.llen(backlog) == 1
        assert metrics.SINK_OUTCOME_ERRORS.labels("backlogged")._value.get() == backlogged + 1
        [line] = [r.getMessage() for r in caplog.records if r.name == "workers.outcomes"]
        assert "kept in Redis" in line and str(tcp_postgres.port) not in line

        # Back, but within the pause after the failure: the worker does not try it yet.
        tcp_postgres.start()
        paused = deliver("Alan Turing")
        assert rt.redis.llen(backlog) == 2
        assert states() == {before: "delivered"}

        # The pause over: the next job's write takes the backlog along.
        clock.now += constants.OUTCOME_RETRY_AFTER
        after = deliver("Katherine Johnson")
        assert states() == {before: "delivered", during: "delivered", paused: "delivered",
                            after: "delivered"}
        assert rt.redis.llen(backlog) == 0
        kept = rows(database_url, "SELECT attempts, reason, next_attempt_at"
                                  " FROM webhook_sink_outcomes WHERE event_id = %s", during)
        assert kept == [{"attempts": 1, "reason": None, "next_attempt_at": None}]
        assert receiver.duplicates == 0 and sum(receiver.posts.values()) == 4
    finally:
        install_runtime(previous)
        rt.close()
        rt.redis.close()
        server.stop()
