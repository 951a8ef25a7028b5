"""``ingest replay``: re-run archived raw deliveries through today's normalizers and sinks.

The archive (``webhook_deliveries``) keeps the exact bytes of every delivery that produced a
new event. Replay reads the ones selected (``--provider``, ``--since``/``--until`` on
``received_at``, ``--dedup-key``), normalizes them again with the providers installed today,
keeps the events whose kind matches ``--kind`` (globs), and hands them to the chosen sinks
(``--sink``, repeatable; default: every enabled sink). Examples::

    ingest replay --provider outreach --since 2026-03-01 --dry-run
    ingest replay --since 6h --kind 'email.*' --sink crm
    ingest replay --dedup-key 'prospect.updated|prospect|123|2026-03-01T10:00:00+00:00'

Why it is safe to run twice: every sink is idempotent on the event id, which is derived from
provider and dedup key. The Postgres sink inserts what is missing, and for rows that exist but
that today's normalizer would fill differently (a fixed mapping, a new field), replay updates
the normalized columns in place (``received_at``, ``delivery_id`` and ``stored_at`` keep
their original values; an activity event stored as stale by an older release is cleared).
The events handed to the Postgres sink bring ``webhook_records`` up to date as live ones do: a
record takes the newest replayed event's data unless a newer event is stored. A sink that
skips stale events (``<SINK>_SKIP_STALE``) gets no state event whose record already holds a
newer one in ``webhook_records``, so replaying a window to the CRM re-sends every activity
and never puts an older update after a newer one; activity always goes. ``--dry-run`` changes nothing and lists what would change, column by
column. Sink errors are counted and shown in the summary (exit status 1); replay again after
the fix.

Replay never verifies signatures: the acceptor did, on receipt, and the signature headers are
not archived. A delivery ``ingest erase`` rewrote (``erased_at`` set: its body lost one
person's events and is no longer what the provider signed) replays like any other, into the
events that remain in it; the summary counts such deliveries.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ingest.config import Settings
from ingest.events import Delivery, Event
from ingest.exceptions import ConfigError, PermanentSinkError, SinkError

if TYPE_CHECKING:
    from sinks.postgres import ArchiveQuery
    from sinks.registry import EnabledSink

__all__ = ["ReplayReport", "Selection", "add_command", "parse_when", "replay"]

# Deliveries normalized and sent per round trip.
BATCH = 200
# How many changes and failures the summary spells out.
SHOWN = 20

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC when no offset), or a span back from now: ``30m``,
    ``6h``, ``7d``, ``2w``."""
    text = value.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[unit]: amount})
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither ISO 8601 nor a span like 6h or 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@dataclass
class Change:
    event_id: str
    dedup_key: str
    columns: dict[str, tuple[Any, Any]]  # column -> (stored, today)


@dataclass
class ReplayReport:
    deliveries: int = 0
    # Of those, how many ``ingest erase`` rewrote without one person's events (erased_at): they
    # are replayed from what is left, the other people's events.
    rewritten: int = 0
    events: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    not_normalized: dict[str, str] = field(default_factory=dict)  # delivery id -> reason
    changes: list[Change] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)
    # Per sink that skips stale events: state events not sent, their record holding a newer one.
    stale: Counter[str] = field(default_factory=Counter)
    failed: dict[str, list[str]] = field(default_factory=dict)  # sink -> reasons

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_normalized


@dataclass(frozen=True)
class Selection:
    provider: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    kinds: tuple[str, ...] = ()
    dedup_key: str | None = None
    # One archived delivery, and only these of its events (the console's "replay to a sink").
    delivery_id: str | None = None
    event_ids: tuple[str, ...] = ()

    def archive(self) -> ArchiveQuery:
        from sinks.postgres import ArchiveQuery

        return ArchiveQuery(provider=self.provider, since=self.since, until=self.until,
                            dedup_key=self.dedup_key, delivery_id=self.delivery_id)

    def wants(self, event: Event) -> bool:
        from sinks.base import matches_any

        if self.dedup_key is not None and event.dedup_key != self.dedup_key:
            return False
        if self.event_ids and event.id not in self.event_ids:
            return False
        return not self.kinds or matches_any(event.kind, self.kinds)


def replay(settings: Settings, selection: Selection, sink_names: Sequence[str] = (),
           dry_run: bool = False, progress: Callable[[int], None] | None = None,
           total: Callable[[int], None] | None = None) -> ReplayReport:
    """Run the replay; ``progress(n)`` is told each time ``n`` more deliveries are done."""
    from ingest.providers import load_providers
    from sinks.postgres import (
        archived_deliveries,
        connect,
        count_archived,
        stored_differences,
        superseded_in_records,
    )
    from sinks.registry import build_sinks
    from workers.normalize import normalize

    enabled = build_sinks(settings)
    chosen = list(sink_names) or list(enabled)
    unknown = [s for s in chosen if s not in enabled]
    if unknown:
        raise ConfigError("INGEST_SINKS", f"--sink {', '.join(unknown)} is not enabled here "
                                          f"(enabled: {', '.join(enabled) or 'none'})")
    providers = load_providers()
    report = ReplayReport()
    query = selection.archive()
    try:
        with connect(settings.require_database(), autocommit=True) as conn:
            if total is not None:
                total(count_archived(conn, query))
            for batch in archived_deliveries(conn, query, BATCH):
                report.deliveries += len(batch)
                report.rewritten += sum(d.erased_at is not None for d in batch)
                events: dict[str, Event] = {}
                for delivery in batch:
                    try:
                        produced = normalize(providers, delivery)
                    except Exception as exc:  # a normalizer may fail on any input: report it
                        report.not_normalized[delivery.id] = f"{type(exc).__name__}: {exc}"
                        continue
                    for event in produced:
                        if selection.wants(event):
                            events.setdefault(event.id, event)
                report.events += len(events)
                differences = stored_differences(conn, list(events.values()))
                changed: list[Event] = []
                for event_id, event in events.items():
                    diff = differences.get(event_id)
                    if diff is None:
                        report.new += 1
                    elif not diff:
                        report.unchanged += 1
                    else:
                        report.changed += 1
                        changed.append(event)
                        if len(report.changes) < SHOWN:
                            report.changes.append(Change(event_id, event.dedup_key, diff))
                superseded = set()
                if any(enabled[name].skip_stale for name in chosen):
                    superseded = superseded_in_records(conn, list(events.values()))
                by_delivery = {d.id: d for d in batch}
                for name in chosen:
                    done = _send(enabled[name], list(events.values()), by_delivery, changed,
                                 superseded, report, dry_run)
                    if settings.sink_outcomes:
                        _record_outcomes(conn, name, done)
                if progress is not None:
                    progress(len(batch))
    finally:
        for enabled_sink in enabled.values():
            enabled_sink.close()
    return report


def _send(enabled: EnabledSink, events: list[Event], deliveries: dict[str, Delivery],
          changed: list[Event], superseded: set[str], report: ReplayReport,
          dry_run: bool) -> dict[str, list[Event]]:
    """Hand the events a sink wants to it (without the ``superseded`` state events when it
    skips stale ones), and where it keeps events, rewrite the ones stored with an earlier
    normalization. ``dry_run``: only count. Returns the events sent and those skipped as
    stale (``"delivered"``, ``"stale"``), for the sink's outcomes."""
    chosen = [e for e in events if enabled.wants(e)]
    done: dict[str, list[Event]] = {"delivered": [], "stale": []}
    if enabled.skip_stale:
        kept = [e for e in chosen if e.id not in superseded]
        report.stale[enabled.name] += len(chosen) - len(kept)
        done["stale"] = [e for e in chosen if e.id in superseded]
        chosen = kept
    if dry_run:
        report.sent[enabled.name] += len(chosen)
        return {"delivered": [], "stale": []}
    if chosen:
        try:
            enabled.send(chosen, deliveries)
        except SinkError as exc:
            failed = exc.event_ids if isinstance(exc, PermanentSinkError) else None
            failed_ids = failed or [e.id for e in chosen]
            report.sent[enabled.name] += len(chosen) - len(failed_ids)
            report.failed.setdefault(enabled.name, []).append(f"{len(failed_ids)} events: {exc}")
            refused = set(failed_ids)
            done["delivered"] = [e for e in chosen if e.id not in refused]
        else:
            report.sent[enabled.name] += len(chosen)
            done["delivered"] = chosen
    if changed:
        try:
            enabled.update(changed)
        except SinkError as exc:
            report.failed.setdefault(enabled.name, []).append(f"updating changed rows: {exc}")
    return done


def _record_outcomes(conn: Any, sink: str, done: dict[str, list[Event]]) -> None:
    """What the replay did, in the sinks' outcomes (the console's), as a worker would write
    it: delivered (the Postgres sink's is its stored row), or skipped as stale."""
    from sinks.outcomes import Outcome, write
    from workers.outcomes import writes_delivered

    at = datetime.now(timezone.utc)
    rows = [Outcome(e.id, sink, "stale", at, attempts=0) for e in done["stale"]]
    if writes_delivered(sink, 1):
        rows += [Outcome(e.id, sink, "delivered", at) for e in done["delivered"]]
    write(conn, rows)


# -- the command ------------------------------------------------------------------------------


def _show(value: Any, width: int = 60) -> str:
    text = value.isoformat() if isinstance(value, datetime) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_report(report: ReplayReport, dry_run: bool, sinks: Sequence[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title="ingest replay" + (" (dry run: nothing changed)" if dry_run else ""),
                  show_header=False)
    table.add_row("deliveries read", str(report.deliveries))
    if report.rewritten:
        table.add_row("  rewritten by an erasure (others' events only)", str(report.rewritten))
    table.add_row("events selected", str(report.events))
    table.add_row("  not in webhook_events yet", str(report.new))
    table.add_row("  stored, normalized differently today", str(report.changed))
    table.add_row("  stored, unchanged", str(report.unchanged))
    table.add_row("deliveries that no longer normalize", str(len(report.not_normalized)))
    for name in sinks:
        verb = "would go to" if dry_run else "sent to"
        failed = f", failures: {len(report.failed[name])}" if name in report.failed else ""
        stale = (f", {report.stale[name]} stale updates skipped" if report.stale[name] else "")
        table.add_row(f"{verb} {name}", f"{report.sent[name]}{failed}{stale}")
    console.print(table)
    for change in report.changes:
        # Payload text is data, not markup: "[/x]" in a dedup key or a value must print as is.
        console.print(f"[bold]{change.event_id}[/bold] {escape(change.dedup_key)}")
        for column, (old, new) in change.columns.items():
            console.print(f"    {column}: {escape(_show(old))} -> {escape(_show(new))}")
    if report.changed > len(report.changes):
        console.print(f"... and {report.changed - len(report.changes)} more changed events")
    for delivery_id, reason in list(report.not_normalized.items())[:SHOWN]:
        console.print(f"[red]not normalized[/red] delivery {delivery_id}: {escape(reason)}")
    for name, reasons in report.failed.items():
        for reason in reasons[:SHOWN]:
            console.print(f"[red]{name} failed[/red]: {escape(reason)}")


def cmd_replay(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    settings = Settings.from_env()
    try:
        selection = Selection(
            provider=args.provider,
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            kinds=tuple(k for group in args.kind or () for k in group.split(",") if k.strip()),
            dedup_key=args.dedup_key,
        )
    except ValueError as exc:
        print(f"ingest replay: {exc}", file=sys.stderr)
        return 2
    from ingest.commands.choices import kind_problem, provider_problem

    problems = [provider_problem(args.provider)] if args.provider else []
    problems += [kind_problem(glob) for glob in selection.kinds]
    if any(problems):
        print(f"ingest replay: {next(p for p in problems if p)}", file=sys.stderr)
        return 2
    sinks = [s for group in args.sink or () for s in group.split(",") if s.strip()]
    from rich.console import Console

    # On stderr, and only on a terminal: stdout is the report, and a pipe gets nothing else.
    progress_console = Console(stderr=True)
    with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=progress_console,
                  disable=not progress_console.is_terminal) as bar:
        task = bar.add_task("replay", total=None)
        report = replay(settings, selection, sinks, dry_run=args.dry_run,
                        progress=lambda n: bar.advance(task, n),
                        total=lambda n: bar.update(task, total=n))
    _print_report(report, args.dry_run, sinks or list(settings.sinks))
    return 0 if report.ok else 1


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest replay`` (called by ingest.commands.cli)."""
    p = add("replay", cmd_replay,
            "re-run archived raw deliveries through today's normalizers and sinks")
    p.add_argument("--provider", help="only this provider's deliveries")
    p.add_argument("--since", help="received at or after: ISO 8601, or a span back (6h, 7d)")
    p.add_argument("--until", help="received before: ISO 8601, or a span back (6h, 7d)")
    p.add_argument("--kind", action="append", metavar="GLOB",
                   help="only events of these kinds, e.g. 'email.*' (repeatable)")
    p.add_argument("--dedup-key", help="only the event with this dedup key")
    p.add_argument("--sink", action="append", metavar="NAME",
                   help="send to this enabled sink only (repeatable; default: every enabled)")
    p.add_argument("--dry-run", action="store_true",
                   help="change nothing; show what would be inserted, updated or sent")
