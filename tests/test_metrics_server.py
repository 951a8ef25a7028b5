"""Worker metrics: ``ingest worker --metrics-port``, one endpoint for all its child processes.

Real processes throughout: the supervisor serves /metrics while its children (one per queue)
do the work, so what a scrape shows is what prometheus-client's multiprocess mode summed from
the children's files. Files left by an earlier run must not be summed in.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.config import Settings
from ingest.commands.embedded import free_port
from ingest.commands.samples import build_sample
from tests.helpers import SECRETS, rows, wait_for_queue_workers, wait_until


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(port: int) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return ""


def serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ingest(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def worker_env(make_env: Callable[..., dict[str, str]], database_url: str,
               tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir()
    env = make_env(database_url, INGEST_METRICS_PORT=str(free_port()),
                   INGEST_METRICS_HOST="127.0.0.1", TMPDIR=str(tmp_path / "tmp"))
    return {"PATH": os.environ.get("PATH", ""), **env}


@pytest.fixture
def stop_at_end() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def send_outcaller(url: str, count: int) -> None:
    rng = random.Random(7)
    for _ in range(count):
        body, headers = build_sample("outcaller", SECRETS["outcaller"][0], rng)
        assert httpx.post(f"{url}/webhooks/outcaller", content=body, headers=headers,
                          timeout=10).status_code == 200


def wait_for_workers(env: dict[str, str]) -> None:
    names = Settings.from_env(env).names
    wait_for_queue_workers(env["REDIS_URL"], [names.ingest_queue, names.sink_queue("postgres")])


def test_supervisor_serves_the_sum_of_its_children_and_forgets_stale_files(
        worker_env: dict[str, str], acceptor: Any, database_url: str, tmp_path: Path,
        stop_at_end: list[subprocess.Popen[str]]) -> None:
    shared = tmp_path / "multiproc"
    shared.mkdir()
    # A file an earlier run left behind: a process that counted 5 events and is gone.
    stale = subprocess.run(
        [sys.executable, "-c", "from ingest import metrics; "
                               "metrics.EVENTS.labels('stale', 'email.sent').inc(5)"],
        env={**worker_env, "PROMETHEUS_MULTIPROC_DIR": str(shared)}, capture_output=True,
        text=True)
    assert stale.returncode == 0, stale.stderr
    assert list(shared.glob("counter_*.db"))

    env = {**worker_env, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    port = int(env["INGEST_METRICS_PORT"])
    supervisor = ingest("worker", env=env)  # no --queue: one child per queue
    stop_at_end.append(supervisor)
    wait_until(lambda: serving(port) or supervisor.poll() is not None, 60, "/metrics")
    assert supervisor.poll() is None, supervisor.communicate()[0][-3000:]
    wait_for_workers(env)

    send_outcaller(acceptor.url, 5)
    wait_until(lambda: len(rows(database_url, "SELECT id FROM webhook_events")) == 5, 60,
               "5 rows")
    # Normalizing happened in the ingest child, storing in the sink-postgres child: one scrape
    # of the supervisor shows both.
    wait_until(lambda: metric(scrape(port), "ingest_sink_events_total", sink="postgres",
                              outcome="delivered") == 5, 30, "the sink child's counter")
    text = scrape(port)
    assert metric(text, "ingest_events_total", provider="outcaller") == 5
    assert metric(text, "ingest_lag_seconds_count", sink="postgres") == 5
    assert metric(text, "ingest_events_total", provider="stale") == 0, "stale file summed in"

    supervisor.send_signal(signal.SIGTERM)
    output, _ = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, output[-3000:]
    assert re.search(r"removed [1-9]\d* stale metrics files", output)


def test_without_a_directory_the_supervisor_uses_a_private_one_and_removes_it(
        worker_env: dict[str, str], acceptor: Any, database_url: str, tmp_path: Path,
        stop_at_end: list[subprocess.Popen[str]]) -> None:
    port = int(worker_env["INGEST_METRICS_PORT"])
    supervisor = ingest("worker", env=worker_env)
    stop_at_end.append(supervisor)
    wait_until(lambda: serving(port) or supervisor.poll() is not None, 60, "/metrics")
    assert supervisor.poll() is None, supervisor.communicate()[0][-3000:]
    private = list((tmp_path / "tmp").glob("ingest-metrics-*"))
    assert len(private) == 1
    wait_for_workers(worker_env)
    send_outcaller(acceptor.url, 3)
    wait_until(lambda: metric(scrape(port), "ingest_sink_events_total", sink="postgres",
                              outcome="delivered") == 3, 60, "3 events stored")

    supervisor.send_signal(signal.SIGTERM)
    output, _ = supervisor.communicate(timeout=60)
    assert supervisor.returncode == 0, output[-3000:]
    assert not private[0].exists(), "the private metrics directory outlived the worker"


def test_single_queue_worker_serves_its_own_counters(
        worker_env: dict[str, str], acceptor: Any, stop_at_end: list[subprocess.Popen[str]]
) -> None:
    port = int(worker_env["INGEST_METRICS_PORT"])
    worker = ingest("worker", "--queue", "ingest", env=worker_env)
    stop_at_end.append(worker)
    wait_until(lambda: serving(port) or worker.poll() is not None, 60, "/metrics")
    assert worker.poll() is None, worker.communicate()[0][-3000:]
    send_outcaller(acceptor.url, 2)
    wait_until(lambda: metric(scrape(port), "ingest_events_total", provider="outcaller") == 2,
               60, "2 events normalized")
    assert "process_cpu_seconds_total" in scrape(port) or sys.platform != "linux"


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_a_bad_metrics_port_stops_start_up_naming_the_variable(
        worker_env: dict[str, str], value: str) -> None:
    result = subprocess.run([sys.executable, "-m", "ingest.commands.cli", "worker", "--burst"],
                            env={**worker_env, "INGEST_METRICS_PORT": value},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "INGEST_METRICS_PORT" in result.stderr


def test_a_metrics_port_in_use_stops_start_up_naming_the_variable(
        worker_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ingest.commands.cli", "worker", "--burst"],
                                env={**worker_env, "INGEST_METRICS_PORT": str(port)},
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "INGEST_METRICS_PORT" in result.stderr and str(port) in result.stderr


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _listening_inode(port: int) -> str | None:
    """The socket inode listening on 127.0.0.1:``port`` (from /proc/net/tcp), if any."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            return fields[9]
    return None


def _holds_socket(pid: int, inode: str) -> bool:
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_restarted_worker_gets_its_metrics_port_while_the_old_scheduler_lingers(
        worker_env: dict[str, str], stop_at_end: list[subprocess.Popen[str]]) -> None:
    """A worker forks its scheduler. The scheduler must not keep the metrics port's socket:
    here it is frozen (SIGSTOP, so it cannot exit) and its worker killed, as a SIGKILLed
    container's would linger; a new worker on the same port must still start and serve."""
    port = int(worker_env["INGEST_METRICS_PORT"])
    queue = Settings.from_env(worker_env).names.ingest_queue
    first = ingest("worker", "--queue", queue, env=worker_env)
    stop_at_end.append(first)
    wait_until(lambda: serving(port) or first.poll() is not None, 60, "first worker's /metrics")
    wait_until(lambda: bool(_children(first.pid)), 30, "the forked scheduler")
    scheduler = _children(first.pid)[0]
    inode = _listening_inode(port)
    assert inode is not None
    assert _holds_socket(first.pid, inode)
    assert not _holds_socket(scheduler, inode), "the forked scheduler kept the metrics socket"
    os.kill(scheduler, signal.SIGSTOP)
    try:
        first.kill()
        first.wait(timeout=30)  # (its output pipe stays open in the frozen scheduler)
        second = ingest("worker", "--queue", queue, env=worker_env)
        stop_at_end.append(second)
        wait_until(lambda: serving(port) or second.poll() is not None, 60, "second /metrics")
        assert second.poll() is None, second.communicate()[0][-2000:]
        assert serving(port)
    finally:
        os.kill(scheduler, signal.SIGKILL)
        if first.stdout is not None:
            first.stdout.close()
