"""Start-up against servers that are not there yet, refuse us, or cannot hold our data.

Every process runs as a user runs it (a real `ingest` process). A server that comes up late is
a TCP forwarder opened on a free port of 127.0.0.1, in front of the test's real Redis or
Postgres, only once the process says it is waiting.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import quote, urlsplit

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from ingest.commands.embedded import free_port
from sinks.postgres import migrate
from tests.helpers import rows, wait_for_queue_workers, wait_until, with_database

# A password no output may show.
PASSWORD = "pw-never-printed-4242"


class Forwarder:
    """A TCP server on 127.0.0.1:``port`` that pipes each connection to ``target`` (a TCP
    address, or a Unix socket path): the real server, appearing on that port when we say."""

    def __init__(self, port: int, target: tuple[str, int] | str) -> None:
        self.port, self.target = port, target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = self._connect()
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def postgres_target(url: str) -> tuple[str, int] | str:
    info = conninfo_to_dict(url)
    host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


def redis_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def via_port(database_url: str, port: int) -> str:
    """``database_url`` reached at 127.0.0.1:``port`` instead (through a Forwarder)."""
    info = conninfo_to_dict(database_url)
    auth = quote(str(info.get("user") or "postgres"), safe="")
    if info.get("password"):
        auth += ":" + quote(str(info["password"]), safe="")
    return f"postgresql://{auth}@127.0.0.1:{port}/{info['dbname']}"


def start(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", *args],
                            env={"PATH": os.environ.get("PATH", ""), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ingest(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.commands.cli", *args],
                          env={"PATH": os.environ.get("PATH", ""), **env},
                          capture_output=True, text=True, timeout=timeout)


def log_lines(stream: IO[str]) -> Iterator[dict[str, Any]]:
    """The JSON log lines of a process, as they come (other lines are skipped)."""
    for line in stream:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def wait_for_line(proc: subprocess.Popen[str], wanted: Callable[[dict[str, Any]], bool],
                  seen: list[dict[str, Any]]) -> dict[str, Any]:
    """The first log line of ``proc`` that ``wanted`` accepts. The processes under test give up
    on their own (INGEST_STARTUP_WAIT), so their stderr always ends."""
    assert proc.stderr is not None
    for record in log_lines(proc.stderr):
        seen.append(record)
        if wanted(record):
            return record
    raise AssertionError(f"the process ended (status {proc.wait()}) without that line: {seen}")


def applied_migrations(database_url: str) -> list[str]:
    return [r["name"] for r in rows(database_url, "SELECT name FROM webhook_ingest_migrations")]


def migration_files() -> list[str]:
    from importlib import resources

    return sorted(f.name for f in resources.files("sinks.migrations").iterdir()
                  if f.name.endswith(".sql"))


# -- ingest migrate waits for Postgres ----------------------------------------------------------


def test_migrate_waits_for_a_postgres_that_comes_up_later(fresh_database: str) -> None:
    port = free_port()
    proc = start("migrate", env={"DATABASE_URL": via_port(fresh_database, port),
                                 "INGEST_STARTUP_WAIT": "60"})
    seen: list[dict[str, Any]] = []
    forwarder = None
    try:
        waiting = wait_for_line(proc, lambda r: "waiting for Postgres" in r["message"], seen)
        assert f"127.0.0.1:{port}" in waiting["message"]
        assert waiting["level"] == "warning"
        forwarder = Forwarder(port, postgres_target(fresh_database))  # the server comes up
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if forwarder is not None:
            forwarder.close()
    assert proc.returncode == 0, err
    assert out.strip() == "applied: " + ", ".join(migration_files())
    assert "answers, after" in err
    assert applied_migrations(fresh_database) == migration_files()


def test_migrate_gives_up_naming_what_to_check_when_no_postgres_comes() -> None:
    port = free_port()
    url = f"postgresql://ingest:{PASSWORD}@127.0.0.1:{port}/ingest"
    result = ingest("migrate", env={"DATABASE_URL": url, "INGEST_STARTUP_WAIT": "2"})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ingest migrate: Postgres at 127.0.0.1:{port} did not answer "
                           "within 2 s"), result.stderr
    for hint in ("Connection refused", "DATABASE_URL", "INGEST_STARTUP_WAIT"):
        assert hint in last
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_migrate_stops_at_once_when_postgres_refuses_it(postgres_server: str) -> None:
    # Waiting cannot create a database: the answer is final, whatever INGEST_STARTUP_WAIT says.
    url = with_database(postgres_server, "wi_" + uuid.uuid4().hex[:12])
    result = ingest("migrate", env={"DATABASE_URL": url, "INGEST_STARTUP_WAIT": "600"})
    assert result.returncode == 1
    assert "refused the connection" in result.stderr and "does not exist" in result.stderr
    assert "DATABASE_URL" in result.stderr
    assert "waiting for Postgres" not in result.stderr
    assert "Traceback" not in result.stderr


# -- ingest migrate: encodings and concurrency ---------------------------------------------------


@pytest.fixture(params=["SQL_ASCII", "LATIN1"])
def non_utf8_database(request: pytest.FixtureRequest,
                      postgres_server: str) -> Iterator[tuple[str, str]]:
    name = "wi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE \"{name}\" ENCODING '{request.param}' TEMPLATE template0 "
                     "LC_COLLATE 'C' LC_CTYPE 'C'")
    yield with_database(postgres_server, name), request.param
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_refuses_a_database_that_is_not_utf8_and_names_the_fix(
        non_utf8_database: tuple[str, str]) -> None:
    url, encoding = non_utf8_database
    for _ in range(2):  # the second run says the same, it does not half-apply anything
        result = ingest("migrate", env={"DATABASE_URL": url})
        assert result.returncode == 1, result.stdout + result.stderr
        message = result.stderr.strip().splitlines()[-1]
        assert f"has encoding {encoding}" in message
        assert "ENCODING 'UTF8' TEMPLATE template0" in message
        assert "Traceback" not in result.stderr
    tables = rows(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert tables == []


def test_migrate_twice_on_a_utf8_database_applies_once(fresh_database: str) -> None:
    first = ingest("migrate", env={"DATABASE_URL": fresh_database})
    second = ingest("migrate", env={"DATABASE_URL": fresh_database})
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == "applied: " + ", ".join(migration_files())
    assert second.stdout.strip() == "schema is up to date"


def test_concurrent_migrations_on_a_fresh_database_apply_each_file_once(
        fresh_database: str) -> None:
    # Several containers (or hosts) may run `ingest migrate` at the same moment.
    procs = [start("migrate", env={"DATABASE_URL": fresh_database}) for _ in range(6)]
    outputs_of = [p.communicate(timeout=120) for p in procs]
    results = [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs_of)]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    outputs = sorted(out.strip() for _, out, _ in results)
    assert outputs == sorted(["applied: " + ", ".join(migration_files())]
                             + ["schema is up to date"] * 5)
    assert applied_migrations(fresh_database) == migration_files()


def test_concurrent_migrations_in_threads_apply_each_file_once(fresh_database: str) -> None:
    barrier = threading.Barrier(8)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(fresh_database))
        except BaseException as exc:  # collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == sorted([migration_files()] + [[]] * 7)


# -- ingest worker waits for Redis ---------------------------------------------------------------


def test_worker_waits_for_a_redis_that_comes_up_later(
        make_env: Callable[..., dict[str, str]], database_url: str, redis_server: str,
        namespace: str) -> None:
    port = free_port()
    env = make_env(database_url, REDIS_URL=f"redis://127.0.0.1:{port}/0",
                   INGEST_STARTUP_WAIT="60")
    proc = start("worker", "--queue", "ingest", env=env)
    seen: list[dict[str, Any]] = []
    forwarder = None
    try:
        waiting = wait_for_line(proc, lambda r: "waiting for Redis" in r["message"], seen)
        assert f"127.0.0.1:{port}" in waiting["message"]
        forwarder = Forwarder(port, redis_target(redis_server))  # Redis comes up
        wait_for_line(proc, lambda r: "Redis at" in r["message"] and "answers" in r["message"],
                      seen)
        # It serves its queue: registered in Redis, as RQ registers a listening worker.
        wait_for_queue_workers(redis_server, [f"{namespace}-ingest"], timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if forwarder is not None:
            forwarder.close()
    assert proc.returncode == 0


def test_worker_gives_up_naming_what_to_check_when_no_redis_comes(
        make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    port = free_port()
    env = make_env(database_url, REDIS_URL=f"redis://127.0.0.1:{port}/0",
                   INGEST_STARTUP_WAIT="2")
    result = ingest("worker", "--queue", "ingest", env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ingest worker: Redis at 127.0.0.1:{port} did not answer within 2 s")
    assert "REDIS_URL" in last and "INGEST_STARTUP_WAIT" in last
    assert "Traceback" not in result.stderr


# -- ingest serve does not wait: it spools ---------------------------------------------------------


def test_acceptor_starts_without_redis_says_so_and_spools(
        make_env: Callable[..., dict[str, str]], tmp_path: Any) -> None:
    port, redis_port = free_port(), free_port()
    env = make_env(REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    proc = start("serve", "--host", "127.0.0.1", "--port", str(port), env=env)
    try:
        seen: list[dict[str, Any]] = []
        warning = wait_for_line(proc, lambda r: "does not answer yet" in r["message"], seen)
        assert f"127.0.0.1:{redis_port}" in warning["message"]
        assert "spool" in warning["message"]

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the acceptor to listen")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["redis"] == "unreachable"
        sent = ingest("send", "outcaller", "--url", f"http://127.0.0.1:{port}", "--count", "3",
                      env=env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["spool_depth"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
