"""The `ingest` command, run as a user runs it: a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.helpers import SECRETS, rows


def ingest(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.run([sys.executable, "-m", "ingest.commands.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_check_prints_providers_and_masks_secrets(make_env: Callable[..., dict[str, str]],
                                                  database_url: str) -> None:
    result = ingest("check", env=make_env(database_url))
    assert result.returncode == 0, result.stderr
    assert "outreach" in result.stdout and "OUTREACH_WEBHOOK_SECRETS" in result.stdout
    assert "postgres" in result.stdout
    for pair in SECRETS.values():
        for secret in pair:
            assert secret not in result.stdout + result.stderr


def test_bad_setting_stops_start_up_naming_the_variable(
        make_env: Callable[..., dict[str, str]]) -> None:
    for command in ("check", "serve", "worker"):
        result = ingest(command, env=make_env(INGEST_MAX_BODY_BYTES="huge"))
        assert result.returncode == 2, command
        assert "INGEST_MAX_BODY_BYTES" in result.stderr, command


def test_migrate_is_idempotent(make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    # The fixture already migrated this database; running again changes nothing.
    result = ingest("migrate", env=make_env(database_url))
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_worker_process_processes_and_stops_cleanly_on_sigterm(
        make_env: Callable[..., dict[str, str]], database_url: str, acceptor: Any) -> None:
    env = {"PATH": os.environ.get("PATH", ""), **make_env(database_url)}
    worker = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "worker"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result = ingest("send", "outcaller", "--url", acceptor.url, "--count", "5",
                        env=make_env(database_url))
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(rows(database_url, "SELECT id FROM webhook_events")) == 5:
                break
            time.sleep(0.2)
        assert len(rows(database_url, "SELECT id FROM webhook_events")) == 5
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output[-2000:]


def test_send_reports_rejections_with_a_nonzero_exit(acceptor: Any,
                                                     make_env: Callable[..., dict[str, str]]) -> None:
    result = ingest("send", "outreach", "--url", acceptor.url, "--secret", "wrong-secret-000",
                    "--count", "3", env=make_env())
    assert result.returncode == 1
    assert "401" in result.stderr


def test_healthz_of_a_real_serve_process(make_env: Callable[..., dict[str, str]]) -> None:
    from ingest.commands.embedded import free_port

    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), **make_env()}
    server = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli",
                               "serve", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status != 200:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.1)
        assert status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)


def test_check_masks_a_database_password_given_in_the_query_string(
        make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    url = database_url.replace("://", "://someone:pw-in-userinfo-1@", 1) \
        if "@" not in database_url else database_url
    result = ingest("check", env=make_env(f"{url}?password=pw-in-query-123&sslmode=prefer"))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "pw-in-query-123" not in output and "pw-in-userinfo-1" not in output
    assert "password=****" in output and "sslmode=prefer" in output
