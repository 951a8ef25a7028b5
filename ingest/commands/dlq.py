"""``ingest dlq list / retry / purge [--sink NAME]``: the dead letters, per sink.

What cannot be delivered ends in RQ's failed registry of its queue, with its reason: a
``deliver`` job of a sink that refused an event (a 4xx, or retries used up), or a
``process_batch`` job holding one delivery that cannot be normalized (shown as sink
``ingest``). ``list`` prints one line per failure: the sink, the event ids (or the delivery
id), and the last line of the exception, which names the reason. ``retry`` puts the jobs back
on their queues with a fresh retry schedule (after the receiver or the normalizer is fixed);
every sink is idempotent on ``event.id``, so a retry never doubles what did get through.
``purge`` deletes them.

Queue names come from :class:`~ingest.constants.Names`, so ``INGEST_NAMESPACE`` is honoured.
The sinks listed are the enabled ones plus every installed one (a sink disabled after its
failures still has its dead letters); nothing here builds a sink, so a sink whose settings
are broken does not hide its failures.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ingest import constants
from ingest.config import Settings
from ingest.redaction import reason

if TYPE_CHECKING:
    from redis import Redis
    from rq.job import Job

__all__ = ["Failure", "add_command", "failure_reason", "list_failures", "purge_failures",
           "queues", "retry_failures"]

INGEST = "ingest"  # the "sink" column of a delivery that failed before reaching any sink


@dataclass(frozen=True)
class Failure:
    """One job in a failed registry, as an operator reads it."""

    sink: str
    ids: tuple[str, ...]
    reason: str
    job_id: str
    queue: str
    failed_at: datetime | None

    def lines(self) -> tuple[str, str]:
        """Two lines that fit 80 columns: the sink, the first event (or delivery) id and when;
        then the reason, indented (free text: a terminal may wrap it, never an id)."""
        ids = self.ids[0] if self.ids else "-"
        if len(self.ids) > 1:
            ids += f" +{len(self.ids) - 1} more"
        when = f"  {self.failed_at:%Y-%m-%d %H:%M:%S}Z" if self.failed_at else ""
        return f"{self.sink}  {ids}{when}", f"    {self.reason}"


def queues(settings: Settings, sink: str | None = None,
           redis: Redis | None = None) -> list[tuple[str, str]]:
    """(label, queue name) of every queue whose dead letters ``--sink`` selects: the ingest
    queue, the enabled and installed sinks', and (given ``redis``) every sink queue of this
    namespace that Redis knows, so a dead letter never hides because this shell does not
    enable or install its sink."""
    from ingest.deployment import deployment_queues

    names = settings.names
    installed = {ep.name for ep in entry_points(group=constants.SINK_ENTRY_POINT_GROUP)}
    everything = [(INGEST, names.ingest_queue)] + [
        (s, names.sink_queue(s)) for s in dict.fromkeys([*settings.sinks, *sorted(installed)])]
    if redis is not None:
        known = dict(everything)
        for label, name in deployment_queues(redis, names, ()):
            known.setdefault(label, name)
        everything = list(known.items())
    if sink is None:
        return everything
    return [(label, name) for label, name in everything if label == sink]


def failure_reason(job: Job) -> str:
    """The last line of the job's recorded exception, redacted once more: a reason written
    before receivers' answers were redacted as they are now (an email a CRM echoed) is shown
    masked too."""
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return reason(lines[-1]) if lines else "(no reason recorded: retries used up)"


def _ids(job: Job) -> tuple[str, ...]:
    try:
        args: Any = job.args
        if job.func_name == constants.DELIVER:
            return tuple(str(e.get("id")) for e in args[1])
        if job.func_name == constants.PROCESS_BATCH:
            return tuple(str(env.get("id")) for env in args[0])
    except Exception:  # a job written by another version: still list it, without ids
        pass
    return ()


def _failed(redis: Redis, settings: Settings,
            sink: str | None) -> Iterator[tuple[str, Any, Job]]:
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    for label, name in queues(settings, sink, redis):
        queue = Queue(name, connection=redis, serializer=JSONSerializer)
        registry = queue.failed_job_registry
        job_ids = registry.get_job_ids()
        for job_id, job in zip(job_ids, Job.fetch_many(job_ids, connection=redis,
                                                       serializer=JSONSerializer)):
            if job is None:  # expired: drop the dangling registry entry
                registry.remove(job_id)
                continue
            yield label, registry, job


def list_failures(redis: Redis, settings: Settings, sink: str | None = None) -> list[Failure]:
    out = []
    for label, _, job in _failed(redis, settings, sink):
        out.append(Failure(sink=label, ids=_ids(job), reason=failure_reason(job), job_id=job.id,
                           queue=job.origin, failed_at=job.ended_at))
    return out


log = logging.getLogger("ingest.commands.dlq")


class _OutcomeNotes:
    """What retrying or discarding dead letters changes in the sink outcomes the console shows
    (sinks.outcomes): a retried event is "pending" again until its job runs, a discarded one
    stays "dead" with a reason saying it was discarded. Best effort, one connection per
    command: without ``DATABASE_URL`` (or with ``INGEST_SINK_OUTCOMES`` off) there is nothing
    to change, and a Postgres that cannot be reached costs one warning line, never the dead
    letters' own change."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.database_url if settings.sink_outcomes else None
        self._conn: Any = None

    def _run(self, change: Callable[[Any], object]) -> None:
        if not self._url:
            return
        try:
            if self._conn is None:
                from sinks.postgres import connect

                self._conn = connect(self._url, autocommit=True, connect_timeout=3)
            change(self._conn)
        except Exception as exc:  # psycopg's errors, a missing table (not migrated yet)
            log.warning("the console's sink outcomes were not updated (%s); the dead letters "
                        "were", type(exc).__name__)
            self._url = None
            self.close()

    def retried(self, sink: str, event_ids: Collection[str]) -> None:
        if sink != INGEST and event_ids:
            from sinks.outcomes import dead_letters_retried

            self._run(lambda conn: dead_letters_retried(conn, sink, sorted(event_ids)))

    def discarded(self, sink: str, event_ids: Collection[str]) -> None:
        if sink != INGEST and event_ids:
            from sinks.outcomes import dead_letters_discarded

            at = datetime.now(timezone.utc)
            self._run(lambda conn: dead_letters_discarded(conn, sink, sorted(event_ids), at))

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:
                pass


def retry_failures(redis: Redis, settings: Settings, sink: str | None = None,
                   event_ids: Collection[str] | None = None) -> int:
    """Re-queue every failed job selected; each gets its retry schedule back, fresh.

    ``event_ids``: only the failures of these events (or, under sink ``ingest``, deliveries).
    A job that holds other events too is split: the chosen ones go back on the queue in a
    job of their own, the rest stay in the dead letters. A re-queued event's sink outcome
    (the console's) is "pending" again. Returns the events (or deliveries) re-queued."""
    def retry(label: str, registry: Any, job: Job, chosen: set[str],
              notes: _OutcomeNotes) -> int:
        from ingest.rq_jobs import deliver_retry

        if job.func_name == constants.DELIVER:
            notes.retried(label, chosen - {""})  # before the job can run again
        if len(chosen) < len(_ids(job)):
            return _split_off(redis, job, chosen, requeue=True)
        if job.func_name == constants.DELIVER:
            fresh = deliver_retry()  # new jitter too: a fixed receiver is not hit in lockstep
            job.retry_intervals, job.retries_left = fresh.intervals, fresh.max
        elif job.retry_intervals:
            job.retries_left = len(job.retry_intervals)
        registry.requeue(job)  # saves the job and puts it on its queue
        return len(_ids(job)) if event_ids is not None else 1

    return _each_chosen(redis, settings, sink, event_ids, retry)


def purge_failures(redis: Redis, settings: Settings, sink: str | None = None,
                   event_ids: Collection[str] | None = None) -> int:
    """Delete the failed jobs selected; with ``event_ids``, only those events' failures (a
    job holding others too keeps them). A discarded event's sink outcome stays "dead", its
    reason now starting "discarded from the dead letters". Returns jobs deleted, or with
    ``event_ids`` the events (or deliveries) discarded."""
    def purge(label: str, registry: Any, job: Job, chosen: set[str],
              notes: _OutcomeNotes) -> int:
        if len(chosen) < len(_ids(job)):
            count = _split_off(redis, job, chosen, requeue=False)
        else:
            registry.remove(job, delete_job=True)
            count = len(_ids(job)) if event_ids is not None else 1
        if job.func_name == constants.DELIVER:
            notes.discarded(label, chosen - {""})
        return count

    return _each_chosen(redis, settings, sink, event_ids, purge)


def _each_chosen(redis: Redis, settings: Settings, sink: str | None,
                 event_ids: Collection[str] | None,
                 act: Callable[[str, Any, Job, set[str], _OutcomeNotes], int]) -> int:
    """``act(sink label, registry, job, chosen ids, notes)`` on every failed job the
    selection takes; the sum of what it returns. One outcome-notes connection for all."""
    count = 0
    notes = _OutcomeNotes(settings)
    try:
        for label, registry, job in list(_failed(redis, settings, sink)):
            chosen = _chosen(job, event_ids)
            if chosen:
                count += act(label, registry, job, chosen, notes)
    finally:
        notes.close()
    return count


def _chosen(job: Job, event_ids: Collection[str] | None) -> set[str]:
    """The ids of ``job`` the selection takes: all of them without one (a job without ids,
    written by another version, counts as one unnamed failure)."""
    ids = set(_ids(job))
    if event_ids is None:
        return ids or {""}
    return ids & set(event_ids)


def _items_index(job: Job) -> int | None:
    """Which argument of the job holds its events (deliver) or deliveries (process_batch)."""
    if job.func_name == constants.DELIVER:
        return 1
    if job.func_name == constants.PROCESS_BATCH:
        return 0
    return None


def _split_off(redis: Redis, job: Job, chosen: set[str], requeue: bool) -> int:
    """Take the ``chosen`` events (deliveries) out of a failed job that holds others too: the
    job keeps the rest, in the dead letters; with ``requeue``, the chosen ones go back on the
    queue as a job of their own, with a fresh retry schedule."""
    import uuid

    from rq import Queue

    from ingest.rq_jobs import FastJSONSerializer, batch_retry, deliver_retry, enqueue_new

    index = _items_index(job)
    if index is None:
        return 0
    args = list(job.args)
    items = list(args[index])
    taken = [item for item in items if str(item.get("id")) in chosen]
    kept = [item for item in items if str(item.get("id")) not in chosen]
    if requeue:
        new_args = list(args)
        new_args[index] = taken
        if job.func_name == constants.DELIVER:
            _keep_raw_of(new_args)
        queue = Queue(job.origin, connection=redis, serializer=FastJSONSerializer)
        retry = deliver_retry() if job.func_name == constants.DELIVER else batch_retry()
        func = str(job.func_name)
        enqueue_new(queue, func, tuple(new_args), f"{job.id}-retry-{uuid.uuid4().hex[:12]}",
                    retry, f"{job.description or func} ({len(taken)} retried alone)")
    args[index] = kept
    # The job left in the dead letters keeps only its own events' raw deliveries: a discarded
    # event's body (personal data) does not linger in Redis with the rest.
    if job.func_name == constants.DELIVER:
        _keep_raw_of(args)
    job.args = tuple(args)
    job.save()
    return len(taken)


def _keep_raw_of(deliver_args: list[Any]) -> None:
    """Trim a deliver job's raw deliveries (its third argument) to those of its events."""
    if len(deliver_args) > 2 and deliver_args[2]:
        wanted = {str(e.get("delivery_id")) for e in deliver_args[1]}
        deliver_args[2] = [d for d in deliver_args[2] if str(d.get("id")) in wanted]


# -- the command ----------------------------------------------------------------------------

def cmd_dlq(args: argparse.Namespace) -> int:
    from ingest.redis_conn import worker_redis

    settings = Settings.from_env()
    redis = worker_redis(settings.require_redis())
    try:
        if args.sink is not None:
            labels = [label for label, _ in queues(settings, None, redis)]
            if args.sink not in labels:
                print(f"ingest dlq: no sink {args.sink!r} (have: {', '.join(labels)})",
                      file=sys.stderr)
                return 2
        if args.action == "list":
            failures = list_failures(redis, settings, args.sink)
            for failure in failures:
                print("\n".join(failure.lines()))
            print(f"{len(failures)} failed", file=sys.stderr)
        elif args.action == "retry":
            print(f"re-queued {retry_failures(redis, settings, args.sink)}")
        else:
            print(f"purged {purge_failures(redis, settings, args.sink)}")
    finally:
        redis.close()
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Registers ``ingest dlq`` with the CLI (see ingest.commands.cli._COMMAND_MODULES)."""
    p = add("dlq", cmd_dlq, "dead letters: list, retry or purge failed deliveries, per sink")
    p.add_argument("action", choices=("list", "retry", "purge"))
    p.add_argument("--sink", metavar="NAME",
                   help=f"only this sink's failures ({INGEST!r}: deliveries that failed to "
                        "normalize); default: all")
