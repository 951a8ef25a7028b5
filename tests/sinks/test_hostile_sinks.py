"""Hostile data and echoing receivers at the HTTP sinks: what cannot be sent fails alone, and
no reason repeats a URL path, query, token or signature."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ingest.events import Contact, Event
from ingest.exceptions import PermanentSinkError
from sinks.crm import CrmSink, parse_secret
from sinks.slack import SlackSink, render_digest, render_event
from tests.helpers import serve
from tests.sinks.conftest import (
    CRM_SECRET,
    CRM_TOKEN,
    CrmReceiver,
    SlackReceiver,
    crm_env,
    enqueue,
    outboundry_delivery,
    run_jobs,
)
from ingest.commands.dlq import list_failures
from workers.runtime import Runtime

NOW = datetime(2026, 6, 4, 5, 49, 10, tzinfo=timezone.utc)


def event(n: int, data: Any = None, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "provider": "outboundry", "dedup_key": f"email-replied|{n}", "event_type": "email-replied",
        "kind": "email.replied", "occurred_at": NOW, "received_at": NOW,
        "contact": Contact(email=f"p{n}@example.com", name=f"Person {n}"),
        "data": data if data is not None else {"lead": {"id": n}}}
    values.update(fields)
    return Event(**values)


def unwritable() -> dict[str, Any]:
    value: Any = []
    for _ in range(1000):
        value = [value]
    return {"lead": {"id": 0}, "deep": value}


def test_crm_an_event_no_serializer_can_write_fails_alone(
        crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    sink = CrmSink(url, [parse_secret(CRM_SECRET)],
                   {"Authorization": f"Bearer {CRM_TOKEN}"}, timeout=5)
    events = [event(1), event(2, data=unwritable()), event(3)]
    try:
        with pytest.raises(PermanentSinkError) as info:
            sink.send(events)
    finally:
        sink.close()
    assert info.value.event_ids == [events[1].id]
    assert "nested too deeply" in str(info.value)
    assert sorted(receiver.accepted) == sorted([events[0].id, events[2].id])


def test_slack_an_event_no_serializer_can_write_fails_alone(
        slack: tuple[SlackReceiver, str], redis_server: str, namespace: str) -> None:
    from ingest.constants import Names

    receiver, url = slack
    sink = SlackSink(url, redis_server, Names(namespace), timeout=5, interval=0.05)
    events = [event(1), event(2, data=unwritable())]
    try:
        with pytest.raises(PermanentSinkError) as info:
            sink.send(events)
    finally:
        sink.close()
    assert info.value.event_ids == [events[1].id]
    assert "Person 1" in receiver.texts()


def test_a_crm_echoing_the_request_leaks_no_key_token_path_or_signature(
        pipeline: Callable[..., Runtime]) -> None:
    async def echo(request: Request) -> Response:
        # A common 404 page: the method, the full URL and the headers it was sent.
        h = request.headers
        return PlainTextResponse(
            f"Cannot POST {request.url.path}?{request.url.query} (signature "
            f"{h['webhook-signature']}, {h['authorization'].lower()})", status_code=404)

    with serve(Starlette(routes=[Route("/hook/p4th-secret", echo, methods=["POST"])])) as server:
        url = f"{server.url}/hook/p4th-secret?apikey=api-key-in-query-77"
        rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
        enqueue(rt, outboundry_delivery(name="Grace Hopper"))
        run_jobs(rt)
    [failure] = list_failures(rt.redis, rt.settings)
    assert "answered 404" in failure.reason
    for leaked in ("api-key-in-query-77", "p4th-secret", CRM_TOKEN, "grace"):
        assert leaked not in failure.reason.lower(), leaked
    assert not re.search(r"v1,[A-Za-z0-9+/]{8}", failure.reason), "the signature is shown"
    assert "\n" not in failure.reason.strip()


def test_slacks_invalid_payload_reason_does_not_carry_the_webhook_path(
        pipeline: Callable[..., Runtime]) -> None:
    async def refuse(request: Request) -> Response:
        return PlainTextResponse(f"invalid_payload for {request.url.path}\x00", status_code=400)

    path = "/services/T9/B9/hook-path-secret"
    with serve(Starlette(routes=[Route(path, refuse, methods=["POST"])])) as server:
        rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=f"{server.url}{path}")
        enqueue(rt, outboundry_delivery())
        run_jobs(rt)
    [failure] = list_failures(rt.redis, rt.settings)
    assert "invalid_payload" in failure.reason
    assert "hook-path-secret" not in failure.reason and "\x00" not in failure.reason


HOSTILE = "<!channel> & <https://evil.example|click> <@U123>"


def mrkdwn_texts(message: dict[str, Any]) -> str:
    """Everything Slack parses as mrkdwn: the top-level text and every mrkdwn object."""
    out = [message["text"]]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "mrkdwn":
                out.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(message["blocks"])
    return "\n".join(out)


@pytest.mark.parametrize("digest", [False, True])
def test_slack_text_is_escaped_in_every_message_and_digest(digest: bool) -> None:
    events = [event(n, data={"campaign": {"name": HOSTILE}, "subject": HOSTILE, "text": HOSTILE},
                    contact=Contact(email="a@example.com", name=HOSTILE), event_type=HOSTILE,
                    kind="call.<!channel>", campaign_id=HOSTILE)
              for n in range(4 if digest else 1)]
    message = render_digest(events) if digest else render_event(events[0])
    text = mrkdwn_texts(message)
    for raw in ("<!channel>", "<https://evil", "<@U123>", "& <"):
        assert raw not in text, (raw, text)
    assert "&lt;!channel&gt;" in text
    orjson.dumps(message)  # still valid JSON
