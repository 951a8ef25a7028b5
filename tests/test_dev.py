"""`ingest dev` as a new user runs it: nothing configured, embedded servers, printed command."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import psycopg

from ingest.commands.embedded import free_port


# Ctrl-C to the last process gone (issue 30); about 1.5 s here, Postgres and Redis included.
CTRL_C_BOUND = 3.0


def everything_started_by(pid: int, pg_data: Path) -> dict[int, str]:
    """PID -> name of ``pid``'s descendants (in any session), the members of its process
    group, and the Postgres server in ``pg_data`` with its children."""
    me = psutil.Process(pid)
    found = {p.pid: p.name() for p in me.children(recursive=True)}
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if p.pid != pid and os.getpgid(p.pid) == pid:
                found[p.pid] = p.info["name"]
    postmaster = psutil.Process(int((pg_data / "postmaster.pid").read_text().split()[0]))
    for p in [postmaster, *postmaster.children(recursive=True)]:
        found[p.pid] = p.name()
    return found


def still_running(dev: subprocess.Popen[str], started: dict[int, str]) -> list[str]:
    """What of ``dev`` and ``started`` has not exited (a zombie has: its parent reaps it)."""
    left = [] if dev.poll() is not None else [f"ingest dev ({dev.pid})"]
    for pid, name in started.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(f"{name} ({pid})")
    return left


def test_dev_runs_everything_and_the_printed_sample_lands_in_postgres(tmp_path: Path) -> None:
    ingest = Path(sys.executable).parent / "ingest"
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL") and not k.endswith(("_SECRETS", "_TOKENS"))}
    env["COLUMNS"] = "80"  # a small terminal; the output is a pipe (as a file would be)
    port = free_port()
    # Its own session and process group, as a shell runs a command: Ctrl-C signals the group.
    proc = subprocess.Popen([str(ingest), "dev", "--port", str(port), "--state-dir",
                             str(tmp_path / "state")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(ln.startswith("Postgres:") for ln in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        banner = "".join(lines)
        assert "Ctrl-C stops" in banner, banner
        assert f"http://127.0.0.1:{port}/webhooks/outreach" in banner
        # The settings it hands over; the banner shows each URL whole, or names it there
        # when it is too long for a line (a deep temporary directory).
        handed = {k: shlex.split(v)[0] for k, v in (
            line[len("export "):].split("=", 1)
            for line in (tmp_path / "state" / "env").read_text().splitlines()
            if line.startswith("export "))}
        database_url, redis_url = handed["DATABASE_URL"], handed["REDIS_URL"]
        assert f"Redis:    {redis_url}\n" in banner
        assert (database_url in banner) is (len(database_url) <= 77)  # whole, or named
        assert redis_url.startswith("redis://127.0.0.1:")
        command = next(ln.strip() for ln in lines if " send outreach " in ln)
        assert "--state-dir state" in command  # not the default: the command names it
        # Every URL and secret whole, on one line, at 80 columns; no table borders cutting them.
        kept = dict(line.split(" = ") for line in
                    (tmp_path / "state" / "secrets.toml").read_text().splitlines())
        from ingest.providers import load_providers

        for name, provider in load_providers().items():
            assert f"  http://127.0.0.1:{port}/webhooks/{name}\n" in banner, name
            secret = kept[provider.secret_setting].strip('"')
            assert f"  {provider.secret_setting}={secret}\n" in banner, name
        assert "\u2502" not in banner and "\u2026" not in banner  # no table, nothing cut
        # RQ's per-worker start-up chatter stays quiet without --verbose.
        assert "Listening on" not in banner and "started with PID" not in banner, banner

        sent = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        assert "accepted (200)" in sent.stderr

        count = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and count < 20:
            with psycopg.connect(database_url) as conn:
                count = conn.execute("SELECT count(*) FROM webhook_events").fetchone()[0]
            time.sleep(0.3)
        assert count == 20, "".join(lines[-40:])

        # Ctrl-C: within 3 s, nothing it started is left: not its process group, not the
        # children it runs in sessions of their own (workers, their schedulers, the acceptor,
        # Redis), not the Postgres server pgserver started.
        started = everything_started_by(proc.pid, tmp_path / "state" / "postgres")
        assert len(started) >= 6, started  # acceptor, supervisor, 2 workers, Redis, Postgres
        ctrl_c = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        left: list[str] = []
        while time.monotonic() - ctrl_c < CTRL_C_BOUND:
            left = still_running(proc, started)
            if not left:
                break
            time.sleep(0.02)
        took = time.monotonic() - ctrl_c
        assert not left, f"{CTRL_C_BOUND} s after Ctrl-C, still running: {left}\n" + \
            "".join(lines[-40:])
        print(f"ingest dev: Ctrl-C to every process gone: {took:.2f} s, {len(started)} processes")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=5)
        proc.stdout.close()
    assert proc.returncode == 0, "".join(lines[-40:])
    # Workers stop before Redis and Postgres: nobody reports a connection refused on the way out.
    after = "".join(lines[next(i for i, ln in enumerate(lines) if "stopping" in ln):])
    assert "refused" not in after.lower() and "Traceback" not in after, after
    # Everything it started is gone: the embedded Redis no longer answers.
    import socket

    host_port = redis_url.split("//")[1].split("/")[0]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(host_port.split(":")[1]))) != 0
