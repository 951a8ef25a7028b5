"""The provider protocol, and the small helpers every provider module shares.

A provider is one module: the raw payload shape, its event -> kind table (``kinds``),
verification, normalization and a sample builder (``sample()``), nothing else. Built-ins and
plugins are written the same way. Standard library and orjson only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Protocol, runtime_checkable

import orjson

from ingest import safejson
from ingest.events import (
    CAMPAIGN_ID,
    CONTACT_EMAIL,
    FALLBACK_FIELDS,
    OCCURRED_AT,
    Contact,
    Delivery,
    Event,
)
from ingest.exceptions import NormalizationError, SignatureError
from ingest.kinds import is_activity, lookup

__all__ = [
    "CAMPAIGN_ID",
    "CREDENTIAL_HEADERS",
    "CREDENTIAL_WORDS",
    "CONTACT_EMAIL",
    "FALLBACK_FIELDS",
    "MakesEvents",
    "OCCURRED_AT",
    "KindTable",
    "Provider",
    "Sample",
    "SampleSource",
    "SignedProvider",
    "SubscriptionSource",
    "TokenProvider",
    "as_id",
    "canonical_digest",
    "iso_ms",
    "kind_classes",
    "is_credential_header",
    "load_object",
    "parse_time",
    "recent",
    "relationship_id",
    "text",
]

# Headers that carry credentials: never stored, never logged, whatever the provider.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
# Words that mark a header as a credential, whatever a provider declares it keeps: the archive
# and the job arguments must not hold one (Outreach's cleanup token, for one).
CREDENTIAL_WORDS = ("token", "secret", "signature", "password", "authorization", "api-key",
                    "apikey", "cookie")


def is_credential_header(name: str) -> bool:
    """Whether a header (any case) carries a credential: never stored, shown or logged."""
    low = name.lower()
    return low in CREDENTIAL_HEADERS or any(word in low for word in CREDENTIAL_WORDS)

# The normalized fields whose fallbacks are counted (OCCURRED_AT, CONTACT_EMAIL, CAMPAIGN_ID,
# FALLBACK_FIELDS) are defined with the Event (ingest.events) and exported here as before.

Sample = tuple[bytes, dict[str, str]]  # (body, headers) of one signed sample delivery


@runtime_checkable
class Provider(Protocol):
    """What the acceptor and workers need from a provider.

    ``verify`` raises :class:`SignatureError` when the request is not authentic.
    ``events`` raises :class:`NormalizationError` only when no dedup key can be formed;
    anything else it cannot map it keeps, with kind ``unknown``.
    """

    name: ClassVar[str]
    # The setting holding this provider's secrets or tokens, e.g. "OUTREACH_WEBHOOK_SECRETS".
    secret_setting: ClassVar[str]
    # Request headers (lower-case) a worker needs, kept with the stored delivery.
    kept_headers: ClassVar[frozenset[str]]
    # True when a dropped connection gets a retry from this provider but a 503 would not.
    retries_network_errors: ClassVar[bool]

    def verify(
        self,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        query: Mapping[str, str],
    ) -> None: ...

    def events(self, delivery: Delivery) -> list[Event]: ...


@runtime_checkable
class KindTable(Protocol):
    """A provider whose event names map onto the shared vocabulary through a data table:
    ``{event name: kind}``, read with :func:`ingest.kinds.lookup`. Every built-in has one; the
    meta-tests check every kind in every loaded provider's table.

    Optionally also ``kind_classes``: ``{event name: "state" | "activity"}`` for the event
    names whose kind the vocabulary cannot judge for this provider (``ingest.kinds``)."""

    kinds: ClassVar[Mapping[str, str]]


def kind_classes(provider: object) -> Mapping[str, str]:
    """The provider's ``kind_classes`` overrides (``{}`` when it has none)."""
    return getattr(provider, "kind_classes", None) or {}


@runtime_checkable
class SampleSource(Protocol):
    """A provider that builds realistic, correctly signed sample deliveries from its documented
    payloads (``ingest send``, ``ingest dev``, bench). Ids and timestamps vary per call, so each
    sample is a new event unless sent again on purpose."""

    def sample(self, rng: random.Random, secret: str) -> Sample: ...


@runtime_checkable
class SubscriptionSource(Protocol):
    """A provider whose own API lists and changes its webhook subscriptions, so that
    ``ingest subscriptions plan``/``apply`` and the workers' periodic check can see and repair
    them. ``subscriptions(settings, redis)`` returns an
    :class:`ingest.subscriptions.model.SubscriptionAPI` built from the deployment's settings
    (its API URL and credentials), or None when it configures none. Optional, like
    ``sample``; ingest.subscriptions.adapter has a base class for writing one."""

    def subscriptions(self, settings: Any, redis: Any) -> Any: ...


def _matches_any(presented: str, expected: Iterable[str]) -> bool:
    # Compare against every candidate without stopping early, so timing says nothing about
    # which key (if any) matched.
    presented_b = presented.encode()
    ok = False
    for candidate in expected:
        ok |= hmac.compare_digest(presented_b, candidate.encode())
    return ok


class MakesEvents:
    """``self.event(delivery, ...)``: an :class:`Event` of ``delivery`` with what every event
    shares filled in: ``provider`` (this provider's name), ``kind`` (from its ``kinds`` table,
    :func:`ingest.kinds.lookup`, unless given), ``received_at`` and ``delivery_id`` (the
    delivery's), ``occurred_at`` (the delivery's receipt time when None) and ``activity``
    (``ingest.kinds``, with its ``kind_classes``). The shared bases below include it."""

    name: ClassVar[str]
    kinds: ClassVar[Mapping[str, str]]

    def event(self, delivery: Delivery, *, event_type: str, dedup_key: str,
              occurred_at: datetime | None, kind: str | None = None, **fields: Any) -> Event:
        kind = lookup(self.kinds, event_type) if kind is None else kind
        return Event(provider=self.name, dedup_key=dedup_key, event_type=event_type, kind=kind,
                     occurred_at=occurred_at or delivery.received_at,
                     received_at=delivery.received_at, delivery_id=delivery.id,
                     activity=is_activity(kind, event_type, kind_classes(self)), **fields)


class SignedProvider(MakesEvents):
    """Base for providers that sign the raw body with a hex HMAC in one header."""

    signature_header: ClassVar[str]
    digestmod: ClassVar[str]
    secret_setting: ClassVar[str]
    retries_network_errors: ClassVar[bool] = False

    def verify(
        self,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        query: Mapping[str, str],
    ) -> None:
        try:
            presented = headers[self.signature_header]
        except KeyError:
            raise SignatureError(f"missing {self.signature_header} header",
                                 "missing_credential") from None
        presented = presented.strip().lower()
        expected = (hmac.new(s.encode(), body, self.digestmod).hexdigest() for s in secrets)
        if not _matches_any(presented, expected):
            raise SignatureError(f"{self.signature_header} does not match any configured secret")


class TokenProvider(MakesEvents):
    """Base for providers authenticated by a shared token: ``Authorization: Bearer <token>``
    or ``?token=<token>``."""

    secret_setting: ClassVar[str]
    retries_network_errors: ClassVar[bool] = False

    def verify(
        self,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        query: Mapping[str, str],
    ) -> None:
        presented: str | None = None
        auth = headers.get("authorization")
        if auth:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                presented = token.strip()
        if presented is None:
            presented = query.get("token")
        if not presented:
            raise SignatureError("missing token: send Authorization: Bearer <token> or ?token=",
                                 "missing_credential")
        if not _matches_any(presented, secrets):
            raise SignatureError("token does not match any configured token", "token")


# -- helpers for events() ------------------------------------------------------------------


def load_object(delivery: Delivery) -> dict[str, Any]:
    """The delivery's body as a dict (the acceptor already checked it is a JSON object), read
    by :func:`ingest.safejson.loads`: fast, and an integer past 64 bits stays exact (a 20-digit
    id stays that id, where orjson alone would make it a float)."""
    try:
        value = safejson.loads(delivery.body)
    except orjson.JSONDecodeError as exc:
        raise NormalizationError(f"body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise NormalizationError("body is not a JSON object")
    return value


def text(value: Any) -> str | None:
    """A non-empty string, or None: real payloads send "", null, or numbers for strings."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    out = str(value).strip()
    return out or None


def as_id(value: Any) -> str | None:
    """An identifier as text: providers send numeric ids where their docs show strings."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return text(value)


def obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (missing or null optional objects)."""
    return value if isinstance(value, dict) else {}


def parse_time(value: Any) -> datetime | None:
    """A timezone-aware UTC datetime from ISO 8601 (any offset, or none: UTC assumed) or unix
    seconds/milliseconds. None when the value is missing or unreadable, never an exception:
    an optional timestamp a provider got wrong must not fail the delivery it travels with."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
        if seconds > 1e11:  # milliseconds
            seconds /= 1000.0
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        raw = value.strip()
        if not raw:
            return None
        # isascii: str.isdigit() is also true for "²" and other digits float() refuses.
        if raw.isascii() and raw.replace(".", "", 1).isdigit():
            return parse_time(float(raw))
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            # Year 1 or 9999 with an offset lands outside datetime's range in UTC.
            return parsed.astimezone(timezone.utc)
        except (OverflowError, ValueError):
            return None
    return None


def time_key(value: Any) -> str | None:
    """A timestamp as it goes into a dedup key: the same instant gives the same text whatever
    offset the provider wrote it with; unreadable values are kept verbatim."""
    parsed = parse_time(value)
    if parsed is not None:
        return parsed.isoformat()
    return text(value)


def canonical_digest(value: Any) -> str:
    """A digest of a JSON value that does not depend on key order or whitespace."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer past 64 bits: the standard library, in the same form
        text = json.dumps(value, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode()
    return hashlib.sha256(text).hexdigest()[:32]


def contact(email: Any = None, name: Any = None, phone: Any = None) -> Contact | None:
    found = Contact(email=text(email), name=text(name), phone=text(phone))
    return found if found else None


def first(values: Any) -> Any:
    """The first element of a list, or the value itself when it is not a list."""
    if isinstance(values, list):
        return values[0] if values else None
    return values


def relationship_id(resource: dict[str, Any], name: str) -> str | None:
    """The id of a JSON:API relationship, in either shape Outreach sends: the documented
    ``relationships.<name>.data.id`` and the bare ``relationships.<name>.id`` of live
    deliveries. A null, zero or missing id (``{"id": 0}``, ``{"id": null}``, ``{}``,
    ``"data": null``, no ``relationships``) is no relationship: None. So is a to-many list."""
    rel = obj(obj(resource.get("relationships")).get(name))
    target = obj(rel.get("data")) if "data" in rel else rel
    found = as_id(target.get("id"))
    return None if found is None or found == "0" else found


def missing(**expected_but_absent: bool) -> tuple[str, ...]:
    """The fallback field names whose flag is true, e.g. ``missing(occurred_at=True)``."""
    return tuple(sorted(f for f, absent in expected_but_absent.items()
                        if absent and f in FALLBACK_FIELDS))


# -- helpers for sample() ------------------------------------------------------------------


def recent(rng: random.Random) -> datetime:
    """A UTC time within the last hour: samples look like fresh activity."""
    return datetime.now(timezone.utc) - timedelta(seconds=rng.randint(0, 3600))


def iso_ms(value: datetime) -> str:
    """ISO 8601 with milliseconds and ``Z``, as most providers write their timestamps."""
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
