"""The subscriptions a deployment wants, against what the provider has: a plan, and the
changes ``apply`` makes from it.

**Wanted**: one subscription per topic (an event name the provider's kind table maps, as
``<P>_SUBSCRIPTION_EVENTS`` selects them), pointing at ``INGEST_PUBLIC_URL/webhooks/<provider>``,
signed with the provider's first configured secret (the newest one, during a rotation).

**Ours**: a subscription pointing at that URL, or one this deployment created or updated (its
id is in the Redis record, ingest.subscriptions.state), whatever its URL now.

Each wanted topic is served by the best of our subscriptions that covers it (exact topic over
wildcard, right URL, active, current secret); what that subscription lacks is the item's
state and what ``apply`` does about it:

=================  =====================================================  ===================
state              meaning                                                ``apply``
=================  =====================================================  ===================
``ok``             present, active, here, current secret                  nothing
``missing``        nothing of ours covers the topic                       create
``inactive``       the provider stopped delivering (Outreach deactivated  re-enable (with the
                   it, Salesloft ``enabled: false``), with its reason     current secret)
``suspended``      Outreach suspended it until ``disabledUntil``          re-enable
``wrong_url``      ours by record, pointing elsewhere                     update the URL
``old_secret``     holds a secret we still accept, not the newest         push the newest
``wrong_secret``   holds a secret we no longer accept: deliveries refused push the current one
``unknown_secret`` the provider does not show it and we never pushed one  push the current one
``extra``          ours, but no wanted topic needs it (or a second one)   left, unless
                                                                          ``--delete-extra``
``elsewhere``      not ours: an ``/webhooks/<provider>`` URL on another   left alone
                   host (another deployment, an old address)
=================  =====================================================  ===================

Where the API cannot change a secret (Salesloft) or URL in place, the item is **re-created**:
the new subscription first, then the old one deleted, only when it is ours by record (or with
``--delete-extra``); so ``apply`` never deletes what it did not create unless asked.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from ingest.redaction import receiver_text
from ingest.subscriptions.model import ApiError, CredentialsRefused, Remote, SubscriptionAPI
from ingest.subscriptions.state import Records
from ingest.subscriptions.tokens import fingerprint

__all__ = ["PROBLEMS", "Item", "Outcome", "ProviderPlan", "execute", "make_plan"]

# Item states that need attention (exit 1, ingest_subscription_healthy 0).
PROBLEMS = frozenset({"missing", "inactive", "suspended", "wrong_url", "old_secret",
                      "wrong_secret", "unknown_secret"})
# Longest provider text (a disabledReason) kept in a detail.
_REASON_CHARS = 160


@dataclass(frozen=True)
class Item:
    """One line of a plan: a wanted topic or a subscription, its state, what apply does."""

    state: str
    topic: str  # the wanted topic, or the subscription's own (prospect.*)
    action: str | None = None  # create, enable, update, recreate, delete
    remote: Remote | None = None
    detail: str = ""
    ours: bool = False  # created or updated by this deployment (recorded)
    topics: tuple[str, ...] = ()  # the wanted topics this subscription serves

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "topic": self.topic, "action": self.action,
                "id": self.remote.id if self.remote else None, "detail": self.detail,
                "created_here": self.ours, "topics": list(self.topics)}


@dataclass
class ProviderPlan:
    provider: str
    url: str | None = None
    wanted: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    error: str | None = None
    refused: bool = False  # the API refused our credentials
    note: str | None = None  # why there is nothing to plan (no secret, no API access)

    @property
    def problems(self) -> list[Item]:
        return [i for i in self.items if i.state in PROBLEMS]

    @property
    def needs_attention(self) -> bool:
        return bool(self.error or self.problems)

    @property
    def ok_topics(self) -> int:
        return sum(len(i.topics) for i in self.items if i.state == "ok")

    def problem_lines(self) -> list[str]:
        """Short lines for ``ingest status`` and the health record."""
        return [f"{i.topic} {i.state.replace('_', ' ')}" + (f" ({i.detail})" if i.detail else "")
                for i in self.problems]

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "url": self.url, "wanted": len(self.wanted),
                "ok": self.ok_topics, "needs_attention": self.needs_attention,
                "error": self.error, "note": self.note,
                "items": [i.to_json() for i in self.items if i.state != "ok"]}


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _looks_like_ours(url: str, provider: str) -> bool:
    try:
        return urlsplit(url).path.rstrip("/").endswith(f"/webhooks/{provider}")
    except ValueError:
        return False


def _host(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(unreadable URL)"


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _when(value: str | None) -> str:
    parsed = _time(value)
    return parsed.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%MZ") if parsed else "?"


def _reason(remote: Remote, secrets: Sequence[str]) -> str:
    parts = []
    if remote.disabled_since:
        parts.append(f"since {_when(remote.disabled_since)}")
    if remote.disabled_until:
        parts.append(f"until {_when(remote.disabled_until)}")
    if remote.disabled_reason:
        # The provider's words: it may quote our URL, or worse; masked like a receiver's.
        parts.append(receiver_text(remote.disabled_reason, secrets, limit=_REASON_CHARS))
    return ", ".join(parts)


def make_plan(api: SubscriptionAPI, topics: Sequence[str], url: str, secrets: Sequence[str],
              records: Mapping[str, Mapping[str, Any]], remotes: Sequence[Remote],
              delete_extra: bool = False, now: float | None = None) -> list[Item]:
    """The items of a plan (see the module docstring). ``secrets``: the provider's configured
    secrets, the one to push first; ``records``: ours by id (ingest.subscriptions.state)."""
    at = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    current, others = secrets[0], secrets[1:]
    provider = api.provider

    def ours(r: Remote) -> bool:
        return _same_url(r.url, url) or r.id in records

    def secret_state(r: Remote) -> str:
        if r.secret is not None:
            if hmac.compare_digest(r.secret.encode(), current.encode()):
                return "ok"
            if any(hmac.compare_digest(r.secret.encode(), s.encode()) for s in others):
                return "old_secret"
            return "wrong_secret"
        pushed = (records.get(r.id) or {}).get("secret")
        if not pushed:
            return "unknown_secret"
        if pushed == fingerprint(current):
            return "ok"
        return "old_secret" if pushed in {fingerprint(s) for s in others} else "wrong_secret"

    def disabled(r: Remote) -> str | None:
        if not r.active:
            return "inactive"
        until = _time(r.disabled_until)
        return "suspended" if until is not None and until > at else None

    mine = [r for r in remotes if ours(r)]

    def rank(r: Remote) -> tuple[bool, bool, bool, bool, int, str]:
        return (not _same_url(r.url, url), disabled(r) is not None, secret_state(r) != "ok",
                "*" in r.topic, len(r.id), r.id)

    serving: dict[str, list[str]] = {}
    items: list[Item] = []
    for topic in topics:
        candidates = [r for r in mine if api.covers(r.topic, topic)]
        if not candidates:
            items.append(Item("missing", topic, "create", detail="not subscribed",
                              topics=(topic,)))
            continue
        serving.setdefault(min(candidates, key=rank).id, []).append(topic)
    by_id = {r.id: r for r in remotes}
    for rid, served in serving.items():
        r = by_id[rid]
        recorded = rid in records
        url_ok = _same_url(r.url, url)
        off = disabled(r)
        secret = secret_state(r)
        if url_ok and off is None and secret == "ok":
            items.append(Item("ok", r.topic, None, r, "", recorded, tuple(served)))
            continue
        state = "wrong_url" if not url_ok else off or secret
        if (secret != "ok" and not api.updates_secret) or (not url_ok and not api.updates_url):
            action = "recreate"
        else:
            action = "enable" if off else "update"
        detail = {
            "wrong_url": f"{api.provider} {rid} points at {_host(r.url)}",
            "inactive": f"{api.provider} {rid} is not active",
            "suspended": f"{api.provider} {rid} suspended",
            "old_secret": f"{api.provider} {rid} signs with an older secret",
            "wrong_secret": f"{api.provider} {rid} signs with a secret not configured here",
            "unknown_secret": f"{api.provider} {rid}: its secret is not shown and was never "
                              "pushed from here",
        }[state]
        why = _reason(r, secrets) if off else ""
        items.append(Item(state, r.topic, action, r, f"{detail}: {why}" if why else detail,
                          recorded, tuple(served)))
    for r in mine:
        if r.id in serving:
            continue
        duplicate = next((t for t in topics if api.covers(r.topic, t)), None)
        detail = (f"{provider} {r.id}: a second subscription for {duplicate}" if duplicate
                  else f"{provider} {r.id}: covers no event subscribed to here")
        if not delete_extra:
            detail += "; kept (--delete-extra deletes it)"
        items.append(Item("extra", r.topic, "delete" if delete_extra else None, r, detail,
                          r.id in records))
    for r in remotes:
        if not ours(r) and _looks_like_ours(r.url, provider):
            items.append(Item("elsewhere", r.topic, None, r,
                              f"{provider} {r.id} points at {_host(r.url)}, not here: left "
                              "alone"))
    return items


@dataclass(frozen=True)
class Outcome:
    """What apply did about one item: ``done`` or not, and a line saying what."""

    item: Item
    done: bool
    line: str


def _retry_by_recreating(exc: ApiError) -> bool:
    # The API would not update it (say, a webhook Outreach deactivated for good): a new one.
    return (not isinstance(exc, CredentialsRefused) and exc.status is not None
            and 400 <= exc.status < 500 and exc.status != 429)


def execute(api: SubscriptionAPI, items: Sequence[Item], url: str, secret: str,
            records: Records, delete_extra: bool = False,
            progress: Callable[[Outcome], None] = lambda o: None) -> list[Outcome]:
    """Carry out every item's action, one at a time; an item that fails is reported and the
    others still run. :class:`CredentialsRefused` stops everything (nothing else can work)."""
    fp = fingerprint(secret)
    outcomes: list[Outcome] = []

    def delete(remote: Remote) -> None:
        try:
            api.delete(remote)
        except ApiError as exc:
            if exc.status != 404:  # gone already (deleted by hand meanwhile): done
                raise
        records.forget(remote.id)

    def recreate(item: Item) -> str:
        old = item.remote
        assert old is not None
        new = api.create(old.topic, url, secret)
        records.put(new.id, new.topic, url, fp)
        if item.ours or delete_extra:
            delete(old)
            return f"re-created {old.topic} as {api.provider} {new.id} (deleted {old.id})"
        return (f"created {old.topic} as {api.provider} {new.id}; {old.id} was not created "
                "here: left (--delete-extra deletes it)")

    for item in items:
        if item.action is None:
            continue
        try:
            if item.action == "create":
                new = api.create(item.topic, url, secret)
                records.put(new.id, new.topic, url, fp)
                line = f"created {item.topic} ({api.provider} {new.id})"
            elif item.action in ("enable", "update"):
                assert item.remote is not None
                try:
                    updated = api.update(item.remote, url=url,
                                         secret=secret if api.updates_secret else None)
                except ApiError as exc:
                    if not _retry_by_recreating(exc):
                        raise
                    line = recreate(item)
                else:
                    records.put(updated.id, updated.topic, url, fp)
                    verb = "re-enabled" if item.action == "enable" else "updated"
                    line = f"{verb} {item.topic} ({api.provider} {updated.id})"
            elif item.action == "recreate":
                line = recreate(item)
            elif item.action == "delete":
                assert item.remote is not None
                delete(item.remote)
                line = f"deleted {item.topic} ({api.provider} {item.remote.id})"
            else:
                raise ValueError(f"unknown action {item.action!r}")
        except CredentialsRefused:
            raise
        except ApiError as exc:
            outcome = Outcome(item, False, f"could not {item.action} {item.topic}: {exc}")
        else:
            outcome = Outcome(item, True, line)
        outcomes.append(outcome)
        progress(outcome)
    return outcomes
