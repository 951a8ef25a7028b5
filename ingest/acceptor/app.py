"""The acceptor: verify, make durable, answer. Nothing slow happens here.

For each ``POST /webhooks/{provider}``, in order: 404 for a provider that is unknown or has no
secret configured; 413 as soon as the streamed body passes the limit (never read whole); 408
when a sender trickles its body past ``INGEST_BODY_TIMEOUT``; 401 when the signature or token
does not match any configured secret; 400 when the body is not a JSON object or nests deeper
than ``MAX_JSON_DEPTH`` (64) levels (checked in line, or for an expensive body in a separate
process, one at a time per provider: :mod:`ingest.acceptor.structure`; 503 when it waits past
``EXPENSIVE_BODY_WAIT`` for its turn); otherwise the delivery is made durable (Redis, or the
local spool) and only then answered 200. Request heads past ``MAX_HEADER_BYTES`` or
``MAX_HEADER_COUNT`` are answered 431, heads not received within ``INGEST_HEAD_TIMEOUT`` 408,
and connections past ``INGEST_MAX_CONNECTIONS`` make room, by the server protocol
(:mod:`ingest.acceptor.http_limits`), before they reach this module. Webhook routes never redirect (no trailing-slash redirect:
its ``Location`` would repeat a query string, which may hold a token).
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
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ingest import constants, metrics
from ingest.activity import mark_started
from ingest.metrics import ActivityCollector
from ingest.refusals import UNKNOWN, RefusalLog
from ingest.subscriptions.state import SubscriptionCollector
from ingest.deployment import keep_registered
from ingest.config import Settings
from ingest.acceptor.durable import Durable, NotDurable
from ingest.acceptor.enqueue import BatchEnqueuer
from ingest.acceptor.structure import NOT_AN_OBJECT, TOO_DEEP, Busy, StructureCheck, Unavailable
from ingest.exceptions import SignatureError
from ingest.providers import Provider, load_providers
from ingest.providers.base import is_credential_header

__all__ = ["create_app"]

log = logging.getLogger("ingest.acceptor")


# The answers of the webhook route, rendered once; ASGI messages are only read by the server.
_JSON_HEADERS = [(b"content-type", b"application/json")]
_ACCEPTED_BODY = b'{"status":"accepted"}'
_ACCEPTED_START = {"type": "http.response.start", "status": 200,
                   "headers": [*_JSON_HEADERS, (b"content-length", b"%d" % len(_ACCEPTED_BODY))]}
_ACCEPTED = {"type": "http.response.body", "body": _ACCEPTED_BODY}
# What a response start with this header makes uvicorn do: close the connection, answer nothing.
_DROP_START = {"type": "http.response.start", "status": 503, "headers": [(b"x-drop", b"\x00")]}
_NO_QUERY: dict[str, str] = {}


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class DropConnection(Exception):
    """Raised to close the connection without an answer (see ``Acceptor.__call__``)."""


class _Refusal(Exception):
    """An answer other than 200, raised from inside the webhook route."""

    def __init__(self, status: int, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


class _BodyDeadline:
    """``asyncio.timeout`` for the body read, without its bookkeeping (this runs per delivery):
    one timer that cancels the reading task, and a flag telling that cancel from any other."""

    __slots__ = ("expired", "handle", "task")

    def __init__(self, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.expired = False
        self.handle = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body from the ASGI messages, refused as soon as it passes ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _DeliveryIds:
    """Random version-4 UUIDs as ``str(uuid.uuid4())`` writes them, drawing on ``os.urandom``
    4 KiB at a time: one system call per 256 ids instead of one per id."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        b = bytearray(self._pool[self._at:self._at + 16])
        self._at += 16
        b[6] = b[6] & 0x0F | 0x40
        b[8] = b[8] & 0x3F | 0x80
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _headers(scope: Scope) -> dict[str, str]:
    # Straight from the ASGI scope, decoded as Starlette's Request.headers does.
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _declared(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _kept_headers(provider: Provider, headers: dict[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in headers.items()
        if k in provider.kept_headers and not is_credential_header(k)
    }


class Acceptor:
    """The webhook route (``POST /webhooks/{provider}``) as a raw ASGI app, and the small
    GET routes as ordinary Starlette endpoints.

    The webhook route is the hot path: it reads the ASGI messages and sends pre-rendered
    answers itself, with no Request or Response object per delivery.
    """

    def __init__(self, settings: Settings, durable: Durable) -> None:
        self.settings = settings
        self.durable = durable
        providers = load_providers()
        # Only providers with a secret are served; the rest answer 404.
        self.providers = {n: p for n, p in providers.items() if settings.secrets_for(n)}
        self.secrets = {n: settings.secrets_for(n) for n in self.providers}
        self._counters: dict[tuple[str, str], Any] = {}
        self._ids = _DeliveryIds()
        enqueuer = getattr(durable, "enqueuer", None)
        # Group commit ends a held batch once every sender's connection waits in it.
        self._enqueuer = enqueuer if isinstance(enqueuer, BatchEnqueuer) else None
        # Refusal bookkeeping (ingest.activity): counted at once, recorded in the background.
        self.refusals = RefusalLog(
            self._enqueuer.async_redis if self._enqueuer is not None else None, settings.names)
        redis = getattr(durable, "redis", None)
        self.collectors = ([ActivityCollector(redis, settings),
                            SubscriptionCollector(redis, settings.names)]
                           if redis is not None else [])
        self.structure = StructureCheck()

    def _count(self, provider: str, result: str) -> None:
        # The labelled child, looked up once: labels() takes a lock and builds a key each call.
        child = self._counters.get((provider, result))
        if child is None:
            child = self._counters[(provider, result)] = metrics.DELIVERIES.labels(
                provider, result)
        child.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._receive(scope, receive)
        except _Refusal as refusal:
            body = orjson.dumps({"error": refusal.message})
            headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(body))]
            if refusal.close:
                # Refusals that leave the body unread: without this the connection stays open
                # and the server keeps receiving (and discarding) whatever the sender streams.
                headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": refusal.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except DropConnection:
            # ASGI has no "close without answering". Starting a response and failing would
            # still put a status line on the wire ("503 ..."), which a sender may read as an
            # answer and never retry. What uvicorn (h11 and httptools alike) does instead: it
            # marks the response as started, *then* validates the headers; a header value with
            # a control character fails that check before anything is written, and an app that
            # returns with its response started but not finished gets its transport closed.
            # The sender sees a network failure, which Outreach retries.
            # tests/faults/test_hostile.py checks this on a raw socket with both HTTP stacks.
            with contextlib.suppress(Exception):
                await send(_DROP_START)
        except _Disconnected:
            pass  # the sender hung up before its body was complete: nobody to answer
        else:
            await send(_ACCEPTED_START)
            await send(_ACCEPTED)

    async def _receive(self, scope: Scope, receive: Receive) -> None:
        """Make one delivery durable, or raise what to answer instead of 200."""
        name = scope["path_params"]["provider"]
        provider = self.providers.get(name)
        if provider is None:
            self._count("unknown", "not_found")
            self.refusals.refused(UNKNOWN, "unknown_provider", scope, _headers(scope), None)
            raise _Refusal(404, f"no provider {name!r} is configured here")
        limit = self.settings.max_body_bytes
        headers = _headers(scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self._count(name, "too_large")
            self.refusals.refused(name, "too_large", scope, headers, int(declared))
            raise _Refusal(413, f"body is larger than {limit} bytes", close=True)
        deadline = _BodyDeadline(self.settings.body_timeout)
        try:
            body = await _read_body(receive, limit)
        except _BodyTooLarge:
            self._count(name, "too_large")
            self.refusals.refused(name, "too_large", scope, headers, _declared(declared))
            raise _Refusal(413, f"body is larger than {limit} bytes", close=True) from None
        except asyncio.CancelledError:
            if not deadline.expired:
                raise
            deadline.task.uncancel()
            self._count(name, "too_slow")
            self.refusals.refused(name, "body_timeout", scope, headers, _declared(declared))
            raise _Refusal(408, f"body not received within {self.settings.body_timeout:g} s",
                           close=True) from None
        finally:
            deadline.handle.cancel()

        query_string = scope.get("query_string", b"")
        query = QueryParams(query_string) if query_string else _NO_QUERY
        try:
            provider.verify(headers, body, self.secrets[name], query)
        except SignatureError as exc:
            self._count(name, "unauthorized")
            self.refusals.refused(name, exc.reason, scope, headers, len(body))
            log.warning("refused: %s", exc, extra={"provider": name})
            raise _Refusal(401, str(exc)) from None

        try:
            shape = await self.structure.check(name, body)
        except Busy:
            self._count(name, "busy")
            self.refusals.refused(name, "busy", scope, headers, len(body))
            if provider.retries_network_errors:
                raise DropConnection from None
            raise _Refusal(503, "too many large bodies from this provider at once; retry "
                                "later") from None
        except Unavailable as exc:
            self._count(name, "unavailable")
            log.error("could not check a body: %s", exc, extra={"provider": name})
            if provider.retries_network_errors:
                raise DropConnection from None
            raise _Refusal(503, "temporarily unable to accept deliveries") from None
        if shape == NOT_AN_OBJECT:
            self._count(name, "bad_request")
            self.refusals.refused(name, "not_json", scope, headers, len(body))
            raise _Refusal(400, "body must be a JSON object")
        if shape == TOO_DEEP:
            self._count(name, "bad_request")
            self.refusals.refused(name, "not_json", scope, headers, len(body))
            raise _Refusal(400, f"body nests deeper than {constants.MAX_JSON_DEPTH} levels")

        delivery_id = self._ids.next()
        envelope: dict[str, Any] = {
            "id": delivery_id,
            "provider": name,
            "received_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "headers": _kept_headers(provider, headers),
            "body": body.decode("utf-8"),  # orjson accepted it, so it is valid UTF-8
        }
        client = scope.get("client")
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
            raise _Refusal(503, "temporarily unable to accept deliveries") from None
        metrics.ENQUEUE_SECONDS.observe(time.perf_counter() - started)
        self._count(name, result)

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
        # The collectors read Redis (bounded: a few pipelined round trips): off the event loop.
        payload, content_type = await asyncio.get_running_loop().run_in_executor(
            None, metrics.render, self.collectors)
        return Response(payload, media_type=content_type)


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
        registering = None
        if acceptor.refusals.redis is not None:
            await mark_started(acceptor.refusals.redis, settings.names)
            # What this acceptor serves, for `ingest status` from any host (ingest.deployment).
            registering = asyncio.create_task(
                keep_registered(acceptor.refusals.redis, settings))
        try:
            yield
        finally:
            acceptor.structure.close()
            if registering is not None:
                registering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await registering
            await acceptor.refusals.aclose()
            await durable.stop()

    app = Starlette(
        routes=[
            Route("/webhooks/{provider}", acceptor, methods=["POST"]),
            Route("/healthz", acceptor.healthz, methods=["GET"]),
            Route("/readyz", acceptor.readyz, methods=["GET"]),
            Route("/metrics", acceptor.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    # A redirect to the slashed or unslashed path would repeat the query string (a token).
    app.router.redirect_slashes = False
    app.state.acceptor = acceptor
    return app
