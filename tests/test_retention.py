"""Retention against a real Postgres, with the real sink writing at the same time, and the
daily run through RQ's scheduler on real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from rq.serializers import JSONSerializer

from ingest.commands.cli import main
from ingest.config import Settings
from ingest.events import Delivery
from ingest.exceptions import ConfigError
from sinks.postgres import PostgresSink
from tests.helpers import SimpleWorker, rows
from tests.sinks.conftest import outboundry_delivery
from workers import retention
from workers.runtime import Runtime


def fill_old(database_url: str, count: int, days_ago: int) -> None:
    """``count`` deliveries and events received ``days_ago`` days ago (COPY-fast)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO webhook_deliveries (id, provider, received_at, body) "
            "SELECT gen_random_uuid(), 'outboundry', now() - make_interval(days => %s) "
            "- g * interval '1 second', '\\x7b7d'::bytea FROM generate_series(1, %s) g",
            [days_ago, count])
        conn.execute(
            "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, "
            "occurred_at, received_at, data) "
            "SELECT gen_random_uuid(), 'outboundry', 'old-' || %s || '-' || g, 'x', 'unknown', "
            "now() - make_interval(days => %s), now() - make_interval(days => %s) "
            "- g * interval '1 second', '{}' FROM generate_series(1, %s) g",
            [days_ago, days_ago, days_ago, count])


def ages(database_url: str, table: str) -> dict[str, int]:
    (row,) = rows(database_url, f"SELECT count(*) FILTER (WHERE received_at < now() - "
                                f"interval '30 days') AS old, count(*) FILTER (WHERE received_at "
                                f">= now() - interval '30 days') AS new FROM {table}")
    return dict(row)


def test_settings_are_validated() -> None:
    assert Settings.from_env({}).retention_days is None
    got = Settings.from_env({"INGEST_RETENTION_DAYS": "30", "INGEST_EVENTS_RETENTION_DAYS": "7"})
    assert (got.retention_days, got.events_retention_days) == (30, 7)
    for bad in ("0", "-3", "thirty", "1.5"):
        with pytest.raises(ConfigError, match="INGEST_RETENTION_DAYS"):
            Settings.from_env({"INGEST_RETENTION_DAYS": bad})
    with pytest.raises(ConfigError, match="INGEST_EVENTS_RETENTION_DAYS"):
        Settings.from_env({"INGEST_EVENTS_RETENTION_DAYS": "0"})


def test_old_rows_go_new_ones_stay_while_the_sink_keeps_writing(
        make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    settings = Settings.from_env(make_env(database_url, INGEST_RETENTION_DAYS="30",
                                          INGEST_EVENTS_RETENTION_DAYS="30"))
    fill_old(database_url, 6000, days_ago=100)
    fill_old(database_url, 300, days_ago=29)  # younger than the retention: stays
    sink = PostgresSink(database_url)
    written: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    turn = threading.Semaphore(0)  # one sink batch per retention batch: they interleave

    def ingest() -> None:
        try:
            while not stop.is_set():
                turn.acquire(timeout=0.5)
                envelopes = [outboundry_delivery() for _ in range(20)]
                deliveries = {e["id"]: Delivery.from_dict(e) for e in envelopes}
                events = [ev for d in deliveries.values()
                          for ev in runtime_providers()["outboundry"].events(d)]
                sink.send(events, deliveries=deliveries)
                written.append(len(events))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=ingest)
    thread.start()
    batches: list[int] = []

    def progress(table: str, n: int) -> None:
        batches.append(n)
        before = len(written)
        turn.release()
        deadline = time.monotonic() + 30
        while len(written) == before and time.monotonic() < deadline and not errors:
            time.sleep(0.01)

    try:
        removed = retention.run_retention(settings, batch=1000, progress=progress)
    finally:
        stop.set()
        turn.release()
        thread.join(timeout=60)
        sink.close()
    assert not errors
    assert removed == {"webhook_deliveries": 6000, "webhook_events": 6000,
                       "webhook_sink_outcomes": 0}
    assert len(batches) >= 12 and sum(written) >= 12 * 20  # the sink wrote during the run
    assert ages(database_url, "webhook_deliveries") == {"old": 0, "new": 300 + sum(written)}
    assert ages(database_url, "webhook_events") == {"old": 0, "new": 300 + sum(written)}


def runtime_providers() -> dict[str, Any]:
    from ingest.providers import load_providers

    return load_providers()


def test_dry_run_counts_and_changes_nothing(make_env: Callable[..., dict[str, str]],
                                            database_url: str, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    fill_old(database_url, 50, days_ago=40)
    for key, value in make_env(database_url, INGEST_EVENTS_RETENTION_DAYS="30").items():
        monkeypatch.setenv(key, value)
    assert main(["retention", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "50" in out and "kept forever" in out
    assert ages(database_url, "webhook_events")["old"] == 50
    assert main(["retention"]) == 0
    assert ages(database_url, "webhook_events")["old"] == 0
    assert ages(database_url, "webhook_deliveries")["old"] == 50  # kept forever: unset


def test_daily_run_once_per_deployment_through_rqs_scheduler(
        make_env: Callable[..., dict[str, str]], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(database_url, INGEST_RETENTION_DAYS="30", INGEST_EVENTS_RETENTION_DAYS="30")
    workers = [Runtime(Settings.from_env(env)) for _ in range(3)]
    try:
        now = datetime.now(timezone.utc)
        when = now.replace(hour=retention.DAILY_HOUR_UTC, minute=0, second=0, microsecond=0)
        when += timedelta(days=1) if when <= now else timedelta(0)
        day, next_day = when.strftime("%Y%m%d"), (when + timedelta(days=1)).strftime("%Y%m%d")
        assert [retention.schedule(rt, now) for rt in workers] == [True, False, False]
        rt = workers[0]
        queue = rt.ingest_queue
        (job_id,) = queue.scheduled_job_registry.get_job_ids()
        assert job_id == rt.names.job_id("retention", f"{day}-0")
        fill_old(database_url, 2500, days_ago=60)
        # Slices of one batch each: the run continues as jobs behind the queue's others.
        monkeypatch.setattr(retention, "BATCH", 1000)
        monkeypatch.setattr(retention, "SLICE_SECONDS", 0.0)
        rt.redis.zadd(queue.scheduled_job_registry.key, {job_id: int(time.time()) - 1})
        from workers.runtime import install_runtime

        previous = install_runtime(rt)
        try:
            SimpleWorker([queue], connection=rt.redis, serializer=JSONSerializer).work(
                burst=True, with_scheduler=True, logging_level="WARNING")
        finally:
            install_runtime(previous)
        assert ages(database_url, "webhook_events")["old"] == 0
        assert ages(database_url, "webhook_deliveries")["old"] == 0
        finished = set(queue.finished_job_registry.get_job_ids())
        assert {rt.names.job_id("retention", f"{day}-{n}") for n in range(3)} <= finished
        # The next day is scheduled, once.
        assert queue.scheduled_job_registry.get_job_ids() == [
            rt.names.job_id("retention", f"{next_day}-0")]
        assert not retention.schedule(workers[1], when + timedelta(hours=1))
    finally:
        for w in workers:
            w.close()


def test_a_run_scheduled_by_an_earlier_version_is_rescheduled_under_the_new_job_path(
        make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    # Before retention moved to workers/, the daily job was "ingest.retention.run_slice": a
    # job already scheduled under that name would fail to import when it comes due.
    env = make_env(database_url, INGEST_RETENTION_DAYS="30")
    rt = Runtime(Settings.from_env(env))
    try:
        now = datetime.now(timezone.utc)
        when = now.replace(hour=retention.DAILY_HOUR_UTC, minute=0, second=0, microsecond=0)
        when += timedelta(days=1) if when <= now else timedelta(0)
        day = when.strftime("%Y%m%d")
        job_id = rt.names.job_id("retention", f"{day}-0")
        queue = rt.ingest_queue
        rt.redis.set(rt.names.key(f"retention:{day}"), b"1", ex=3600)  # the old version's claim
        queue.schedule_job(queue.create_job("ingest.retention.run_slice", args=(day, 0),
                                            job_id=job_id), when)

        assert retention.schedule(rt, now)

        registry = queue.scheduled_job_registry
        assert registry.get_job_ids() == [job_id]
        assert registry.get_scheduled_time(job_id) == when
        job = queue.fetch_job(job_id)
        assert job is not None and job.func_name == retention.SLICE_JOB
        assert job.args == [day, 0]
        # Repaired once: later workers find the current path and leave it alone.
        assert not retention.schedule(rt, now)
        assert registry.get_job_ids() == [job_id]
    finally:
        rt.close()


def test_the_pace_backs_off_when_batches_slow_down_and_comes_back() -> None:
    pace = retention.Pace()
    # The first batch sets the table's reference time per row; at that pace the rest is REST.
    assert retention.next_step(pace, "t", 1000, 0.010, waiting=0) == pytest.approx(
        0.010 * retention.REST)
    # Three times slower per row than the reference: the server is busy, the rest doubles.
    rest = retention.next_step(pace, "t", 1000, 0.030, waiting=0)
    assert pace.rest == 2 * retention.REST and rest == pytest.approx(0.030 * pace.rest)
    assert retention.next_step(pace, "t", 1000, 0.030, waiting=0) == pytest.approx(
        0.030 * 4 * retention.REST)
    # It stays within MAX_REST times the batch, and MAX_REST_SECONDS.
    for _ in range(5):
        rest = retention.next_step(pace, "t", 1000, 0.050, waiting=0)
    assert pace.rest == retention.MAX_REST
    assert rest == min(retention.MAX_REST_SECONDS, 0.050 * retention.MAX_REST)
    # Fast again: the rest halves batch by batch back to REST, never below.
    for _ in range(20):
        retention.next_step(pace, "t", 1000, 0.011, waiting=0)
    assert pace.rest == retention.REST
    assert pace.backed_off == 7 and pace.batches == 28 and pace.rows == 28_000
    # Another table has its own reference: slower rows there are not a busy server.
    retention.next_step(pace, "u", 1000, 0.100, waiting=0)
    retention.next_step(pace, "u", 1000, 0.110, waiting=0)
    assert pace.rest == retention.REST and pace.backed_off == 7


def test_a_server_that_stays_slower_becomes_the_reference() -> None:
    # One lucky fast batch (its rows still in memory) must not keep the whole run backed off.
    pace = retention.Pace()
    retention.next_step(pace, "t", 1000, 0.002, waiting=0)
    slow = [retention.next_step(pace, "t", 1000, 0.010, waiting=0) > 0 and
            pace.rest > retention.REST for _ in range(60)]
    assert slow[0] and not slow[-1]
    assert pace.rest == retention.REST
    # ... and a batch much slower than those just before it still backs off.
    retention.next_step(pace, "t", 1000, 0.030, waiting=0)
    assert pace.rest == 2 * retention.REST


def test_waiting_jobs_make_the_pace_back_off() -> None:
    pace = retention.Pace()
    retention.next_step(pace, "t", 1000, 0.010, waiting=0)
    # As fast as ever, but more jobs wait than BACKLOG_JOBS: back off, rest BACKLOG_REST at least.
    rest = retention.next_step(pace, "t", 1000, 0.010, waiting=retention.BACKLOG_JOBS + 1)
    assert pace.rest == 2 * retention.REST and rest == retention.BACKLOG_REST
    assert pace.backed_off == 1
    # A few jobs waiting is ordinary traffic.
    assert retention.next_step(pace, "t", 1000, 0.010, waiting=retention.BACKLOG_JOBS) < 1.0
    assert pace.rest == retention.REST


def test_a_backlog_in_the_queues_ends_a_slice_and_slows_a_run(
        make_env: Callable[..., dict[str, str]], database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_env(database_url, INGEST_RETENTION_DAYS="30", INGEST_EVENTS_RETENTION_DAYS="30")
    settings = Settings.from_env(env)
    rt = Runtime(settings)
    monkeypatch.setattr(retention, "BACKLOG_REST", 0.01)
    try:
        fill_old(database_url, 2500, days_ago=60)
        assert retention.queued_jobs(rt.redis, settings) == 0
        # Jobs waiting in the sink queue (their content does not matter: only counted).
        sink_key = f"rq:queue:{settings.names.sink_queue('postgres')}"
        rt.redis.rpush(sink_key, *[f"job-{i}" for i in range(retention.BACKLOG_JOBS + 1)])
        assert retention.queued_jobs(rt.redis, settings) == retention.BACKLOG_JOBS + 1

        # A worker's slice removes one batch and stops, leaving its worker to the jobs.
        pace = retention.Pace()
        removed = retention.run_retention(settings, batch=1000, redis=rt.redis, pace=pace,
                                          stop_on_backlog=True)
        assert removed == {"webhook_deliveries": 1000, "webhook_events": 0,
                           "webhook_sink_outcomes": 0}
        assert retention.remaining(settings)

        # The command goes on, backing off after every batch.
        pace = retention.Pace()
        removed = retention.run_retention(settings, batch=1000, redis=rt.redis, pace=pace)
        assert removed == {"webhook_deliveries": 1500, "webhook_events": 2500,
                           "webhook_sink_outcomes": 0}
        # 5 batches of rows, and the outcomes' (none to remove): each followed by a back-off.
        assert pace.backed_off == pace.batches == 6 and pace.rest == retention.MAX_REST

        # Without the backlog, nothing backs off for it.
        rt.redis.delete(sink_key)
        fill_old(database_url, 2000, days_ago=61)
        pace = retention.Pace(rest=0.0)
        retention.run_retention(settings, batch=1000, redis=rt.redis, pace=pace,
                                stop_on_backlog=True)
        assert not retention.remaining(settings)
        # 2 full and an empty last one per table, and one (empty) of outcomes.
        assert pace.batches == 7
    finally:
        rt.close()
