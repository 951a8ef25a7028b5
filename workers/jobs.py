"""The two RQ job functions.

``process_batch(envelopes)``: one job per acceptor flush. Normalizes every delivery, drops
duplicates (workers.dedup), and enqueues one ``deliver`` job per sink whose filter matches.
A delivery that cannot be read, normalized or serialized is set aside as a batch of its own,
which then fails alone, at once (no retries), with a readable reason (and can be retried with
``ingest dlq retry`` after a fix); the rest of the batch goes on.

``deliver(sink, events, deliveries)``: hands events to one sink. Transient errors are retried
by RQ with backoff and jitter. A permanent error on several events splits them into one job
per event, so each failure lands in the failed registry alone and the others get through.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from rq import get_current_job

from ingest import constants, metrics, safejson
from ingest.events import Delivery, Event
from ingest.exceptions import NormalizationError, PermanentSinkError, TransientSinkError
from ingest.kinds import UNKNOWN
from ingest.redaction import reason
from ingest.rq_jobs import deliver_retry, enqueue_new
from sinks.registry import EnabledSink
from sinks.outcomes import Outcome
from workers import dedup, fanout, marks, suppression
from workers.outcomes import attempts_of, next_attempt_at, now, writes_delivered
from workers.labels import event_type_label, kind_label, label
from workers.normalize import normalize
from workers.runtime import Runtime, current_runtime

__all__ = ["GroupSetAside", "deliver", "deliver_group", "process_batch", "process_group"]

log = logging.getLogger("workers.jobs")


def _stretch_next_retry(job: Any, retry_after: float) -> None:
    """Make the job's next scheduled retry wait at least ``retry_after`` seconds: the
    receiver's own hint (429/503 Retry-After) beats our backoff when it is longer. RQ reads
    the interval from the job object when it schedules the retry, right after this job ends."""
    intervals = list(job.retry_intervals or [])
    if not intervals or not job.retries_left:
        return
    index = max(len(intervals) - job.retries_left, 0)
    wanted = math.ceil(min(retry_after, constants.MAX_RETRY_AFTER))
    if index < len(intervals) and intervals[index] < wanted:
        intervals[index] = wanted
        job.retry_intervals = intervals


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:32]


def _job_form(event: Event, rendered: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """``event.to_job()``, from what process_batch already rendered when it can: only
    ``stale`` may have changed since (workers.marks)."""
    out = rendered.get(event.id)
    if out is None:
        return event.to_job()
    return out if out["stale"] == event.stale else {**out, "stale": event.stale}


def enqueue_deliveries(rt: Runtime, events: Sequence[Event], deliveries: dict[str, Delivery],
                       rendered: Mapping[str, dict[str, Any]] | None = None) -> int:
    """One deliver job per sink whose filter matches, or, past the sink's bound, several
    (workers.fanout: bounded jobs, a chain per bulk delivery); ids make re-enqueueing a no-op.
    ``rendered``: ``to_job()`` of events by id, as already made (see :func:`process_batch`)."""
    rendered = rendered or {}
    created = 0
    skipped: list[Outcome] = []  # stale events a sink skips: never queued for it
    for name, enabled in rt.sinks.items():
        wanted_events = [e for e in events if enabled.wants(e)]
        chosen = marks.for_sink(enabled, wanted_events)
        if len(chosen) < len(wanted_events):
            at, kept = now(), {e.id for e in chosen}
            skipped += [Outcome(e.id, name, "stale", at, attempts=0)
                        for e in wanted_events if e.id not in kept]
        if not chosen:
            continue
        if len(chosen) > fanout.job_events(enabled):
            forms = {e.id: _job_form(e, rendered) for e in chosen}
            raws = enabled.deliveries_for(chosen, deliveries) or {}
            created += fanout.enqueue_bounded(rt, name, enabled, chosen, forms,
                                              {i: d.to_dict() for i, d in raws.items()})
            continue
        wanted = enabled.deliveries_for(chosen, deliveries)
        raw = None if wanted is None else [d.to_dict() for d in wanted.values()]
        job_id = rt.names.job_id(f"deliver-{name}", _digest([e.id for e in chosen]))
        created += enqueue_new(
            rt.sink_queue(name), constants.DELIVER,
            (name, [_job_form(e, rendered) for e in chosen], raw),
            job_id, deliver_retry(), f"deliver({name}, {len(chosen)} events)",
        )
    rt.outcomes.record(skipped)
    return created


def process_batch(envelopes: list[dict[str, Any]]) -> dict[str, int]:
    job = get_current_job()
    return _process([(job.id if job is not None else "direct", envelopes)], job)[0]


class GroupSetAside(Exception):
    """A delivery of jobs run together cannot be processed: each job then runs on its own
    (process_batch), which sets that delivery aside as it always does."""


def process_group(calls: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, int]]:
    """Several process_batch jobs (job id, envelopes) run as one (workers.grouping): their
    events claimed each under its own job's id, one deliver job per sink for them all. The
    result of each job, in order. Raises :class:`GroupSetAside` when a delivery cannot be
    processed: that, and anything else going wrong, makes the worker run each job alone."""
    return _process(calls, None)


def _process(calls: Sequence[tuple[str, list[dict[str, Any]]]],
             job: Any) -> list[dict[str, int]]:
    """process_batch for the envelopes of one job, or of several run together (``job`` is
    then None): each envelope's events are claimed under the id of the job it came in."""
    rt = current_runtime()
    alone = len(calls) == 1
    deliveries: dict[str, Delivery] = {}
    candidates: dict[str, Event] = {}  # by event id: copies inside one batch collapse here
    rendered: dict[str, dict[str, Any]] = {}  # their to_job(), made once for check and jobs
    owner_of: dict[str, str] = {}  # event id -> the job whose envelope brought it first
    delivered_by: dict[str, str] = {}  # delivery id -> the job it came in
    poisoned = 0
    produced: Counter[str] = Counter()  # events per provider, copies included
    per_job: dict[str, Counter[str]] = {owner: Counter() for owner, _ in calls}

    for owner, envelopes in calls:
        per_job[owner]["deliveries"] += len(envelopes)
        for envelope in envelopes:
            # Everything that depends on one delivery's content happens inside this try:
            # whatever it raises (RecursionError included) fails that delivery alone.
            try:
                delivery = Delivery.from_dict(envelope)
                events = normalize(rt.providers, delivery)
                # What the deliver jobs will carry: an event no serializer can write must fail
                # here, alone, not later in the enqueue of the whole batch.
                forms = [event.to_job() for event in events]
                for form in forms:
                    safejson.dumps(form)
            except Exception as exc:
                if not alone:
                    raise GroupSetAside(type(exc).__name__) from None
                _set_aside(rt, job, envelope, exc, len(envelopes) == 1, owner)
                poisoned += 1
                continue
            deliveries[delivery.id] = delivery
            delivered_by[delivery.id] = owner
            for event, form in zip(events, forms):
                produced[event.provider] += 1
                per_job[owner]["produced"] += 1
                if event.id not in candidates:
                    candidates[event.id] = event
                    rendered[event.id] = form
                    owner_of[event.id] = owner

    events = suppression.drop_suppressed(rt.redis, rt.names, list(candidates.values()), produced)
    kept = {e.id for e in events}
    for event_id in candidates.keys() - kept:
        per_job[owner_of[event_id]]["suppressed"] += 1
    owners = [owner_of[e.id] for e in events]
    fresh = [e for e, ok in zip(events, dedup.claim(rt.redis, rt.names, owners, events)) if ok]
    fresh = marks.mark_stale(rt.redis, rt.names, fresh, rt.settings.dedup_ttl)
    kinds: Counter[tuple[str, str]] = Counter()  # counted once per (provider, kind)
    for event in fresh:
        produced[event.provider] -= 1
        per_job[owner_of[event.id]]["events"] += 1
        kinds[event.provider, event.kind] += 1
        if event.kind == UNKNOWN:
            provider_label = label(event.provider)
            metrics.UNKNOWN_EVENTS.labels(
                provider_label, event_type_label(rt, provider_label, event.event_type)).inc()
    for (provider, kind), count in kinds.items():
        metrics.EVENTS.labels(label(provider), kind_label(kind)).inc(count)
    metrics.count_fallbacks(fresh)
    for provider_name, count in produced.items():
        if count:
            metrics.DUPLICATES.labels(label(provider_name)).inc(count)
    duplicates = sum(produced.values())

    if fresh:
        enqueue_deliveries(rt, fresh, deliveries, rendered)
        dedup.mark_done(rt.redis, rt.names, fresh, rt.settings.dedup_ttl)
    first = calls[0][0]
    if log.isEnabledFor(logging.DEBUG):  # one line per delivery is too many at INFO
        new = Counter(e.delivery_id for e in fresh)
        for delivery in deliveries.values():
            log.debug("delivery processed: %d new events", new[delivery.id],
                      extra={"provider": delivery.provider, "delivery_id": delivery.id,
                             "job_id": delivered_by[delivery.id], "count": new[delivery.id]})
    received = sum(len(envelopes) for _, envelopes in calls)
    if alone:
        log.info("batch processed: %d deliveries, %d new events, %d duplicates, %d set aside",
                 received, len(fresh), duplicates, poisoned,
                 extra={"job_id": first, "count": received})
        return [{"deliveries": received, "events": len(fresh), "duplicates": duplicates,
                 "poisoned": poisoned}]
    log.info("batches processed: %d jobs, %d deliveries, %d new events, %d duplicates",
             len(calls), received, len(fresh), duplicates,
             extra={"job_id": first, "count": received})
    return [{"deliveries": c["deliveries"], "events": c["events"],
             "duplicates": c["produced"] - c["events"] - c["suppressed"], "poisoned": 0}
            for c in (per_job[owner] for owner, _ in calls)]


def _set_aside(rt: Runtime, job: Any, envelope: Any, exc: Exception, only: bool,
               owner: str) -> None:
    """A delivery that cannot be processed: when it is its job's only one, the job fails
    (into the failed registry, no retries: parsing is deterministic); else it gets a job of
    its own, which then fails alone."""
    why = _poison_reason(exc)
    ids = _envelope_ids(envelope)
    if only:
        if job is not None:
            job.retries_left = 0
        metrics.POISON.labels(label(ids["provider"])).inc()
        log.error("delivery cannot be processed; it goes to the failed registry: %s",
                  why, extra={**ids, "job_id": owner})
        raise NormalizationError(why) from None
    # Counted in POISON when its own job fails, not twice.
    log.warning("setting aside a delivery that cannot be processed: %s", why, extra=ids)
    enqueue_new(rt.ingest_queue, constants.PROCESS_BATCH, ([envelope],),
                rt.names.job_id("alone", _alone_token(envelope)), None,
                f"process_batch(1 delivery, set aside: {type(exc).__name__})")


def _poison_reason(exc: BaseException) -> str:
    """The reason a delivery failed: one readable line, redacted, naming the error's type
    unless it is our own."""
    text = reason(exc)
    if isinstance(exc, NormalizationError):
        return text or "delivery cannot be normalized"
    return reason(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _envelope_ids(envelope: Any) -> dict[str, Any]:
    """Log fields of an envelope that may not even be well-formed."""
    get = envelope.get if isinstance(envelope, dict) else (lambda _key: None)
    return {"provider": label(str(get("provider") or "unknown")),
            "delivery_id": label(str(get("id") or "unknown"))}


def _alone_token(envelope: Any) -> str:
    """The set-aside job's id part: the delivery id when it is a plain id, else a digest."""
    delivery_id = envelope.get("id") if isinstance(envelope, dict) else None
    if isinstance(delivery_id, str) and delivery_id.replace("-", "").isalnum() \
            and len(delivery_id) <= 64:
        return delivery_id
    return hashlib.sha256(repr(envelope)[:100_000].encode("utf-8", "replace")).hexdigest()[:32]


def deliver(sink_name: str, events: list[dict[str, Any]],
            deliveries: list[dict[str, Any]] | None = None,
            chain: dict[str, Any] | None = None) -> dict[str, int]:
    """Hand ``events`` to one sink. ``chain``: this job is a chunk of a bulk delivery's
    chain (workers.fanout), whose next chunk it queues first."""
    rt = current_runtime()
    enabled = rt.sinks.get(sink_name)
    job = get_current_job()
    attempts = attempts_of(job)
    if enabled is None:
        # A worker configured otherwise: RQ retries the job, which a worker with the sink
        # runs (and records); nothing is recorded here.
        raise PermanentSinkError(f"sink {sink_name!r} is not enabled here (INGEST_SINKS)")
    if chain is not None:
        fanout.hand_on(rt, sink_name, chain)
    elif len(events) > fanout.job_events(enabled):
        # Written before jobs were bounded (or re-queued from the dead letters): bounded now.
        created = fanout.split_job(rt, sink_name, enabled, events, deliveries)
        log.info("split %d events into bounded jobs", len(events),
                 extra={"sink": sink_name, "count": created})
        return {"delivered": 0, "rechunked": len(events)}
    evs = marks.still_current(rt.redis, rt.names, enabled, [Event.from_job(e) for e in events])
    skipped = {"stale": len(events) - len(evs)} if len(evs) < len(events) else {}
    # What this job did, written once, at its end (workers.outcomes): stale ones first.
    outcomes: list[Outcome] = []
    if skipped:
        at, sending = now(), {e.id for e in evs}
        outcomes += [Outcome(str(e["id"]), sink_name, "stale", at, attempts)
                     for e in events if e["id"] not in sending]
    if not evs:
        rt.outcomes.record(outcomes)
        return {"delivered": 0, **skipped}
    try:
        # The events themselves cannot be written (a PermanentSinkError naming them): a batch
        # of several is split, each then fails or succeeds alone.
        _send(enabled, evs, deliveries or ())
    except PermanentSinkError as exc:
        failed_ids = set(exc.event_ids or ())
        failed = [e for e in evs if e.id in failed_ids]
        if len(evs) > 1 and failed:
            # Give each failed event its own job: it fails alone, the rest are done.
            by_id = {e["id"]: e for e in events}
            raw_by_id = {d["id"]: d for d in deliveries or ()}
            for e in failed:
                raw = [raw_by_id[e.delivery_id]] if e.delivery_id in raw_by_id else None
                enqueue_new(
                    rt.sink_queue(sink_name), constants.DELIVER, (sink_name, [by_id[e.id]], raw),
                    rt.names.job_id(f"deliver-{sink_name}", _digest([e.id])),
                    deliver_retry(),
                    f"deliver({sink_name}, 1 event, split after: {reason(exc, limit=200)})",
                )
            for e in failed:
                log.warning("sink refused an event; it gets a job of its own: %s", reason(exc),
                            extra=_event_extra(sink_name, e))
            metrics.SINK_EVENTS.labels(sink_name, "split").inc(len(failed))
            metrics.SINK_EVENTS.labels(sink_name, "delivered").inc(len(evs) - len(failed))
            # The refused events' own jobs record them; the others are delivered.
            outcomes += _delivered_outcomes(sink_name, [e for e in evs if e.id not in failed_ids],
                                            attempts)
            rt.outcomes.record(outcomes)
            return {"delivered": len(evs) - len(failed), "split": len(failed), **skipped}
        if job is not None:
            job.retries_left = 0  # retrying cannot help; go straight to the failed registry
        metrics.SINK_EVENTS.labels(sink_name, "failed").inc(len(evs))
        why = reason(exc) or type(exc).__name__
        for e in evs:
            metrics.POISON.labels(label(e.provider)).inc()
            log.error("sink refused the event; it goes to the failed registry: %s", why,
                      extra=_event_extra(sink_name, e))
        at = now()
        outcomes += [Outcome(e.id, sink_name, "dead", at, attempts, reason=why) for e in evs]
        rt.outcomes.record(outcomes)
        if why != str(exc):
            raise PermanentSinkError(why, event_ids=exc.event_ids) from None
        raise
    except Exception as exc:
        final = job is None or not job.retries_left  # RQ retries only while some are left
        if not final and isinstance(exc, TransientSinkError) and exc.retry_after:
            _stretch_next_retry(job, exc.retry_after)
        metrics.SINK_EVENTS.labels(sink_name, "failed" if final else "retried").inc(len(evs))
        why = reason(exc) or type(exc).__name__
        log.warning("sink failed (%s): %s", "no retries left" if final else "will retry",
                    why, extra={"sink": sink_name, "count": len(evs),
                                "job_id": job.id if job is not None else None})
        at = now()
        retry_at = None if final else next_attempt_at(job, at)
        outcomes += [Outcome(e.id, sink_name, "dead" if final else "retrying", at, attempts,
                             next_attempt_at=retry_at, reason=why) for e in evs]
        rt.outcomes.record(outcomes)
        raise
    _delivered(sink_name, evs, job.id if job is not None else "direct")
    outcomes += _delivered_outcomes(sink_name, evs, attempts)
    rt.outcomes.record(outcomes)
    return {"delivered": len(evs), **skipped}


def _delivered_outcomes(sink_name: str, evs: Sequence[Event], attempts: int) -> list[Outcome]:
    """The rows saying ``evs`` were delivered (none for the Postgres sink's first attempt:
    its stored rows say so)."""
    if not writes_delivered(sink_name, attempts):
        return []
    at = now()
    return [Outcome(e.id, sink_name, "delivered", at, attempts) for e in evs]


def _send(enabled: EnabledSink, evs: Sequence[Event], raw: Iterable[dict[str, Any]]) -> None:
    """One ``send`` to the sink, with the raw deliveries when it wants them; its time goes to
    ``ingest_sink_seconds``."""
    started = time.perf_counter()
    try:
        enabled.send(evs, {d["id"]: Delivery.from_dict(d) for d in raw}
                     if enabled.needs_raw else None)
    finally:
        metrics.SINK_SECONDS.labels(enabled.name).observe(time.perf_counter() - started)


def _delivered(sink_name: str, evs: Sequence[Event], job_id: str, jobs: int = 1) -> None:
    """Metrics and the log line of events a sink took."""
    now = datetime.now(timezone.utc)
    lag = metrics.LAG_SECONDS.labels(sink_name)
    for e in evs:
        lag.observe((now - e.received_at).total_seconds())
    metrics.SINK_EVENTS.labels(sink_name, "delivered").inc(len(evs))
    if jobs == 1:
        log.info("delivered %d events to %s", len(evs), sink_name,
                 extra={"sink": sink_name, "count": len(evs), "job_id": job_id})
    else:
        log.info("delivered %d events of %d jobs to %s", len(evs), jobs, sink_name,
                 extra={"sink": sink_name, "count": len(evs), "job_id": job_id})


def deliver_group(calls: Sequence[tuple[Any, ...]], job_ids: Sequence[str],
                  attempts: Sequence[int] | None = None) -> list[dict[str, int]]:
    """Several deliver jobs of one sink (their arguments, ``calls``), as one send; the result of
    each job, in order. Whatever goes wrong raises, and the worker then runs each job on its
    own with :func:`deliver` (workers.grouping), which handles every failure as it always
    does: so this needs no failure handling of its own. ``attempts``: which attempt each job
    is on (workers.outcomes.attempts_of), for the outcome rows."""
    sink_name = calls[0][0]
    rt = current_runtime()
    enabled = rt.sinks.get(sink_name)
    if enabled is None or any(call[0] != sink_name for call in calls):
        raise PermanentSinkError(f"sink {sink_name!r} is not enabled here, or the jobs differ")
    merged: dict[str, Event] = {}
    raw: dict[str, dict[str, Any]] = {}
    ids_of_call: list[set[str]] = []
    attempt: dict[str, int] = {}  # event id -> the highest attempt of the jobs holding it
    for index, (_, events, deliveries) in enumerate(_deliver_args(*call) for call in calls):
        ids = set()
        tries = attempts[index] if attempts is not None and index < len(attempts) else 1
        for data in events:
            event = Event.from_job(data)
            merged.setdefault(event.id, event)
            ids.add(event.id)
            attempt[event.id] = max(attempt.get(event.id, 0), tries)
        ids_of_call.append(ids)
        for d in deliveries or ():
            raw.setdefault(d["id"], d)
    evs = marks.still_current(rt.redis, rt.names, enabled, list(merged.values()))
    if evs:
        _send(enabled, evs, raw.values())
        _delivered(sink_name, evs, job_ids[0], jobs=len(calls))
    sent = {e.id for e in evs}
    at = now()
    rt.outcomes.record(
        [Outcome(e.id, sink_name, "delivered", at, attempt[e.id]) for e in evs
         if writes_delivered(sink_name, attempt[e.id])]
        + [Outcome(i, sink_name, "stale", at, attempt[i]) for i in merged if i not in sent])
    results = []
    for ids in ids_of_call:
        delivered = len(ids & sent)
        results.append({"delivered": delivered} if delivered == len(ids)
                       else {"delivered": delivered, "stale": len(ids) - delivered})
    return results


def _deliver_args(sink_name: str, events: list[dict[str, Any]],
                  deliveries: list[dict[str, Any]] | None = None) -> tuple[
                      str, list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A deliver job's arguments, the optional one filled in."""
    return sink_name, events, deliveries


def _event_extra(sink: str, event: Event) -> dict[str, Any]:
    """Log fields of a line about one event: the delivery it came from, for tracing."""
    return {"sink": sink, "provider": event.provider, "delivery_id": event.delivery_id,
            "event_id": event.id}
