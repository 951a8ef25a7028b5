"""Refusals, activity, silence and backlog as operators see them: /metrics, `ingest status`,
`ingest refused`. Real acceptor over HTTP, real Redis, real RQ workers."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.acceptor.app import create_app
from ingest.commands.cli import main
from ingest.config import Settings
from tests.helpers import SECRETS, serve, wait_until

BODY = orjson.dumps({"data": {"type": "prospect", "id": 1, "attributes": {}},
                     "meta": {"eventName": "prospect.created",
                              "deliveredAt": "2026-01-01T00:00:00Z"}})


def signed(body: bytes, secret: str = SECRETS["outreach"][0]) -> dict[str, str]:
    return {"Content-Type": "application/json", "Outreach-Webhook-Signature":
            hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            env: dict[str, str], *argv: str) -> tuple[int, str]:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.fixture
def env(make_env: Callable[..., dict[str, str]], database_url: str) -> dict[str, str]:
    return make_env(database_url, INGEST_MAX_BODY_BYTES="2000", INGEST_BODY_TIMEOUT="0.5")


@pytest.fixture
def server(env: dict[str, str]) -> Iterator[Any]:
    with serve(create_app(Settings.from_env(env))) as s:
        yield s


def _trickle(url: str, path: str) -> None:
    """A request whose body never completes within the body deadline."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Outreach-Webhook-Signature: abc\r\nContent-Length: 100\r\n\r\n{{".encode())
        answer = sock.recv(4096)
    assert b" 408 " in answer.split(b"\r\n")[0]


def test_every_refusal_reason_is_counted_and_listed_without_credentials(
        server: Any, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    url = server.url
    before = scrape(url)
    wrong_sig = "f" * 64
    wrong_token = "wrong-token-value-123456"
    query_token = "query-token-value-654321"
    sent = [
        ("outreach", "signature", 401, lambda: httpx.post(
            f"{url}/webhooks/outreach", content=BODY,
            headers={"Outreach-Webhook-Signature": wrong_sig, "User-Agent": "probe/1"})),
        ("outreach", "missing_credential", 401, lambda: httpx.post(
            f"{url}/webhooks/outreach", content=BODY)),
        ("mailstand", "token", 401, lambda: httpx.post(
            f"{url}/webhooks/mailstand", content=BODY,
            headers={"Authorization": f"Bearer {wrong_token}"})),
        ("mailstand", "token", 401, lambda: httpx.post(
            f"{url}/webhooks/mailstand?token={query_token}", content=BODY)),
        ("mailstand", "missing_credential", 401, lambda: httpx.post(
            f"{url}/webhooks/mailstand", content=BODY)),
        ("outreach", "not_json", 400, lambda: httpx.post(
            f"{url}/webhooks/outreach", content=b"[1]", headers=signed(b"[1]"))),
        ("outreach", "too_large", 413, lambda: httpx.post(
            f"{url}/webhooks/outreach", content=b"x" * 5000, headers=signed(b"x" * 5000))),
        ("unknown", "unknown_provider", 404, lambda: httpx.post(
            f"{url}/webhooks/nosuch-{wrong_token}", content=BODY)),
    ]
    for _, _, status, request in sent:
        assert request().status_code == status
    _trickle(url, "/webhooks/outreach")
    sent.append(("outreach", "body_timeout", 408, lambda: None))

    expected: dict[tuple[str, str], int] = {}
    for provider, reason, _, _ in sent:
        expected[(provider, reason)] = expected.get((provider, reason), 0) + 1
    after = scrape(url)
    for (provider, reason), n in expected.items():
        was = value(before, "ingest_refused_total", provider=provider, reason=reason) or 0
        now = value(after, "ingest_refused_total", provider=provider, reason=reason)
        assert now == was + n, (provider, reason)

    def listed() -> list[dict[str, Any]]:
        code, out = run_cli(monkeypatch, capsys, env, "refused", "--json")
        assert code == 0
        return list(orjson.loads(out))

    wait_until(lambda: len(listed()) == len(sent), 10, "every refusal in the refusal log")
    records = listed()
    got: dict[tuple[str, str], int] = {}
    for r in records:
        got[(r["provider"], r["reason"])] = got.get((r["provider"], r["reason"]), 0) + 1
    assert got == expected
    times = [r["time"] for r in records]
    assert times == sorted(times, reverse=True)  # newest first
    sig_record = next(r for r in records if r["reason"] == "signature")
    assert sig_record["user_agent"] == "probe/1"
    assert sig_record["client"] == "127.0.0.1"
    assert "outreach-webhook-signature" in sig_record["headers"]
    assert sig_record["content_length"] == len(BODY)
    assert any("authorization" in r["headers"] for r in records if r["reason"] == "token")
    # No credential value anywhere, in the JSON or in the table, nor on /metrics.
    _, table = run_cli(monkeypatch, capsys, env, "refused")
    metrics_text = httpx.get(f"{url}/metrics").text
    for secret in (wrong_sig, wrong_token, query_token, "abc\r"):
        assert secret not in orjson.dumps(records).decode()
        assert secret not in table
        assert secret not in metrics_text
    assert "signature" in table and "unknown_provider" in table

    code, out = run_cli(monkeypatch, capsys, env, "refused", "--provider", "mailstand", "--json")
    assert code == 0
    assert {r["provider"] for r in orjson.loads(out)} == {"mailstand"}
    last = value(after, "ingest_last_refused_timestamp_seconds", provider="outreach")
    assert last is not None and abs(last - time.time()) < 3600


def test_refusal_is_answered_when_redis_is_unreachable(
        make_env: Callable[..., dict[str, str]], free_tcp_port: int) -> None:
    settings = Settings.from_env(make_env(REDIS_URL=f"redis://127.0.0.1:{free_tcp_port}/0"))
    with serve(create_app(settings)) as s:
        for _ in range(3):
            response = httpx.post(f"{s.url}/webhooks/outreach", content=BODY,
                                  headers={"Outreach-Webhook-Signature": "0" * 64}, timeout=10)
            assert response.status_code == 401
        wait_until(lambda: (value(scrape(s.url), "ingest_activity_write_errors_total",
                                  outcome="error") or 0) >= 3, 10, "the failed writes counted")
        assert value(scrape(s.url), "ingest_activity_redis_up") == 0


def _status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    code, out = run_cli(monkeypatch, capsys, env, "status", "--json")
    return code, dict(orjson.loads(out))


def _provider(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in status["providers"] if p["name"] == name)


def test_a_provider_that_stops_sending_is_flagged_silent_then_clears(
        make_env: Callable[..., dict[str, str]], database_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env(database_url, INGEST_SILENCE_AFTER="outreach=3s")
    with serve(create_app(Settings.from_env(env))) as s:
        assert httpx.post(f"{s.url}/webhooks/outreach", content=BODY,
                          headers=signed(BODY)).status_code == 200
        samples = scrape(s.url)
        assert value(samples, "ingest_provider_silent", provider="outreach") == 0
        accepted = value(samples, "ingest_last_accepted_timestamp_seconds", provider="outreach")
        assert accepted is not None and abs(accepted - time.time()) < 3600
        # Only outreach is watched this closely; the others fall under the 24 h default.
        assert value(samples, "ingest_provider_silent", provider="salesloft") == 0

        wait_until(lambda: value(scrape(s.url), "ingest_provider_silent",
                                 provider="outreach") == 1, 60, "outreach flagged silent")
        code, status = _status(monkeypatch, capsys, env)
        assert code == 1
        assert _provider(status, "outreach")["silent"] is True
        assert _provider(status, "outreach")["accepted_last_hour"] == 1
        assert any("outreach is silent" in line for line in status["attention"])
        assert not _provider(status, "salesloft")["silent"]

        assert httpx.post(f"{s.url}/webhooks/outreach", content=BODY,
                          headers=signed(BODY)).status_code == 200
        wait_until(lambda: value(scrape(s.url), "ingest_provider_silent",
                                 provider="outreach") == 0, 60, "outreach no longer silent")
        _, status = _status(monkeypatch, capsys, env)
        assert _provider(status, "outreach")["silent"] is False
        assert not any("silent" in line for line in status["attention"])


def test_stopped_workers_make_the_oldest_job_age_and_status_fail(
        make_env: Callable[..., dict[str, str]], database_url: str, redis_server: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import wait_for_queue_workers

    env = make_env(database_url)
    settings = Settings.from_env(env)
    ingest_queue = settings.names.ingest_queue
    worker = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "worker"],
                              env={"PATH": os.environ.get("PATH", ""), **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with serve(create_app(settings)) as s:
            wait_for_queue_workers(redis_server, [ingest_queue,
                                                  settings.names.sink_queue("postgres")])
            for _ in range(3):
                assert httpx.post(f"{s.url}/webhooks/outreach", content=BODY,
                                  headers=signed(BODY)).status_code == 200

            def healthy() -> bool:
                code, status = _status(monkeypatch, capsys, env)
                return code == 0 and all(q["queued"] == 0 for q in status["queues"])

            wait_until(healthy, 60, "the workers to drain the queues, status exit 0")
            assert value(scrape(s.url), "ingest_queue_oldest_seconds", queue=ingest_queue) == 0
            assert value(scrape(s.url), "ingest_queue_workers", queue=ingest_queue) == 1

            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            assert httpx.post(f"{s.url}/webhooks/outreach", content=BODY,
                              headers=signed(BODY)).status_code == 200
            samples = scrape(s.url)
            assert value(samples, "ingest_queue_jobs", queue=ingest_queue, state="queued") == 1
            first = value(samples, "ingest_queue_oldest_seconds", queue=ingest_queue)
            assert first is not None
            wait_until(lambda: (value(scrape(s.url), "ingest_queue_oldest_seconds",
                                      queue=ingest_queue) or 0) > first + 1, 30,
                       "the oldest queued job to age")
            code, status = _status(monkeypatch, capsys, env)
            assert code == 1
            assert status["workers"][ingest_queue] == 0
            assert any(f"no worker serves queue {ingest_queue}" in line
                       for line in status["attention"])
            assert set(status) == {"deployment", "providers", "sinks", "queues",
                                   "spool_depth", "workers", "attention"}
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)


@pytest.mark.parametrize("raw", ["outreach", "outreach=6", "outreach=6w", "outreach=-1h",
                                 "nosuch=6h", "outreach=6h,outreach=1h", "=6h", "outreach=h"])
def test_malformed_silence_after_stops_start_up_naming_the_variable(
        make_env: Callable[..., dict[str, str]], raw: str) -> None:
    from ingest.exceptions import ConfigError

    with pytest.raises(ConfigError) as err:
        Settings.from_env(make_env(INGEST_SILENCE_AFTER=raw))
    assert err.value.variable == "INGEST_SILENCE_AFTER"


def test_silence_after_durations(make_env: Callable[..., dict[str, str]]) -> None:
    settings = Settings.from_env(make_env(
        INGEST_SILENCE_AFTER="outreach=90m, salesloft=1.5d,mailstand=off,*=30s"))
    assert settings.silence_threshold("outreach") == 5400
    assert settings.silence_threshold("salesloft") == 1.5 * 86400
    assert settings.silence_threshold("mailstand") is None
    assert settings.silence_threshold("outcaller") == 30
    assert Settings.from_env(make_env()).silence_threshold("outreach") == 24 * 3600


def test_deliveries_drained_from_the_spool_count_as_accepted_when_received(
        tmp_path: Any, redis_server: str, namespace: str) -> None:
    import asyncio
    import uuid
    from datetime import datetime, timedelta, timezone

    from redis import Redis
    from rq import Queue

    from ingest.constants import Names
    from ingest.acceptor.spool import Spool

    received = datetime.now(timezone.utc) - timedelta(hours=2)
    envelopes = [{"id": str(uuid.uuid4()), "provider": "outcaller",
                  "received_at": (received + timedelta(seconds=i)).isoformat(),
                  "headers": {}, "body": "{}"} for i in range(3)]
    spool = Spool(tmp_path / "spool")

    async def append() -> None:
        await spool.start()
        await asyncio.gather(*(spool.append(e) for e in envelopes))
        await spool.stop()

    asyncio.run(append())
    names = Names(namespace)
    redis = Redis.from_url(redis_server)
    try:
        assert spool.drain(Queue(names.ingest_queue, connection=redis), names) == 3
        last = float(redis.hget(names.key("activity:accepted"), "outcaller"))
    finally:
        redis.close()
    assert last == pytest.approx((received + timedelta(seconds=2)).timestamp(), abs=0.01)


def refuse_permanently() -> None:
    """A job that fails the way a sink's 4xx does (run by a real RQ worker below)."""
    from ingest.exceptions import PermanentSinkError

    raise PermanentSinkError("CRM answered 422: field owner_id is required")


def test_dead_letters_show_in_metrics_and_status_with_the_last_reason(
        make_env: Callable[..., dict[str, str]], database_url: str, redis_server: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from redis import Redis
    from rq import Queue

    from tests.helpers import SimpleWorker
    from rq.serializers import JSONSerializer

    env = make_env(database_url)
    settings = Settings.from_env(env)
    redis = Redis.from_url(redis_server)
    try:
        queue = Queue(settings.names.sink_queue("postgres"), connection=redis,
                      serializer=JSONSerializer)
        queue.enqueue("tests.test_activity.refuse_permanently")
        SimpleWorker([queue], connection=redis, serializer=JSONSerializer).work(
            burst=True, with_scheduler=False, logging_level="WARNING")
        assert queue.failed_job_registry.count == 1
    finally:
        redis.close()
    with serve(create_app(settings)) as s:
        assert value(scrape(s.url), "ingest_dead_letters", sink="postgres") == 1
        assert value(scrape(s.url), "ingest_queue_jobs", queue=queue.name, state="failed") == 1
    code, status = _status(monkeypatch, capsys, env)
    assert code == 1
    sink = next(x for x in status["sinks"] if x["name"] == "postgres")
    assert sink["dead_letters"] == 1
    assert "422" in sink["last_failure"]
    assert any("dead letters on postgres" in line for line in status["attention"])
    code, text = run_cli(monkeypatch, capsys, env, "status")
    assert code == 1 and "dead letters on postgres" in text


# What a hostile User-Agent gets past the HTTP parser (which refuses C0 controls in a header):
# C1 CSI (0x9b) sequences that clear the screen or recolour it, a right-to-left override's
# UTF-8 bytes (read as latin-1, as the acceptor reads headers: C1 0x80 among them), and a
# backslash sequence typed to look like an escape.
_TERMINAL_BYTES = b"probe\x9b2J\x9b31m \xe2\x80\xaegnp.exe \\x9b"
# Kept by another writer: C0 escapes (ESC, BEL: an OSC 8 hyperlink), a right-to-left
# override, a zero-width joiner, a line separator.
_INVISIBLE = "\x1b]8;;http://x\x07\u202egnp.exe\u200d\u2028next"


def test_refused_shows_what_a_sender_chose_escaped_never_as_terminal_control(
        server: Any, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from redis import Redis

    answer = httpx.post(f"{server.url}/webhooks/outreach", content=BODY,
                        headers={"Outreach-Webhook-Signature": "f" * 64,
                                 "User-Agent": _TERMINAL_BYTES})
    assert answer.status_code == 401
    settings = Settings.from_env(env)
    redis = Redis.from_url(settings.require_redis())
    try:
        redis.lpush(settings.names.key("refused:mailstand"), orjson.dumps({
            "time": time.time(), "reason": "token", "client": "127.0.0.1",
            "user_agent": _INVISIBLE, "content_length": 2, "headers": ["x-\u202ename"]}))
    finally:
        redis.close()

    def listed() -> list[dict[str, Any]]:
        return list(orjson.loads(run_cli(monkeypatch, capsys, env, "refused", "--json")[1]))

    wait_until(lambda: len(listed()) == 2, 10, "the refusal in the refusal log")
    code, table = run_cli(monkeypatch, capsys, env, "refused")
    assert code == 0
    _, raw_json = run_cli(monkeypatch, capsys, env, "refused", "--json")
    sent_ua = _TERMINAL_BYTES.decode("latin-1")  # as the acceptor reads a header
    for text in (table, raw_json):
        unprintable = {c for c in text if not c.isprintable() and c != "\n"}
        assert not unprintable, unprintable
    # Shown escaped, and a backslash the sender typed doubled: never mistaken for an escape.
    assert "ua=probe\\x9b2J\\x9b31m \u00e2\\x80\u00aegnp.exe \\\\x9b  headers=" in table
    assert r"ua=\x1b]8;;http://x\x07\u202egnp.exe\u200d\u2028next  headers=x-\u202ename" in table
    # The JSON parses back to exactly what was kept.
    records = orjson.loads(raw_json)
    assert {r["user_agent"] for r in records} == {sent_ua, _INVISIBLE}
    assert ["x-\u202ename"] in [r["headers"] for r in records]
