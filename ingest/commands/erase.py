"""``ingest erase``: remove everything the pipeline holds about one person, or one record.

Examples::

    ingest erase --email jane@example.com --dry-run     # count, change nothing
    ingest erase --email jane@example.com --yes         # erase, no question asked
    ingest erase --resource outreach:prospect:123 --yes

Where it looks, in this order (each place's count is printed; the address itself never is,
only its SHA-256):

1. the spool (``INGEST_SPOOL_DIR`` on this host): records mentioning the subject are removed
   by writing the segment again without them (a new file renamed over the old one, so a
   crash leaves one or the other). A segment a live acceptor is still appending to is locked;
   it is counted as ``spool segments in use`` and left alone: it is sealed and drained into
   Redis as soon as Redis takes deliveries again, and erasing once more then catches it.
2. RQ jobs in every queue of the namespace (ingest, sink-*), whatever their state: queued,
   scheduled or waiting for a retry, started, failed (dead letters), finished (kept for a
   while), deferred, canceled. A job holding only the subject's data is deleted; a batch that
   also holds other people's is written again without the subject's deliveries and events.
   A started job is only rewritten (its worker already holds the data): erase waits for it to
   end (``--wait``) and looks again, so what it wrote is removed from Postgres afterwards.
3. the Slack outbox: events waiting to be posted.
4. Postgres, in one transaction: ``webhook_events`` (``contact_email`` equal to the address,
   case-insensitively, or the address anywhere in the row), the ``webhook_deliveries`` those
   events came from and any archived delivery whose body or headers mention it, and the
   ``webhook_records`` that mention it. A row goes into ``webhook_erasures`` with the counts.

A raw delivery is kept or removed whole: its bytes are what the provider signed. A delivery
that mentions several people (a Salesloft array) goes, with the events of other people it
would still have produced; events already stored for them stay. Events that arrive later
about the same person are stored as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from ingest import constants
from ingest.config import Settings

__all__ = ["EmailSubject", "ErasureReport", "ResourceSubject", "Subject", "add_command",
           "erase", "parse_resource"]

# Seconds between looks at started jobs that hold the subject, while erase waits for them.
_POLL = 0.5
# The places of a report, in the order they are printed.
PLACES = (
    "spool records", "spool segments in use", "rq jobs removed", "rq jobs rewritten",
    "rq deliveries removed", "rq events removed", "rq jobs still running", "slack outbox",
    "webhook_events", "webhook_deliveries", "webhook_records",
)


class Subject(Protocol):
    """Whom or what to erase, and how to recognize it in each place."""

    @property
    def sha256(self) -> str: ...

    def in_envelope(self, envelope: dict[str, Any]) -> bool: ...

    def in_event(self, event: dict[str, Any]) -> bool: ...

    def in_text(self, text: str) -> bool: ...

    def sql(self) -> tuple[str, str, str, dict[str, Any]]:
        """WHERE clauses for webhook_events (alias e), webhook_deliveries (d) beyond the
        events' own, webhook_records (r); and their parameters."""
        ...


@dataclass(frozen=True)
class EmailSubject:
    """A person by email address, matched case-insensitively anywhere it appears."""

    address: str

    def __post_init__(self) -> None:
        if "@" not in self.address or len(self.address.strip()) < 3:
            raise ValueError("--email needs an email address")
        object.__setattr__(self, "address", self.address.strip().lower())

    def __repr__(self) -> str:  # the address never prints
        return f"EmailSubject(sha256={self.sha256[:12]}...)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.address.encode()).hexdigest()

    def in_text(self, text: str) -> bool:
        return self.address in text.lower()

    def in_envelope(self, envelope: dict[str, Any]) -> bool:
        return self.in_text(orjson.dumps(envelope).decode())

    def in_event(self, event: dict[str, Any]) -> bool:
        return self.in_text(orjson.dumps(event).decode())

    def sql(self) -> tuple[str, str, str, dict[str, Any]]:
        # strpos, not LIKE: an address may hold _ or %, which LIKE reads as wildcards.
        return (
            "lower(e.contact_email) = %(a)s OR strpos(lower(e::text), %(a)s) > 0",
            "strpos(lower(convert_from(d.body, 'UTF8')), %(a)s) > 0"
            " OR strpos(lower(d.headers::text), %(a)s) > 0",
            "strpos(lower(r::text), %(a)s) > 0",
            {"a": self.address},
        )


@dataclass(frozen=True)
class ResourceSubject:
    """One record: ``PROVIDER:TYPE:ID`` as in webhook_records."""

    provider: str
    resource_type: str
    resource_id: str

    @property
    def sha256(self) -> str:
        text = f"{self.provider}:{self.resource_type}:{self.resource_id}"
        return hashlib.sha256(text.encode()).hexdigest()

    def in_text(self, text: str) -> bool:
        return False  # a record is recognized by its normalized events, never by raw text

    def in_event(self, event: dict[str, Any]) -> bool:
        return (event.get("provider"), event.get("resource_type"), event.get("resource_id")) == (
            self.provider, self.resource_type, self.resource_id)

    def in_envelope(self, envelope: dict[str, Any]) -> bool:
        from ingest.events import Delivery
        from ingest.providers import load_providers

        if envelope.get("provider") != self.provider:
            return False
        provider = load_providers().get(self.provider)
        if provider is None:
            return False
        try:
            events = provider.events(Delivery.from_dict(envelope))
        except Exception:  # a delivery that does not normalize is about no record we know
            return False
        return any(e.record == (self.provider, self.resource_type, self.resource_id)
                   for e in events)

    def sql(self) -> tuple[str, str, str, dict[str, Any]]:
        match = "provider = %(p)s AND resource_type = %(t)s AND resource_id = %(i)s"
        return ("e." + match.replace(" AND ", " AND e."), "false", "r." + match.replace(
            " AND ", " AND r."), {"p": self.provider, "t": self.resource_type,
                                  "i": self.resource_id})


def parse_resource(value: str) -> ResourceSubject:
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--resource must be PROVIDER:TYPE:ID, got {value!r}")
    return ResourceSubject(*parts)


@dataclass
class ErasureReport:
    counts: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False
    not_searched: list[str] = field(default_factory=list)  # places this run could not reach

    def as_dict(self) -> dict[str, int]:
        return {place: self.counts[place] for place in PLACES}


# -- the spool --------------------------------------------------------------------------------


def _erase_spool(directory: Path, subject: Subject, report: ErasureReport) -> None:
    from ingest.acceptor.spool import _HEADER, _fsync_dir, read_segment

    if not directory.is_dir():
        return
    for path in sorted(directory.iterdir()):
        if not (path.name.startswith("seg-") and path.suffix in (".log", ".corrupt")):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # drained meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # A live acceptor's active segment, or a drainer moving it to Redis now.
                report.counts["spool segments in use"] += 1
                continue
            if os.fstat(fd).st_nlink == 0:
                continue
            data = path.read_bytes()
            contents = read_segment(data)
            # The valid records as written (bytes, not re-encoded), and where they end.
            spans: list[tuple[int, int]] = []
            offset = 0
            for _ in contents.records:
                _, length, _ = _HEADER.unpack_from(data, offset)
                spans.append((offset, offset + _HEADER.size + length))
                offset += _HEADER.size + length
            kept = [data[a:b] for (a, b), r in zip(spans, contents.records)
                    if not subject.in_envelope(r)]
            removed = len(contents.records) - len(kept)
            # What follows the valid records (a torn tail, or damage kept for a human) stays,
            # unless it mentions the subject.
            rest = data[offset:]
            if rest and subject.in_text(rest.decode("utf-8", "replace")):
                rest = b""
                removed += 1
            if not removed:
                continue
            report.counts["spool records"] += removed
            if report.dry_run:
                continue
            new = b"".join(kept) + rest
            if not new:
                path.unlink()
            else:
                tmp = path.with_name(f".erase-{path.name}.tmp")
                with open(tmp, "wb") as fh:
                    fh.write(new)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)  # atomic: a drainer sees the old file or the new one
            _fsync_dir(directory)
        finally:
            os.close(fd)


# -- RQ jobs ----------------------------------------------------------------------------------


def _queue_names(settings: Settings, redis: Any) -> list[str]:
    from rq import Queue

    from workers.dlq import queues

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


def _rewrite(func: str, args: list[Any], subject: Subject,
             report: ErasureReport) -> list[Any] | None:
    """The job's arguments without the subject, or None when nothing else is left."""
    if func == constants.PROCESS_BATCH and args and isinstance(args[0], list):
        envelopes = [e for e in args[0] if not subject.in_envelope(e)]
        report.counts["rq deliveries removed"] += len(args[0]) - len(envelopes)
        return [envelopes, *args[1:]] if envelopes else None
    if func == constants.DELIVER and len(args) >= 2 and isinstance(args[1], list):
        events = [e for e in args[1] if not subject.in_event(e)]
        raw = args[2] if len(args) > 2 and isinstance(args[2], list) else None
        kept_raw = [d for d in raw if not subject.in_envelope(d)] if raw is not None else None
        report.counts["rq events removed"] += len(args[1]) - len(events)
        if raw is not None and kept_raw is not None:
            report.counts["rq deliveries removed"] += len(raw) - len(kept_raw)
            # The raw body of an event that stays went with the subject's data: the event is
            # stored without it (its delivery_id becomes null, replay cannot re-run it).
            have = {d.get("id") for d in kept_raw}
            events = [dict(e, delivery_id=None) if e.get("delivery_id") not in have else e
                      for e in events]
        return [args[0], events, kept_raw, *args[3:]] if events else None
    # A job we do not know the shape of: recognize the subject by its raw text only.
    return None if subject.in_text(orjson.dumps(args).decode()) else args


def _erase_jobs(settings: Settings, redis: Any, subject: Subject,
                report: ErasureReport) -> set[str]:
    """Erase the subject from every job; return the ids of started jobs that held it."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ingest.rq_jobs import FastJSONSerializer

    running: set[str] = set()
    for name in _queue_names(settings, redis):
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        for job_id, started in dict(_job_ids(queue)).items():
            key = Job.key_for(job_id)
            raw = redis.hget(key, "data")
            if raw is None:
                continue
            try:
                func, _instance, args, kwargs = FastJSONSerializer.loads(zlib.decompress(raw))
            except (zlib.error, ValueError, TypeError):
                continue  # not one of ours, or not JSON: no jobs of ours look like that
            text = _decoded(raw)
            if not subject.in_text(text) and not _might_hold(func, args, subject):
                _scrub_results(redis, job_id, key, subject, report)
                continue
            before = Counter(report.counts)
            new_args = _rewrite(str(func), list(args), subject, report)
            if new_args == list(args):
                report.counts = before
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
                redis.hset(key, "data", zlib.compress(data))
                _scrub_results(redis, job_id, key, subject, report)
    return running


def _might_hold(func: Any, args: Any, subject: Subject) -> bool:
    """A record (not an address) cannot be seen in raw text: look at the jobs that hold it."""
    return isinstance(subject, ResourceSubject) and func in (constants.PROCESS_BATCH,
                                                             constants.DELIVER)


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


# -- the Slack outbox -------------------------------------------------------------------------


def _erase_outbox(settings: Settings, redis: Any, subject: Subject,
                  report: ErasureReport) -> None:
    for items in redis.scan_iter(match=settings.names.key("slack:*:items"), count=500):
        prefix = items[: -len(b"items")]
        for event_id, value in redis.hgetall(items).items():
            try:
                event = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if not (subject.in_event(event) if isinstance(event, dict) else False):
                continue
            report.counts["slack outbox"] += 1
            if report.dry_run:
                continue
            pipe = redis.pipeline(transaction=True)
            pipe.hdel(items, event_id)
            pipe.zrem(prefix + b"queue", event_id)
            pipe.zrem(prefix + b"inflight", event_id)
            pipe.srem(prefix + b"solo", event_id)
            pipe.execute()


# -- Postgres ---------------------------------------------------------------------------------


def _erase_postgres(url: str, subject: Subject, report: ErasureReport) -> None:
    import psycopg
    from psycopg.types.json import Jsonb

    from sinks.postgres import connect

    events_where, deliveries_where, records_where, params = subject.sql()
    with connect(url) as conn, conn.transaction():
        events = conn.execute(
            f"SELECT e.id, e.delivery_id FROM webhook_events e WHERE {events_where}",
            params).fetchall()
        event_ids = [r[0] for r in events]
        delivery_ids = sorted({r[1] for r in events if r[1] is not None})
        params = dict(params, events=event_ids, deliveries=delivery_ids)
        deliveries = conn.execute(
            "SELECT d.id FROM webhook_deliveries d WHERE d.id = ANY(%(deliveries)s::uuid[])"
            f" OR {deliveries_where}", params).fetchall()
        records = conn.execute(
            "SELECT r.provider, r.resource_type, r.resource_id FROM webhook_records r"
            f" WHERE r.event_id = ANY(%(events)s::uuid[]) OR {records_where}", params).fetchall()
        report.counts["webhook_events"] += len(event_ids)
        report.counts["webhook_deliveries"] += len(deliveries)
        report.counts["webhook_records"] += len(records)
        if report.dry_run:
            raise psycopg.Rollback()
        conn.execute("DELETE FROM webhook_events WHERE id = ANY(%s::uuid[])", [event_ids])
        conn.execute("DELETE FROM webhook_deliveries WHERE id = ANY(%s::uuid[])",
                     [[r[0] for r in deliveries]])
        with conn.cursor() as cur:
            cur.executemany("DELETE FROM webhook_records WHERE provider = %s AND "
                            "resource_type = %s AND resource_id = %s", records)
        conn.execute("INSERT INTO webhook_erasures (subject_sha256, counts) VALUES (%s, %s)",
                     (subject.sha256, Jsonb(report.as_dict())))


# -- the whole erasure ------------------------------------------------------------------------


def erase(settings: Settings, subject: Subject, dry_run: bool = False, wait: float = 60.0,
          step: Callable[[str], None] | None = None, suppress: bool = False) -> ErasureReport:
    """Erase ``subject`` everywhere (see the module docstring); ``step(place)`` is told
    where it is looking. ``suppress`` (an email subject only) first lists it so workers drop
    its future events (workers.suppression)."""
    from ingest.redis_conn import worker_redis
    from workers import suppression

    report = ErasureReport(dry_run=dry_run)
    tell = step or (lambda _place: None)
    redis = worker_redis(settings.require_redis())
    try:
        if suppress and not dry_run:
            # Before looking anywhere: what arrives during the erase is dropped, not stored.
            suppression.add(redis, settings.names, subject.sha256)
        tell("spool")
        _erase_spool(settings.spool_dir, subject, report)
        tell("RQ jobs")
        running = _erase_jobs(settings, redis, subject, report)
        tell("Slack outbox")
        _erase_outbox(settings, redis, subject, report)
        if running and not dry_run:
            tell("jobs still running")
            deadline = time.monotonic() + wait
            while running and time.monotonic() < deadline:
                time.sleep(_POLL)
                running = {j for j in running if _is_started(redis, settings, j)}
            # What those jobs did meanwhile (events stored, jobs enqueued) is erased below.
            again = ErasureReport()
            running |= _erase_jobs(settings, redis, subject, again)
            _erase_outbox(settings, redis, subject, again)
            report.counts.update(again.counts)
        report.counts["rq jobs still running"] = len(running) if not dry_run else 0
    finally:
        redis.close()
    if settings.database_url:
        tell("Postgres")
        _erase_postgres(settings.database_url, subject, report)
    else:
        report.not_searched.append("Postgres: DATABASE_URL is not set")
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
    title = f"ingest erase {subject.sha256[:16]}…" + (
        " (dry run: nothing changed)" if report.dry_run else "")
    table = Table(title=title)
    table.add_column("place")
    table.add_column("would be removed" if report.dry_run else "removed", justify="right")
    for place in PLACES:
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
    p.add_argument("--suppress", action="store_true",
                   help="also drop this contact's future events (a hash of the address is "
                        "listed in Redis)")
    p.add_argument("--unsuppress", action="store_true",
                   help="only lift an earlier --suppress; erase nothing")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for running jobs that hold the subject "
                        "(default: %(default)s)")
