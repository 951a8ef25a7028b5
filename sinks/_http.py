"""What the HTTP sinks (crm, slack) share: URL and timeout checks, safe names for targets,
Retry-After, and one reused client per worker process.

Sink URLs are secrets in practice (Slack's is a bearer capability; a CRM URL may carry a
token in its path, query or user info), so errors name a target only by scheme and host,
never by its full URL, and a redirect's ``Location`` is shown the same way. What a receiver
answers is quoted only through :func:`ingest.redaction.reason`: one line, with every URL path,
query string, credential and configured secret masked.
"""

from __future__ import annotations

import math
import os
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

from ingest import constants, redaction
from ingest.exceptions import ConfigError

__all__ = ["ProcessClient", "check_url", "parse_retry_after", "parse_timeout", "safe_target",
           "short_body"]

USER_AGENT = "webhook-ingest"


def check_url(variable: str, url: str | None) -> str:
    """``url`` when it is a usable http(s) URL, else a :class:`ConfigError` naming
    ``variable`` (the message never repeats the value: it may be a secret)."""
    if not url:
        raise ConfigError(variable, "is not set")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(variable, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, "must be an http:// or https:// URL with a host")
    return url


def parse_timeout(value: str | None, variable: str) -> float:
    """A sink's HTTP timeout in seconds (``SINK_HTTP_TIMEOUT`` when unset), well inside the
    job timeout; a :class:`ConfigError` naming ``variable`` otherwise."""
    if value is None:
        return constants.SINK_HTTP_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(variable, f"must be a number of seconds, got {value!r}") from None
    if not 0 < seconds <= constants.JOB_TIMEOUT / 4:
        raise ConfigError(variable, f"must be between 0 and {constants.JOB_TIMEOUT / 4:g} seconds")
    return seconds


def safe_target(url: str) -> str:
    """``https://host[:port]``: enough to tell targets apart in an error, no path or token."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}" if parts.scheme else host


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), capped at
    ``MAX_RETRY_AFTER``; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), float(constants.MAX_RETRY_AFTER))


def short_body(response: httpx.Response, limit: int = 200, redact: tuple[str, ...] = ()) -> str:
    """The start of a response body on one line, for an error reason an operator reads.
    Any of ``redact`` (configured secrets, header values) is masked, in case a receiver
    echoes a request back."""
    try:
        text = response.text[: 20 * limit]
    except Exception:  # undecodable bytes: the status is the information
        return ""
    text = " ".join(text.split())
    for secret in sorted((s for s in redact if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "****")
    # A receiver's error page may quote the request: its path, query, headers, signature.
    return redaction.reason(text, limit=limit)


class ProcessClient:
    """An httpx client kept for the life of a worker process (connection reuse) and made
    anew in a forked child, which must not share its parent's sockets. It never follows
    redirects: a 3xx is reported, as the contract says, not silently obeyed."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._client: httpx.Client | None = None
        self._pid = 0

    def get(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
