"""Request-head limits for uvicorn's httptools protocol, which has none of its own.

httptools gathers a header's value in memory until the value ends, however long it is, so a
sender streaming a 64 MB header (or a million small ones) costs the acceptor memory and event
loop time that every other delivery waits for. :class:`LimitedHttpToolsProtocol` counts the
bytes of each request head as they arrive, and the header fields as they are parsed; past
``MAX_HEADER_BYTES`` or ``MAX_HEADER_COUNT`` it answers ``431 Request Header Fields Too Large``
and closes the connection, before the application sees the request.

``ingest serve`` runs uvicorn with it (``http=LimitedHttpToolsProtocol``).
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ingest import constants

__all__ = ["LimitedHttpToolsProtocol"]

log = logging.getLogger("ingest.acceptor")

_END_OF_HEAD = b"\r\n\r\n"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
              b"content-type: application/json\r\nconnection: close\r\n")


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    max_header_bytes = constants.MAX_HEADER_BYTES
    max_header_count = constants.MAX_HEADER_COUNT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # of the request head being received
        self._in_head = True
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
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
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes, self._tail = True, 0, b""

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def _refuse(self, why: str) -> None:
        self._refused = True
        body = b'{"error":"' + why.encode() + b'"}'
        log.warning("refused a request: %s", why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE + b"content-length: %d\r\n\r\n" % len(body) + body)
            self.transport.close()
