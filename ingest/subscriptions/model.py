"""What the subscription code passes around: a provider's subscriptions as its API shows them
(:class:`Remote`), the interface a provider's API adapter offers (:class:`SubscriptionAPI`),
and the errors talking to that API can end in. Standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ingest.exceptions import IngestError

__all__ = [
    "ApiError",
    "ApiUnreachable",
    "CredentialsRefused",
    "RateLimited",
    "Remote",
    "SubscriptionAPI",
    "SubscriptionError",
]


class SubscriptionError(IngestError):
    """Seeing or changing a provider's webhook subscriptions failed; the message says why and
    never holds a credential."""


class ApiError(SubscriptionError):
    """The provider's API answered something we cannot use (``status``: its HTTP status, or
    None when no answer came)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class CredentialsRefused(ApiError):
    """The API refused our token, key or OAuth grant, or its scope (401, 403, invalid_grant):
    a setting to fix, not an outage (exit status 2)."""


class RateLimited(ApiError):
    """The API kept answering 429 for longer than the operation's deadline."""


class ApiUnreachable(ApiError):
    """No answer: connection refused, reset, timed out, or past the deadline."""


@dataclass(frozen=True)
class Remote:
    """One subscription as the provider has it.

    ``topic`` is what it subscribes to in the provider's own words: ``prospect.created`` or
    ``prospect.*`` (Outreach: resource.action, wildcards allowed), ``person_updated``
    (Salesloft: an event type). ``active`` is False when the provider stopped delivering to it
    (Outreach ``active: false``, Salesloft ``enabled: false``); ``disabled_*`` are Outreach's
    reason and times (a temporarily suspended webhook stays ``active``, with ``disabled_until``
    in the future). ``secret`` is the signing secret when the provider shows it (Salesloft's
    ``callback_token``), else None; never printed.
    """

    id: str
    topic: str
    url: str
    active: bool
    disabled_reason: str | None = None
    disabled_since: str | None = None
    disabled_until: str | None = None
    secret: str | None = field(default=None, repr=False)


@runtime_checkable
class SubscriptionAPI(Protocol):
    """A provider's webhook-subscription API, as ``ingest subscriptions`` uses it.

    ``topics(kinds)`` are the subscriptions the provider's event -> kind table wants (one per
    event name it maps); ``covers(remote_topic, topic)`` says whether a subscription as the
    provider has it delivers ``topic`` (wildcards). ``updates_secret`` / ``updates_url``: the
    API can change a subscription's secret / URL in place; when it cannot, a subscription with
    the wrong one is re-created (the new one first, then the old one deleted).
    Every call may raise :class:`ApiError`.
    """

    provider: str
    updates_secret: bool
    updates_url: bool

    def topics(self, kinds: Mapping[str, str]) -> list[str]: ...

    def covers(self, remote_topic: str, topic: str) -> bool: ...

    def list(self) -> list[Remote]: ...

    def create(self, topic: str, url: str, secret: str) -> Remote: ...

    def update(self, remote: Remote, *, url: str, secret: str | None) -> Remote: ...

    def delete(self, remote: Remote) -> None: ...

    def close(self) -> None: ...
