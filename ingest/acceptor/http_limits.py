"""Limits uvicorn's httptools protocol does not have: on request heads, and on connections.

httptools gathers a header's value in memory until the value ends, however long it is, so a
sender streaming a 64 MB header (or a million small ones) costs the acceptor memory and event
loop time that every other delivery waits for. :class:`LimitedHttpToolsProtocol` counts the
bytes of each request head as they arrive, and the header fields as they are parsed; past
``MAX_HEADER_BYTES`` or ``MAX_HEADER_COUNT`` it answers ``431 Request Header Fields Too Large``
and closes the connection, before the application sees the request.

uvicorn closes a keep-alive connection that stays idle after an answer, but nothing closes a
connection that never sends a whole request head: each kept a file descriptor for good, and
once the process ran out of them, valid deliveries got no answer and nothing was logged. So:

- **Head deadline.** A connection has ``head_timeout`` seconds (``INGEST_HEAD_TIMEOUT``) from
  when it opened, or from its last answer, to send a whole request head. Then it is closed:
  with ``408`` if part of a head came, silently if nothing did.
- **Connection limit.** At most ``max_connections`` (``INGEST_MAX_CONNECTIONS``, lowered by
  :func:`fit_connection_limit` to what the file-descriptor limit holds) are open at once. A
  connection past the limit makes room by closing the one that has waited longest for its
  request (its head or its body still incomplete: an idle or trickling connection, never one
  whose request is being answered). A real sender sends its request as soon as it connects,
  so it is always the youngest, and idle connections cannot crowd it out; only when every open
  connection has a whole request in hand is the new connection closed instead. Either way the
  acceptor logs it (a line at most every ``CONNECTION_LIMIT_LOG_EVERY`` seconds, with counts)
  and counts it in ``ingest_connections_closed_total``.

``ingest serve`` runs uvicorn with it (``http=LimitedHttpToolsProtocol.configured(...)``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ingest import constants, metrics

__all__ = ["LimitedHttpToolsProtocol", "fit_connection_limit"]

log = logging.getLogger("ingest.acceptor")

_END_OF_HEAD = b"\r\n\r\n"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
              b"content-type: application/json\r\nconnection: close\r\n")
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\n"
              b"content-type: application/json\r\nconnection: close\r\n")


class _HeadTooLarge(Exception):
    pass


def fit_connection_limit(wanted: int) -> tuple[int, int, int]:
    """(connection limit, listen backlog, file-descriptor limit) for this process.

    Raises the soft ``RLIMIT_NOFILE`` to the hard limit (what any process may do), then lowers
    ``wanted`` so that the open connections, the connections the kernel may hand over at once
    (the backlog: an event loop accepts them all before closing any) and ``FD_RESERVE`` fit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the soft limit we have; the connection limit fits it below
    fds = soft if soft != resource.RLIM_INFINITY else 1 << 20
    backlog = max(16, min(constants.LISTEN_BACKLOG, fds // 4))
    limit = max(16, min(wanted, fds - backlog - constants.FD_RESERVE))
    return limit, backlog, fds


class _Door:
    """The connections of one server: how many are open, which are still waiting for their
    request (oldest first), and the log line when the limit is reached."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        # Insertion-ordered: the first is the one that has waited longest for its request.
        self.waiting: dict[LimitedHttpToolsProtocol, None] = {}
        self.made_room = 0  # since the last log line
        self.refused = 0
        self.logged_at = -constants.CONNECTION_LIMIT_LOG_EVERY
        self.flush: asyncio.TimerHandle | None = None
        metrics.CONNECTION_LIMIT.set(limit)

    def admit(self, newcomer: LimitedHttpToolsProtocol) -> None:
        """Called once ``newcomer`` counts as open and waiting, past the limit."""
        victim = next((c for c in self.waiting if c is not newcomer), None)
        if victim is None:
            self.refused += 1
            metrics.CONNECTIONS_CLOSED.labels("refused").inc()
            newcomer.close_now()
        else:
            self.made_room += 1
            metrics.CONNECTIONS_CLOSED.labels("made_room").inc()
            victim.close_now()
        self._report(newcomer.loop)

    def _report(self, loop: asyncio.AbstractEventLoop) -> None:
        wait = self.logged_at + constants.CONNECTION_LIMIT_LOG_EVERY - time.monotonic()
        if wait <= 0:
            self._log()
        elif self.flush is None:  # what happens until then is told then, in one line
            self.flush = loop.call_later(wait, self._log)

    def _log(self) -> None:
        self.flush = None
        if not (self.made_room or self.refused):
            return
        log.warning(
            "open connections reached the limit of %d (INGEST_MAX_CONNECTIONS): closed %d "
            "that had waited longest for their request to make room, and %d new ones because "
            "every open connection had a request in hand. Many idle or slow connections: see "
            "docs/operations.md, 'Hostile and broken senders'.",
            self.limit, self.made_room, self.refused,
            extra={"count": self.made_room + self.refused})
        self.made_room = self.refused = 0
        self.logged_at = time.monotonic()


# One door per server (uvicorn's ServerState, which every connection of a server shares).
_doors: weakref.WeakKeyDictionary[Any, _Door] = weakref.WeakKeyDictionary()


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = constants.MAX_HEADER_BYTES
    max_header_count = constants.MAX_HEADER_COUNT
    head_timeout: float = constants.DEFAULT_HEAD_TIMEOUT
    max_connections: int = constants.DEFAULT_MAX_CONNECTIONS

    @classmethod
    def configured(cls, head_timeout: float, max_connections: int,
                   ) -> type[LimitedHttpToolsProtocol]:
        """This protocol with other limits (uvicorn takes a class, and makes one per
        connection)."""
        return type(cls.__name__, (cls,), {"head_timeout": head_timeout,
                                           "max_connections": max_connections})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # of the request head being received
        self._in_head = True
        self._refused = False
        door = _doors.get(self.server_state)
        if door is None:
            door = _doors[self.server_state] = _Door(self.max_connections)
        self._door = door
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._data_since_idle = False

    # -- connections: the limit and the head deadline -------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        door = self._door
        self._counted = True
        door.open += 1
        self._wait_for_request()
        if door.open > door.limit:
            door.admit(self)
        metrics.OPEN_CONNECTIONS.set(door.open)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _wait_for_request(self) -> None:
        """The connection waits for a request: it may be closed to make room, and has
        ``head_timeout`` seconds for a head."""
        door = self._door
        door.waiting.pop(self, None)
        door.waiting[self] = None  # the youngest
        self._data_since_idle = False
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _forget(self) -> None:
        """No longer open, as far as the limit goes (closed, or about to be)."""
        door = self._door
        if self._counted:
            self._counted = False
            door.open -= 1
            metrics.OPEN_CONNECTIONS.set(door.open)
        door.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def close_now(self) -> None:
        self._forget()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        metrics.CONNECTIONS_CLOSED.labels("head_timeout").inc()
        if self._data_since_idle:  # a sender that is there, only too slow: tell it
            body = b'{"error":"request head not received within %g s"}' % self.head_timeout
            self.transport.write(_TIMED_OUT + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.close_now()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no pipelined request runs
            self._wait_for_request()
            self._data_since_idle = self._in_head and self._head_bytes > 0

    # -- request heads: size and field count -----------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._data_since_idle = True
        if self._in_head and self._head_bytes + len(data) > self.max_header_bytes:
            # Past the limit unless the head ends within it (the body may follow in `data`).
            end = (self._tail + data).find(_END_OF_HEAD)
            if end < 0 or self._head_bytes - len(self._tail) + end > self.max_header_bytes:
                self._refuse(f"request head larger than {self.max_header_bytes} bytes")
                return
        if self._in_head:
            self._head_bytes += len(data)
            # The last bytes seen, to find an end of head split across two reads.
            self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
        super().data_received(data)

    _tail = b""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.max_header_count:
            self._refuse(f"more than {self.max_header_count} header fields")
            raise _HeadTooLarge  # stops the parser; send_400_response stays silent
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail = False, 0, b""
        if self._head_timer is not None:  # the body has INGEST_BODY_TIMEOUT (the app's)
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._tail = True, 0, b""
        if self.cycle is not None and not self.cycle.response_complete:
            # The whole request is in hand and being answered: never closed to make room.
            self._door.waiting.pop(self, None)

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self, why: str) -> None:
        self._refused = True
        body = b'{"error":"' + why.encode() + b'"}'
        log.warning("refused a request: %s", why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.close_now()
