"""``ingest dev``: the whole pipeline on one machine, with nothing installed but Python.

Starts embedded Redis and Postgres when ``REDIS_URL``/``DATABASE_URL`` are unset, migrates,
runs the acceptor and the workers as child processes, and prints every URL and secret a user
needs, plus the commands to try next. Secrets it generates are kept in the state directory,
so webhook URLs stay the same from one run to the next. Ctrl-C stops everything it started.

It hands its environment over: ``<state dir>/env`` (``.ingest-dev/env``) holds, as ``export``
lines, every setting the stack runs with (``REDIS_URL``, ``DATABASE_URL``, the secrets, the
sinks' settings). ``source .ingest-dev/env`` gives them to any shell, and every ``ingest``
command run from this directory without ``REDIS_URL``, ``DATABASE_URL`` or ``INGEST_CONFIG``
uses them by itself (:func:`dev_environment`), saying so in one line. The file is removed when
the stack stops; one left by a stack that was killed is ignored (its pid is in it).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from ingest.commands.devenv import DEV_ENV, DEV_STATE_DIR, PID_LINE, URL_LINE
from ingest.config import Settings
from ingest.commands.embedded import EmbeddedPostgres, EmbeddedRedis
from ingest.providers import load_providers

__all__ = ["run_dev"]

# Widest line the banner prints: every value on it must be whole at 80 columns.
_WIDTH = 79


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


def _handed_over(settings: Settings, env: Mapping[str, str]) -> dict[str, str]:
    """The settings the stack runs with, as another shell needs them: the servers, the spool,
    the namespace and config file when set, the secrets, and the enabled sinks' settings."""
    from ingest.providers import load_providers

    keys = ["REDIS_URL", "DATABASE_URL", "INGEST_SPOOL_DIR", "INGEST_NAMESPACE", "INGEST_CONFIG",
            "INGEST_SINKS", *(p.secret_setting for p in load_providers().values())]
    prefixes = tuple(f"{sink.upper().replace('-', '_')}_" for sink in settings.sinks)
    keys += sorted(k for k in env if k.startswith(prefixes))
    return {k: env[k] for k in dict.fromkeys(keys) if env.get(k)}


def _write_env(path: Path, values: Mapping[str, str], base: str) -> None:
    lines = [f"# Written by `ingest dev` (pid {os.getpid()}) for the stack it runs; removed when",
             "# it stops. In a shell: source " + _shown_path(path),
             f"{PID_LINE}{os.getpid()}", f"{URL_LINE}{base}"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # it holds the secrets


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _console_port(settings: Settings, port: int) -> int:
    """Where the dev stack's console listens: ``INGEST_CONSOLE_PORT`` when set, else the
    port after the acceptor's when free, else any free port (the banner says which)."""
    from ingest.commands.embedded import free_port

    if settings.raw.get("INGEST_CONSOLE_PORT"):
        return settings.console_port
    return port + 1 if port < 65535 and not _port_taken(port + 1) else free_port()


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
    if _port_taken(port):
        # Before anything starts: a second `ingest dev` must not print a banner for the first.
        print(f"ingest dev: port {port} is taken (another `ingest dev`, or another server): "
              f"stop it, or pass --port {port + 1}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    env_file = state / DEV_ENV
    started: list[EmbeddedRedis | EmbeddedPostgres] = []
    children: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)  # its terminal closed: stop what it started too
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
        console_port = _console_port(settings, port)
        console_url = f"http://127.0.0.1:{console_port}"
        console_env = dict(env)
        console_env["INGEST_LOG_LEVEL"] = settings.raw.get("INGEST_LOG_LEVEL") or "warning"
        children.append(subprocess.Popen(
            [*_ingest_command(), "console", "--host", "127.0.0.1", "--port", str(console_port)],
            env=console_env, start_new_session=True))
        worker_env = dict(env)
        if not verbose and not settings.raw.get("INGEST_LOG_LEVEL"):
            worker_env["INGEST_LOG_LEVEL"] = "warning"  # RQ's start-up lines, per worker
        children.append(subprocess.Popen([*_ingest_command(), "worker"], env=worker_env,
                                         start_new_session=True))
        # Let the workers log their start-up first, so the banner is the last thing on screen.
        time.sleep(2.0)

        _write_env(env_file, _handed_over(settings, env), base)
        _banner(console, base, env, redis_url, database_url, env_file, console_url)
        while not stop:
            for proc in children:
                if proc.poll() is not None:
                    console.print(f"[red]a child process exited ({proc.args!r}); stopping[/red]")
                    return 1
            time.sleep(0.3)
        console.print("stopping...")
        return 0
    finally:
        env_file.unlink(missing_ok=True)  # nothing runs there any more
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


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it is under it (shorter to type)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _ingest_shown() -> str:
    """How to type ``ingest`` from here: its name when the shell finds this one on PATH,
    else its path (relative when under this directory, as .venv/bin/ingest)."""
    script = Path(sys.argv[0]).resolve()
    if not script.name == "ingest":
        return "ingest"
    found = shutil.which("ingest")
    if found and Path(found).resolve() == script:
        return "ingest"
    return shlex.quote(_shown_path(script))


def _banner(console: Console, base: str, env: dict[str, str], redis_url: str,
            database_url: str, env_file: Path, console_url: str) -> None:
    """What to copy first, then the URLs and secrets: at most 24 lines of at most 79
    characters, so all of it shows whole on an 80x24 terminal. A value too long for a line of
    its own (a deep working directory) is named by its setting in the env file instead."""
    # Plain lines, never a table: a URL or secret cut or wrapped cannot be pasted.
    def line(text: str = "") -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False, emoji=False)

    def value(label: str, setting: str, text: str) -> None:
        if len(label) + len(text) <= _WIDTH or not setting:
            line(label + text)
        elif len(text) + 2 <= _WIDTH:
            line(label.rstrip())
            line("  " + text)
        else:
            line(f"{label}{setting} in {_shown_path(env_file)}")

    ingest = _ingest_shown()
    source = shlex.quote(_shown_path(env_file))
    state = env_file.parent
    default = state == (Path.cwd() / DEV_STATE_DIR).resolve()
    line(f"webhook-ingest dev runs at {base} (Ctrl-C stops it)")
    line(f"Console: {console_url}")
    # Commands run from this directory find the stack in .ingest-dev by themselves; with
    # another --state-dir, the shell needs its settings first.
    line("In another terminal, from this directory:" if default else
         f"In another terminal, from this directory, after: source {source}")
    line(f"  {ingest} send outreach --count 20" + (
        "" if default else f" --state-dir {shlex.quote(_shown_path(state))}"))
    line(f"  {ingest} events")
    line(f"  {ingest} status")
    if default:
        line(f"  source {source}   # its settings, for any tool")
    line("Webhook URLs and their secrets:")
    for name, provider in sorted(load_providers().items()):
        value("  ", "", f"{base}/webhooks/{name}")
        setting = provider.secret_setting
        value("  ", setting, f"{setting}={env[setting]}")
    value("Redis:    ", "REDIS_URL", redis_url)
    value("Postgres: ", "DATABASE_URL", database_url)
