"""The providers' API client against real local servers: deadlines, bounded answers, where
the token may go, and what an error may quote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ingest.config import Secret
from ingest.subscriptions.http import ApiClient, retry_after
from ingest.subscriptions.model import ApiError, ApiUnreachable, CredentialsRefused
from ingest.subscriptions.tokens import StaticToken
from tests.helpers import serve

TOKEN = "api-token-9d1e5c7a3b2f4068"
SECRET = "webhook-secret-for-tests-0001"


def _client(url: str, deadline: float = 30.0) -> ApiClient:
    return ApiClient("outreach", url, StaticToken(Secret(TOKEN)), deadline=deadline,
                     redact=[SECRET])


def test_a_next_page_on_another_host_is_not_followed_and_gets_no_token() -> None:
    seen: list[str] = []

    async def elsewhere(request: Request) -> Response:
        seen.append(request.headers.get("authorization", ""))
        return JSONResponse({"data": []})

    with serve(Starlette(routes=[Route("/api/v2/webhooks", elsewhere)])) as other:
        async def listing(request: Request) -> Response:
            return JSONResponse({"data": [], "links": {"next": f"{other.url}/api/v2/webhooks"}})

        with serve(Starlette(routes=[Route("/api/v2/webhooks", listing)])) as api:
            client = _client(api.url)
            first = client.call("GET", "/api/v2/webhooks")
            with pytest.raises(ApiError, match="another host"):
                client.call("GET", first["links"]["next"])
            client.close()
    assert seen == []


def test_a_dripping_server_is_cut_at_the_deadline() -> None:
    async def drip(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(600):  # one byte every half second, for five minutes
                yield b" "
                await asyncio.sleep(0.5)
        return StreamingResponse(body(), media_type="application/json")

    with serve(Starlette(routes=[Route("/slow", drip)])) as api:
        client = _client(api.url, deadline=2.0)
        with pytest.raises(ApiUnreachable, match="did not answer"):
            client.call("GET", "/slow")
        client.close()


def test_an_answer_past_the_bound_is_not_read() -> None:
    async def huge(request: Request) -> Response:
        return Response(b"[" + b"0," * (2 * 1024 * 1024) + b"0]", media_type="application/json")

    with serve(Starlette(routes=[Route("/huge", huge)])) as api:
        client = _client(api.url)
        with pytest.raises(ApiError, match="more than 1048576 bytes"):
            client.call("GET", "/huge")
        client.close()


def test_errors_quote_the_api_with_secrets_and_tokens_masked() -> None:
    async def echo(request: Request) -> Response:
        body = (await request.body()).decode()
        status = 403 if request.method == "GET" else 422
        return JSONResponse({"errors": [{"id": "validationError", "title": "Invalid",
                                         "detail": f"{request.headers['authorization']} "
                                                   f"sent {body}"}]}, status_code=status)

    with serve(Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])) as api:
        client = _client(api.url)
        with pytest.raises(ApiError) as posted:
            client.call("POST", "/echo", {"secret": SECRET})
        with pytest.raises(CredentialsRefused) as got:
            client.call("GET", "/echo")
        client.close()
    for caught in (posted, got):
        text = str(caught.value)
        assert "validationError" in text
        assert SECRET not in text and TOKEN not in text
    assert posted.value.status == 422


def test_retry_after_reads_seconds_dates_and_the_reset_header() -> None:
    now = 1_800_000_000.0
    assert retry_after(httpx.Headers({"Retry-After": "3"}), now) == 3.0
    assert retry_after(httpx.Headers({"Retry-After": "Fri, 15 Jan 2027 08:00:05 GMT"}),
                       1_800_000_000.0) is not None
    assert retry_after(httpx.Headers({"X-RateLimit-Reset": str(now + 7)}), now) == 7.0
    assert retry_after(httpx.Headers({"X-RateLimit-Reset": "12"}), now) == 12.0
    assert retry_after(httpx.Headers({"Retry-After": "-5"}), now) == 0.0
    assert retry_after(httpx.Headers({"Retry-After": "soon"}), now) is None
    assert retry_after(httpx.Headers({"Retry-After": "99999"}), now) == 300.0


def test_the_limits_the_docs_state_are_the_clients() -> None:
    from pathlib import Path

    from ingest.subscriptions import http

    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "operations.md")
                    .read_text().split())
    assert (http.CALL_DEADLINE, http.REQUEST_TIMEOUT) == (60.0, 10.0)
    assert http.MAX_ANSWER_BYTES == 1024 * 1024
    assert ("Each API call ends within 60 s whatever happens (each attempt within 10 s), "
            "reads at most 1 MiB") in text
