"""Prometheus ``/metrics`` for workers: ``ingest worker --metrics-port P``.

A worker serving one queue counts in its own memory and serves that. ``ingest worker`` with
several queues supervises one child process per queue, and the metrics live in the children;
so the supervisor runs prometheus-client's multiprocess mode: each child writes its values to
files in ``PROMETHEUS_MULTIPROC_DIR`` and the supervisor's endpoint sums them. Counters of a
child that died and was restarted stay in the sum, so they never go backwards.

The process that serves the endpoint owns the directory and empties it at start: files left
by an earlier run (other PIDs) would otherwise be summed in forever. So one directory must
never be shared by two workers (each container has its own; on one host, leave the variable
unset and each supervisor makes a private temporary directory, removed when it stops).

This module imports prometheus-client only inside functions: in multiprocess mode the value
files are created when :mod:`ingest.metrics` is imported, which must come after the cleaning.

The HTTP server is prometheus-client's (its WSGI app, a threading WSGI server, no access log),
started here rather than by its ``start_http_server`` only to choose how often the serving
thread looks for a stop: every ``_STOP_CHECK`` seconds, not 0.5, so a worker told to stop
is not kept waiting for it (the module docstring of workers/worker.py says why that
matters).

A worker forks its scheduler (workers.scheduler), and a forked child inherits every open file,
the metrics port's listening socket included: a scheduler still finishing (or outliving a
worker killed with SIGKILL) would keep the port, and the restarted worker would fail with
"Address already in use". So a forked child closes its copy of the socket at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ingest.config import Settings
from ingest.exceptions import ConfigError

__all__ = ["WorkerMetrics", "clean_multiproc_dir"]

log = logging.getLogger("ingest.commands.metrics_server")

# The metrics servers listening in this process: a forked child closes its copies at once.
_listening: set[Any] = set()
_fork_hook_installed = False


def _close_inherited_sockets() -> None:
    """In a freshly forked child: close the listening sockets it inherited (its parent keeps
    serving on them); the serving threads did not come along anyway."""
    for server in list(_listening):
        try:
            server.socket.close()
        except OSError:
            pass
    _listening.clear()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_close_inherited_sockets)
        _fork_hook_installed = True

# The environment variable prometheus-client reads to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Settings naming where a worker serves its metrics.
PORT_SETTING = "INGEST_METRICS_PORT"
HOST_SETTING = "INGEST_METRICS_HOST"
DEFAULT_HOST = "0.0.0.0"
# How often the serving thread looks whether it should stop (socketserver's default: 0.5 s).
_STOP_CHECK = 0.1


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds up the process's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log line on stderr (every line there is one of our JSON records)."""


def _serve(host: str, port: int, registry: Any) -> WSGIServer:
    """What prometheus-client's ``start_http_server`` does (without TLS), but with a serving
    thread that notices a stop within ``_STOP_CHECK`` seconds."""
    from prometheus_client import make_wsgi_app

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    server: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class,
                                     handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _STOP_CHECK},
                     name="metrics-http", daemon=True).start()
    return server


def clean_multiproc_dir(directory: Path) -> int:
    """Remove prometheus-client's value files (``*.db``) from ``directory``; return how many.

    Only those files: the directory may be one the operator chose, holding anything else.
    """
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _port(settings: Settings, given: int | None) -> int | None:
    if given is not None:
        value: str | int = given
    else:
        raw = settings.raw.get(PORT_SETTING)
        if not raw:
            return None
        value = raw
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(PORT_SETTING, f"must be a port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(PORT_SETTING, f"must be between 1 and 65535, got {port}")
    return port


class WorkerMetrics:
    """The metrics endpoint of one ``ingest worker`` process; a context manager."""

    def __init__(self, host: str, port: int, supervising: bool,
                 directory: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.supervising = supervising
        self.directory = directory  # the operator's PROMETHEUS_MULTIPROC_DIR, if any
        self._made_directory = False
        self._server: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, host: str | None, port: int | None,
                      supervising: bool) -> WorkerMetrics | None:
        """None when no port is configured (``--metrics-port`` or ``INGEST_METRICS_PORT``)."""
        chosen = _port(settings, port)
        if chosen is None:
            return None
        directory = settings.raw.get(MULTIPROC_ENV) or None
        return cls(host or settings.raw.get(HOST_SETTING) or DEFAULT_HOST, chosen, supervising,
                   Path(directory) if directory else None)

    def start(self) -> WorkerMetrics:
        from prometheus_client import REGISTRY, CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry: Any = REGISTRY
        if self.supervising or self.directory is not None:
            if self.directory is None:
                self.directory = Path(tempfile.mkdtemp(prefix="ingest-metrics-"))
                self._made_directory = True
            stale = clean_multiproc_dir(self.directory)
            if stale:
                log.info("removed %d stale metrics files from %s", stale, self.directory)
            os.environ[MULTIPROC_ENV] = str(self.directory)  # children inherit it
            registry = CollectorRegistry()
            MultiProcessCollector(  # type: ignore[no-untyped-call]
                registry, path=str(self.directory))
        if self.supervising:
            # The children serve one queue each and must not try to listen on our port; an
            # empty value wins over a config file (the environment always does).
            os.environ[PORT_SETTING] = ""
        try:
            self._server = _serve(self.host, self.port, registry)
        except OSError as exc:
            self.close()
            raise ConfigError(PORT_SETTING, f"cannot listen on {self.host}:{self.port}: "
                                            f"{exc.strerror or exc}") from None
        _install_fork_hook()
        _listening.add(self._server)
        log.info("serving metrics on http://%s:%d/metrics", self.host, self.port,
                 extra={"port": self.port})
        return self

    def close(self) -> None:
        if self._server is not None:
            _listening.discard(self._server)
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._made_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> WorkerMetrics:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "multiprocess" if self.supervising or self.directory else "single process"
        return f"<WorkerMetrics {self.host}:{self.port} {mode}>"
