"""``ingest dev``: the whole pipeline on one machine, with nothing installed but Python.

Starts embedded Redis and Postgres when ``REDIS_URL``/``DATABASE_URL`` are unset, migrates,
runs the acceptor and the workers as child processes, and prints every URL and secret a user
needs, plus a command that sends a signed sample. Secrets it generates are kept in the state
directory, so webhook URLs stay the same from one run to the next. Ctrl-C stops everything it
started.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from ingest.config import Settings
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis
from ingest.providers import load_providers

__all__ = ["run_dev"]


def _dev_secrets(state: Path, settings: Settings) -> dict[str, str]:
    """Secrets from the environment when set, else generated once and kept in ``state``."""
    path = state / "secrets.toml"
    kept: dict[str, str] = {}
    if path.exists():
        kept = {k: str(v) for k, v in tomllib.loads(path.read_text()).items()}
    out: dict[str, str] = {}
    for name, provider in sorted(load_providers().items()):
        setting = provider.secret_setting
        configured = settings.secrets_for(name)
        if configured:
            out[setting] = ",".join(configured)
        else:
            out[setting] = kept.get(setting) or secrets.token_urlsafe(24)
    generated = {k: v for k, v in out.items() if not settings.raw.get(k)}
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in sorted(generated.items())))
    path.chmod(0o600)
    return out


def _ingest_command() -> list[str]:
    return [sys.executable, "-m", "ingest.commands.cli"]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the acceptor exited during start-up; see its log above")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the acceptor did not answer {url}/healthz within {timeout:.0f} s")


def run_dev(port: int = 8000, state_dir: str = ".ingest-dev", verbose: bool = False) -> int:
    console = Console(stderr=True)
    settings = Settings.from_env()
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    children: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = settings.redis_url
        if not redis_url:
            with console.status("starting embedded Redis (append-only file on)..."):
                redis = EmbeddedRedis(state / "redis").start()
            started.append(redis)
            redis_url = redis.url
        database_url = settings.database_url
        if not database_url:
            with console.status("starting embedded Postgres..."):
                postgres = EmbeddedPostgres(state / "postgres").start()
            started.append(postgres)
            database_url = postgres.url

        env = dict(os.environ)
        env.update(_dev_secrets(state, settings))
        env.update({
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "INGEST_SPOOL_DIR": str(state / "spool"),
            "INGEST_LOG_FORMAT": "text",
            "PYTHONUNBUFFERED": "1",
        })
        migrated = subprocess.run([*_ingest_command(), "migrate"], env=env, capture_output=True,
                                  text=True)
        if migrated.returncode != 0:
            console.print(f"[red]ingest migrate failed:[/red]\n{migrated.stderr}")
            return 1

        base = f"http://127.0.0.1:{port}"
        # Children in sessions of their own: Ctrl-C reaches only this process, which stops
        # them in order (workers, acceptor, then Redis and Postgres), never all at once.
        acceptor = subprocess.Popen(
            [*_ingest_command(), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
            start_new_session=True)
        children.append(acceptor)
        try:
            _wait_healthy(base, acceptor)
        except RuntimeError as exc:
            console.print(f"[red]{exc}[/red] (is port {port} taken? try `ingest dev --port 8001`)")
            return 1
        worker_env = dict(env)
        if not verbose and not settings.raw.get("INGEST_LOG_LEVEL"):
            worker_env["INGEST_LOG_LEVEL"] = "warning"  # RQ's start-up lines, per worker
        children.append(subprocess.Popen([*_ingest_command(), "worker"], env=worker_env,
                                         start_new_session=True))
        # Let the workers log their start-up first, so the banner is the last thing on screen.
        time.sleep(2.0)

        _banner(console, base, env, redis_url, database_url)
        while not stop:
            for proc in children:
                if proc.poll() is not None:
                    console.print(f"[red]a child process exited ({proc.args!r}); stopping[/red]")
                    return 1
            time.sleep(0.3)
        console.print("stopping...")
        return 0
    finally:
        # Workers first, then the acceptor, then the servers they use: nobody is left talking
        # to a Redis or Postgres that is already gone.
        for proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for server in reversed(started):
            server.stop()


def _banner(console: Console, base: str, env: dict[str, str], redis_url: str,
            database_url: str) -> None:
    # Plain lines, never a table: a URL or secret cut or wrapped at 80 columns (or in a file,
    # where rich assumes 80) cannot be pasted. Each value stands whole on its own line.
    def line(text: str = "") -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False, emoji=False)

    line(f"webhook-ingest is running at {base}")
    for name, provider in sorted(load_providers().items()):
        line()
        line(f"{name}:")
        line(f"  {base}/webhooks/{name}")
        line(f"  {provider.secret_setting}={env[provider.secret_setting]}")
    line()
    line(f"Redis:    {redis_url}")
    line(f"Postgres: {database_url}")
    line(f"  psql {shlex.quote(database_url)} -c 'select kind, contact_email from webhook_events'")
    ingest = shlex.quote(str(Path(sys.argv[0]).resolve())) if sys.argv[0].endswith("ingest") \
        else "ingest"
    secret = env["OUTREACH_WEBHOOK_SECRETS"].split(",")[0]
    # --secret=VALUE: a generated secret may start with "-", which argparse takes for an option.
    line("Send a signed sample from another terminal:")
    line(f"  {ingest} send outreach --url {base} --secret={shlex.quote(secret)} --count 20")
    line("What needs attention, and the last refused requests:")
    line(f"  REDIS_URL={shlex.quote(redis_url)} {ingest} status")
    line(f"  REDIS_URL={shlex.quote(redis_url)} {ingest} refused")
    line("Ctrl-C stops everything.")
