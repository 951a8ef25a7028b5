"""Connection hygiene at the acceptor: the request-head deadline and the connection limit
(ingest.acceptor.http_limits), on a real uvicorn server with the acceptor's protocol.

The 20,000-idle-connection reproduction against `ingest serve` is in tests/faults/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from ingest.acceptor.app import create_app
from ingest import constants
from ingest.acceptor.http_limits import LimitedHttpToolsProtocol, fit_connection_limit
from ingest.config import Settings
from tests.faults.conftest import outcaller_delivery
from tests.helpers import read_answer, serve
from tests.test_activity import scrape, value

LIMIT = 16  # the smallest INGEST_MAX_CONNECTIONS allows


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_with(sock: socket.socket, timeout: float = 10.0) -> bytes | None:
    """What the server sent before closing ``sock``; None if it is still open after
    ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def delivery_request(n: int, keep_alive: bool = False) -> bytes:
    _, body, headers, _ = outcaller_delivery(n)
    lines = ["POST /webhooks/outcaller HTTP/1.1", "Host: 127.0.0.1",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def one_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a keep-alive connection."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head


@pytest.fixture
def short_deadline(settings: Settings) -> Iterator[Any]:
    """The acceptor with a half-second head deadline."""
    protocol = LimitedHttpToolsProtocol.configured(head_timeout=0.5, max_connections=1000)
    with serve(create_app(settings), http=protocol) as server:
        yield server


def test_a_connection_that_never_sends_a_request_is_closed_silently(short_deadline: Any) -> None:
    sock = connect(short_deadline.port)
    try:
        assert closed_with(sock) == b""  # closed, and not a byte: there is nobody to tell
    finally:
        sock.close()
    closed = value(scrape(short_deadline.url), "ingest_connections_closed_total",
                   reason="head_timeout")
    assert closed is not None and closed >= 1


def test_a_request_head_not_finished_in_time_is_answered_408(short_deadline: Any) -> None:
    sock = connect(short_deadline.port)
    try:
        sock.sendall(delivery_request(1)[:40])  # the request line and a bit
        answer = closed_with(sock)
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert b"request head not received within 0.5 s" in answer


def test_the_deadline_starts_again_after_each_answer_on_a_kept_alive_connection(
        short_deadline: Any) -> None:
    sock = connect(short_deadline.port)
    try:
        for n in (1, 2):  # each answered within the deadline of its own
            sock.sendall(delivery_request(n, keep_alive=True))
            assert one_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(delivery_request(3, keep_alive=True)[:40])
        answer = closed_with(sock)
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer


@pytest.fixture
def limited(settings: Settings) -> Iterator[Any]:
    protocol = LimitedHttpToolsProtocol.configured(head_timeout=60, max_connections=LIMIT)
    with serve(create_app(settings), http=protocol) as server:
        yield server


def test_past_the_limit_the_connection_waiting_longest_for_its_request_makes_room(
        limited: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.acceptor")
    port = limited.port
    request = delivery_request(7)
    # The oldest: a head, then a body that never ends (a trickling sender).
    trickler = connect(port)
    trickler.sendall(request[:-5])
    idle = [connect(port) for _ in range(LIMIT - 1)]  # full: idle connections, no byte sent
    sock = connect(port)  # past the limit: a real delivery
    try:
        sock.sendall(request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        # The trickler made room: closed without an answer (its request never arrived).
        assert closed_with(trickler) == b""
        assert all(still_open(s) for s in idle)
    finally:
        for s in [trickler, sock, *idle]:
            s.close()
    made_room = value(scrape(limited.url), "ingest_connections_closed_total",
                      reason="made_room")
    assert made_room is not None and made_room >= 1
    lines = [r.getMessage() for r in caplog.records if r.name == "ingest.acceptor"]
    assert any(f"reached the limit of {LIMIT}" in line for line in lines), lines


def test_a_request_in_hand_is_never_closed_to_make_room(settings: Settings) -> None:
    """When every open connection's request is being answered, the new connection is the one
    closed, and every request in hand is still answered."""
    release = threading.Event()
    started = threading.Semaphore(0)

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        started.release()
        while not release.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    protocol = LimitedHttpToolsProtocol.configured(head_timeout=60, max_connections=LIMIT)
    with serve(slow, http=protocol) as server:
        busy = [connect(server.port) for _ in range(LIMIT)]
        try:
            for s in busy:
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                          b"Connection: close\r\n\r\n{}")
            for _ in busy:
                assert started.acquire(timeout=10), "the requests did not all reach the app"
            newcomer = connect(server.port)
            try:
                assert closed_with(newcomer) == b""
            finally:
                newcomer.close()
            release.set()
            answers = [read_answer(s) for s in busy]
        finally:
            release.set()
            for s in busy:
                s.close()
    assert all(a.startswith(b"HTTP/1.1 200") and b"done" in a for a in answers), answers


def test_the_connection_limit_fits_the_file_descriptor_limit() -> None:
    """`ingest serve` never holds more connections than it has descriptors for: the open
    connections, the ones the kernel may hand over at once and the reserve all fit."""
    limit, backlog, fds = fit_connection_limit(10**9)
    assert limit + backlog + constants.FD_RESERVE <= fds
    assert fit_connection_limit(100)[0] == 100  # well within: as asked
