"""The first hour with the CLI: `ingest dev` hands its settings over and fits an 80x24
terminal; `ingest status` shows the running stack from a shell that has only REDIS_URL."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from redis import Redis

from ingest.acceptor.app import create_app
from ingest.commands.cli import main
from ingest.commands.devenv import DEV_ENV, PID_LINE, URL_LINE, dev_stack
from ingest.commands.embedded import free_port
from ingest.commands.status import build_status
from ingest.config import Settings
from ingest.deployment import read_deployment
from ingest.providers import load_providers
from tests.helpers import serve, wait_until

ROOT = Path(__file__).resolve().parents[1]
INGEST = Path(sys.executable).parent / "ingest"


# -- ingest status reads the deployment -------------------------------------------------------

def test_status_from_a_shell_with_only_redis_url_lists_the_running_stack(
        make_env: Callable[..., dict[str, str]], database_url: str, redis_server: str,
        namespace: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # The stack: two providers, the postgres and crm sinks; a plugin sink's queue has a job.
    env = make_env(database_url, SALESLOFT_WEBHOOK_SECRETS=None, OUTCALLER_WEBHOOK_TOKENS=None,
                   OUTBOUNDRY_WEBHOOK_TOKENS=None, INGEST_SINKS="postgres,crm",
                   INGEST_SILENCE_AFTER="outreach=6h,*=24h",
                   CRM_WEBHOOK_URL="http://127.0.0.1:9/hook",
                   CRM_WEBHOOK_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    stack = Settings.from_env(env)
    redis = Redis.from_url(redis_server)
    redis.sadd("rq:queues", f"rq:queue:{stack.names.sink_queue('recording')}")
    # This shell: REDIS_URL and the namespace, nothing else (no secrets, default sinks).
    shell = Settings.from_env({"REDIS_URL": redis_server, "INGEST_NAMESPACE": namespace,
                               "INGEST_SPOOL_DIR": str(tmp_path / "spool")})
    try:
        before = build_status(redis, shell)
        assert before["deployment"]["source"] == "this shell"
        assert not any(p["enabled"] for p in before["providers"])

        with serve(create_app(stack)):
            wait_until(lambda: read_deployment(redis, stack.names, time.time()) is not None,
                       10, "the acceptor's registration")
            status = build_status(redis, shell)
            monkeypatch.chdir(tmp_path)
            for key in [k for k in os.environ if k.startswith(("INGEST_", "REDIS_", "DATABASE_"))
                        or k.endswith(("_SECRETS", "_TOKENS"))]:
                monkeypatch.delenv(key)
            monkeypatch.setenv("REDIS_URL", redis_server)
            monkeypatch.setenv("INGEST_NAMESPACE", namespace)
            assert main(["status", "--json"]) in (0, 1)
            printed = orjson.loads(capsys.readouterr().out)
        assert status["deployment"] == {**status["deployment"], "source": "registered",
                                        "acceptor_running": True}
        for seen in (status, printed):
            enabled = {p["name"] for p in seen["providers"] if p["enabled"]}
            assert enabled == {"outreach", "mailstand"}
            assert [s["name"] for s in seen["sinks"]] == ["postgres", "crm", "recording"]
            assert {q["queue"] for q in seen["queues"]} == {
                stack.names.ingest_queue, *(stack.names.sink_queue(s)
                                            for s in ("postgres", "crm", "recording"))}
        silence = {p["name"]: p["silence_after_seconds"] for p in status["providers"]}
        assert silence["outreach"] == 6 * 3600 and silence["mailstand"] == 24 * 3600

        # The stack stops: its configuration still shows, and that no acceptor runs.
        later = read_deployment(redis, stack.names, time.time() + 120)
        assert later is not None and not later.live and set(later.providers) == {
            "outreach", "mailstand"}
    finally:
        redis.delete(stack.names.key("deployment:acceptors"))
        redis.srem("rq:queues", f"rq:queue:{stack.names.sink_queue('recording')}")
        redis.close()


# -- ingest dev hands its settings over -------------------------------------------------------

def _write_stack(directory: Path, pid: int, values: dict[str, str]) -> None:
    state = directory / ".ingest-dev"
    state.mkdir(parents=True, exist_ok=True)
    lines = [f"{PID_LINE}{pid}", f"{URL_LINE}http://127.0.0.1:8765"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
    (state / DEV_ENV).write_text("\n".join(lines) + "\n")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_dev_stacks_settings_are_used_only_where_nothing_else_is_set(
        tmp_path: Path, redis_server: str, namespace: str) -> None:
    values = {"REDIS_URL": redis_server, "INGEST_NAMESPACE": namespace,
              "OUTREACH_WEBHOOK_SECRETS": "a secret with spaces and 'quotes'"}
    _write_stack(tmp_path, os.getpid(), values)
    found = dev_stack(str(tmp_path / ".ingest-dev"), environ={})
    assert found is not None and dict(found.values) == values
    assert found.url == "http://127.0.0.1:8765"
    assert dev_stack(str(tmp_path / ".ingest-dev"), environ={"DATABASE_URL": "x"}) is None
    _write_stack(tmp_path, _dead_pid(), values)  # a stack that was killed
    assert dev_stack(str(tmp_path / ".ingest-dev"), environ={}) is None

    # A command run from there, in a shell without REDIS_URL, says it uses the stack's.
    _write_stack(tmp_path, os.getpid(), values)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "DATABASE_", "INGEST_"))}
    done = subprocess.run([str(INGEST), "status", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr
    assert done.stderr.splitlines()[0] == (
        "ingest status: using the settings of the `ingest dev` running here (.ingest-dev/env)")
    assert "providers" in orjson.loads(done.stdout)


# -- ingest dev on an 80x24 terminal ----------------------------------------------------------

def _screen(server: str) -> list[str]:
    out = subprocess.run(["tmux", "-L", server, "capture-pane", "-p"], capture_output=True,
                         text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.skipif(shutil.which("tmux") is None,
                    reason="tmux is not installed (Debian: apt-get install tmux; .ci/run "
                           "installs it)")
def test_dev_on_an_80x24_terminal_shows_everything_to_copy_whole(
        tmp_path: Path, make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    port = free_port()
    # A tmux server of its own: its sessions start with this test's environment.
    server = f"wi-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_SECRETS", "_TOKENS"))}
    env.update(make_env(database_url))
    for setting in (p.secret_setting for p in load_providers().values()):
        env.pop(setting, None)  # dev generates them
    env["TERM"] = "xterm"
    command = f"{shlex.quote(str(INGEST))} dev --port {port}; sleep 30"
    started = subprocess.run(["tmux", "-L", server, "new-session", "-d", "-x", "80", "-y", "24",
                              "-c", str(tmp_path), command], env=env)
    assert started.returncode == 0
    try:
        wait_until(lambda: any(r.startswith("Postgres:") for r in _screen(server)), 120,
                   "the banner")
        time.sleep(0.5)
        screen = _screen(server)
        rows = [r.rstrip() for r in screen]
        assert len(screen) <= 24 and all(len(r) <= 80 for r in rows), screen
        handed = (tmp_path / ".ingest-dev" / DEV_ENV).read_text()
        values = dict(line[len("export "):].split("=", 1) for line in handed.splitlines()
                      if line.startswith("export "))
        values = {k: shlex.split(v)[0] for k, v in values.items()}
        base = f"http://127.0.0.1:{port}"
        expected = [f"webhook-ingest dev runs at {base} (Ctrl-C stops it)",
                    f"  {INGEST} send outreach --count 20", f"  {INGEST} events",
                    f"  {INGEST} status"]
        for name, provider in load_providers().items():
            setting = provider.secret_setting
            expected += [f"  {base}/webhooks/{name}", f"  {setting}={values[setting]}"]
        expected.append(f"Redis:    {values['REDIS_URL']}")
        # Every URL, secret and command is one whole row of the visible screen.
        missing = [e for e in expected if e not in rows]
        assert not missing, "\n".join(["missing:", *missing, "screen:", *screen])
        assert any(r.strip() == values["DATABASE_URL"] or r == f"Postgres: {values['DATABASE_URL']}"
                   for r in rows), screen
        assert any(r.startswith("  source .ingest-dev/env") for r in rows), screen
        # The console runs too, on loopback without a token: its URL is one whole row.
        console = next((r.removeprefix("Console: ") for r in rows
                        if r.startswith("Console: http://127.0.0.1:")), None)
        assert console is not None, screen
        page = httpx.get(console + "/", timeout=10)
        assert page.status_code == 200 and "Overview" in page.text, page.text[:500]

        # Ctrl-C: the stack stops, and the hand-over with it.
        subprocess.run(["tmux", "-L", server, "send-keys", "C-c"], check=True)
        wait_until(lambda: not (tmp_path / ".ingest-dev" / DEV_ENV).exists(), 60,
                   "ingest dev to stop")
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True)


def test_a_second_dev_on_a_taken_port_fails_before_any_banner(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(INGEST), "dev", "--port", str(port)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ingest dev: port {port} is taken (another `ingest dev`, or "
                                   f"another server): stop it, or pass --port {port + 1}")
    assert "webhook-ingest dev runs" not in done.stdout + done.stderr
    assert not (tmp_path / ".ingest-dev").exists()
