"""The acceptor: verify, make durable, answer. Nothing slow happens here.

For each ``POST /webhooks/{provider}``, in order: 404 for a provider that is unknown or has no
secret configured; 413 as soon as the streamed body passes the limit (never read whole); 408
when a sender trickles its body past ``INGEST_BODY_TIMEOUT``; 401 when the signature or token
does not match any configured secret; 400 when the body is not a JSON object; otherwise the
delivery is made durable (Redis, or the local spool) and only then answered 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ingest import metrics
from ingest.config import Settings
from ingest.durable import Durable, NotDurable
from ingest.enqueue import BatchEnqueuer
from ingest.exceptions import SignatureError
from ingest.providers import Provider, load_providers
from ingest.providers.base import CREDENTIAL_HEADERS

__all__ = ["create_app"]

log = logging.getLogger("ingest.acceptor")


# The 200 answer, rendered once: JSONResponse would serialize the same dict for every request.
_ACCEPTED = b'{"status":"accepted"}'


class _BodyTooLarge(Exception):
    pass


class DropConnection(Exception):
    """Raised to close the connection without an answer (see ``DropConnectionMiddleware``)."""


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    # close=True for refusals that leave request body unread: without it the connection stays
    # open and the server keeps receiving (and discarding) whatever the sender streams.
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _uuid4() -> str:
    """``str(uuid.uuid4())`` at half the cost (no UUID object): a random version-4 UUID."""
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _kept_headers(provider: Provider, headers: dict[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in headers.items()
        if k in provider.kept_headers and k not in CREDENTIAL_HEADERS
    }


class Acceptor:
    def __init__(self, settings: Settings, durable: Durable) -> None:
        self.settings = settings
        self.durable = durable
        providers = load_providers()
        # Only providers with a secret are served; the rest answer 404.
        self.providers = {n: p for n, p in providers.items() if settings.secrets_for(n)}
        self.secrets = {n: settings.secrets_for(n) for n in self.providers}
        self._counters: dict[tuple[str, str], Any] = {}
        enqueuer = getattr(durable, "enqueuer", None)
        # Group commit ends a held batch once every sender's connection waits in it.
        self._enqueuer = enqueuer if isinstance(enqueuer, BatchEnqueuer) else None

    def _count(self, provider: str, result: str) -> None:
        # The labelled child, looked up once: labels() takes a lock and builds a key each call.
        child = self._counters.get((provider, result))
        if child is None:
            child = self._counters[(provider, result)] = metrics.DELIVERIES.labels(
                provider, result)
        child.inc()

    async def receive(self, request: Request) -> Response:
        name = request.path_params["provider"]
        provider = self.providers.get(name)
        if provider is None:
            self._count("unknown", "not_found")
            return _error(404, f"no provider {name!r} is configured here")
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                body = await _read_body(request, self.settings.max_body_bytes)
        except _BodyTooLarge:
            self._count(name, "too_large")
            return _error(413, f"body is larger than {self.settings.max_body_bytes} bytes",
                          close=True)
        except TimeoutError:
            self._count(name, "too_slow")
            return _error(408, f"body not received within {self.settings.body_timeout:g} s",
                          close=True)

        # Straight from the ASGI scope (what request.headers wraps), decoded as Starlette does.
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in request.scope["headers"]}
        try:
            provider.verify(headers, body, self.secrets[name], request.query_params)
        except SignatureError as exc:
            self._count(name, "unauthorized")
            log.warning("refused: %s", exc, extra={"provider": name})
            return _error(401, str(exc))

        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None  # also covers nesting past orjson's recursion limit
        if not isinstance(parsed, dict):
            self._count(name, "bad_request")
            return _error(400, "body must be a JSON object")

        delivery_id = _uuid4()
        envelope: dict[str, Any] = {
            "id": delivery_id,
            "provider": name,
            "received_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "headers": _kept_headers(provider, headers),
            "body": body.decode("utf-8"),  # orjson accepted it, so it is valid UTF-8
        }
        client = request.scope.get("client")
        if self._enqueuer is not None and client is not None:
            self._enqueuer.sender(tuple(client))
        started = time.perf_counter()
        try:
            result = await self.durable.store(envelope)
        except NotDurable as exc:
            self._count(name, "unavailable")
            log.error("could not make delivery durable: %s", exc,
                      extra={"provider": name, "delivery_id": delivery_id})
            if provider.retries_network_errors:
                raise DropConnection from None  # the sender retries network failures only
            return _error(503, "temporarily unable to accept deliveries")
        metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
        self._count(name, result)
        return Response(_ACCEPTED, media_type="application/json")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        redis_ok = await self.durable.redis_ok()
        body = {
            "status": "ready" if redis_ok else "unavailable",
            "redis": "ok" if redis_ok else "unreachable",
            "spool_depth": self.durable.spool_depth(),
        }
        return JSONResponse(body, status_code=200 if redis_ok else 503)

    async def metrics(self, request: Request) -> Response:
        metrics.SPOOL_DEPTH.set(self.durable.spool_depth())
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)


class DropConnectionMiddleware:
    """Turns :class:`DropConnection` into a closed connection with not one byte of answer.

    ASGI has no "close without answering". Starting a response and failing would still put a
    status line on the wire ("503 ..."), which a sender may read as an answer and never retry.
    What uvicorn (h11 and httptools alike) does instead: it marks the response as started,
    *then* validates the headers; a header value with a control character fails that check
    before anything is written, and an application that returns with its response started but
    not finished gets its transport closed. The sender sees the connection close with no
    response at all: a network failure, which Outreach retries. tests/faults/test_hostile.py
    checks this on a raw socket with both HTTP implementations.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        except DropConnection:
            with contextlib.suppress(Exception):
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"x-drop", b"\x00")]})


def create_app(settings: Settings | None = None, durable: Durable | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    durable = durable or Durable.from_settings(settings)
    if isinstance(getattr(durable, "enqueuer", None), BatchEnqueuer):
        # Workers busy on any queue of the pipeline make group commit batch harder.
        durable.enqueuer.watch(settings.names.sink_queue(s) for s in settings.sinks)
    acceptor = Acceptor(settings, durable)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await durable.start()
        try:
            yield
        finally:
            await durable.stop()

    app = Starlette(
        routes=[
            Route("/webhooks/{provider}", acceptor.receive, methods=["POST"]),
            Route("/healthz", acceptor.healthz, methods=["GET"]),
            Route("/readyz", acceptor.readyz, methods=["GET"]),
            Route("/metrics", acceptor.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(DropConnectionMiddleware)
    app.state.acceptor = acceptor
    return app
