"""Limits at the door: JSON nesting, request-head size and count, no redirects."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from rq import Queue

from ingest import constants
from tests.faults.conftest import outcaller_delivery
from tests.helpers import SECRETS, read_answer

TOKEN = {"Authorization": f"Bearer {SECRETS['outcaller'][0]}"}


def nested(depth: int) -> bytes:
    """A valid lead whose ``data.extra`` brings the body to ``depth`` levels of nesting."""
    inner = b"[" * (depth - 2) + b"]" * (depth - 2)
    return (b'{"event": "lead.created", "resource": "lead", "workspaceId": "w", '
            b'"timestamp": "2026-01-01T00:00:00Z", "data": {"id": "lead_deep", "extra": '
            + inner + b"}}")


def queued(settings: Any) -> int:
    from ingest.redis_conn import worker_redis

    redis = worker_redis(settings.require_redis())
    try:
        return int(Queue(settings.names.ingest_queue, connection=redis).count)
    finally:
        redis.close()


def test_nesting_past_the_limit_is_refused_before_anything_is_enqueued(
        acceptor: Any, settings: Any) -> None:
    url = f"{acceptor.url}/webhooks/outcaller"
    limit = constants.MAX_JSON_DEPTH
    assert orjson.loads(nested(limit)) and orjson.loads(nested(limit + 1))
    too_deep = httpx.post(url, content=nested(limit + 1), headers=TOKEN, timeout=10)
    assert too_deep.status_code == 400
    assert f"deeper than {limit} levels" in too_deep.json()["error"]
    assert queued(settings) == 0
    # Many brackets side by side are not depth: accepted.
    wide = orjson.dumps({"event": "lead.created", "resource": "lead", "workspaceId": "w",
                         "timestamp": "2026-01-01T00:00:00Z",
                         "data": {"id": "lead_wide", "rows": [[[1]]] * 500}})
    assert httpx.post(url, content=wide, headers=TOKEN, timeout=10).status_code == 200
    assert httpx.post(url, content=nested(limit), headers=TOKEN, timeout=10).status_code == 200
    assert queued(settings) >= 1


def test_a_trailing_slash_is_not_redirected(acceptor: Any) -> None:
    answer = httpx.post(f"{acceptor.url}/webhooks/outcaller/?token=abc-secret-value",
                        content=b"{}", headers={"Host": "evil.example"}, timeout=10)
    assert answer.status_code == 404
    assert "location" not in answer.headers


def raw_request(port: int, head: bytes, body: bytes = b"") -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed before taking it all: read what it said
        return read_answer(sock)
    finally:
        sock.close()


def head(headers: list[tuple[str, str]], length: int = 2) -> bytes:
    lines = ["POST /webhooks/outcaller HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Content-Length: {length}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_an_oversized_header_is_answered_431_and_closed(acceptor: Any) -> None:
    port = acceptor.port
    big = [("X-Filler", "a" * (constants.MAX_HEADER_BYTES + 1))]
    answer = raw_request(port, head(big + [("Authorization", TOKEN["Authorization"])]), b"{}")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_too_many_header_fields_are_answered_431(acceptor: Any) -> None:
    many = [(f"X-H{i}", "v") for i in range(constants.MAX_HEADER_COUNT + 1)]
    answer = raw_request(acceptor.port, head(many), b"{}")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_a_head_within_the_limits_with_a_large_body_in_the_same_packet_is_accepted(
        acceptor: Any) -> None:
    _, body, headers, _ = outcaller_delivery(3)
    padded = orjson.loads(body)
    padded["data"]["notes"] = "n" * 200_000
    body = orjson.dumps(padded)
    fields = list(headers.items()) + [(f"X-H{i}", "v" * 100)
                                      for i in range(constants.MAX_HEADER_COUNT - 10)]
    answer = raw_request(acceptor.port, head(fields, len(body)), body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]


@pytest.mark.parametrize("flooders", [6])
def test_valid_deliveries_keep_being_answered_during_a_header_flood(
        acceptor: Any, flooders: int) -> None:
    """Senders stream endless headers; real deliveries alongside them are still answered."""
    stop = threading.Event()
    cut_off: list[bool] = []

    def flood() -> None:
        while not stop.is_set():
            sock = socket.create_connection(("127.0.0.1", acceptor.port), timeout=10)
            try:
                sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nX-Flood: ")
                sent = 0
                while sent < 48 * 1024 * 1024 and not stop.is_set():
                    sock.sendall(b"a" * 65536)
                    sent += 65536
                if sent >= 48 * 1024 * 1024:
                    cut_off.append(False)  # all of it went in: nothing stopped it
            except OSError:
                cut_off.append(True)  # the server closed on us, as it should
            finally:
                sock.close()

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(flooders)]
    for t in threads:
        t.start()
    latencies = []
    try:
        with httpx.Client(timeout=5.0) as client:  # Outreach's own deadline
            for n in range(30):
                _, body, headers, _ = outcaller_delivery(100 + n)
                started = time.perf_counter()
                answer = client.post(f"{acceptor.url}/webhooks/outcaller", content=body,
                                     headers=headers)
                latencies.append(time.perf_counter() - started)
                assert answer.status_code == 200, (n, answer.status_code)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert cut_off and all(cut_off), "a flooding sender was let through"
    latencies.sort()
    print(f"\nvalid deliveries during the header flood: median {latencies[15] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")


def test_expensive_bodies_get_the_same_verdicts_from_the_separate_process(
        acceptor: Any, settings: Any) -> None:
    """Bodies with many containers are checked outside the event loop
    (ingest.acceptor.structure), with the same verdicts as in line."""
    url = f"{acceptor.url}/webhooks/outcaller"
    limit = constants.MAX_JSON_DEPTH
    many = b",".join([b"[]"] * (constants.INLINE_MAX_CONTAINERS + 100))

    def wide(depth: int) -> bytes:  # a valid lead, thousands of arrays wide, `depth` deep
        chain = b"[" * (depth - 3) + b"]" * (depth - 3)
        return (b'{"event": "lead.created", "resource": "lead", "workspaceId": "w", '
                b'"timestamp": "2026-01-01T00:00:00Z", "data": {"id": "lead_wide", '
                b'"extra": [' + many + b", " + chain + b"]}}")

    assert orjson.loads(wide(limit + 1)) and orjson.loads(wide(limit))
    before = checked_apart("outcaller")
    too_deep = httpx.post(url, content=wide(limit + 1), headers=TOKEN, timeout=30)
    assert too_deep.status_code == 400
    assert f"deeper than {limit} levels" in too_deep.json()["error"]
    not_object = httpx.post(url, content=b"[" + many + b"]", headers=TOKEN, timeout=30)
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]
    broken = httpx.post(url, content=wide(limit)[:-1], headers=TOKEN, timeout=30)
    assert broken.status_code == 400
    assert queued(settings) == 0
    assert httpx.post(url, content=wide(limit), headers=TOKEN, timeout=30).status_code == 200
    assert queued(settings) == 1
    assert checked_apart("outcaller") - before == 4


def checked_apart(provider: str) -> float:
    """Bodies of ``provider`` this process's acceptors checked in the separate process."""
    return REGISTRY.get_sample_value("ingest_expensive_bodies_total",
                                     {"provider": provider, "outcome": "checked"}) or 0.0
