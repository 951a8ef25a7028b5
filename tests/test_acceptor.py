"""The acceptor's HTTP contract, over real HTTP against a real Redis."""

from __future__ import annotations

import hashlib
import hmac
import socket
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from ingest.acceptor.app import create_app
from ingest.config import Settings
from tests.helpers import SECRETS, serve


def outreach_headers(body: bytes, secret: str = SECRETS["outreach"][0]) -> dict[str, str]:
    return {"Content-Type": "application/json",
            "Outreach-Webhook-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


BODY = orjson.dumps({"data": {"type": "prospect", "id": 1, "attributes": {}},
                     "meta": {"eventName": "prospect.created", "deliveredAt": "2026-01-01T00:00:00Z"}})


def test_healthz(acceptor: Any) -> None:
    response = httpx.get(f"{acceptor.url}/healthz")
    assert response.status_code == 200


def test_readyz_reports_redis_and_spool(acceptor: Any) -> None:
    response = httpx.get(f"{acceptor.url}/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "redis": "ok", "spool_depth": 0}


def test_readyz_is_503_when_redis_is_unreachable(make_env: Callable[..., dict[str, str]],
                                                 unused_port: int) -> None:
    settings = Settings.from_env(make_env(REDIS_URL=f"redis://127.0.0.1:{unused_port}/0"))
    with serve(create_app(settings)) as server:
        response = httpx.get(f"{server.url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["redis"] == "unreachable"


def test_unknown_provider_is_404(acceptor: Any) -> None:
    response = httpx.post(f"{acceptor.url}/webhooks/nosuch", content=BODY)
    assert response.status_code == 404
    assert "nosuch" in response.json()["error"]


def test_provider_without_secret_is_404(make_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(make_env(OUTREACH_WEBHOOK_SECRETS=""))
    with serve(create_app(settings)) as server:
        response = httpx.post(f"{server.url}/webhooks/outreach", content=BODY,
                              headers=outreach_headers(BODY))
    assert response.status_code == 404


@pytest.mark.parametrize("body", [b"not json", b"[1, 2, 3]", b'"a string"', b"", b"{bad"],
                         ids=["text", "array", "string", "empty", "broken"])
def test_body_that_is_not_a_json_object_is_400(acceptor: Any, runtime: Any, body: bytes) -> None:
    response = httpx.post(f"{acceptor.url}/webhooks/outreach", content=body,
                          headers=outreach_headers(body))
    assert response.status_code == 400
    assert response.json() == {"error": "body must be a JSON object"}
    assert runtime.ingest_queue.count == 0


def test_deeply_nested_json_is_400_not_a_crash(acceptor: Any, runtime: Any) -> None:
    body = b'{"a":' * 5000 + b"1" + b"}" * 5000
    response = httpx.post(f"{acceptor.url}/webhooks/outreach", content=body,
                          headers=outreach_headers(body))
    assert response.status_code == 400
    assert runtime.ingest_queue.count == 0


def test_oversized_body_is_413_by_content_length(make_env: Callable[..., dict[str, str]],
                                                 runtime: Any) -> None:
    settings = Settings.from_env(make_env(INGEST_MAX_BODY_BYTES="1000"))
    body = b'{"x": "' + b"a" * 2000 + b'"}'
    with serve(create_app(settings)) as server:
        response = httpx.post(f"{server.url}/webhooks/outreach", content=body,
                              headers=outreach_headers(body))
    assert response.status_code == 413
    assert runtime.ingest_queue.count == 0


def test_oversized_chunked_body_is_refused_before_it_is_all_sent(
        make_env: Callable[..., dict[str, str]], runtime: Any) -> None:
    """No Content-Length: the acceptor counts while streaming and answers 413 while the
    sender still has most of its (endless) body to send."""
    settings = Settings.from_env(make_env(INGEST_MAX_BODY_BYTES="65536"))
    sent = 0

    def endless() -> Any:
        nonlocal sent
        chunk = b"a" * 16384
        for _ in range(64 * 1024):  # up to 1 GiB, far more than the server may read
            sent += len(chunk)
            yield chunk

    with serve(create_app(settings)) as server:
        try:
            response = httpx.post(f"{server.url}/webhooks/outreach", content=endless(),
                                  headers=outreach_headers(b""), timeout=30)
            status = response.status_code
        except httpx.HTTPError:
            status = None  # the server may close the connection after answering
    assert status in (413, None)
    assert sent < 8 * 1024 * 1024, f"client sent {sent} bytes before the refusal"
    assert runtime.ingest_queue.count == 0


def test_credentials_are_not_echoed_in_errors(acceptor: Any) -> None:
    body = BODY
    response = httpx.post(f"{acceptor.url}/webhooks/outcaller", content=body,
                          headers={"Authorization": "Bearer wrong-token-value-123"})
    assert response.status_code == 401
    assert "wrong-token-value-123" not in response.text


def test_metrics_count_results_by_provider(acceptor: Any, runtime: Any) -> None:
    httpx.post(f"{acceptor.url}/webhooks/outreach", content=BODY, headers=outreach_headers(BODY))
    httpx.post(f"{acceptor.url}/webhooks/outreach", content=BODY,
               headers=outreach_headers(BODY, "wrong-secret-0000000"))
    text = httpx.get(f"{acceptor.url}/metrics").text
    assert 'ingest_deliveries_total{provider="outreach",result="accepted"}' in text
    assert 'ingest_deliveries_total{provider="outreach",result="unauthorized"}' in text
    assert "ingest_spool_depth" in text


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
