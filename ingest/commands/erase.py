"""``ingest erase``: remove everything the pipeline holds about one person, or one record.

Examples::

    ingest erase --email jane@example.com --dry-run     # count, change nothing
    ingest erase --email jane@example.com --yes         # erase, no question asked
    ingest erase --resource outreach:prospect:123 --yes

An address is recognized however a raw body spells it (JSON escapes such as
``jane\u0040example.com``, any case) and only as a whole address; a record by the events its
deliveries normalize into (ingest.subjects says how, and how cheaply).

Where it looks, in this order (each place's count is printed; the address itself never is,
only its SHA-256):

1. the spool (``INGEST_SPOOL_DIR`` on this host): each sealed segment that holds the subject
   is replaced, atomically, by a copy without the subject's records (a record that also holds
   other people's events is written again without the subject's: see below). A segment a
   live acceptor is still appending to is locked; it is counted as ``spool segments in use``
   and left alone: it is sealed and drained into Redis as soon as Redis takes deliveries
   again, and erasing once more then catches it.
2. RQ jobs in every queue of the namespace (ingest, sink-*), whatever their state: queued,
   scheduled or waiting for a retry, started, failed (dead letters), finished (kept for a
   while), deferred, canceled. A job holding only the subject's data is deleted; a batch that
   also holds other people's is written again without the subject's deliveries and events.
   A started job is only rewritten (its worker already holds the data): erase waits for it to
   end (``--wait``) and looks again, so what it wrote is removed from Postgres afterwards.
3. every installed sink that keeps data (sinks.base: ``erase``), enabled or not, through
   :class:`sinks.registry.EnabledSink`: first those whose data waits to be sent (the Slack
   outbox: events waiting to be posted), with the jobs, then, once the running jobs ended,
   the others (Postgres, in one transaction: ``webhook_events``, the ``webhook_deliveries``
   they came from and any archived delivery that mentions the subject, ``webhook_records``;
   a row goes into ``webhook_erasures`` with the counts: sinks.postgres_data).

A raw delivery that holds several people's events (a Salesloft ``data`` array) keeps the
others': it is written again without the subject's elements, wherever it is (spool, RQ jobs,
``webhook_deliveries``), and marked with ``erased_at`` (the envelope's key, the archive's
column): its body is no longer the bytes the provider signed, and it still normalizes into
exactly the other people's events, so workers and replay use it as before (nothing after the
acceptor verifies signatures). A delivery whose events are all the subject's, or that mentions
the subject outside such an element, goes whole; so does a single event that mentions several
people (one event's values cannot be split between them). Events that arrive later about the
same person are stored as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingest import constants
from ingest.config import Settings
from ingest.subjects import EmailSubject, Erasure, ResourceSubject, Subject, parse_resource

__all__ = ["PLACES", "EmailSubject", "ErasureReport", "ResourceSubject", "Subject",
           "add_command", "erase", "parse_resource"]

# Seconds between looks at started jobs that hold the subject, while erase waits for them.
_POLL = 0.5
# The places of a report this command searches itself, in the order they are printed; the
# sinks' places (their ``erases``) follow. The deliveries "rewritten" were kept without the
# subject's events (other people's stay); the other counts are of what went.
PLACES = (
    "spool records", "spool records rewritten", "spool segments in use",
    "spool rewrite leftovers",
    "rq jobs removed", "rq jobs rewritten", "rq deliveries removed", "rq deliveries rewritten",
    "rq events removed", "rq jobs still running", "sink outcomes waiting in redis",
)


@dataclass
class ErasureReport:
    counts: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False
    not_searched: list[str] = field(default_factory=list)  # places this run could not reach
    places: tuple[str, ...] = PLACES  # every place, in print order: ours, then the sinks'

    def as_dict(self) -> dict[str, int]:
        return {place: self.counts[place] for place in self.places}


class _Scope(Erasure):
    """One erasure (ingest.subjects.Erasure) with this command's report: its counts are the
    report's."""

    def __init__(self, subject: Subject, now: datetime, report: ErasureReport,
                 providers: Mapping[str, Any] | None = None) -> None:
        super().__init__(subject, dry_run=report.dry_run, now=now, counts=report.counts,
                         places=report.places, providers=providers)
        self.report = report


# -- the spool --------------------------------------------------------------------------------


def _erase_spool(directory: Path, scope: _Scope) -> None:
    from ingest.acceptor.spool import remove_stale_rewrites, rewrite_segment, segment_files

    counts, subject = scope.report.counts, scope.subject
    if not scope.report.dry_run:
        # Copies an earlier rewrite left when it was cut off: no drain ever reads them, and
        # the subject may be in them. Their segments are intact (or drained), so they go.
        counts["spool rewrite leftovers"] += remove_stale_rewrites(directory)
    for path in segment_files(directory):
        done = rewrite_segment(
            path, scope.delivery, dry_run=scope.report.dry_run,
            # What follows the valid records (a torn tail, or damage kept for a human) cannot
            # be parsed; it stays unless it may mention the subject.
            keep_rest=lambda rest: not subject.in_text(rest.decode("utf-8", "replace")))
        counts["spool segments in use"] += done.in_use
        counts["spool records"] += done.removed + done.rest_dropped
        counts["spool records rewritten"] += done.replaced


# -- RQ jobs ----------------------------------------------------------------------------------


def _queue_names(settings: Settings, redis: Any) -> list[str]:
    from rq import Queue

    from ingest.commands.dlq import queues

    names = settings.names
    found = [name for _, name in queues(settings)]
    sink_prefix = names.sink_queue("")
    for queue in Queue.all(connection=redis):
        if queue.name == names.ingest_queue or queue.name.startswith(sink_prefix):
            found.append(queue.name)
    return list(dict.fromkeys(found))


def _job_ids(queue: Any) -> Iterator[tuple[str, bool]]:
    """(job id, started) for every job of ``queue`` in any state."""
    for job_id in queue.get_job_ids():
        yield job_id, False
    for registry in (queue.scheduled_job_registry, queue.failed_job_registry,
                     queue.finished_job_registry, queue.deferred_job_registry,
                     queue.canceled_job_registry):
        for job_id in registry.get_job_ids(cleanup=False):
            yield job_id, False
    for job_id in queue.started_job_registry.get_job_ids(cleanup=False):
        yield job_id, True


def _decoded(value: bytes) -> str:
    with contextlib.suppress(zlib.error):
        value = zlib.decompress(value)
    return value.decode("utf-8", "replace")


def _deliveries(envelopes: list[Any], scope: _Scope) -> tuple[list[Any], set[Any]]:
    """The envelopes without the subject (rewritten where others' events stay), and the ids
    of those removed whole."""
    kept: list[Any] = []
    removed: set[Any] = set()
    for envelope in envelopes:
        new = scope.delivery(envelope)
        if new is None:
            scope.report.counts["rq deliveries removed"] += 1
            removed.add(envelope.get("id"))
            continue
        if new is not envelope:
            scope.report.counts["rq deliveries rewritten"] += 1
        kept.append(new)
    return kept, removed


def _rewrite(func: str, args: list[Any], scope: _Scope) -> list[Any] | None:
    """The job's arguments without the subject, or None when nothing else is left."""
    subject, counts = scope.subject, scope.report.counts
    if func == constants.PROCESS_BATCH and args and isinstance(args[0], list):
        envelopes, _ = _deliveries(args[0], scope)
        return [envelopes, *args[1:]] if envelopes else None
    if func == constants.DELIVER and len(args) >= 2 and isinstance(args[1], list):
        events = [e for e in args[1] if not subject.in_event(e)]
        counts["rq events removed"] += len(args[1]) - len(events)
        raw = args[2] if len(args) > 2 and isinstance(args[2], list) else None
        kept_raw = None
        if raw is not None:
            kept_raw, removed = _deliveries(raw, scope)
            # The raw delivery of an event that stays went whole with the subject's data: the
            # event is stored without it (its delivery_id becomes null, replay cannot re-run
            # it). A rewritten delivery still holds it.
            events = [dict(e, delivery_id=None) if e.get("delivery_id") in removed else e
                      for e in events]
        if len(args) > 3 and args[3]:
            # A chunk of a bulk delivery's chain (workers.fanout) stays, if empty: it still
            # queues the next chunk when it runs.
            return [args[0], events, kept_raw, *args[3:]]
        return [args[0], events, kept_raw, *args[3:]] if events else None
    # A job we do not know the shape of: recognize the subject in its decoded arguments.
    return None if subject.in_value(args) else args


def _erase_jobs(settings: Settings, redis: Any, scope: _Scope) -> set[str]:
    """Erase the subject from every job; return the ids of started jobs that held it."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ingest.rq_jobs import FastJSONSerializer

    report, subject = scope.report, scope.subject
    running: set[str] = set()
    for name in _queue_names(settings, redis):
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        for job_id, started in dict(_job_ids(queue)).items():
            key = Job.key_for(job_id)
            raw = redis.hget(key, "data")
            if raw is None:
                continue
            try:
                data = zlib.decompress(raw)
            except zlib.error:
                continue  # not one of ours: no jobs of ours look like that
            # The cheap test first: most jobs do not hold the subject and are never decoded.
            if not subject.might_be_in(data):
                _scrub_results(redis, job_id, key, subject, report)
                continue
            try:
                func, _instance, args, kwargs = FastJSONSerializer.loads(data)
            except (ValueError, TypeError):
                continue  # not JSON: not one of ours either
            before = Counter(report.counts)
            new_args = _rewrite(str(func), list(args), scope)
            if new_args == list(args):
                report.counts.clear()
                report.counts.update(before)
                _scrub_results(redis, job_id, key, subject, report)
                continue
            if started:
                running.add(job_id)
            if new_args is None and not started:
                report.counts["rq jobs removed"] += 1
                if not report.dry_run:
                    job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
                    job.delete(remove_from_queue=True)
                continue
            report.counts["rq jobs rewritten"] += 1
            if not report.dry_run:
                # A started job left with nothing keeps empty arguments: its worker still owns
                # it, and a retry of it then does nothing.
                empty = [args[0], [], []] if func == constants.DELIVER else [[]]
                data = FastJSONSerializer.dumps([func, None, new_args or empty, kwargs])
                redis.hset(key, "data", zlib.compress(data, constants.JOB_DATA_COMPRESSION))
                _scrub_results(redis, job_id, key, subject, report)
    return running


def _scrub_results(redis: Any, job_id: str, key: str, subject: Subject,
                   report: ErasureReport) -> None:
    """A job's failure text and results must not hold the subject either."""
    from rq.results import Result

    exc = redis.hget(key, "exc_info")
    if exc is not None and subject.in_text(_decoded(exc)):
        report.counts["rq jobs rewritten"] += 1
        if not report.dry_run:
            redis.hdel(key, "exc_info")
    results_key = Result.get_key(job_id)  # type: ignore[no-untyped-call]
    for _, entry in redis.xrange(results_key) if redis.type(results_key) == b"stream" else ():
        if any(subject.in_text(_decoded(v)) for v in entry.values()):
            if not report.dry_run:
                redis.delete(results_key)
            break


# -- the sinks' data -------------------------------------------------------------------------


def _erase_sinks(keepers: list[Any], scope: _Scope, step: Callable[[str], None]) -> None:
    """Each sink's own data (sinks.registry.EnabledSink.erase); its counts go in the report."""
    for keeper in keepers:
        step(keeper.title)
        scope.report.counts.update(keeper.erase(scope))


# -- the whole erasure ------------------------------------------------------------------------


def erase(settings: Settings, subject: Subject, dry_run: bool = False, wait: float = 60.0,
          step: Callable[[str], None] | None = None, suppress: bool = False) -> ErasureReport:
    """Erase ``subject`` everywhere (see the module docstring); ``step(place)`` is told
    where it is looking. ``suppress`` (an email subject only) first lists it so workers drop
    its future events (workers.suppression)."""
    from ingest.providers import load_providers
    from ingest.redis_conn import worker_redis
    from sinks.registry import data_keepers
    from workers import suppression

    keepers, unreachable = data_keepers(settings)
    in_flight = [k for k in keepers.values() if k.erase_in_flight]
    stored = [k for k in keepers.values() if not k.erase_in_flight]
    places = PLACES + tuple(p for k in keepers.values() for p in k.erases)
    report = ErasureReport(dry_run=dry_run, places=tuple(dict.fromkeys(places)))
    now = datetime.now(timezone.utc)
    scope = _Scope(subject, now, report, load_providers())
    tell = step or (lambda _place: None)
    redis = worker_redis(settings.require_redis())
    try:
        if suppress and not dry_run:
            # Before looking anywhere: what arrives during the erase is dropped, not stored.
            suppression.add(redis, settings.names, subject.sha256)
        tell("spool")
        _erase_spool(settings.spool_dir, scope)
        tell("RQ jobs")
        running = _erase_jobs(settings, redis, scope)
        _erase_sinks(in_flight, scope, tell)
        if running and not dry_run:
            tell("jobs still running")
            deadline = time.monotonic() + wait
            while running and time.monotonic() < deadline:
                time.sleep(_POLL)
                running = {j for j in running if _is_started(redis, settings, j)}
            # What those jobs did meanwhile (events stored, jobs enqueued) is erased below.
            again = _Scope(subject, now, ErasureReport(places=report.places), scope.providers)
            running |= _erase_jobs(settings, redis, again)
            _erase_sinks(in_flight, again, lambda _place: None)
            report.counts.update(again.report.counts)
        report.counts["rq jobs still running"] = len(running) if not dry_run else 0
    finally:
        redis.close()
    for title, exc in unreachable.items():
        report.not_searched.append(f"{title}: {exc.variable} is not set")
    try:
        _erase_sinks(stored, scope, tell)
    finally:
        for keeper in keepers.values():
            keeper.close()
    if scope.erased_events:
        # The workers' outcome rows of those events, waiting while Postgres was away: written
        # later, they would be rows about events that no longer exist.
        from workers.outcomes import forget

        tell("sink outcomes waiting in Redis")
        redis = worker_redis(settings.require_redis())
        try:
            report.counts["sink outcomes waiting in redis"] += forget(
                redis, settings.names, scope.erased_events, dry_run)
        finally:
            redis.close()
    return report


def _is_started(redis: Any, settings: Settings, job_id: str) -> bool:
    from rq.job import Job, JobStatus

    status = redis.hget(Job.key_for(job_id), "status")
    return status is not None and status.decode() == JobStatus.STARTED.value


# -- the command ------------------------------------------------------------------------------


def _print_report(report: ErasureReport, subject: Subject, suppressed: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # The title on a line of its own: above a narrow table it would wrap.
    console.print("ingest erase: would remove (dry run: nothing changed)" if report.dry_run
                  else "ingest erase: removed", highlight=False)
    table = Table()
    table.add_column("place")
    table.add_column("count", justify="right")
    for place in report.places:
        table.add_row(place, str(report.counts[place]))
    console.print(table)
    console.print(f"subject sha256: {subject.sha256}")
    for place in report.not_searched:
        console.print(f"[yellow]not searched: {place}; set it and run this erase again[/yellow]")
    if report.counts["spool segments in use"]:
        console.print("[yellow]Spool segments in use by a running acceptor were not read. "
                      "They reach Redis once it takes deliveries again; run this erase again "
                      "then (or stop the acceptor first).[/yellow]")
    if suppressed:
        console.print("Workers now drop this contact's future events "
                      "(lift with --unsuppress).")
    if any(report.counts[p] for p in report.places if p.endswith(" rewritten")):
        console.print("Raw deliveries that also held other people's events were kept without "
                      "this subject's and marked erased_at: their bodies are no longer the "
                      "bytes the provider signed.")
    if report.counts["rq jobs still running"]:
        console.print("[yellow]Jobs holding the subject were still running; run this erase "
                      "again once they end (or pass a longer --wait).[/yellow]")


def cmd_erase(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.prompt import Confirm

    try:
        subject: Subject = (EmailSubject(args.email) if args.email
                            else parse_resource(args.resource))
    except ValueError as exc:
        print(f"ingest erase: {exc}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    if (args.suppress or args.unsuppress) and not args.email:
        print("ingest erase: --suppress and --unsuppress take --email", file=sys.stderr)
        return 2
    if args.unsuppress:
        from ingest.redis_conn import worker_redis
        from workers import suppression

        redis = worker_redis(settings.require_redis())
        try:
            listed = suppression.remove(redis, settings.names, subject.sha256)
        finally:
            redis.close()
        print(f"subject {subject.sha256}: " + (
            "suppression lifted; its future events are stored again" if listed
            else "was not suppressed"))
        return 0
    if not args.dry_run and not args.yes:
        if not sys.stdin.isatty():
            print("ingest erase: refusing to erase without confirmation: stdin is not a "
                  "terminal; pass --yes (or --dry-run to count first)", file=sys.stderr)
            return 2
        if not Confirm.ask(f"Erase subject {subject.sha256[:16]}… everywhere? This cannot "
                           "be undone"):
            print("ingest erase: nothing changed")
            return 1
    console = Console(stderr=True)
    with console.status("erasing") as status:
        report = erase(settings, subject, dry_run=args.dry_run, wait=args.wait,
                       step=lambda place: status.update(f"erasing: {place}"),
                       suppress=args.suppress)
    _print_report(report, subject, suppressed=args.suppress and not args.dry_run)
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest erase`` (called by ingest.commands.cli)."""
    p = add("erase", cmd_erase,
            "remove everything held about one person (--email) or one record (--resource)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--email", metavar="ADDRESS", help="the person's email address")
    which.add_argument("--resource", metavar="PROVIDER:TYPE:ID",
                       help="one record, e.g. outreach:prospect:123")
    p.add_argument("--dry-run", action="store_true", help="count what would go; change nothing")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    suppression = p.add_mutually_exclusive_group()
    suppression.add_argument("--suppress", action="store_true",
                             help="also drop this contact's future events (a hash of the "
                                  "address is listed in Redis)")
    suppression.add_argument("--unsuppress", action="store_true",
                             help="only lift an earlier --suppress; erase nothing")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for running jobs that hold the subject "
                        "(default: %(default)s)")
