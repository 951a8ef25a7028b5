"""The periodic subscription check: every ``INGEST_SUBSCRIPTIONS_CHECK_EVERY`` (15 minutes),
one worker reads each provider's webhook subscriptions through its API and records whether
they are all there, active, pointing here and holding the current secret
(ingest.subscriptions.run); ``ingest_subscription_healthy`` and ``ingest status`` read that.
The check changes nothing: repairing is ``ingest subscriptions apply``, run by a person or a
deploy script.

Scheduling follows the daily retention run (workers.retention): the checks fall on fixed
slots (multiples of the interval since the epoch); a worker serving the ingest queue, at
start, claims the next slot with a Redis ``SET NX`` marker and schedules one job with a fixed
id through RQ's scheduler; the job, when it has run, claims and schedules the slot after. So
however many workers start, each slot runs once, and a slot whose job was lost is claimed
again by the next worker to start. Without ``INGEST_PUBLIC_URL`` or with the interval ``off``
nothing is scheduled. A provider whose API does not answer, or refuses our credentials, is
recorded unhealthy with the reason; the other providers are still checked. Each provider's
calls end within the API client's deadline, so the check never holds the ingest queue long.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

from redis.exceptions import RedisError

from ingest.exceptions import ConfigError
from ingest.rq_jobs import make_job
from ingest.subscriptions.access import check_every, public_url
from ingest.subscriptions.model import SubscriptionError
from ingest.subscriptions.run import check_provider, managed_providers
from ingest.subscriptions.state import Health, write_health
from workers.runtime import Runtime, current_runtime

__all__ = ["CHECK_JOB", "run_check", "schedule", "schedule_at_start"]

log = logging.getLogger("workers.subscriptions")

# The job function of the check, by name.
CHECK_JOB = "workers.subscriptions.run_check"


def _checked(runtime: Runtime) -> list[str]:
    """The providers a check covers: enabled here, with a subscriptions API."""
    return [name for name in sorted(managed_providers())
            if runtime.settings.secrets_for(name)]


def _validate(runtime: Runtime, names: list[str]) -> None:
    """Read every checked provider's API settings now (no request is made): a malformed one
    stops the starting worker naming the variable, instead of failing each check later."""
    providers = managed_providers()
    for name in names:
        api = providers[name].subscriptions(runtime.settings, None)
        if api is not None:
            api.close()


def schedule(runtime: Runtime, now: float | None = None, after: int | None = None) -> bool:
    """Schedule the check of the next slot (after slot ``after``, when the check of that
    slot asks) unless a worker already did. True when this call did."""
    every = check_every(runtime.settings)
    names = _checked(runtime)
    if every is None or public_url(runtime.settings) is None or not names:
        return False
    _validate(runtime, names)
    now = time.time() if now is None else now
    slot = max(math.floor(now / every) + 1, (after or 0) + 1)
    marker = runtime.names.key(f"subscriptions:check:{slot}")
    # Kept past the slot, so a worker starting just after it does not schedule it again.
    if not runtime.redis.set(marker, b"1", nx=True, ex=int(3 * every) + 60):
        return False
    queue = runtime.ingest_queue
    queue.schedule_job(make_job(queue, CHECK_JOB, (slot,),
                                runtime.names.job_id("subscriptions", str(slot)), None,
                                f"subscription check ({slot})"),
                       datetime.fromtimestamp(slot * every, timezone.utc))
    return True


def schedule_at_start(runtime: Runtime) -> None:
    """At a worker's start: schedule the next check; Redis failing only postpones it (the
    next worker start, or the running chain, schedules it). A malformed setting (the public
    URL, the interval, a provider's API access) stops the worker, naming it."""
    try:
        if schedule(runtime):
            log.info("scheduled the next webhook subscription check")
    except RedisError as exc:
        log.warning("could not schedule the webhook subscription check: %s", exc)


def run_check(slot: int) -> dict[str, Any]:
    """RQ job: check every provider's subscriptions, record the results, schedule the next
    slot. Returns each provider's outcome (``ok``, ``attention`` or ``error``)."""
    rt = current_runtime()
    results: dict[str, Any] = {}
    for name in _checked(rt):
        try:
            plan = check_provider(rt.settings, rt.redis, name)
        except (SubscriptionError, ConfigError) as exc:
            # Recorded like any failed check, so /metrics and `ingest status` show it; the
            # job itself does not fail (it would be a dead letter of the ingest queue).
            write_health(rt.redis, rt.names, Health(name, time.time(), False, [str(exc)],
                                                    check_every(rt.settings), str(exc)))
            log.warning("subscription check of %s failed: %s", name, exc,
                        extra={"provider": name})
            results[name] = "error"
            continue
        if plan.note:
            continue
        results[name] = "error" if plan.error else "attention" if plan.needs_attention else "ok"
        if plan.needs_attention:
            log.warning("%s's webhook subscriptions need attention: %s", name,
                        plan.error or "; ".join(plan.problem_lines()[:3]),
                        extra={"provider": name})
    schedule(rt, after=slot)
    return results
