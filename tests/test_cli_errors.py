"""Every command a user runs says one line, never a traceback, when something is off: Redis or
Postgres stopped, a database not migrated, wrong credentials, a closed pipe, a wrong
argument. The exit status is the documented one (ingest.commands.errors)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.commands.cli import main
from ingest.commands.embedded import free_port, redis_server_binary
from tests.helpers import wait_until, with_database

ROOT = Path(__file__).resolve().parents[1]

REDIS_COMMANDS = [["status"], ["status", "--json"], ["refused"], ["dlq", "list"],
                  ["dlq", "retry"], ["dlq", "purge"],
                  ["erase", "--email", "someone@example.com", "--yes"]]
POSTGRES_COMMANDS = [["replay"], ["replay", "--dry-run"], ["retention"],
                     ["erase", "--email", "someone@example.com", "--yes"], ["events"],
                     ["sql", "select count(*) from webhook_events"]]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ingest {command}: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server: str, namespace: str,
          database_url: str) -> Callable[..., None]:
    """``shell(REDIS_URL=..., ...)``: a user's shell, in an empty directory, with these set."""
    monkeypatch.chdir(tmp_path)

    def configure(**values: str) -> None:
        base = {"REDIS_URL": redis_server, "DATABASE_URL": database_url,
                "INGEST_NAMESPACE": namespace, "INGEST_SPOOL_DIR": str(tmp_path / "spool"),
                "INGEST_RETENTION_DAYS": "30", "INGEST_STARTUP_WAIT": "1"}
        for key, value in {**base, **values}.items():
            monkeypatch.setenv(key, value)

    return configure


@pytest.mark.parametrize("argv", REDIS_COMMANDS, ids=" ".join)
def test_a_stopped_redis_is_one_line_naming_redis_url(
        argv: list[str], shell: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    shell(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    status, out, err = run(argv, capsys)
    line = one_line(err, argv[0])
    assert status == 1 and "cannot reach Redis" in line and "REDIS_URL" in line, err
    assert out == ""


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS, ids=" ".join)
def test_a_stopped_postgres_is_one_line_naming_database_url(
        argv: list[str], shell: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    shell(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    status, out, err = run(argv, capsys)
    line = one_line(err, argv[0])
    assert status == 1 and "cannot reach Postgres" in line and "DATABASE_URL" in line, err


@pytest.mark.parametrize("argv", POSTGRES_COMMANDS, ids=" ".join)
def test_a_database_not_migrated_yet_says_run_ingest_migrate(
        argv: list[str], shell: Callable[..., None], fresh_database: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    shell(DATABASE_URL=fresh_database)
    status, out, err = run(argv, capsys)
    line = one_line(err, argv[0])
    assert status == 2 and "run `ingest migrate`" in line, err


def test_wrong_credentials_are_configuration_errors(
        shell: Callable[..., None], redis_server: str, postgres_server: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    shell(DATABASE_URL=with_database(postgres_server, "no_such_database_here"))
    status, _, err = run(["events"], capsys)
    assert status == 2 and "Postgres refused the connection" in one_line(err, "events")
    assert "DATABASE_URL" in err
    # A Redis that wants a password (the shared one may not: it then takes any).
    port = free_port()
    guarded = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind",
                                "127.0.0.1", "--save", "", "--requirepass", "the-right-one-42"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(port), 10, "the password-protected Redis")
        secret = "not-the-password-0123"
        for url in (f"redis://:{secret}@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
            shell(REDIS_URL=url)
            status, _, err = run(["status"], capsys)
            line = one_line(err, "status")
            assert status == 2 and "Redis refused our credentials" in line, err
            assert "REDIS_URL" in line and secret not in err
    finally:
        guarded.terminate()
        guarded.wait(timeout=10)


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_debug_shows_the_traceback_instead(shell: Callable[..., None]) -> None:
    shell(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisConnectionError):
        main(["status", "--debug"])


def test_ctrl_c_is_one_line_and_status_130(
        shell: Callable[..., None], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    shell()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ingest.commands.status.build_status", interrupted)
    status, _, err = run(["status"], capsys)
    assert status == 130 and one_line(err, "status") == "ingest status: interrupted"


def test_a_closed_pipe_ends_quietly(shell: Callable[..., None], database_url: str) -> None:
    """``ingest sql ... | head -1``: the reader goes away; no traceback, status 0."""
    shell()
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest.commands.cli", "sql",
         "select n, repeat('x', 300) from generate_series(1, 1000) n", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ), cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b'{"n":1')
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(("argv", "expected"), [
    (["dlq", "list", "--sink", "bogus"], "no sink 'bogus' (have: ingest, postgres"),
    (["replay", "--provider", "bogus"], "no provider 'bogus' (have: mailstand"),
    (["replay", "--kind", "emial.*"], "no kind matches 'emial.*'"),
    (["events", "--kind", "mailing.nope"], "no kind matches 'mailing.nope'"),
    (["events", "--provider", "bogus"], "no provider 'bogus'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_wrong_arguments_are_refused_with_the_choices(
        argv: list[str], expected: str, shell: Callable[..., None],
        capsys: pytest.CaptureFixture[str]) -> None:
    shell()
    status, out, err = run(argv, capsys)
    assert status == 2 and expected in one_line(err, argv[0]), err


def test_a_kind_glob_that_matches_an_open_table_entry_is_fine(
        shell: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    shell()
    # OutCallerAI's call.* keeps whatever action it sends: any call.<action> can exist.
    assert run(["events", "--kind", "call.transferred"], capsys)[0] == 0
    assert run(["replay", "--kind", "email.*", "--dry-run"], capsys)[0] == 0


def test_exclusive_flags_are_refused_by_the_parser(
        shell: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    shell()
    with pytest.raises(SystemExit) as exited:
        main(["erase", "--email", "a@example.com", "--suppress", "--unsuppress"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_sql_is_read_only_and_shows_rows_that_fit(
        shell: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    shell()
    status, _, err = run(["sql", "delete from webhook_events"], capsys)
    assert status == 2 and "read-only" in one_line(err, "sql")
    status, _, err = run(["sql", "select * from no_such_table"], capsys)
    assert status == 2 and "no_such_table" in one_line(err, "sql")
    status, out, _ = run(["sql", "select 'a' as x, repeat('y', 300) as long"], capsys)
    assert status == 0 and all(len(line) <= 80 for line in out.splitlines())
    assert "y" * 60 in out.replace("\n", "").replace(" ", "")  # folded, not cut
