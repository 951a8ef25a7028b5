"""``ingest status [--json]`` and ``ingest refused [--provider P] [--json]``.

``status`` is one screen read at 3 a.m.: per provider (enabled, last accepted, accepted and
refused in the last hour, silent or not), per sink (queued, oldest, retrying, dead letters, the
last failure's reason), the spool, live workers per queue, and what needs attention. It exits
1 when anything needs attention, so cron and Nagios-style checks can run it.

Everything comes from Redis (:mod:`ingest.activity`), except the spool depth: a spool fills
only while its acceptor cannot reach Redis, so no acceptor can publish it there when it
matters. ``status`` counts the spool in this machine's ``INGEST_SPOOL_DIR`` (run it where the
acceptor's spool volume is mounted); each acceptor's ``ingest_spool_depth`` gauge covers
remote ones.

``refused`` prints what refused requests carried (User-Agent, client, header names): text a
stranger chose. Any character a terminal could act on rather than show (C0 and C1 controls,
bidirectional overrides, other invisible formatting) is printed escaped (:func:`shown`), in
the table and in the JSON alike; the JSON still parses to the same text.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ingest import constants
from ingest.config import Settings
from ingest.safejson import utf16_units

__all__ = ["add_command", "build_status", "local_spool_depth", "shown", "shown_json"]


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def shown(text: str) -> str:
    """``text`` as a terminal may print it: every character that is not printable (C0 and C1
    controls, bidirectional and other format characters, line separators) as a Python-style
    escape, and backslashes doubled so an escape shown cannot be one the sender typed."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c != "\\" else
                   ("\\\\" if c == "\\" else _escape(c)) for c in text)


# Outside printable ASCII: what shown_json looks at (orjson already escapes C0 controls).
_NON_ASCII = re.compile(r"[^\x20-\x7e]")


def _json_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char.isprintable():
        return char
    return "".join(f"\\u{unit:04x}" for unit in utf16_units(char))


def shown_json(value: Any) -> str:
    """``value`` as JSON with every non-printable character as a ``\\uXXXX`` escape: the same
    data once parsed, nothing a terminal acts on when printed."""
    return _NON_ASCII.sub(_json_escape, orjson.dumps(value).decode())


def local_spool_depth(directory: Path) -> int:
    """Deliveries in the spool segments under ``directory`` (read only, no lock taken)."""
    from ingest.acceptor.spool import Spool, read_segment

    depth = 0
    for path in Spool(directory)._segment_paths():
        try:
            depth += len(read_segment(path.read_bytes()).records)
        except OSError:
            continue  # drained between listing and reading
    return depth


def _ago(now: float, at: float | None) -> str:
    if at is None:
        return "never"
    seconds = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, timezone.utc).isoformat().replace("+00:00", "Z")


def _last_failure(redis: Any, queue: str) -> str | None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ingest.commands.dlq import failure_reason

    newest = redis.zrevrange(f"rq:failed:{queue}", 0, 0)
    if not newest:
        return None
    try:
        return failure_reason(Job.fetch(newest[0].decode(), connection=redis,
                                        serializer=JSONSerializer))
    except NoSuchJobError:
        return None


def build_status(redis: Any, settings: Settings) -> dict[str, Any]:
    """The status as one JSON-able object (keys: deployment, providers, sinks, queues,
    spool_depth, workers, attention).

    Providers and sinks are the running deployment's, as its acceptors and RQ registered them
    in Redis (ingest.deployment); only when no acceptor ever registered does this shell's
    configuration stand in (``deployment.source`` says which)."""
    from ingest.activity import read_last_hour
    from ingest.deployment import read_state
    from ingest.deployment import deployment_queues, read_deployment
    from ingest.providers import load_providers

    seconds, micros = redis.time()
    deployment = read_deployment(redis, settings.names, seconds + micros / 1e6)
    if deployment is not None:
        enabled, sink_names = dict(deployment.providers), deployment.sinks
    else:
        enabled = {name: settings.silence_threshold(name)
                   for name in sorted(settings.provider_secrets)}
        sink_names = settings.sinks
    state = read_state(redis, settings, enabled,
                       deployment_queues(redis, settings.names, sink_names))
    hour = read_last_hour(redis, settings.names, state.now)
    attention: list[str] = []
    if deployment is not None and not deployment.live:
        attention.append(f"no acceptor has registered since {_ago(state.now, deployment.seen_at)}"
                         ": is `ingest serve` running?")
    about = {"source": "registered" if deployment is not None else "this shell",
             "acceptor_seen": _iso(deployment.seen_at) if deployment is not None else None,
             "acceptor_running": deployment.live if deployment is not None else None}
    by_name = {p.name: p for p in state.providers}
    providers = []
    for name in sorted({*load_providers(), *enabled}):
        p = by_name.get(name)
        refused = {k.split("|")[2]: v for k, v in hour.items()
                   if k.startswith(f"refused|{name}|")}
        entry: dict[str, Any] = {
            "name": name,
            "enabled": p is not None,
            "last_accepted": _iso(p.last_accepted) if p else None,
            "last_refused": _iso(p.last_refused) if p else None,
            "accepted_last_hour": hour.get(f"accepted|{name}", 0),
            "refused_last_hour": refused,
            "silent": bool(p and p.silent),
            "silence_after_seconds": p.silence_after if p else None,
        }
        providers.append(entry)
        if p is not None and p.silent:
            since = _ago(state.now, p.last_accepted) if p.last_accepted else (
                f"never (watching since {_ago(state.now, state.started)})")
            attention.append(f"provider {name} is silent: last accepted {since}, limit "
                             f"{p.silence_after:g} s (INGEST_SILENCE_AFTER)")
    from ingest.subscriptions.state import add_to_status

    add_to_status(redis, settings.names, state.now, providers, attention)
    queues, sinks, workers = [], [], {}
    for q in state.queues:
        queues.append({"queue": q.name, "label": q.label, "queued": q.queued,
                       "started": q.started, "scheduled": q.scheduled, "failed": q.failed,
                       "oldest_seconds": round(q.oldest_seconds, 1), "workers": q.workers})
        workers[q.name] = q.workers
        if q.label != "ingest":
            sinks.append({"name": q.label, "queued": q.queued,
                          "oldest_seconds": round(q.oldest_seconds, 1),
                          "retrying": q.scheduled, "dead_letters": q.failed,
                          "last_failure": _last_failure(redis, q.name) if q.failed else None})
        if q.failed:
            attention.append(f"{q.failed} dead letters on {q.label}: see `ingest dlq list "
                             f"--sink {q.label}`, then `ingest dlq retry` after the fix")
        if not q.workers:
            attention.append(f"no worker serves queue {q.name}: start `ingest worker "
                             f"--queue {q.label if q.label == 'ingest' else 'sink-' + q.label}`")
        if q.oldest_seconds > constants.STATUS_OLDEST_LIMIT:
            attention.append(f"oldest queued job on {q.name} waits {q.oldest_seconds:.0f} s "
                             f"(over {constants.STATUS_OLDEST_LIMIT} s): workers are behind")
    spool = local_spool_depth(settings.spool_dir)
    if spool:
        attention.append(f"{spool} deliveries wait in the spool at {settings.spool_dir}: the "
                         "acceptor moves them once it reaches Redis again")
    return {"deployment": about, "providers": providers, "sinks": sinks, "queues": queues,
            "spool_depth": spool, "workers": workers, "attention": attention}


def _when(iso: str | None) -> str:
    """An ISO time as ``2026-12-06 18:09:03Z``: whole, and narrow enough for 80 columns."""
    return iso[:19].replace("T", " ") + "Z" if iso else "never"


def _print_status(status: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    about = status["deployment"]
    if about["source"] == "this shell":
        console.print("No acceptor has registered in this Redis: providers and sinks as this "
                      "shell's configuration has them.", markup=False, highlight=False)
    # Names, times and counts are never cut: a column folds before it drops a character.
    t = Table(title="providers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("provider", overflow="fold")
    t.add_column("on", no_wrap=True)
    t.add_column("last accepted", no_wrap=True)
    t.add_column("1h ok", justify="right", no_wrap=True)
    t.add_column("1h refused", overflow="fold")
    t.add_column("silent", no_wrap=True)
    for p in status["providers"]:
        refused = ", ".join(f"{k}={v}" for k, v in sorted(p["refused_last_hour"].items()))
        t.add_row(p["name"], "yes" if p["enabled"] else "no", _when(p["last_accepted"]),
                  str(p["accepted_last_hour"]), refused or "0",
                  "SILENT" if p["silent"] else "-")
    console.print(t)
    t = Table(title="queues", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("queue", overflow="fold")
    for heading in ("queued", "oldest s", "running", "retrying", "dead", "workers"):
        t.add_column(heading, justify="right", no_wrap=True)
    for q in status["queues"]:
        t.add_row(q["queue"], str(q["queued"]), f"{q['oldest_seconds']:g}", str(q["started"]),
                  str(q["scheduled"]), str(q["failed"]), str(q["workers"]))
    console.print(t)
    for s in status["sinks"]:
        if s["last_failure"]:
            console.print(f"last failure on {s['name']}: {s['last_failure']}", markup=False,
                          highlight=False)
    console.print(f"spool depth: {status['spool_depth']}")
    if status["attention"]:
        console.print("[bold red]needs attention:[/]")
        for line in status["attention"]:
            console.print(f"  - {line}", markup=False, highlight=False)
    else:
        console.print("[green]all good[/]")


def _redis(settings: Settings) -> Any:
    from ingest.redis_conn import worker_redis

    return worker_redis(settings.require_redis())


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    redis = _redis(settings)
    try:
        status = build_status(redis, settings)
    finally:
        redis.close()
    if args.json:
        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_status(status)
    return 1 if status["attention"] else 0


def cmd_refused(args: argparse.Namespace) -> int:
    from ingest.refusals import UNKNOWN, read_refusals
    from ingest.providers import load_providers

    settings = Settings.from_env()
    known = sorted(load_providers()) + [UNKNOWN]
    if args.provider is not None and args.provider not in known:
        print(f"ingest refused: no provider {args.provider!r} (have: {', '.join(known)})",
              file=sys.stderr)
        return 2
    redis = _redis(settings)
    try:
        records = read_refusals(redis, settings.names, [args.provider] if args.provider else known)
    finally:
        redis.close()
    if args.json:
        sys.stdout.write(shown_json(records) + "\n")
        return 0
    if not records:
        print("no refused requests kept (the last 100 per provider are kept for 7 days)")
        return 0
    from rich.console import Console

    # Two lines a refusal, each within 80 columns: what and when, then who. The user agent
    # and header names are free text: rich wraps them at word boundaries, never mid-word.
    console = Console()
    for r in records:
        length = r.get("content_length")
        try:
            when = _when(_iso(float(r.get("time") or 0)))
        except (TypeError, ValueError):
            when = "?"
        headers = r.get("headers")
        names = ", ".join(str(h) for h in headers) if isinstance(headers, list) else ""
        # shown(): what the sender chose (user agent, header names) never acts on the terminal.
        console.print(shown(f"{when}  {r['provider']}  {r.get('reason', '?')!s}  "
                            f"client={r.get('client') or '-'}  "
                            f"length={'-' if length is None else length}"),
                      markup=False, highlight=False)
        console.print(shown(f"  ua={r.get('user_agent') or '-'}  headers={names or '-'}"),
                      markup=False, highlight=False)
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest status`` and ``ingest refused`` (called by ingest.commands.cli)."""
    p = add("status", cmd_status, "providers, sinks, queues, spool and workers on one screen; "
                                  "exit 1 when something needs attention")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add("refused", cmd_refused, "the last refused requests, newest first (no credentials)")
    p.add_argument("--provider", help="only this provider ('unknown': unknown providers)")
    p.add_argument("--json", action="store_true", help="print a JSON list")

