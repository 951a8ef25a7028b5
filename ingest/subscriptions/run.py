"""Checking and repairing one provider's subscriptions end to end: API access from the
settings, the plan against what the provider lists, the changes, and the health record that
``/metrics`` and ``ingest status`` read. ``ingest subscriptions`` and the workers' periodic
check (workers.subscriptions) both run through here."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis

from ingest.config import Settings
from ingest.providers import SubscriptionSource, load_providers
from ingest.subscriptions.access import check_every, require_public_url, webhook_url
from ingest.subscriptions.model import CredentialsRefused, SubscriptionAPI, SubscriptionError
from ingest.subscriptions.plan import Outcome, ProviderPlan, execute, make_plan
from ingest.subscriptions.state import Health, Records, write_health

__all__ = ["Applied", "apply_provider", "check_provider", "managed_providers"]

log = logging.getLogger("ingest.subscriptions")

# Seconds an `apply` may hold a provider's lock (one apply at a time per provider).
APPLY_LOCK_SECONDS = 600


def managed_providers() -> dict[str, SubscriptionSource]:
    """Every loaded provider that offers a subscriptions API (built-ins and plugins)."""
    return {name: p for name, p in load_providers().items()
            if isinstance(p, SubscriptionSource)}


def _connect(settings: Settings, redis: Redis, name: str,
             plan: ProviderPlan) -> SubscriptionAPI | None:
    provider = load_providers().get(name)
    secrets = settings.secrets_for(name)
    if provider is None or not isinstance(provider, SubscriptionSource):
        plan.note = "no subscriptions API for this provider"
        return None
    if not secrets:
        plan.note = f"not enabled here ({provider.secret_setting} is empty): nothing to subscribe"
        return None
    api = provider.subscriptions(settings, redis)
    if api is None:
        plan.note = "no API access configured (docs/operations.md, \"Provider subscriptions\")"
        return None
    if not isinstance(api, SubscriptionAPI):
        raise SubscriptionError(f"{name}'s subscriptions() returned {type(api).__name__}, "
                                "which is not a SubscriptionAPI")
    return api


def _plan(settings: Settings, redis: Redis, name: str, api: SubscriptionAPI,
          plan: ProviderPlan, delete_extra: bool) -> set[str] | None:
    """Fill ``plan`` from the provider's list; the ids it listed (None when it could not)."""
    provider = load_providers()[name]
    secrets = settings.secrets_for(name)
    plan.wanted = api.topics(getattr(provider, "kinds", None) or {})
    assert plan.url is not None
    records = Records(redis, settings.names, name).all()
    try:
        remotes = api.list()
    except CredentialsRefused as exc:
        plan.error, plan.refused = str(exc), True
        return None
    except SubscriptionError as exc:
        plan.error = str(exc)
        return None
    plan.items = make_plan(api, plan.wanted, plan.url, secrets, records, remotes,
                           delete_extra=delete_extra)
    return {r.id for r in remotes}


def _record(settings: Settings, redis: Redis, plan: ProviderPlan) -> None:
    problems = [plan.error] if plan.error else plan.problem_lines()
    write_health(redis, settings.names, Health(
        plan.provider, time.time(), not plan.needs_attention, problems,
        check_every(settings), plan.error))


def check_provider(settings: Settings, redis: Redis, name: str,
                   delete_extra: bool = False) -> ProviderPlan:
    """The plan for one provider (nothing changed); its health recorded when it was
    checked (the provider is enabled and has API access)."""
    plan = ProviderPlan(name, webhook_url(require_public_url(settings), name))
    api = _connect(settings, redis, name, plan)
    if api is None:
        return plan
    try:
        _plan(settings, redis, name, api, plan, delete_extra)
    finally:
        api.close()
    _record(settings, redis, plan)
    return plan


@dataclass
class Applied:
    before: ProviderPlan
    outcomes: list[Outcome]
    after: ProviderPlan


def apply_provider(settings: Settings, redis: Redis, name: str, delete_extra: bool = False,
                   progress: Callable[[Outcome], None] = lambda o: None) -> Applied:
    """Plan, carry the plan out, and plan again to see the result (recorded as the health),
    holding the provider's apply lock throughout."""
    before = ProviderPlan(name, webhook_url(require_public_url(settings), name))
    api = _connect(settings, redis, name, before)
    if api is None:
        return Applied(before, [], before)
    lock = settings.names.key(f"subscriptions:apply-lock:{name}")
    owner = uuid.uuid4().hex
    if not redis.set(lock, owner, nx=True, ex=APPLY_LOCK_SECONDS):
        before.error = (f"another `ingest subscriptions apply` is changing {name}'s "
                        "subscriptions now; run this again once it is done")
        return Applied(before, [], before)
    try:
        _plan(settings, redis, name, api, before, delete_extra)
        if before.error:
            _record(settings, redis, before)
            return Applied(before, [], before)
        secret = settings.secrets_for(name)[0]
        assert before.url is not None
        outcomes = execute(api, before.items, before.url, secret,
                           Records(redis, settings.names, name), delete_extra, progress)
        after = ProviderPlan(name, before.url)
        present = _plan(settings, redis, name, api, after, delete_extra=False)
        if present is not None:
            # Forget what was deleted at the provider since (by hand, or by this run).
            records = Records(redis, settings.names, name)
            for rid in set(records.all()) - present:
                records.forget(rid)
        _record(settings, redis, after)
        return Applied(before, outcomes, after)
    except CredentialsRefused as exc:
        before.error, before.refused = str(exc), True
        _record(settings, redis, before)
        return Applied(before, [], before)
    finally:
        api.close()
        redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                   "return redis.call('del', KEYS[1]) end return 0", 1, lock, owner)

