"""The CRM sink against a real Standard Webhooks receiver on 127.0.0.1, through real workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ingest import constants
from ingest.config import Settings
from ingest.commands.embedded import free_port
from ingest.events import Contact, Event
from ingest.exceptions import ConfigError, PermanentSinkError, TransientSinkError
from sinks.crm import CrmSink, parse_headers, parse_secret
from tests.helpers import rows
from tests.sinks.suite import RefusingTargetSuite
from tests.sinks.conftest import (
    CRM_SECRET,
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from ingest.commands.dlq import list_failures
from workers.runtime import Runtime

SECOND_SECRET = "whsec_c2Vjb25kLXNlY3JldC1mb3Itcm90YXRpb24tMDAwMQ=="


def _event(n: int = 1) -> Event:
    now = datetime(2026, 6, 4, 5, 49, 10, tzinfo=timezone.utc)
    return Event(provider="outboundry", dedup_key=f"email-replied|{n}", event_type="email-replied",
                 kind="email.replied", occurred_at=now, received_at=now,
                 contact=Contact(email="amit@example.in", name="Amit Joshi"),
                 data={"lead": {"id": n}})


def _settings(**env: str) -> Settings:
    return Settings.from_env({"INGEST_SINKS": "crm", **env})


# -- signature and configuration ------------------------------------------------------------

def test_signature_verifies_with_the_standardwebhooks_library() -> None:
    sink = CrmSink.from_settings(_settings(CRM_WEBHOOK_URL="https://crm.example/hook",
                                           CRM_WEBHOOK_SECRET=CRM_SECRET))
    event = _event()
    body = event.to_json()
    headers = sink.request_headers(event.id, body, int(time.time()))
    assert headers["webhook-id"] == event.id
    assert Webhook(CRM_SECRET).verify(body, headers)["id"] == event.id
    with pytest.raises(WebhookVerificationError):
        Webhook(CRM_SECRET).verify(body.replace(b"Amit", b"Anit"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECOND_SECRET).verify(body, headers)
    stale = sink.request_headers(event.id, body, int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(CRM_SECRET).verify(body, stale)


def test_two_secrets_sign_with_both_so_a_secret_rotates_without_downtime() -> None:
    sink = CrmSink.from_settings(_settings(CRM_WEBHOOK_URL="https://crm.example/hook",
                                           CRM_WEBHOOK_SECRET=f"{CRM_SECRET},{SECOND_SECRET}"))
    event = _event()
    headers = sink.request_headers(event.id, event.to_json(), int(time.time()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (CRM_SECRET, SECOND_SECRET):
        Webhook(secret).verify(event.to_json(), headers)


@pytest.mark.parametrize("secret, problem", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with whsec_"),
    ("whsec_not*base64!!", "not valid base64"),
    ("whsec_", "empty"),
])
def test_a_malformed_secret_stops_start_up_naming_the_variable_not_the_value(
        secret: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        CrmSink.from_settings(_settings(CRM_WEBHOOK_URL="https://crm.example/hook",
                                        CRM_WEBHOOK_SECRET=secret))
    assert info.value.variable == "CRM_WEBHOOK_SECRET"
    assert problem in str(info.value)
    assert secret.removeprefix("whsec_") not in str(info.value) or not secret.removeprefix("whsec_")


def test_missing_url_or_secret_stops_start_up() -> None:
    with pytest.raises(ConfigError) as info:
        CrmSink.from_settings(_settings(CRM_WEBHOOK_SECRET=CRM_SECRET))
    assert info.value.variable == "CRM_WEBHOOK_URL"
    with pytest.raises(ConfigError) as info:
        CrmSink.from_settings(_settings(CRM_WEBHOOK_URL="ftp://user:pw@crm.example/x",
                                        CRM_WEBHOOK_SECRET=CRM_SECRET))
    assert info.value.variable == "CRM_WEBHOOK_URL" and "pw" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        CrmSink.from_settings(_settings(CRM_WEBHOOK_URL="https://crm.example/hook"))
    assert info.value.variable == "CRM_WEBHOOK_SECRET"
    assert parse_secret(CRM_SECRET)  # and a good one parses


def test_extra_headers_from_json_lines_or_a_toml_table(tmp_path: Path) -> None:
    assert parse_headers('{"Authorization": "Bearer a", "X-Tenant": 7}') == {
        "Authorization": "Bearer a", "X-Tenant": "7"}
    assert parse_headers("Authorization: Bearer a\nX-Tenant: acme\n") == {
        "Authorization": "Bearer a", "X-Tenant": "acme"}
    for bad in ('{"webhook-id": "x"}', "no colon here", '{"Bad Name": "x"}', '["a"]',
                '{"X-A": "line\\nbreak"}'):
        with pytest.raises(ConfigError) as info:
            parse_headers(bad)
        assert info.value.variable == "CRM_HEADERS"
    config = tmp_path / "ingest.toml"
    config.write_text('[sinks.crm]\nwebhook_url = "https://crm.example/hook"\n'
                      f'webhook_secret = "{CRM_SECRET}"\ntimeout = 3\n'
                      '[sinks.crm.headers]\nAuthorization = "Bearer from-toml"\n')
    sink = CrmSink.from_settings(_settings(INGEST_CONFIG=str(config)))
    assert sink.headers == {"Authorization": "Bearer from-toml"}
    assert sink.timeout == 3.0
    assert "from-toml" not in repr(sink)


# -- through real workers -----------------------------------------------------------------------

def test_500_twice_then_200_gives_exactly_one_accepted_delivery(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    receiver, url = crm
    receiver.script = [(500, {}), (500, {})]
    rt = pipeline(INGEST_SINKS="postgres,crm", **crm_env(url))
    envelope = outboundry_delivery()
    [event_id] = event_ids(envelope)
    enqueue(rt, envelope)
    run_jobs(rt)
    assert receiver.posts[event_id] == 3  # two refusals, then the delivery
    assert list(receiver.accepted) == [event_id]
    assert receiver.duplicates == 0 and receiver.unverified == 0
    assert receiver.accepted[event_id]["contact"]["name"] == "Amit Joshi"
    assert not list_failures(rt.redis, rt.settings)
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_events")[0]["n"] == 1


def test_retry_after_stretches_the_next_retry(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = crm
    receiver.script = [(503, {"Retry-After": "120"})]
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelope = outboundry_delivery()
    enqueue(rt, envelope)
    before = time.time()
    run_jobs(rt, rounds=0)  # no fast-forward: look at the schedule RQ made
    scheduled = rt.queue(rt.names.sink_queue("crm")).scheduled_job_registry
    [job_id] = scheduled.get_job_ids()
    assert scheduled.get_scheduled_time(job_id).timestamp() >= before + 120 - 1
    assert not receiver.accepted
    run_jobs(rt)  # once due, it goes through
    assert list(receiver.accepted) == event_ids(envelope)


def test_a_4xx_is_a_dead_letter_with_its_reason_and_other_sinks_are_unaffected(
        crm: tuple[CrmReceiver, str], slack: tuple[object, str],
        pipeline: Callable[..., Runtime], database_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ingest.commands.cli import main

    receiver, url = crm
    slack_receiver, slack_url = slack
    env = {"INGEST_SINKS": "postgres,crm,slack", "SLACK_WEBHOOK_URL": slack_url, **crm_env(url)}
    rt = pipeline(**env)
    envelope = outboundry_delivery()
    [event_id] = event_ids(envelope)
    receiver.refuse[event_id] = 400
    enqueue(rt, envelope)
    run_jobs(rt)

    [failure] = list_failures(rt.redis, rt.settings)
    assert failure.sink == "crm" and failure.ids == (event_id,)
    assert "answered 400" in failure.reason and "unknown contact" in failure.reason
    assert receiver.posts[event_id] == 1  # permanent: not retried
    assert rows(database_url, "SELECT id::text FROM webhook_events") == [{"id": event_id}]
    assert len(slack_receiver.messages) == 1  # type: ignore[attr-defined]

    for key, value in rt.settings.raw.items():
        if key in env or key in ("REDIS_URL", "DATABASE_URL", "INGEST_NAMESPACE"):
            monkeypatch.setenv(key, value)
    assert main(["dlq", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("crm") and event_id in out and "answered 400" in out

    del receiver.refuse[event_id]  # the CRM is fixed
    assert main(["dlq", "retry", "--sink", "crm"]) == 0
    assert "re-queued 1" in capsys.readouterr().out
    run_jobs(rt)
    assert list(receiver.accepted) == [event_id] and receiver.duplicates == 0
    assert not list_failures(rt.redis, rt.settings)
    assert main(["dlq", "retry"]) == 0  # nothing left: nothing sent again
    assert "re-queued 0" in capsys.readouterr().out
    run_jobs(rt)
    assert receiver.posts[event_id] == 2
    assert len(slack_receiver.messages) == 1  # type: ignore[attr-defined]
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_events")[0]["n"] == 1


def test_one_refused_event_fails_alone_and_the_rest_of_its_batch_is_delivered(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelopes = [outboundry_delivery(name=n) for n in ("Ada Lovelace", "Bad Data", "Alan Turing")]
    ids = event_ids(*envelopes)
    receiver.refuse[ids[1]] = 422
    enqueue(rt, *envelopes)  # one batch: one deliver job with three events
    run_jobs(rt)
    assert sorted(receiver.accepted) == sorted([ids[0], ids[2]])
    assert receiver.duplicates == 0
    [failure] = list_failures(rt.redis, rt.settings, "crm")
    assert failure.ids == (ids[1],) and "422" in failure.reason


def test_redirects_are_not_followed_and_the_reason_names_no_secret(
        pipeline: Callable[..., Runtime]) -> None:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.helpers import serve

    hits: list[str] = []

    async def elsewhere(request: object) -> Response:
        hits.append("followed")
        return Response("ok")

    async def moved(request: object) -> Response:
        return Response(status_code=307, headers={
            "Location": f"http://user:pw-in-location@127.0.0.1:{other.port}/new?token=tok-in-query"})

    with serve(Starlette(routes=[Route("/new", elsewhere, methods=["POST"])])) as other, \
            serve(Starlette(routes=[Route("/hook", moved, methods=["POST"])])) as server:
        rt = pipeline(INGEST_SINKS="crm", **crm_env(f"{server.url}/hook"))
        enqueue(rt, outboundry_delivery())
        run_jobs(rt)
    assert hits == []
    [failure] = list_failures(rt.redis, rt.settings)
    assert "307" in failure.reason and "redirect" in failure.reason
    assert f"127.0.0.1:{other.port}" in failure.reason
    assert "pw-in-location" not in failure.reason and "tok-in-query" not in failure.reason


def test_network_errors_are_transient_and_credentials_never_show(
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    url = f"http://crm-user:hunter2-password@127.0.0.1:{port}/hook/s3cr3t-path?token=q-token"
    sink = CrmSink.from_settings(_settings(CRM_WEBHOOK_URL=url, CRM_WEBHOOK_SECRET=CRM_SECRET,
                                           CRM_TIMEOUT="2"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TransientSinkError) as info:
        sink.send([_event()])
    text = str(info.value) + repr(sink) + caplog.text
    assert f"127.0.0.1:{port}" in str(info.value)
    for secret in ("hunter2-password", "s3cr3t-path", "q-token", CRM_SECRET):
        assert secret not in text
    sink.close()


@pytest.mark.parametrize("status, transient", [
    (500, True), (502, True), (408, True), (429, True), (400, False), (401, False),
    (404, False), (409, False), (301, False)])
def test_status_classification(status: int, transient: bool) -> None:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.helpers import serve

    async def answer(request: object) -> Response:
        return Response("no", status_code=status, headers={"Location": "/x", "Retry-After": "7"})

    with serve(Starlette(routes=[Route("/hook", answer, methods=["POST"])])) as server:
        sink = CrmSink(f"{server.url}/hook", [parse_secret(CRM_SECRET)])
        events = [_event(1), _event(2)]
        with pytest.raises(TransientSinkError if transient else PermanentSinkError) as info:
            sink.send(events)
        sink.close()
    error: Any = info.value
    if transient:
        assert error.retry_after == 7
    else:
        assert sorted(error.event_ids or []) == sorted(e.id for e in events)


def test_retried_jobs_keep_their_schedule_within_bounds() -> None:
    from ingest.rq_jobs import deliver_retry

    retry = deliver_retry()
    assert retry.max == len(constants.DELIVER_RETRY_INTERVALS)
    for got, base in zip(retry.intervals, constants.DELIVER_RETRY_INTERVALS):
        assert 0.75 * base - 1 <= got <= 1.25 * base


def test_failed_registry_of_a_queue_is_where_dead_letters_live(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelope = outboundry_delivery()
    receiver.refuse[event_ids(envelope)[0]] = 404
    enqueue(rt, envelope)
    run_jobs(rt)
    registry = FailedJobRegistry(rt.names.sink_queue("crm"), connection=rt.redis,
                                 serializer=JSONSerializer)
    assert registry.count == 1
    assert receiver.unauthorized == 0  # the configured auth header reached the receiver


class TestCrmSuite(RefusingTargetSuite):
    """The shared sink contract (tests/sinks/suite.py) against a real HTTP receiver that
    verifies signatures and deduplicates on webhook-id."""

    sink = "crm"

    @pytest.fixture
    def target(self, crm: tuple[CrmReceiver, str]) -> tuple[CrmReceiver, str]:
        return crm

    def make(self, target: tuple[CrmReceiver, str]) -> CrmSink:
        return CrmSink.from_settings(_settings(**crm_env(target[1])))

    def delivered(self, target: tuple[CrmReceiver, str], events: Sequence[Event]) -> list[str]:
        # What the receiver took: a copy sent again carries the same webhook-id, which is how
        # an HTTP receiver keeps it once (it counts such copies in ``duplicates``).
        wanted = {e.id for e in events}
        return [i for i in target[0].accepted if i in wanted]

    def unreachable(self, target: tuple[CrmReceiver, str]) -> CrmSink:
        return CrmSink.from_settings(_settings(**crm_env(
            f"http://127.0.0.1:{free_port()}/hook", CRM_TIMEOUT="2")))

    def refuse(self, target: tuple[CrmReceiver, str], event: Event) -> Event:
        target[0].refuse[event.id] = 422  # "unknown contact"
        return event
