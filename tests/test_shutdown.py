"""Stopping as platforms stop processes: SIGTERM, then SIGKILL after a grace period (docker 10 s).

Every `ingest worker` exits with code 0 within 2 s of SIGTERM when idle, and within the job in
hand plus 2 s when busy (having finished that job); the whole Procfile set stops together in
2 s, each process with code 0 (the acceptor too: a platform reads anything else as a crash). A redis-py release once made every worker take up to 60 s (workers/worker.py, the
module docstring's last paragraph), mostly when several processes stopped at once on a busy
machine: so each scenario runs 10 times, and the Procfile's processes get SIGTERM together.

Each time is measured from the moment the SIGTERM was sent to the moment the process exited,
which a thread blocked in waitpid sees at once. The bounds are the issue's: here a worker takes
0.03 to 0.05 s when idle, and the five Procfile processes up to 0.5 s when they stop at once on
two cores shared with other test runs, so a noisy machine has room before a bound fails.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus

from ingest.commands.embedded import free_port
from ingest.constants import Names
from ingest.rq_jobs import FastJSONSerializer
from tests.helpers import wait_until
from tests.test_deploy_files import procfile
from tests.test_procfile_e2e import stack_env  # noqa: F401  (the fixture)

REPEATS = 10
IDLE_BOUND = 2.0  # seconds from SIGTERM to exit, idle
BUSY_MARGIN = 2.0  # seconds past the job in hand, busy
JOB_SECONDS = 1.0
# Between two busy workers' SIGTERMs: a few stop at a time, as the issue's "a busy one" asks,
# not ten at once on two cores (the Procfile set is the test of stopping together).
STAGGER = 0.4
GIVE_UP = 75.0  # past any bound: a worker stuck for RQ's 60 s still shows its real time


class Watched:
    """A process with a thread blocked in waitpid on it, so its exit time is taken the moment it
    happens, whatever the test is doing then."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          cwd=logs)
        self.signalled_at = math.nan
        self.exited_at = math.nan
        self._waiter = threading.Thread(target=self._wait, name=f"wait-{name}", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        self.popen.wait()
        self.exited_at = time.monotonic()

    @property
    def exited_after(self) -> float:
        """Seconds from the SIGTERM to the exit; inf if it has not exited."""
        return math.inf if math.isnan(self.exited_at) else self.exited_at - self.signalled_at

    def term(self) -> None:
        self.signalled_at = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the exit; then kill (its time stays inf)."""
        self._waiter.join(max(0.0, timeout))
        if self._waiter.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
            self._waiter.join()
            self.exited_at = math.nan

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def wait_for_exits(processes: list[Watched]) -> None:
    """Wait for each signalled process, killing any still running GIVE_UP s after its SIGTERM
    (a worker stuck for RQ's 60 s still shows its real time)."""
    for proc in processes:
        proc.wait(proc.signalled_at + GIVE_UP - time.monotonic())


def report(processes: list[Watched]) -> str:
    return ", ".join(f"{p.name}: {p.exited_after:.2f} s (exit {p.popen.returncode})"
                     for p in processes)


def summary(what: str, processes: list[Watched]) -> None:
    """One line with the times, shown by ``pytest -rP`` (or ``-s``)."""
    times = sorted(p.exited_after for p in processes)
    print(f"{what}: SIGTERM to exit, {len(times)} processes: min {times[0]:.2f} s, "
          f"median {times[len(times) // 2]:.2f} s, max {times[-1]:.2f} s")


@pytest.fixture
def started() -> Iterator[list[Watched]]:
    """Processes a test starts; stopped (by PID) if still running at its end."""
    out: list[Watched] = []
    yield out
    for proc in out:
        if proc.popen.poll() is None:
            proc.term()
    for proc in out:
        proc.wait(10)


def workers_on(redis_url: str, queue: str) -> int:
    with Redis.from_url(redis_url) as redis:
        return sum(queue in w.queue_names() for w in Worker.all(connection=redis))


@pytest.mark.timeout(300)  # a failing run waits up to GIVE_UP for a stuck worker
def test_an_idle_worker_stops_within_2_s_of_sigterm(
        stack_env: dict[str, str], started: list[Watched], tmp_path: Path) -> None:
    queue = Names(stack_env["INGEST_NAMESPACE"]).ingest_queue
    # Started together (one start-up cost), stopped one at a time while the others idle.
    for i in range(REPEATS):
        started.append(Watched(f"idle-{i}", ["ingest", "worker", "--queue", "ingest"],
                               stack_env, tmp_path))
    wait_until(lambda: workers_on(stack_env["REDIS_URL"], queue) == REPEATS, 90,
               f"{REPEATS} idle workers")
    for proc in started:
        proc.term()
        wait_for_exits([proc])
    summary("idle worker", started)
    assert all(p.popen.returncode == 0 for p in started), report(started) + started[0].tail()
    slow = [p for p in started if p.exited_after > IDLE_BOUND]
    assert not slow, f"over {IDLE_BOUND} s: {report(slow)}\n{slow[0].tail()}"


@pytest.mark.timeout(300)  # a failing run waits up to GIVE_UP for a stuck worker
def test_a_busy_worker_finishes_its_job_and_stops_within_2_s_after_it(
        stack_env: dict[str, str], started: list[Watched], tmp_path: Path) -> None:
    # One namespace each (hence one queue each), so each worker takes exactly its own job.
    queues: dict[str, Queue] = {}
    jobs: dict[str, Job] = {}
    signalled_wall: dict[str, float] = {}
    with Redis.from_url(stack_env["REDIS_URL"]) as redis:
        for i in range(REPEATS):
            namespace = f"{stack_env['INGEST_NAMESPACE']}b{i}"
            name = f"busy-{i}"
            queues[name] = Queue(Names(namespace).ingest_queue, connection=redis,
                                 serializer=FastJSONSerializer)
            started.append(Watched(name, ["ingest", "worker", "--queue", "ingest"],
                                   {**stack_env, "INGEST_NAMESPACE": namespace}, tmp_path))
        wait_until(lambda: all(workers_on(stack_env["REDIS_URL"], q.name) == 1
                               for q in queues.values()), 90, f"{REPEATS} idle workers")
        # One job each, SIGTERM as soon as it runs (it has nearly all of its JOB_SECONDS
        # left, and the worker must finish it first); the next one STAGGER seconds later.
        for proc in started:
            job = queues[proc.name].enqueue("time.sleep", JOB_SECONDS, job_timeout=60)
            jobs[proc.name] = job
            wait_until(lambda: job.get_status(refresh=True) == JobStatus.STARTED, 30,
                       f"{proc.name}'s job to start", interval=0.01)
            signalled_wall[proc.name] = time.time()
            proc.term()
            time.sleep(STAGGER)
        wait_for_exits(started)
        summary(f"busy worker ({JOB_SECONDS:g} s job)", started)
        for proc in started:
            job = jobs[proc.name]
            job.refresh()
            assert job.get_status() == JobStatus.FINISHED, f"{proc.name}: {proc.tail()}"
            assert job.ended_at is not None
            ended = job.ended_at.replace(tzinfo=timezone.utc) if job.ended_at.tzinfo is None \
                else job.ended_at
            assert ended >= datetime.fromtimestamp(signalled_wall[proc.name], timezone.utc), \
                f"{proc.name}: its job ended before the SIGTERM; the worker was not busy"
    assert all(p.popen.returncode == 0 for p in started), report(started) + started[0].tail()
    bound = JOB_SECONDS + BUSY_MARGIN
    slow = [p for p in started if p.exited_after > bound]
    assert not slow, f"over {bound} s: {report(slow)}\n{slow[0].tail()}"


class PortTaken(Exception):
    """Another process bound a port free_port() chose before ours did (other test runs share
    the machine): that round starts again on new ports."""


def start_procfile(label: str, stack_env: dict[str, str], logs: Path,
                   started: list[Watched]) -> tuple[list[Watched], list[str]]:
    """Every Procfile line as its own process, as a platform runs it; their readiness URLs."""
    stack: list[Watched] = []
    urls: list[str] = []
    for name, command in procfile().items():
        port = free_port()
        setting, path = {"web": ("PORT", "readyz"), "console": ("INGEST_CONSOLE_PORT", "healthz")
                         }.get(name, ("INGEST_METRICS_PORT", "metrics"))
        env = {**stack_env, setting: str(port)}
        stack.append(Watched(f"{name}-{label}", ["/bin/sh", "-c", f"exec {command}"], env, logs))
        urls.append(f"http://127.0.0.1:{port}/{path}")
    started.extend(stack)
    return stack, urls


@pytest.mark.timeout(300)  # ten rounds, and a failing one waits up to GIVE_UP
def test_the_procfile_set_stops_together_within_2_s_of_sigterm(
        stack_env: dict[str, str], started: list[Watched], tmp_path: Path) -> None:
    names = Names(stack_env["INGEST_NAMESPACE"])
    queues = [names.ingest_queue, *(names.sink_queue(n.removeprefix("sink-"))
                                    for n in procfile() if n.startswith("sink-"))]

    def ready(stack: list[Watched], urls: list[str]) -> bool:
        for proc in stack:
            if proc.popen.poll() is not None:
                if "already in use" in proc.tail():
                    raise PortTaken(proc.name)
                pytest.fail(f"{proc.name} exited: {proc.tail()}")
        try:
            if not all(httpx.get(url, timeout=2).status_code == 200 for url in urls):
                return False
        except httpx.HTTPError:
            return False
        with Redis.from_url(stack_env["REDIS_URL"]) as redis:
            serving = [q for w in Worker.all(connection=redis) for q in w.queue_names()]
        return all(serving.count(q) == 1 for q in queues)

    measured: list[Watched] = []
    times: list[str] = []
    for round_ in range(REPEATS):
        for attempt in range(3):
            stack, urls = start_procfile(f"{round_}.{attempt}", stack_env, tmp_path, started)
            try:
                wait_until(lambda: ready(stack, urls), 90, f"round {round_}: the Procfile ready")
                break
            except PortTaken:
                for proc in stack:
                    if proc.popen.poll() is None:
                        proc.term()
                for proc in stack:
                    proc.wait(30)
        else:
            pytest.fail(f"round {round_}: a port was taken by another process three times")
        for proc in stack:
            proc.term()
        wait_for_exits(stack)
        measured.extend(stack)
        times.append(report(stack))
        for proc in stack:
            assert proc.popen.returncode == 0, f"{proc.name}: {proc.tail()}"
            assert "Traceback" not in proc.log.read_text(errors="replace"), proc.tail()
        slow = [p for p in stack if p.exited_after > IDLE_BOUND]
        assert not slow, f"round {round_}, over {IDLE_BOUND} s: {report(slow)}\n" \
                         f"{slow[0].tail()}\nrounds before: {times[:-1]}"
    summary(f"Procfile set, {REPEATS} rounds", measured)
