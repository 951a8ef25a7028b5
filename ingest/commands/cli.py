"""The ``ingest`` command. Each subcommand is a small function; heavy imports stay inside it.

Every command reads configuration once, through :class:`Settings`; a bad setting prints one
line naming the variable and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from ingest import constants
from ingest.config import Settings

__all__ = ["main"]


def _settings() -> Settings:
    return Settings.from_env()


def _setup_logging(settings: Settings, fmt: str | None = None) -> None:
    from ingest.logs import log_level, setup_logging

    secrets = [s.reveal() for group in settings.provider_secrets.values() for s in group]
    secrets += [v for k, v in settings.raw.items()
                if k.endswith(("_SECRET", "_SECRETS", "_TOKEN", "_TOKENS", "_URL",
                               "_API_KEY")) and v]
    setup_logging(fmt or settings.log_format, secrets, log_level(settings))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ingest.acceptor.app import create_app
    from ingest.acceptor.http_limits import LimitedHttpToolsProtocol, fit_connection_limit

    # uvicorn ends its graceful shutdown by raising the signal that asked for it once more,
    # with the handlers it found restored: by default SIGTERM then kills the process, and a
    # platform sees exit code 143 (docker) for a clean stop. With this handler it exits 0, as
    # the workers do; a SIGTERM before uvicorn takes over (start-up) stops it at once, with 0.
    signal.signal(signal.SIGTERM, _stopped)
    settings = _settings()
    _setup_logging(settings)
    _report_redis_at_start(settings)
    limit, backlog = _connection_limit(settings, fit_connection_limit)
    app = create_app(settings)
    # What is imported and built by now lives as long as the process: out of the collector's
    # sight, it is not traversed by every full collection, nor at exit (see cmd_worker).
    gc.freeze()
    port = args.port if args.port is not None else int(os.environ.get("PORT", "8000"))
    host = args.host or settings.raw.get("INGEST_HOST") or "0.0.0.0"
    protocol = LimitedHttpToolsProtocol.configured(head_timeout=settings.head_timeout,
                                                   max_connections=limit)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                http=protocol, loop="uvloop", timeout_keep_alive=constants.KEEP_ALIVE_TIMEOUT,
                backlog=backlog, timeout_graceful_shutdown=10)
    return 0


def _connection_limit(settings: Settings,
                      fit: Callable[[int], tuple[int, int, int]]) -> tuple[int, int]:
    """(connection limit, listen backlog) for ``ingest serve``, said once at start."""
    limit, backlog, fds = fit(settings.max_connections)
    logger = logging.getLogger("ingest.commands.cli")
    if limit < settings.max_connections:
        logger.warning(
            "holding at most %d connections open, not INGEST_MAX_CONNECTIONS=%d: this process "
            "may open %d files, of which %d stay for other uses and %d for connections not yet "
            "accepted. Raise the limit (ulimit -n; docker: ulimits nofile) to hold more.",
            limit, settings.max_connections, fds, constants.FD_RESERVE, backlog)
    else:
        logger.info("holding at most %d connections open (INGEST_MAX_CONNECTIONS; this process "
                    "may open %d files)", limit, fds)
    return limit, backlog


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _report_redis_at_start(settings: Settings) -> None:
    """The acceptor starts without Redis (deliveries go to the spool until it answers), so it
    does not wait for it; it says so once, at start, instead of leaving that to be guessed."""
    from ingest.startup import redis_problem, server_address

    url = settings.require_redis()
    problem = redis_problem(url)
    if problem is not None:
        logging.getLogger("ingest.commands.cli").warning(
            "Redis at %s does not answer yet (%s): accepting deliveries into the spool (%s) "
            "until it does, and /readyz answers 503 meanwhile. Check that Redis runs and that "
            "REDIS_URL names it.", server_address(url), problem, settings.spool_dir)


def cmd_worker(args: argparse.Namespace) -> int:
    from ingest.commands.metrics_server import WorkerMetrics

    settings = _settings()
    _setup_logging(settings)
    try:
        queues = [_queue_name(settings, q) for q in args.queue or ()]
    except ValueError as exc:
        print(f"ingest worker: {exc}", file=sys.stderr)
        return 2
    # Before the metrics endpoint opens: a worker still waiting for Redis is not healthy yet.
    from ingest.startup import wait_for_redis

    wait_for_redis(settings.require_redis(), settings.startup_wait)
    # Mirrors run_worker: several queues without --burst means one child process per queue.
    supervising = not args.burst and len(queues or range(1 + len(settings.sinks))) > 1
    # Before anything imports ingest.metrics: multiprocess mode must clean its directory first.
    exposition = WorkerMetrics.from_settings(settings, args.metrics_host, args.metrics_port,
                                             supervising)
    if exposition is not None:
        exposition.start()
    try:
        from workers.processes import run_worker

        # Nearly everything the process will hold is imported by now, for as long as it runs:
        # out of the collector's sight (gc.freeze), it is neither traversed by every full
        # collection nor at exit, where that was most of the CPU a stopping worker spent (0.24 s
        # after SIGTERM without it, 0.07 s with it), and the scheduler it forks shares those
        # pages instead of copying them as the collector touches them.
        gc.freeze()
        return run_worker(settings, queues or None, burst=args.burst,
                          command=[sys.executable, "-m", "ingest.commands.cli", "worker"])
    finally:
        if exposition is not None:
            exposition.close()


def _queue_name(settings: Settings, queue: str) -> str:
    """``ingest`` or ``sink-<name>``, as Procfile and docker-compose write them, to the queue
    of this deployment's namespace. A name already in the namespace is taken as it is."""
    names = settings.names
    if names.namespace and queue in {names.ingest_queue, *map(names.sink_queue, settings.sinks)}:
        return queue
    if queue == constants.INGEST_QUEUE:
        return names.ingest_queue
    sink = queue.removeprefix(constants.SINK_QUEUE_PREFIX)
    if sink and sink != queue:
        if sink not in settings.sinks:
            logging.getLogger("ingest.commands.cli").warning(
                "sink %r is not enabled in INGEST_SINKS; this worker will wait for jobs that "
                "will not come", sink, extra={"queue": queue})
        return names.sink_queue(sink)
    raise ValueError(f"no queue {queue!r}: use {constants.INGEST_QUEUE!r} or "
                     f"'{constants.SINK_QUEUE_PREFIX}<sink>' (e.g. sink-postgres)")


def cmd_migrate(args: argparse.Namespace) -> int:
    from sinks.postgres import MigrationError, migrate

    settings = _settings()
    _setup_logging(settings)
    try:
        applied = migrate(settings.require_database(), wait=settings.startup_wait)
    except MigrationError as exc:
        print(f"ingest migrate: {exc}", file=sys.stderr)
        return 1
    print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ingest.providers import load_providers
    from sinks.registry import build_sinks

    settings = _settings()
    sinks = build_sinks(settings)
    print(f"REDIS_URL          {_mask_url(settings.redis_url)}")
    print(f"DATABASE_URL       {_mask_url(settings.database_url)}")
    print(f"INGEST_NAMESPACE   {settings.namespace or '(none)'}")
    print("providers:")
    for name, provider in sorted(load_providers().items()):
        secrets = settings.provider_secrets.get(name, ())
        state = ", ".join(s.masked() for s in secrets) if secrets else "disabled (no secret)"
        print(f"  {name:<12} {provider.secret_setting:<28} {state}")
    print("sinks:")
    for name, enabled in sinks.items():
        print(f"  {name:<12} events={','.join(enabled.events)}")
    return 0


def _mask_url(url: str | None) -> str:
    if not url:
        return "(not set)"
    from ingest.redaction import mask_dsn

    # The password may be in the user info or a query parameter (?password=...).
    return mask_dsn(url)


def cmd_send(args: argparse.Namespace) -> int:
    from ingest.providers import load_providers
    from ingest.commands.send import send

    settings = _settings()
    providers = load_providers()
    if args.provider not in providers:
        print(f"ingest send: no provider {args.provider!r} (have: {', '.join(sorted(providers))})",
              file=sys.stderr)
        return 2
    setting = providers[args.provider].secret_setting
    secret = (args.secret or next(iter(settings.secrets_for(args.provider)), None)
              or _dev_secret(args.state_dir, setting))
    if not secret:
        print(f"ingest send: no secret for {args.provider}: pass --secret or set {setting}",
              file=sys.stderr)
        return 2
    if args.url is None:
        from ingest.commands.devenv import read_dev_stack

        stack = read_dev_stack(args.state_dir)
        args.url = stack.url if stack is not None and stack.url else "http://127.0.0.1:8000"
    url = args.url.rstrip("/")
    if not url.endswith(f"/webhooks/{args.provider}"):
        url = f"{url}/webhooks/{args.provider}"
    try:
        report = send(args.provider, url, secret, count=args.count, concurrency=args.concurrency,
                      duplicates=args.duplicates, seed=args.seed)
    except ValueError as exc:
        print(f"ingest send: {exc}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


def _dev_secret(state_dir: str, setting: str) -> str | None:
    """The first secret ``ingest dev`` generated for ``setting``, if it runs from here: so
    ``ingest dev`` in one terminal and ``ingest send outreach`` in another just work."""
    import tomllib
    from pathlib import Path

    path = Path(state_dir) / "secrets.toml"
    try:
        kept = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    value = str(kept.get(setting) or "").split(",")[0].strip()
    return value or None


def cmd_dev(args: argparse.Namespace) -> int:
    from ingest.commands.devserver import run_dev

    return run_dev(port=args.port, state_dir=args.state_dir, verbose=args.verbose)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest", description="Receive sales-engagement webhooks; never lose one.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--debug", action="store_true",
                       help="on a failure, show the traceback instead of one line")
        return p

    p = add("serve", cmd_serve, "run the acceptor (uvicorn)")
    p.add_argument("--host", default=None, help="default: $INGEST_HOST, else 0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="default: $PORT, else 8000")

    p = add("worker", cmd_worker, "run RQ workers (one process per queue)")
    p.add_argument("--queue", action="append", metavar="NAME",
                   help="serve only this queue (repeatable); default: every queue needed")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on this port; default: $INGEST_METRICS_PORT, "
                        "else none")
    p.add_argument("--metrics-host", default=None, metavar="HOST",
                   help="default: $INGEST_METRICS_HOST, else 0.0.0.0")

    add("migrate", cmd_migrate, "create or upgrade the Postgres schema (idempotent)")
    add("check", cmd_check, "validate configuration; print providers and sinks, secrets masked")

    p = add("send", cmd_send, "send realistic, correctly signed sample deliveries")
    p.add_argument("provider")
    p.add_argument("--url", default=None,
                   help="acceptor base URL or full webhook URL (default: where the `ingest "
                        "dev` running here listens, else http://127.0.0.1:8000)")
    p.add_argument("--secret", help="default: the first of the provider's configured secrets, "
                                    "else the one `ingest dev` generated (see --state-dir)")
    p.add_argument("--state-dir", default=".ingest-dev",
                   help="where `ingest dev` keeps generated secrets (default: %(default)s)")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duplicates", type=float, default=0.0,
                   help="fraction of deliveries re-sent byte-for-byte, 0 <= R < 1")
    p.add_argument("--seed", type=int, default=None, help="for repeatable payloads")

    p = add("dev", cmd_dev, "everything on this machine: embedded Redis and Postgres, "
                            "acceptor, workers")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", default=".ingest-dev",
                   help="where embedded servers keep data and generated secrets")
    p.add_argument("--verbose", action="store_true",
                   help="show every worker's start-up lines (RQ's included)")

    for module in _COMMAND_MODULES:
        importlib.import_module(module).add_command(add)
    return parser


# Subcommands that live in their own modules: each module's add_command(add) registers its
# command when the parser is built; the modules keep their heavy imports inside the command.
_COMMAND_MODULES = ("ingest.commands.dlq", "ingest.commands.replay", "ingest.commands.erase",
                    "ingest.commands.retention", "ingest.commands.status",
                    "ingest.commands.query", "ingest.commands.subscriptions",
                    "ingest.commands.console")


def _use_dev_stack(command: str) -> None:
    """In a shell that configures nothing of its own, from the directory where `ingest dev`
    runs: take the settings it hands over (ingest.commands.devenv), and say so."""
    from ingest.commands.devenv import DEV_ENV, DEV_STATE_DIR, dev_stack

    stack = dev_stack()
    if stack is not None:
        for key, value in stack.values.items():
            os.environ.setdefault(key, value)
        print(f"ingest {command}: using the settings of the `ingest dev` running here "
              f"({DEV_STATE_DIR}/{DEV_ENV})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (ingest.commands.errors). A failure a user can cause
    or meet prints one line naming the fix; ``--debug`` shows the traceback instead."""
    from ingest.commands.errors import OK, explain

    args = _parser().parse_args(argv)
    if args.command != "dev":
        _use_dev_stack(args.command)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`ingest dlq list | head`): nothing more to say to it. Python
        # would complain once more while flushing stdout at exit: point it at nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except BaseException as exc:
        found = explain(exc)
        if found is None or args.debug:
            raise
        line, status = found
        print(f"ingest {args.command}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
