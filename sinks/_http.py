"""What the HTTP sinks (crm, slack) share: URL and timeout checks, safe names for targets,
Retry-After, and one reused client per worker process.

Sink URLs are secrets in practice (Slack's is a bearer capability; a CRM URL may carry a
token in its path, query or user info), so errors name a target only by scheme and host,
never by its full URL, and a redirect's ``Location`` is shown the same way. What a receiver
answers is quoted only through :func:`ingest.redaction.receiver_text`: one line, with every URL
path, query string, credential, signature, email address, phone number and configured secret
masked.

A receiver is not trusted to be quick or brief. Each request runs under one total deadline
(the sink's timeout): httpx bounds each read and write, so a receiver dripping one byte every
few seconds would otherwise hold a request for as long as it likes; here every read, write
and connect of the request gets only what is left of its deadline (:class:`_DeadlineBackend`).
And of an answer only the first ``MAX_ANSWER_BYTES`` are read (:class:`Answer`): the status
and headers decide, the start of the body is kept for the reason, and a 200 MB answer costs
a worker 64 KiB, not 200 MB.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import httpcore
import httpx

from ingest import constants, redaction
from ingest.config import parse_http_url
from ingest.exceptions import ConfigError

__all__ = ["MAX_ANSWER_BYTES", "Answer", "ProcessClient", "check_url", "parse_retry_after",
           "parse_timeout", "safe_target", "short_body"]

USER_AGENT = "webhook-ingest"
# Most bytes of a receiver's answer body read (64 KiB); the rest is never read.
MAX_ANSWER_BYTES = 64 * 1024


def check_url(variable: str, url: str | None) -> str:
    """``url`` when it is a usable http(s) URL, else a :class:`ConfigError` naming
    ``variable`` (:func:`ingest.config.parse_http_url`)."""
    return parse_http_url(variable, url)


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


@dataclass(frozen=True)
class Answer:
    """A receiver's answer: status, headers, and at most ``MAX_ANSWER_BYTES`` of its body."""

    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    url: httpx.URL
    head: bytes  # the start of the body
    complete: bool  # the whole body is in ``head``

    @property
    def text(self) -> str:
        return self.head.decode("utf-8", "replace")


def short_body(response: Answer, limit: int = 200, redact: tuple[str, ...] = ()) -> str:
    """The start of a response body on one line, for an error reason an operator reads.
    Any of ``redact`` (configured secrets, header values) is masked, in case a receiver
    echoes a request back; so is whatever looks like a URL path, credential, signature,
    email address or phone number (:func:`ingest.redaction.receiver_text`)."""
    text = " ".join(response.text[: 20 * limit].split())
    return quote_receiver(text, limit=limit, redact=redact)


def quote_receiver(text: str, limit: int = 200, redact: tuple[str, ...] = ()) -> str:
    """Receiver-written text (a reason phrase, a body) as a reason may quote it."""
    for secret in sorted((s for s in redact if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "****")
    # A receiver's error page may quote the request: its path, query, headers, signature,
    # and the contact's address or phone number.
    return redaction.receiver_text(text, limit=limit)


# -- one deadline per request ----------------------------------------------------------------


class _Deadline(threading.local):
    """The monotonic time the current thread's request must end by (None: no deadline)."""

    at: float | None = None


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write gets at most what is left of the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bound(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bound(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: typing.Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        bounded = _bound(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, bounded),
                               self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own network backend, with every connect, read and write bounded by what is
    left of the current request's total deadline."""

    def __init__(self, inner: httpcore.NetworkBackend, deadline: _Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None,
                    ) -> httpcore.NetworkStream:
        bounded = _bound(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, bounded, local_address,
                                                       socket_options), self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[typing.Any] | None = None,
                            ) -> httpcore.NetworkStream:
        bounded = _bound(self._deadline, timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, bounded, socket_options),
                               self._deadline)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bound(deadline: _Deadline, timeout: float | None,
           error: type[httpcore.TimeoutException]) -> float | None:
    """``timeout``, shortened to what is left of the deadline; ``error`` once none is left."""
    if deadline.at is None:
        return timeout
    left = deadline.at - time.monotonic()
    if left <= 0:
        raise error("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class ProcessClient:
    """An httpx client kept for the life of a worker process (connection reuse) and made
    anew in a forked child, which must not share its parent's sockets. It never follows
    redirects: a 3xx is reported, as the contract says, not silently obeyed. Each request
    (:meth:`post`) ends within ``timeout`` seconds in all, and reads at most
    ``max_answer`` bytes of the answer."""

    def __init__(self, timeout: float, max_answer: int = MAX_ANSWER_BYTES) -> None:
        self.timeout = timeout
        self.max_answer = max_answer
        self._client: httpx.Client | None = None
        self._pid = 0
        self._deadline = _Deadline()

    def get(self) -> httpx.Client:
        if self._client is None or self._pid != os.getpid():
            transport = httpx.HTTPTransport()
            pool = getattr(transport, "_pool", None)
            backend = getattr(pool, "_network_backend", None)
            if not isinstance(pool, httpcore.ConnectionPool) or backend is None:
                # The one place this leans on httpx's inside; a release that moves it fails here,
                # loudly, rather than letting a dripping receiver hold a worker.
                raise RuntimeError("this httpx release keeps its connection pool elsewhere; "
                                   "the HTTP sinks cannot bound a request's total time")
            pool._network_backend = _DeadlineBackend(backend, self._deadline)
            self._client = httpx.Client(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 5.0)),
                follow_redirects=False,
                # Identity: a compressed answer would be read compressed (iter_raw), or could
                # unpack into far more than the bytes read.
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                transport=transport,
            )
            self._pid = os.getpid()
        return self._client

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Every request made inside ends within ``seconds`` from now, all its steps together."""
        previous, self._deadline.at = self._deadline.at, time.monotonic() + seconds
        try:
            yield
        finally:
            self._deadline.at = previous

    def post(self, url: str, *, content: bytes | None = None, json: typing.Any = None,
             headers: dict[str, str] | None = None) -> Answer:
        """POST, within the total deadline, reading at most ``max_answer`` bytes of the
        answer's body. Raises httpx's transport errors (a deadline that passed is a timeout)."""
        client = self.get()
        with self.deadline(self.timeout), client.stream(
                "POST", url, content=content, json=json, headers=headers) as response:
            head = bytearray()
            complete = True
            for chunk in response.iter_raw():
                head += chunk
                if len(head) > self.max_answer:
                    # Closing the response unread drops the connection; the rest never comes.
                    complete = False
                    break
            return Answer(status_code=response.status_code,
                          reason_phrase=response.reason_phrase, headers=response.headers,
                          url=response.url, head=bytes(head[: self.max_answer]),
                          complete=complete)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
