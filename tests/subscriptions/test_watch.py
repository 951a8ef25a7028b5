"""Watched: a worker checks the subscriptions on a schedule (RQ's scheduler, a real worker),
`ingest_subscription_healthy` on the acceptor's /metrics and `ingest status` say what it found,
and `apply` repairs it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq.serializers import JSONSerializer

from ingest.acceptor.app import create_app
from ingest.config import Settings
from tests.helpers import SimpleWorker, redis_values, serve
from tests.subscriptions.conftest import OUTREACH_TOKEN
from tests.subscriptions.fake_apis import FakeOutreach, FakeSalesloft
from workers import subscriptions
from workers.runtime import Runtime, install_runtime

Run = Callable[..., tuple[int, str, str]]
REASON = "Deactivated: failing since 7 days (DNS resolution failed)"


@pytest.fixture
def env(sub_env: Callable[..., dict[str, str]], database_url: str) -> dict[str, str]:
    return sub_env(DATABASE_URL=database_url, INGEST_SUBSCRIPTIONS_CHECK_EVERY="10m")


@pytest.fixture
def rt(env: dict[str, str]) -> Iterator[Runtime]:
    runtime = Runtime(Settings.from_env(env))
    previous = install_runtime(runtime)
    try:
        yield runtime
    finally:
        install_runtime(previous)
        runtime.close()


def _run_scheduled_check(rt: Runtime) -> None:
    """Make the scheduled check due now and let a real worker's scheduler run it."""
    queue = rt.ingest_queue
    (job_id,) = queue.scheduled_job_registry.get_job_ids()
    rt.redis.zadd(queue.scheduled_job_registry.key, {job_id: int(time.time()) - 1})
    SimpleWorker([queue], connection=rt.redis, serializer=JSONSerializer).work(
        burst=True, with_scheduler=True, logging_level="WARNING")
    assert queue.finished_job_registry.get_job_ids()[-1:] == [job_id]


def _healthy(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.labels["provider"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "ingest_subscription_healthy"}


def test_a_deactivated_webhook_turns_the_metric_and_status_and_apply_repairs_it(
        run: Run, env: dict[str, str], rt: Runtime, outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    assert run(env, "subscriptions", "apply", "--yes")[0] == 0
    now = time.time()
    # One slot per deployment, however many workers start.
    assert [subscriptions.schedule(rt, now), subscriptions.schedule(rt, now)] == [True, False]

    with serve(create_app(Settings.from_env(env))) as acceptor:
        _run_scheduled_check(rt)
        assert _healthy(acceptor.url) == {"outreach": 1.0, "salesloft": 1.0}
        # The check scheduled the next slot itself.
        assert len(rt.ingest_queue.scheduled_job_registry.get_job_ids()) == 1

        (wid,) = outreach_api.find("mailing", "replied")
        outreach_api.deactivate(wid, REASON, "2026-04-02T10:00:00.000Z")
        _run_scheduled_check(rt)
        assert _healthy(acceptor.url) == {"outreach": 0.0, "salesloft": 1.0}

        code, out, _ = run(env, "status", "--json")
        assert code == 1
        import orjson

        status: dict[str, Any] = orjson.loads(out)
        line = next(a for a in status["attention"] if a.startswith("outreach's webhook"))
        assert "mailing.replied inactive" in line and REASON in line
        assert "since 2026-04-02 10:00Z" in line and "ingest subscriptions plan" in line
        outreach = next(p for p in status["providers"] if p["name"] == "outreach")
        assert outreach["subscriptions"]["healthy"] is False

        code, out, err = run(env, "subscriptions", "apply", "--yes")
        assert code == 0, out + err
        assert outreach_api.webhooks[wid]["active"] is True
        # apply records what it left: the metric is back at once, and stays on the next check.
        assert _healthy(acceptor.url) == {"outreach": 1.0, "salesloft": 1.0}
        _run_scheduled_check(rt)
        assert _healthy(acceptor.url) == {"outreach": 1.0, "salesloft": 1.0}
        code, out, _ = run(env, "status", "--json")
        assert not any("webhook subscriptions" in a for a in orjson.loads(out)["attention"])


def test_a_check_that_cannot_read_the_api_is_unhealthy_with_the_reason(
        run: Run, env: dict[str, str], rt: Runtime, outreach_api: FakeOutreach,
        caplog: pytest.LogCaptureFixture, redis_server: str, namespace: str) -> None:
    outreach_api.tokens.static.clear()  # the token was revoked ...
    outreach_api.echo_credentials = True  # ... and the API quotes it back
    assert subscriptions.schedule(rt)
    with caplog.at_level("INFO"):
        _run_scheduled_check(rt)
    assert "outreach's webhook subscriptions need attention" in caplog.text
    assert OUTREACH_TOKEN not in caplog.text
    assert not any(OUTREACH_TOKEN.encode() in value
                   for _, values in redis_values(rt.redis, namespace) for value in values)
    from ingest.subscriptions.state import read_health

    health = read_health(rt.redis, rt.names)
    assert health["outreach"].healthy is False
    assert "refused our credentials (401)" in (health["outreach"].error or "")
    assert health["salesloft"].healthy is False  # nothing subscribed yet: all missing
    code, out, _ = run(env, "status")
    assert code == 1 and "refused our credentials" in " ".join(out.split())


def test_nothing_is_scheduled_without_a_public_url_or_with_the_check_off(
        sub_env: Callable[..., dict[str, str]], database_url: str) -> None:
    for overrides in ({"INGEST_PUBLIC_URL": ""}, {"INGEST_SUBSCRIPTIONS_CHECK_EVERY": "off"}):
        runtime = Runtime(Settings.from_env(sub_env(DATABASE_URL=database_url, **overrides)))
        try:
            assert subscriptions.schedule(runtime) is False
            assert runtime.ingest_queue.scheduled_job_registry.get_job_ids() == []
        finally:
            runtime.close()


def test_a_malformed_api_setting_stops_the_starting_worker_naming_it(
        sub_env: Callable[..., dict[str, str]], database_url: str) -> None:
    from ingest.exceptions import ConfigError

    runtime = Runtime(Settings.from_env(sub_env(DATABASE_URL=database_url,
                                                SALESLOFT_API_URL="api.salesloft.com")))
    try:
        with pytest.raises(ConfigError) as caught:
            subscriptions.schedule_at_start(runtime)
        assert caught.value.variable == "SALESLOFT_API_URL"
    finally:
        runtime.close()
