"""The CRM sink: POST each event as JSON to one URL, signed per the Standard Webhooks spec.

Every request carries ``webhook-id`` (the event id, stable across retries, so the receiver
deduplicates on it), ``webhook-timestamp`` (unix seconds, fresh per attempt) and
``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
base64-decoded part of the ``whsec_`` secret; any Standard Webhooks library verifies it.
Several secrets (comma-separated) sign every request with each, space-separated, so a secret
rotates without downtime.

Answers: 2xx delivered. 5xx, 408, 429 and network errors are transient (``Retry-After`` is
honoured by the retry schedule). A 3xx is permanent: redirects are never followed, because a
signed body re-sent to wherever a ``Location`` points is how secrets leak. Any other 4xx is
permanent for that event alone; the other events of the batch count as delivered. Each request
ends within ``CRM_TIMEOUT`` in all (not per read), and reads at most 64 KiB of the answer
(sinks._http); what the receiver wrote is quoted in a reason only redacted, its emails and
phone numbers masked too.

Progress per event: right after the receiver's 2xx, a mark in Redis (``crm:<target>:sent:<event
id>``, holding a digest of the body sent, kept for ``INGEST_DEDUP_TTL``) records that the
receiver has this event as it is; an event whose mark matches is not posted again. So a job
that fails or times out half way and is retried (or a job split after a refusal) re-sends
only what the receiver did not take. A body that changed (``ingest replay`` after a mapping
change) is sent again. Without ``REDIS_URL`` (a replay on a machine without it) there are no
marks: every event is posted, which the receiver deduplicates on ``webhook-id``.

One deliver job holds at most :attr:`CrmSink.job_events` events (``JOB_TIMEOUT`` / 2 over
``CRM_TIMEOUT``: 15 at the default 10 s), so a job's posts fit well inside its timeout even
when every request takes its whole deadline (workers.fanout).

Settings (``CRM_*`` or ``[sinks.crm]``): ``WEBHOOK_URL``, ``WEBHOOK_SECRET`` (required),
``EVENTS`` (globs over kind, default ``*``), ``HEADERS`` (extra headers, e.g. auth), ``TIMEOUT``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
import orjson
from redis import Redis

from ingest import constants, safejson
from ingest.config import Settings, parse_list
from ingest.events import Event
from ingest.exceptions import ConfigError, PermanentSinkError, TransientSinkError
from ingest.redaction import reason
from sinks._http import (
    ProcessClient,
    check_url,
    parse_retry_after,
    parse_timeout,
    quote_receiver,
    safe_target,
    short_body,
)

__all__ = ["CrmSink", "SentMarks", "parse_headers", "parse_secret", "sign"]

SECRET_PREFIX = "whsec_"
# Headers the sink sets itself; CRM_HEADERS may not replace them.
_RESERVED = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature", "content-type",
                       "content-length", "host", "transfer-encoding"})
# RFC 9110 token characters: what a header name may contain.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Status codes worth retrying besides 5xx: the receiver was busy, not unwilling.
_RETRYABLE_4XX = frozenset({408, 429})


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` Standard Webhooks signature."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def parse_secret(value: str, variable: str = "CRM_WEBHOOK_SECRET") -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret; a :class:`ConfigError` naming
    ``variable`` (and never showing the value) when it is not one."""
    if not value.startswith(SECRET_PREFIX):
        raise ConfigError(variable, f"must start with {SECRET_PREFIX} (a Standard Webhooks secret)")
    encoded = value[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(variable, f"the part after {SECRET_PREFIX} is not valid base64") from None
    if not key:
        raise ConfigError(variable, f"the part after {SECRET_PREFIX} is empty")
    return key


def parse_headers(value: str | Mapping[str, Any] | None,
                  variable: str = "CRM_HEADERS") -> dict[str, str]:
    """Extra request headers: a mapping (a TOML table), a JSON object
    (``{"Authorization": "Bearer abc"}``), or ``Name: value`` lines."""
    if value is None or value == "":
        return {}
    pairs: list[tuple[str, Any]]
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif value.lstrip().startswith("{"):
        try:
            loaded = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ConfigError(variable, "looks like JSON but is not a valid JSON object") from None
        if not isinstance(loaded, dict):
            raise ConfigError(variable, "must be a JSON object of header names to values")
        pairs = list(loaded.items())
    else:
        pairs = []
        for number, line in enumerate(value.splitlines(), 1):
            if not line.strip():
                continue
            name, colon, rest = line.partition(":")
            if not colon:
                raise ConfigError(variable, f"line {number} is not 'Name: value'")
            pairs.append((name.strip(), rest.strip()))
    headers: dict[str, str] = {}
    for name, raw in pairs:
        name = str(name)
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(variable, f"{name!r} is not a valid header name")
        if name.lower() in _RESERVED:
            raise ConfigError(variable, f"{name} is set by the sink itself and cannot be replaced")
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ConfigError(variable, f"the value of {name} must be text")
        text = str(raw)
        if "\r" in text or "\n" in text:
            raise ConfigError(variable, f"the value of {name} contains a line break")
        headers[name] = text
    return headers


class SentMarks:
    """Which events one receiver already accepted, as which body: a Redis key per event
    (``<prefix><event id>`` holding a digest of the body), kept ``ttl`` seconds. Opened
    lazily, from the URL, in the process that uses it."""

    def __init__(self, redis_url: str, prefix: str, ttl: int) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.ttl = ttl
        self._redis: Redis | None = None
        self._pid = 0

    def _conn(self) -> Redis:
        if self._redis is None or self._pid != os.getpid():
            from ingest.redis_conn import worker_redis

            self._redis = worker_redis(self.redis_url)
            self._pid = os.getpid()
        return self._redis

    def sent(self, marks: Mapping[str, bytes]) -> set[str]:
        """Of ``marks`` (event id -> body digest), the events accepted with that body."""
        if not marks:
            return set()
        ids = list(marks)
        found = self._conn().mget([self.prefix + i for i in ids])
        return {i for i, value in zip(ids, found) if value == marks[i]}

    def mark(self, event_id: str, digest: bytes) -> None:
        self._conn().set(self.prefix + event_id, digest, ex=self.ttl)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None


def _body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest()[:32].encode()


class CrmSink:
    name: ClassVar[str] = "crm"
    default_events: ClassVar[tuple[str, ...]] = ("*",)
    # A CRM shows the latest state: an update older than one it got would put old data back.
    skip_stale_default: ClassVar[bool] = True

    def __init__(self, url: str, keys: Sequence[bytes], headers: Mapping[str, str] | None = None,
                 timeout: float = constants.SINK_HTTP_TIMEOUT,
                 marks: SentMarks | None = None) -> None:
        if not keys:
            raise ValueError("CrmSink needs at least one signing key")
        self.url = url
        self.target = safe_target(url)
        self.keys = tuple(keys)
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.marks = marks
        # Events one deliver job may hold: posted one after another, each within the timeout,
        # they take at most half the job's timeout (workers.fanout splits larger fan-outs).
        self.job_events = max(1, min(constants.MAX_JOB_EVENTS_HTTP,
                                     int(constants.JOB_TIMEOUT / 2 // timeout)))
        self._client = ProcessClient(timeout)
        # Values an error message must never show, should a receiver echo them back.
        self._redact = tuple(self.headers.values()) + (url,)

    @classmethod
    def from_settings(cls, settings: Settings) -> CrmSink:
        section = settings.section("CRM")
        url = check_url("CRM_WEBHOOK_URL", section.get("WEBHOOK_URL"))
        secrets = parse_list(section.get("WEBHOOK_SECRET"))
        if not secrets:
            raise ConfigError("CRM_WEBHOOK_SECRET", "is not set (a whsec_... secret)")
        keys = [parse_secret(s) for s in secrets]
        table = {str(k).upper(): v for k, v in settings.sink_tables.get("crm", {}).items()}
        headers_value: str | Mapping[str, Any] | None = section.get("HEADERS")
        if "CRM_HEADERS" not in settings.raw and isinstance(table.get("HEADERS"), Mapping):
            headers_value = table["HEADERS"]  # a TOML table, kept as one
        headers = parse_headers(headers_value)
        timeout = parse_timeout(section.get("TIMEOUT"), "CRM_TIMEOUT")
        marks = None
        if settings.redis_url:
            # Keys name the receiver by a digest of its URL: a new receiver gets everything.
            target = hashlib.sha256(url.encode()).hexdigest()[:16]
            marks = SentMarks(settings.redis_url, settings.names.key(f"crm:{target}:sent:"),
                              settings.dedup_ttl)
        return cls(url, keys, headers, timeout, marks)

    def __repr__(self) -> str:
        return f"<CrmSink {self.target} headers={sorted(self.headers)}>"

    def request_headers(self, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
        signatures = " ".join(sign(key, event_id, timestamp, body) for key in self.keys)
        return {**self.headers, "content-type": "application/json", "webhook-id": event_id,
                "webhook-timestamp": str(timestamp), "webhook-signature": signatures}

    def send(self, events: Sequence[Event]) -> None:
        refused: dict[str, str] = {}
        bodies: dict[str, bytes] = {}
        for event in events:
            try:
                bodies[event.id] = safejson.dumps(event.to_dict())
            except safejson.Unserializable as exc:
                refused[event.id] = f"event {event.id} {exc}"
        digests = {i: _body_digest(b) for i, b in bodies.items()}
        done = self.marks.sent(digests) if self.marks is not None else set()
        for event in events:
            if event.id not in bodies or event.id in done:
                continue  # refused above, or the receiver already has it as it is
            try:
                self._post(event, bodies[event.id])
            except PermanentSinkError as exc:
                refused[event.id] = str(exc)
                continue
            if self.marks is not None:
                self.marks.mark(event.id, digests[event.id])
        if not refused:
            return
        first = next(iter(refused.values()))
        if len(refused) == 1:
            raise PermanentSinkError(first, event_ids=list(refused))
        raise PermanentSinkError(f"{len(refused)} of {len(events)} events refused; first: {first}",
                                 event_ids=list(refused))

    def _post(self, event: Event, body: bytes) -> None:
        headers = self.request_headers(event.id, body, int(time.time()))
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            # The exception text is the library's, not ours: keep only its type and the
            # first line of its message, which for transport errors never holds the URL.
            detail = reason(exc, self._redact, limit=200)
            raise TransientSinkError(
                f"CRM at {self.target} unreachable: {type(exc).__name__} {detail}".rstrip()
            ) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        # The reason phrase is the receiver's own text, like its body: quoted only redacted.
        phrase = quote_receiver(response.reason_phrase, limit=60, redact=self._redact)
        said = f"CRM at {self.target} answered {status} {phrase}".rstrip()
        if status >= 500 or status in _RETRYABLE_4XX:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            hint = f" (Retry-After {retry_after:g} s)" if retry_after is not None else ""
            raise TransientSinkError(said + hint, retry_after=retry_after)
        if 300 <= status < 400:
            location = response.headers.get("location")
            where = safe_target(str(response.url.join(location))) if location else "nowhere"
            raise PermanentSinkError(
                f"{said}, a redirect to {where}; redirects are not followed: set "
                "CRM_WEBHOOK_URL to the final address", event_ids=[event.id])
        detail = short_body(response, redact=self._redact)
        raise PermanentSinkError(f"{said} for event {event.id}" + (f": {detail}" if detail else ""),
                                 event_ids=[event.id])

    def close(self) -> None:
        self._client.close()
        if self.marks is not None:
            self.marks.close()
