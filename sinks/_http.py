"""What the HTTP sinks (crm, slack) share: URL checks, safe names for targets, Retry-After.

Sink URLs are secrets in practice (Slack's is a bearer capability; a CRM URL may carry a
token in its path, query or user info), so errors name a target only by scheme and host,
never by its full URL, and a redirect's ``Location`` is shown the same way.
"""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpx

from ingest import constants
from ingest.exceptions import ConfigError

__all__ = ["check_url", "client", "parse_retry_after", "safe_target", "short_body"]

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
        text = response.text
    except Exception:  # undecodable bytes: the status is the information
        return ""
    text = " ".join(text.split())
    for secret in sorted((s for s in redact if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "****")
    return text[:limit] + ("…" if len(text) > limit else "")


def client(timeout: float) -> httpx.Client:
    """A client kept for the life of a worker process (connection reuse), which never follows
    redirects: a 3xx is reported, as the contract says, not silently obeyed."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )
