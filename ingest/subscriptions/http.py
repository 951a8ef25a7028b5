"""The HTTP client of the providers' APIs: one total deadline per call, bounded answers,
429 waited out, a refused token refreshed once, and no credential in any error.

- **Deadline.** Each call (every attempt, wait and refresh it takes) ends within ``deadline``
  seconds. Each attempt runs under ``asyncio.wait_for`` with what is left, so a server that
  drips its answer a byte at a time cannot hold a worker past it (httpx alone bounds each
  read, not the whole exchange).
- **Bounded answers.** At most ``MAX_ANSWER_BYTES`` of a body are read; a longer one is an
  error, never a 200 MB string in memory.
- **429.** Waited out for as long as ``Retry-After`` (seconds or an HTTP date) says, else the
  provider's ``X-RateLimit-Reset`` (Outreach: unix time; a small number: seconds), else a
  backoff, as long as the deadline allows; then :class:`RateLimited`.
- **401.** The token source is asked once for a fresh token (OAuth refresh); a static token
  cannot be, and a second 401 or any 403 is :class:`CredentialsRefused`.
- **Retries.** A connection that could not be made, a timeout or a 5xx are retried with
  backoff for reads, updates and deletes; a create (POST) only when the request never left
  (connect errors), since a create the provider made but did not answer would be doubled.
- **Same host only.** A next-page link pointing at another host than the configured API is
  not followed: the token never goes anywhere else. Redirects are never followed.
- **Nothing secret in errors.** What the provider wrote is quoted through
  :func:`ingest.redaction.receiver_text` with every credential and webhook secret masked
  (an API may echo a request body, and a create's body holds the webhook secret).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson

from ingest.redaction import receiver_text
from ingest.subscriptions.model import (
    ApiError,
    ApiUnreachable,
    CredentialsRefused,
    RateLimited,
)

__all__ = ["MAX_ANSWER_BYTES", "Answer", "ApiClient", "Session", "TokenSource", "exchange",
           "quote_answer", "retry_after"]

# Most bytes of an answer read (1 MiB: a page of 100 webhooks is some 100 KiB).
MAX_ANSWER_BYTES = 1024 * 1024
# Seconds one attempt's connect, read or write may take (and never more than the deadline).
REQUEST_TIMEOUT = 10.0
# Seconds one call may take in all, attempts and waits included.
CALL_DEADLINE = 60.0
# Attempts of one call (429s, connection errors and 5xx together).
MAX_ATTEMPTS = 8
# Longest single wait a rate limit may ask for (seconds); the deadline usually cuts it first.
MAX_WAIT = 300.0
USER_AGENT = "webhook-ingest"


class TokenSource(Protocol):
    """Where the bearer credential comes from (ingest.subscriptions.tokens)."""

    def token(self, ends: float) -> str: ...

    def refresh(self, stale: str, ends: float) -> bool: ...

    def secrets(self) -> list[str]: ...


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes  # at most MAX_ANSWER_BYTES
    complete: bool


async def _exchange(method: str, url: str, headers: Mapping[str, str], content: bytes | None,
                    left: float, max_answer: int) -> Answer:
    timeout = httpx.Timeout(min(REQUEST_TIMEOUT, left), connect=min(5.0, left))
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        async with client.stream(method, url, headers=dict(headers), content=content) as resp:
            head = bytearray()
            complete = True
            async for chunk in resp.aiter_raw():
                head += chunk
                if len(head) > max_answer:
                    complete = False
                    break
            return Answer(resp.status_code, resp.headers, bytes(head[:max_answer]), complete)


def exchange(method: str, url: str, headers: Mapping[str, str], content: bytes | None,
             ends: float, max_answer: int = MAX_ANSWER_BYTES) -> Answer:
    """One request and its (bounded) answer, ended by ``ends`` (monotonic) whatever happens.
    Raises httpx's transport errors, and TimeoutError once the deadline passes."""
    left = ends - time.monotonic()
    if left <= 0:
        raise TimeoutError("the call's deadline passed")
    answer: Answer = asyncio.run(asyncio.wait_for(
        _exchange(method, url, {"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                                **headers}, content, left, max_answer), left))
    return answer


class Session:
    """An event loop and an httpx client kept between one API client's calls, so they reuse
    connections; made anew in a forked child, which must not share its parent's sockets."""

    def __init__(self, max_answer: int = MAX_ANSWER_BYTES) -> None:
        self.max_answer = max_answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._pid = 0

    async def _go(self, client: httpx.AsyncClient, method: str, url: str,
                  headers: Mapping[str, str], content: bytes | None, left: float) -> Answer:
        timeout = httpx.Timeout(min(REQUEST_TIMEOUT, left), connect=min(5.0, left))
        request = client.build_request(method, url, headers=dict(headers), content=content,
                                       timeout=timeout)
        response = await client.send(request, stream=True)
        try:
            head = bytearray()
            complete = True
            async for chunk in response.aiter_raw():
                head += chunk
                if len(head) > self.max_answer:
                    complete = False
                    break
            return Answer(response.status_code, response.headers,
                          bytes(head[:self.max_answer]), complete)
        finally:
            await response.aclose()

    def exchange(self, method: str, url: str, headers: Mapping[str, str],
                 content: bytes | None, ends: float) -> Answer:
        """As :func:`exchange`, on this session's connections."""
        left = ends - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        if self._loop is None or self._client is None or self._pid != os.getpid():
            self._loop = asyncio.new_event_loop()
            self._client = httpx.AsyncClient(follow_redirects=False, headers={
                "User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
            self._pid = os.getpid()
        answer: Answer = self._loop.run_until_complete(asyncio.wait_for(
            self._go(self._client, method, url, headers, content, left), left))
        return answer

    def close(self) -> None:
        if self._loop is not None and self._pid == os.getpid():
            try:
                if self._client is not None:
                    self._loop.run_until_complete(self._client.aclose())
            finally:
                self._loop.close()
        self._loop = self._client = None


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds a 429 asks to wait: ``Retry-After``, else ``X-RateLimit-Reset``; None when
    neither is readable. Never negative, at most ``MAX_WAIT``."""
    now = time.time() if now is None else now
    seconds: float | None = None
    value = (headers.get("retry-after") or "").strip()
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
                seconds = when.timestamp() - now if when.tzinfo is not None else None
            except (TypeError, ValueError, IndexError):
                seconds = None
    if seconds is None:
        reset = (headers.get("x-ratelimit-reset") or "").strip()
        try:
            number = float(reset)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            seconds = number - now if number > 1e9 else number  # unix time, or seconds left
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_WAIT)


def _backoff(attempt: int) -> float:
    return float(min(0.5 * 2.0 ** (attempt - 1), 8.0))


def quote_answer(answer: Answer, secrets: Iterable[str], limit: int = 200) -> str:
    """What the API said, as an error may quote it: JSON:API ``errors`` (id, title, detail)
    or an OAuth ``error``/``error_description`` when the body has them, else its start; one
    line, every credential and secret masked, URLs, emails and phone numbers too."""
    text = answer.body.decode("utf-8", "replace")
    try:
        doc = orjson.loads(answer.body) if answer.complete else None
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list) and errors:
            parts = []
            for e in errors[:3]:
                if isinstance(e, dict):
                    parts.append(": ".join(str(e[k]) for k in ("id", "title", "detail")
                                           if e.get(k)))
            text = "; ".join(p for p in parts if p) or text
        elif isinstance(doc.get("error"), str):
            text = ": ".join(str(doc[k]) for k in ("error", "error_description")
                             if isinstance(doc.get(k), str))
    masked = text
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        masked = masked.replace(secret, "****")
    return receiver_text(" ".join(masked.split()), limit=limit) or "(no text)"


class ApiClient:
    """Calls to one provider's API at ``base_url`` with the token ``auth`` gives.

    ``call`` returns the answer's JSON (None for an empty body). ``stats`` counts what the
    client did: ``requests``, ``rate_limited`` (429s waited out or not), ``refreshed`` and
    ``retried``. ``redact`` holds more values to mask in errors (the webhook secrets)."""

    def __init__(self, provider: str, base_url: str, auth: TokenSource, *,
                 media_type: str = "application/json", deadline: float = CALL_DEADLINE,
                 redact: Iterable[str] = (), sleep: Callable[[float], None] = time.sleep) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self._origin = (parts.scheme, parts.hostname, parts.port)
        self.auth = auth
        self.media_type = media_type
        self.deadline = deadline
        self.redact = list(redact)
        self.stats: Counter[str] = Counter()
        self._sleep = sleep
        self._session = Session()

    def close(self) -> None:
        """Close the kept connections (a later call opens new ones)."""
        self._session.close()

    def url(self, target: str) -> str:
        """``target`` (a path, or a URL the API gave, such as a next-page link) as an absolute
        URL on the configured API; an ApiError for any other host."""
        if target.startswith("/"):
            return self.base_url + target
        parts = urlsplit(target)
        if (parts.scheme, parts.hostname, parts.port) != self._origin:
            raise ApiError(f"{self.provider}'s API gave a link to another host "
                           f"({parts.scheme}://{parts.hostname}): not followed, so the token "
                           "goes nowhere else")
        return target

    def secrets(self) -> list[str]:
        return [*self.auth.secrets(), *self.redact]

    def _pause(self, seconds: float, ends: float) -> bool:
        if time.monotonic() + seconds >= ends:
            return False
        self._sleep(seconds)
        return True

    def call(self, method: str, target: str, body: Any = None) -> Any:
        url = self.url(target)
        what = f"{method} {urlsplit(url).path}"
        ends = time.monotonic() + self.deadline
        content = orjson.dumps(body) if body is not None else None
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            token = self.auth.token(ends)
            headers = {"Authorization": f"Bearer {token}", "Accept": self.media_type}
            if content is not None:
                headers["Content-Type"] = self.media_type
            self.stats["requests"] += 1
            try:
                answer = self._session.exchange(method, url, headers, content, ends)
            except (httpx.TransportError, TimeoutError) as exc:
                sent = not isinstance(exc, httpx.ConnectError)
                if (attempt < MAX_ATTEMPTS and (method != "POST" or not sent)
                        and self._pause(_backoff(attempt), ends)):
                    self.stats["retried"] += 1
                    continue
                raise ApiUnreachable(f"{self.provider}'s API did not answer {what} "
                                     f"({type(exc).__name__}) within {self.deadline:g} s: "
                                     "check its address and this host's network") from None
            status = answer.status
            if status == 429:
                self.stats["rate_limited"] += 1
                wait = retry_after(answer.headers)
                if attempt < MAX_ATTEMPTS and self._pause(
                        _backoff(attempt) if wait is None else wait, ends):
                    continue
                raise RateLimited(f"{self.provider}'s API kept answering 429 (rate limited) "
                                  f"to {what}; try again later", 429)
            if status == 401 and not refreshed and self.auth.refresh(token, ends):
                refreshed = True
                self.stats["refreshed"] += 1
                continue
            if status in (401, 403):
                raise CredentialsRefused(
                    f"{self.provider}'s API refused our credentials ({status}) for {what}: "
                    f"{quote_answer(answer, self.secrets())}", status)
            if status >= 500 and method != "POST" and attempt < MAX_ATTEMPTS and self._pause(
                    _backoff(attempt), ends):
                self.stats["retried"] += 1
                continue
            if not 200 <= status < 300:
                raise ApiError(f"{self.provider}'s API answered {status} to {what}: "
                               f"{quote_answer(answer, self.secrets())}", status)
            if not answer.complete:
                raise ApiError(f"{self.provider}'s API answered {what} with more than "
                               f"{MAX_ANSWER_BYTES} bytes: not read", status)
            if not answer.body.strip():
                return None
            try:
                return orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                raise ApiError(f"{self.provider}'s API answered {what} with something that "
                               "is not JSON", status) from None
