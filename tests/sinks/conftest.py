"""Real receivers for the HTTP sinks, a pipeline factory, and RQ driven for real.

The CRM receiver checks what a real Standard Webhooks receiver checks (the `standardwebhooks`
library verifies every request) and deduplicates on ``webhook-id``. The Slack receiver parses
every body with slack_sdk's Block Kit models and answers 429 with ``Retry-After`` when
messages come faster than one per second, as Slack does.

Retries are real RQ retries: a failed job is scheduled by RQ with its backoff; the tests do
not wait minutes for it but move the scheduled time to now and let RQ's own scheduler (a
burst worker started ``with_scheduler=True``) enqueue it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from rq.serializers import JSONSerializer
from slack_sdk.models.blocks import Block
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ingest.config import Settings
from ingest.rq_jobs import enqueue_batch
from ingest.events import Delivery
from tests.helpers import ServerThread, SimpleWorker, drain
from workers.runtime import Runtime, install_runtime

CRM_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
CRM_TOKEN = "crm-api-token-7f3a9c2e51"


# -- receivers --------------------------------------------------------------------------------

@dataclass
class CrmReceiver:
    """A CRM endpoint: verifies, deduplicates on webhook-id, answers as scripted."""

    secret: str = CRM_SECRET
    # statuses (with headers) to answer, in order, before answering normally
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    # event id -> status answered every time that event comes
    refuse: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # first copy per id
    posts: Counter[str] = field(default_factory=Counter)  # every verified POST, per id
    duplicates: int = 0
    unverified: int = 0
    unauthorized: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            headers = dict(request.headers)
            try:
                payload = Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                with self.lock:
                    self.unverified += 1
                return JSONResponse({"error": "bad signature"}, status_code=401)
            if headers.get("authorization") != f"Bearer {CRM_TOKEN}":
                with self.lock:
                    self.unauthorized += 1
                return JSONResponse({"error": "no token"}, status_code=401)
            msg_id = headers["webhook-id"]
            assert payload["id"] == msg_id  # the body is the event, its id the webhook-id
            with self.lock:
                self.posts[msg_id] += 1
                if msg_id in self.refuse:
                    return JSONResponse({"error": "unknown contact"},
                                        status_code=self.refuse[msg_id])
                if self.script:
                    status, extra = self.script.pop(0)
                    return JSONResponse({"error": "scripted"}, status_code=status, headers=extra)
                if msg_id in self.accepted:
                    self.duplicates += 1
                else:
                    self.accepted[msg_id] = payload
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@dataclass
class SlackReceiver:
    """A Slack incoming webhook: Block Kit validation, one message per second, 429s."""

    # Slack's limit is one message per second; 50 ms of slack absorbs clock granularity
    # (Redis expiries are whole milliseconds), never a real second message.
    min_gap: float = 0.95
    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    refuse_containing: str | None = None  # a message with this text gets invalid_payload
    messages: list[dict[str, Any]] = field(default_factory=list)  # accepted bodies
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each accepted
    requests: int = 0
    rate_limited: int = 0
    invalid: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            raw = await request.body()
            try:
                body = orjson.loads(raw)
                problem = block_kit_problem(body)
            except orjson.JSONDecodeError:
                problem = "not JSON"
            if self.refuse_containing and self.refuse_containing.encode() in raw:
                problem = problem or f"refused: contains {self.refuse_containing}"
            now = time.monotonic()
            with self.lock:
                self.requests += 1
                if problem:
                    self.invalid.append(problem)
                    return PlainTextResponse("invalid_payload", status_code=400)
                if self.script:
                    status, headers, text = self.script.pop(0)
                    if status == 429:
                        self.rate_limited += 1
                    return PlainTextResponse(text, status_code=status, headers=headers)
                if self.arrivals and now - self.arrivals[-1] < self.min_gap:
                    self.rate_limited += 1
                    return PlainTextResponse("rate_limited", status_code=429,
                                             headers={"Retry-After": "1"})
                self.messages.append(body)
                self.arrivals.append(now)
            return PlainTextResponse("ok")

        return Starlette(routes=[Route("/services/T000/B000/XXXXSECRETXXXX", hook,
                                       methods=["POST"])])

    def texts(self) -> str:
        return orjson.dumps(self.messages).decode()


def block_kit_problem(body: Any) -> str | None:
    """Why ``body`` is not a valid incoming-webhook message, or None when it is."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        return "no text"
    blocks = body.get("blocks")
    if not isinstance(blocks, list) or not blocks or len(blocks) > 50:
        return "blocks missing or more than 50"
    for raw in blocks:
        parsed = Block.parse(raw)
        if parsed is None:
            return f"unknown block {raw!r}"
        try:
            parsed.validate_json()
        except Exception as exc:
            return f"invalid block: {exc}"
        if parsed.to_dict() != raw:
            return f"block with fields Slack does not know: {raw!r}"
    return None


@pytest.fixture
def crm() -> Iterator[tuple[CrmReceiver, str]]:
    receiver = CrmReceiver()
    server = ServerThread(receiver.app()).start()
    try:
        yield receiver, f"{server.url}/hook"
    finally:
        server.stop()


@pytest.fixture
def slack() -> Iterator[tuple[SlackReceiver, str]]:
    receiver = SlackReceiver()
    server = ServerThread(receiver.app()).start()
    try:
        yield receiver, f"{server.url}/services/T000/B000/XXXXSECRETXXXX"
    finally:
        server.stop()


# -- the pipeline -----------------------------------------------------------------------------

@pytest.fixture
def pipeline(make_env: Callable[..., dict[str, str]],
             database_url: str) -> Iterator[Callable[..., Runtime]]:
    """``pipeline(INGEST_SINKS=..., CRM_WEBHOOK_URL=...)``: an installed worker runtime."""
    made: list[tuple[Runtime, Runtime | None]] = []

    def make(**overrides: str) -> Runtime:
        rt = Runtime(Settings.from_env(make_env(database_url, **overrides)))
        made.append((rt, install_runtime(rt)))
        return rt

    yield make
    for rt, previous in reversed(made):
        install_runtime(previous)
        rt.close()
        rt.redis.close()


def crm_env(url: str, **extra: str) -> dict[str, str]:
    return {"CRM_WEBHOOK_URL": url, "CRM_WEBHOOK_SECRET": CRM_SECRET,
            "CRM_HEADERS": f'{{"Authorization": "Bearer {CRM_TOKEN}"}}', **extra}


def fast_forward(rt: Runtime) -> int:
    """Make every scheduled retry due now. Returns how many there were."""
    moved = 0
    for name in rt.queue_names():
        registry = rt.queue(name).scheduled_job_registry
        ids = registry.get_job_ids()
        if ids:
            rt.redis.zadd(registry.key, {i: int(time.time()) - 1 for i in ids})
            moved += len(ids)
    return moved


def run_jobs(rt: Runtime, rounds: int = 10, pause: float = 0.0) -> None:
    """Run every queued job, then every scheduled retry (brought forward), until none is
    left or ``rounds`` is used up. RQ's scheduler does the enqueueing of retries."""
    drain(rt)
    for _ in range(rounds):
        if not fast_forward(rt):
            return
        if pause:
            time.sleep(pause)
        for name in rt.queue_names():
            worker = SimpleWorker([rt.queue(name)], connection=rt.redis,
                                  serializer=JSONSerializer, log_job_description=False)
            worker.work(burst=True, with_scheduler=True, logging_level="WARNING")
        drain(rt)


# -- deliveries -------------------------------------------------------------------------------

def outboundry_delivery(event: str = "email-replied", *, name: str = "Amit Joshi",
                        email: str | None = None, campaign: str = "Cold Email - EM Segment",
                        lead_id: str | None = None) -> dict[str, Any]:
    """An Outboundry delivery envelope as the acceptor writes it (tokens are not kept)."""
    lead_id = lead_id or uuid.uuid4().hex
    payload = {
        "event": event,
        "company_id": "67787093-cc3a-44ca-8a12-5bf1afa3194c",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "data": {
            "actionData": {"message": "Thanks, yes: can we talk Tuesday?"},
            "lead": {"id": lead_id, "name": name,
                     "email": email or f"{name.split()[0].lower()}.{lead_id[:6]}@example.com",
                     "profile_url": f"https://linkedin.com/in/{lead_id[:10]}"},
            "campaign": {"id": 4021, "name": campaign},
            "sender": {"id": "s-1", "name": "Ravi Mehta", "email": "ravi@acme-sales.example"},
        },
    }
    return Delivery(id=str(uuid.uuid4()), provider="outboundry",
                    received_at=datetime.now(timezone.utc), headers={},
                    body=orjson.dumps(payload).decode()).to_dict()


def outcaller_lead(name: str = "Priya Sharma", *, email: str | None = None,
                   lead_id: str | None = None) -> dict[str, Any]:
    """An OutCallerAI ``lead.updated`` envelope: a state event, so it also writes the lead's
    row in webhook_records (Outboundry's events are all activity and write none)."""
    lead_id = lead_id or f"lead_{uuid.uuid4().hex[:12]}"
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    payload = {"event": "lead.updated", "resource": "lead", "action": "updated",
               "workspaceId": "cmpxz43bl00032c6udndznzdg", "timestamp": now,
               "data": {"id": lead_id, "name": name, "status": "contacted",
                        "email": email or f"{name.split()[0].lower()}.{lead_id[-6:]}@example.com"},
               "previousData": {"status": "new"}}
    return Delivery(id=str(uuid.uuid4()), provider="outcaller",
                    received_at=datetime.now(timezone.utc), headers={},
                    body=orjson.dumps(payload).decode()).to_dict()


def enqueue(rt: Runtime, *envelopes: dict[str, Any]) -> None:
    """Write one batch job, exactly as the acceptor's group commit does."""
    enqueue_batch(rt.ingest_queue, list(envelopes), rt.names.job_id("batch", uuid.uuid4().hex))


def event_ids(*envelopes: dict[str, Any]) -> list[str]:
    from ingest.providers import load_providers

    providers = load_providers()
    return [e.id for env in envelopes
            for e in providers[env["provider"]].events(Delivery.from_dict(env))]
