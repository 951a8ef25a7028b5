"""The Slack sink against a real receiver that validates Block Kit and rate-limits like Slack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
import httpx
import orjson
import pytest
from rq.serializers import JSONSerializer

from ingest.config import Settings
from ingest.events import Contact, Delivery, Event
from ingest.exceptions import ConfigError, PermanentSinkError
from ingest.providers import load_providers
from sinks.base import Sink
from sinks.slack import SlackSink, find_link, render_digest, render_event
from tests.helpers import SECRETS, drain, rows
from tests.sinks.suite import ErasingSinkSuite, RefusingTargetSuite
from tests.sinks.conftest import (
    SlackReceiver,
    block_kit_problem,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from ingest.commands.dlq import list_failures
from workers.runtime import Runtime

SAMPLES = Path(__file__).parent.parent / "samples"


def _sample_events() -> list[Event]:
    providers = load_providers()
    out: list[Event] = []
    for path in sorted(SAMPLES.glob("*/*.raw")):
        provider = path.parent.name
        if provider not in providers:
            continue
        headers = {}
        if provider == "salesloft":
            headers = {"x-salesloft-event": path.stem.split("_bare")[0].split("_array")[0]
                       .split("_bounced")[0]}
        delivery = Delivery(id="d", provider=provider, received_at=datetime.now(timezone.utc),
                            headers=headers, body=path.read_text())
        try:
            out += providers[provider].events(delivery)
        except Exception:  # a sample that needs headers this test does not guess
            continue
    return out


# -- rendering ------------------------------------------------------------------------------

def test_every_sample_event_renders_as_valid_block_kit() -> None:
    events = _sample_events()
    assert len(events) >= 8
    for event in events:
        message = render_event(event)
        assert block_kit_problem(message) is None, (event, message)
    digest = render_digest(events * 12)
    assert block_kit_problem(digest) is None
    assert digest["text"].startswith(f"{len(events) * 12} new events")


def test_a_reply_message_says_who_what_which_campaign_and_links() -> None:
    body = (SAMPLES / "outboundry/email_replied_numeric_ids.raw").read_text()
    [event] = load_providers()["outboundry"].events(
        Delivery(id="d", provider="outboundry", received_at=datetime.now(timezone.utc),
                 headers={}, body=body))
    text = orjson.dumps(render_event(event)).decode()
    for expected in ("Email reply from Amit Joshi", "amit.joshi@example.in", "email.replied",
                     "email-replied", "Cold Email - EM Segment", "https://linkedin.com/in/amitjoshi",
                     "evaluating new tools"):
        assert expected in text


def test_payload_text_cannot_break_out_of_mrkdwn() -> None:
    now = datetime.now(timezone.utc)
    event = Event(provider="mailstand", dedup_key="k", event_type="reply", kind="email.replied",
                  occurred_at=now, received_at=now,
                  contact=Contact(name="<!channel> & <https://evil.example|click>"),
                  data={"text": "<!here> hi", "url": "javascript:alert(1)"})
    message = render_event(event)
    assert message["blocks"][0]["text"]["type"] == "plain_text"  # shown as typed, never parsed
    text = orjson.dumps({**message, "blocks": message["blocks"][1:]}).decode()
    assert "<!channel>" not in text and "<!here>" not in text and "evil.example|click>" not in text
    assert find_link(event.data) is None  # only http(s) links become buttons


def test_url_is_required_and_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        SlackSink.from_settings(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert info.value.variable == "SLACK_WEBHOOK_URL"
    sink = SlackSink.from_settings(Settings.from_env({
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T1/B2/verysecretpart"}))
    assert "verysecretpart" not in repr(sink)
    assert SlackSink.default_events == ("email.replied", "linkedin.*_replied", "meeting.booked")


# -- through real workers -------------------------------------------------------------------

def test_only_replies_and_meetings_are_posted_by_default_and_only_once(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime],
        database_url: str) -> None:
    receiver, url = slack
    rt = pipeline(INGEST_SINKS="postgres,slack", SLACK_WEBHOOK_URL=url)
    reply = outboundry_delivery(name="Grace Hopper")
    opened = outboundry_delivery("email-opened", name="Alan Turing")
    linkedin = outboundry_delivery("message-replied", name="Edsger Dijkstra")
    enqueue(rt, reply, opened)
    enqueue(rt, linkedin)
    run_jobs(rt)
    assert receiver.invalid == []
    assert len(receiver.messages) == 2
    text = receiver.texts()
    assert "Grace Hopper" in text and "Edsger Dijkstra" in text and "Alan Turing" not in text
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_events")[0]["n"] == 3

    # The same events handed to the sink again (a retried job) post nothing new.
    sink = rt.sinks["slack"].sink
    providers = load_providers()
    again = [e for env in (reply, linkedin)
             for e in providers["outboundry"].events(Delivery.from_dict(env))]
    sink.send(again)
    assert len(receiver.messages) == 2


def test_429_is_waited_out_not_dropped(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = slack
    receiver.script = [(429, {"Retry-After": "1"}, "rate_limited")]
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    envelope = outboundry_delivery(name="Barbara Liskov")
    enqueue(rt, envelope)
    drain(rt)  # no retries run: the job itself waited
    assert receiver.requests == 2 and receiver.rate_limited == 1
    assert len(receiver.messages) == 1 and "Barbara Liskov" in receiver.texts()
    assert not list_failures(rt.redis, rt.settings)
    scheduled = rt.queue(rt.names.sink_queue("slack")).scheduled_job_registry
    assert scheduled.count == 0


def test_a_long_retry_after_holds_every_worker_and_reschedules_the_job(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = slack
    receiver.script = [(429, {"Retry-After": "120"}, "rate_limited")]
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    enqueue(rt, outboundry_delivery())
    before = time.time()
    drain(rt)
    scheduled = rt.queue(rt.names.sink_queue("slack")).scheduled_job_registry
    [job_id] = scheduled.get_job_ids()
    assert scheduled.get_scheduled_time(job_id).timestamp() >= before + 120 - 1
    sink = rt.sinks["slack"].sink
    assert sink.outbox().slot_wait() > 60  # type: ignore[attr-defined]
    assert receiver.requests == 1 and not receiver.messages
    assert not list_failures(rt.redis, rt.settings)


@pytest.mark.parametrize("status, answer", [(400, "invalid_payload"), (404, "no_service"),
                                            (403, "action_prohibited"), (302, "")])
def test_refusals_are_dead_letters_with_slacks_answer(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime],
        status: int, answer: str) -> None:
    receiver, url = slack
    receiver.script = [(status, {"Location": "https://elsewhere.example/x"}, answer)]
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    envelope = outboundry_delivery()
    enqueue(rt, envelope)
    run_jobs(rt)
    [failure] = list_failures(rt.redis, rt.settings)
    assert failure.sink == "slack" and failure.ids == tuple(event_ids(envelope))
    assert f"Slack answered {status}" in failure.reason and answer in failure.reason
    assert "XXXXSECRETXXXX" not in failure.reason
    assert receiver.requests == 1


def test_a_refused_event_fails_alone_and_dlq_retry_posts_it_once(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = slack
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    receiver.script = [(404, {}, "no_service")]
    envelope = outboundry_delivery(name="Frances Allen")
    enqueue(rt, envelope)
    run_jobs(rt)
    assert len(list_failures(rt.redis, rt.settings, "slack")) == 1
    from ingest.commands.dlq import retry_failures

    assert retry_failures(rt.redis, rt.settings, "slack") == 1
    run_jobs(rt)
    assert len(receiver.messages) == 1 and "Frances Allen" in receiver.texts()
    assert not list_failures(rt.redis, rt.settings)
    assert retry_failures(rt.redis, rt.settings) == 0


def test_a_digest_slack_refuses_is_resent_event_by_event_so_only_the_bad_one_fails(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = slack
    receiver.refuse_containing = "Bad Data"
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    names = ["Ada Good", "Bad Data", "Alan Good", "Grace Good", "Edsger Good"]
    envelopes = [outboundry_delivery(name=n) for n in names]
    enqueue(rt, *envelopes)  # one batch: more than 3 events, so a digest first
    run_jobs(rt)
    assert receiver.invalid and receiver.invalid[0].startswith("refused")
    _assert_all_posted_once(receiver, [n for n in names if n != "Bad Data"])
    assert len(receiver.messages) == 4 and receiver.rate_limited == 0
    [failure] = list_failures(rt.redis, rt.settings)
    assert failure.sink == "slack" and failure.ids == (event_ids(envelopes[1])[0],)
    assert "invalid_payload" in failure.reason


def test_a_burst_of_50_single_event_jobs_becomes_a_digest_at_the_allowed_rate(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    """50 replies arriving one by one (50 batches, 50 deliver jobs), one Slack worker:
    no flood, nothing lost, never faster than one message per second."""
    receiver, url = slack
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    names = [f"Lead{i:02d}x Burst" for i in range(50)]
    envelopes = [outboundry_delivery(name=n) for n in names]
    for envelope in envelopes:
        enqueue(rt, envelope)
    started = time.monotonic()
    run_jobs(rt, rounds=20, pause=0.5)
    elapsed = time.monotonic() - started
    _assert_all_posted_once(receiver, names)
    print(f"burst of 50 jobs: {len(receiver.messages)} messages, {receiver.rate_limited} "
          f"429s, {elapsed:.1f} s")
    assert len(receiver.messages) <= 5  # a digest, not 50 messages
    assert receiver.rate_limited == 0  # never faster than Slack allows
    assert len(receiver.messages) <= 1 + elapsed  # the rate, however slow the machine
    assert not list_failures(rt.redis, rt.settings)


def test_a_burst_of_50_through_the_acceptor_and_three_workers(
        slack: tuple[SlackReceiver, str], make_env: Callable[..., dict[str, str]],
        database_url: str, pipeline: Callable[..., Runtime]) -> None:
    """The real path: 50 signed replies posted at once to a real acceptor, then three Slack
    worker processes (`ingest worker --queue sink-slack --burst`) sharing one webhook."""
    from ingest.acceptor.app import create_app
    from tests.helpers import serve

    receiver, url = slack
    env = make_env(database_url, INGEST_SINKS="postgres,slack", SLACK_WEBHOOK_URL=url)
    rt = pipeline(**{k: v for k, v in env.items()})
    token = SECRETS["outboundry"][0]
    names = [f"Lead{i:02d}y Burst" for i in range(50)]
    bodies = [Delivery.from_dict(outboundry_delivery(name=n)).body for n in names]

    async def post_all(base: str) -> list[int]:
        import asyncio

        async with httpx.AsyncClient(timeout=10) as client:
            answers = await asyncio.gather(*(
                client.post(f"{base}/webhooks/outboundry", content=b,
                            headers={"Authorization": f"Bearer {token}",
                                     "Content-Type": "application/json"}) for b in bodies))
        return [a.status_code for a in answers]

    import asyncio

    with serve(create_app(rt.settings)) as acceptor:
        assert asyncio.run(post_all(acceptor.url)) == [200] * 50
    drain_ingest_only(rt)
    started = time.monotonic()
    child_env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}, **env,
                 "INGEST_LOG_FORMAT": "text"}
    workers = [subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "worker", "--queue",
                                 "sink-slack", "--burst"], env=child_env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for _ in range(3)]
    logs = []
    try:
        for proc in workers:
            logs.append(proc.communicate(timeout=90)[1].decode())
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert [p.returncode for p in workers] == [0, 0, 0], logs
    assert "XXXXSECRETXXXX" not in "".join(logs)  # the webhook URL is never logged
    run_jobs(rt, rounds=20, pause=0.5)  # retries of jobs that parked their events, if any
    elapsed = time.monotonic() - started
    _assert_all_posted_once(receiver, names)
    print(f"burst via acceptor: {len(receiver.messages)} messages, {receiver.rate_limited} "
          f"429s, {elapsed:.1f} s")
    assert len(receiver.messages) < 50
    assert receiver.rate_limited == 0
    assert len(receiver.messages) <= 1 + elapsed
    assert not list_failures(rt.redis, rt.settings)
    assert rows(database_url, "SELECT count(*) AS n FROM webhook_events")[0]["n"] == 50


def drain_ingest_only(rt: Runtime) -> None:
    from tests.helpers import SimpleWorker

    worker = SimpleWorker([rt.ingest_queue], connection=rt.redis, serializer=JSONSerializer,
                          log_job_description=False)
    worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    # postgres is drained here too; slack is left to the worker processes
    postgres = rt.queue(rt.names.sink_queue("postgres"))
    SimpleWorker([postgres], connection=rt.redis, serializer=JSONSerializer,
                 log_job_description=False).work(burst=True, logging_level="WARNING")


def _assert_all_posted_once(receiver: SlackReceiver, names: list[str]) -> None:
    """Every lead shows up in exactly one accepted message (single or digest)."""
    assert all(p.startswith("refused") for p in receiver.invalid), receiver.invalid
    bodies = [orjson.dumps(m).decode() for m in receiver.messages]
    for name in names:
        assert sum(name in body for body in bodies) == 1, name


def test_permanent_error_carries_the_event_ids(
        slack: tuple[SlackReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    receiver, url = slack
    receiver.script = [(400, {}, "invalid_payload")]
    rt = pipeline(INGEST_SINKS="slack", SLACK_WEBHOOK_URL=url)
    sink = rt.sinks["slack"].sink
    envelope = outboundry_delivery()
    events = load_providers()["outboundry"].events(Delivery.from_dict(envelope))
    with pytest.raises(PermanentSinkError) as info:
        sink.send(events)
    assert info.value.event_ids == [events[0].id]
    assert "invalid_payload" in str(info.value)


class TestSlackSuite(RefusingTargetSuite, ErasingSinkSuite):
    """The shared sink contract (tests/sinks/suite.py) against a real HTTP receiver that
    validates Block Kit and allows one message a second, paced through real Redis."""

    sink = "slack"

    @pytest.fixture
    def target(self, slack: tuple[SlackReceiver, str], make_env: Callable[..., dict[str, str]],
               database_url: str) -> tuple[SlackReceiver, Settings]:
        receiver, url = slack
        return receiver, Settings.from_env(make_env(database_url, INGEST_SINKS="slack",
                                                    SLACK_WEBHOOK_URL=url))

    def make(self, target: tuple[SlackReceiver, Settings]) -> SlackSink:
        return SlackSink.from_settings(target[1])

    def delivered(self, target: tuple[SlackReceiver, Settings],
                  events: Sequence[Event]) -> list[str]:
        # A message names each event's contact by address (one address per event here).
        text = [orjson.dumps(m).decode() for m in target[0].messages]
        return [e.id for e in events for m in text
                if e.contact is not None and e.contact.email and e.contact.email in m]

    def unreachable(self, target: tuple[SlackReceiver, Settings]) -> SlackSink:
        from ingest.commands.embedded import free_port

        settings = target[1]
        return SlackSink(f"http://127.0.0.1:{free_port()}/services/T/B/X",
                         settings.require_redis(), settings.names, timeout=2)

    def refuse(self, target: tuple[SlackReceiver, Settings], event: Event) -> Event:
        assert event.contact is not None
        target[0].refuse_containing = event.contact.email  # invalid_payload, for good
        return event

    def store(self, sink: Sink, events: Sequence[Event],
              deliveries: Mapping[str, Delivery]) -> None:
        assert isinstance(sink, SlackSink)
        sink.outbox().park(events)  # waiting to be posted: what the sink keeps

    def held(self, target: tuple[SlackReceiver, Settings], events: Sequence[Event]) -> set[str]:
        from ingest.redis_conn import worker_redis

        settings = target[1]
        redis = worker_redis(settings.require_redis())
        try:
            waiting = {k.decode() for key in redis.scan_iter(
                match=settings.names.key("slack:*:items")) for k in redis.hkeys(key)}
        finally:
            redis.close()
        return waiting & {e.id for e in events}
