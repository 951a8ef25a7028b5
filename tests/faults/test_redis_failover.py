"""A Redis failover under continuous signed traffic: a primary, one replica and three Sentinels
(tests/redis_ha.py), every process of ours configured with ``REDIS_URL=redis+sentinel://...``.
The primary is killed with SIGKILL, the Sentinels promote the replica, and later the old
primary comes back (the Sentinels make it the new primary's replica), as an orchestrator
restarting a dead container would. No process of ours is restarted.

With ``INGEST_REDIS_MIN_REPLICAS=1`` every delivery answered 200 must be stored exactly once
and no job may be lost or failed; with 0 the test reports how many answered deliveries the
failover lost (docs/operations.md quotes it). Each prints what it measured: how long the
failover took, and how long the acceptor answered anything but 200 or 401.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.acceptor.app import create_app
from tests.faults.conftest import Stack, Traffic, make_stack_env
from tests.helpers import serve, wait_until
from tests.redis_ha import RedisSet

# A job whose retries the failover used up to their 60 s step settles a minute later.
pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


@pytest.fixture
def redis_set(tmp_path: Path) -> Iterator[RedisSet]:
    servers = RedisSet(tmp_path / "redis-ha")
    try:
        yield servers.start()
    finally:
        servers.stop()


def ha_stack(make_env: Callable[..., dict[str, str]], redis_set: RedisSet, database_url: str,
             tmp_path: Path, logs: Path, min_replicas: int) -> Stack:
    env = make_stack_env(make_env, redis_set.url(), database_url, tmp_path)
    env["INGEST_REDIS_MIN_REPLICAS"] = str(min_replicas)
    return Stack(env=env, database_url=database_url, logs=logs)


def spool_depth(url: str) -> int:
    return int(httpx.get(f"{url}/readyz", timeout=5).json()["spool_depth"])


def fail_over(stack: Stack, redis_set: RedisSet) -> tuple[Traffic, dict[str, Any]]:
    """Traffic through a kill -9 of the primary, the promotion and the old primary's return;
    returns the traffic and what was measured. Every process of ours runs throughout."""
    supervisor = stack.start_workers()
    stack.wait_for_workers()
    workers_before = {q: p.pid for q, p in stack.children(supervisor).items()}
    with serve(create_app(stack.settings)) as acceptor:
        traffic = Traffic(acceptor.url)
        with traffic.flowing(accepted=30):
            victim = redis_set.primary()
            killed_at = time.monotonic()
            victim.stop(kill=True)
            failover = redis_set.wait_for_promotion(victim.port)
            traffic.wait_for_accepted(len(traffic.accepted) + 30)  # on the new primary
            redis_set.bring_back(victim)
            back = time.monotonic() - killed_at
            traffic.wait_for_accepted(len(traffic.accepted) + 30)
        stopped = time.monotonic()
        wait_until(lambda: spool_depth(acceptor.url) == 0, 60, "the spool to drain")
        wait_until(stack.settled, 90, "every queue idle", interval=0.25)
        settled = time.monotonic() - stopped
    assert {q: p.pid for q, p in stack.children(supervisor).items()} == workers_before
    bad = [(t - killed_at, status) for t, status in traffic.failures
           if not isinstance(status, int) or status >= 500]
    stored = stack.stored()
    report = {
        "min_replicas": stack.env["INGEST_REDIS_MIN_REPLICAS"],
        "accepted": len(traffic.accepted),
        "lost": len(traffic.accepted - set(stored)),
        "doubled": sum(1 for n in stored.values() if n != 1),
        "failover_s": round(failover, 2),
        "old_primary_back_s": round(back, 2),
        "settled_after_s": round(settled, 2),
        "not_answered_or_5xx": len(bad),
        "first_bad_s": round(min((t for t, _ in bad), default=0.0), 2),
        "last_bad_s": round(max((t for t, _ in bad), default=0.0), 2),
        "statuses": {str(k): v for k, v in sorted(traffic.statuses.items(), key=str)},
    }
    return traffic, report


def show(capsys: pytest.CaptureFixture[str], report: dict[str, Any]) -> None:
    with capsys.disabled():
        print("\nredis failover:", " ".join(f"{k}={v}" for k, v in report.items()))


def test_failover_with_one_replica_required_loses_nothing(
        make_env: Callable[..., dict[str, str]], redis_set: RedisSet, database_url: str,
        tmp_path: Path, fault_logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = ha_stack(make_env, redis_set, database_url, tmp_path, fault_logs, min_replicas=1)
    try:
        traffic, report = fail_over(stack, redis_set)
    finally:
        stack.stop_processes()
    show(capsys, report)
    # The spool answered while no replica could acknowledge: never a 5xx, never silence.
    assert report["not_answered_or_5xx"] == 0, report
    stack.assert_invariants(traffic)  # every 200 stored once, no job failed or left


def test_failover_without_waiting_for_replicas_reports_what_it_lost(
        make_env: Callable[..., dict[str, str]], redis_set: RedisSet, database_url: str,
        tmp_path: Path, fault_logs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = ha_stack(make_env, redis_set, database_url, tmp_path, fault_logs, min_replicas=0)
    try:
        _, report = fail_over(stack, redis_set)
    finally:
        stack.stop_processes()
    show(capsys, report)
    # Nothing is promised about what the promoted replica lacked; nothing may be doubled.
    assert report["doubled"] == 0, report
    assert report["accepted"] - report["lost"] > 0
