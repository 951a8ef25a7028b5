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
permanent for that event alone; the other events of the batch count as delivered.

Settings (``CRM_*`` or ``[sinks.crm]``): ``WEBHOOK_URL``, ``WEBHOOK_SECRET`` (required),
``EVENTS`` (globs over kind, default ``*``), ``HEADERS`` (extra headers, e.g. auth), ``TIMEOUT``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx
import orjson

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
    safe_target,
    short_body,
)

__all__ = ["CrmSink", "parse_headers", "parse_secret", "sign"]

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


class CrmSink:
    name: ClassVar[str] = "crm"
    default_events: ClassVar[tuple[str, ...]] = ("*",)
    # A CRM shows the latest state: an update older than one it got would put old data back.
    skip_stale_default: ClassVar[bool] = True

    def __init__(self, url: str, keys: Sequence[bytes], headers: Mapping[str, str] | None = None,
                 timeout: float = constants.SINK_HTTP_TIMEOUT) -> None:
        if not keys:
            raise ValueError("CrmSink needs at least one signing key")
        self.url = url
        self.target = safe_target(url)
        self.keys = tuple(keys)
        self.headers = dict(headers or {})
        self.timeout = timeout
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
        return cls(url, keys, headers, timeout)

    def __repr__(self) -> str:
        return f"<CrmSink {self.target} headers={sorted(self.headers)}>"

    def request_headers(self, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
        signatures = " ".join(sign(key, event_id, timestamp, body) for key in self.keys)
        return {**self.headers, "content-type": "application/json", "webhook-id": event_id,
                "webhook-timestamp": str(timestamp), "webhook-signature": signatures}

    def send(self, events: Sequence[Event]) -> None:
        refused: dict[str, str] = {}
        for event in events:
            try:
                self._post(event)
            except PermanentSinkError as exc:
                refused[event.id] = str(exc)
        if not refused:
            return
        first = next(iter(refused.values()))
        if len(refused) == 1:
            raise PermanentSinkError(first, event_ids=list(refused))
        raise PermanentSinkError(f"{len(refused)} of {len(events)} events refused; first: {first}",
                                 event_ids=list(refused))

    def _post(self, event: Event) -> None:
        try:
            body = safejson.dumps(event.to_dict())
        except safejson.Unserializable as exc:
            raise PermanentSinkError(f"event {event.id} {exc}", event_ids=[event.id]) from None
        headers = self.request_headers(event.id, body, int(time.time()))
        try:
            response = self._client.get().post(self.url, content=body, headers=headers)
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
        phrase = reason(response.reason_phrase, self._redact, limit=60)
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
