"""Child processes of the bench, and where the CPU went while they ran.

Every server the bench measures runs in its own process, started here with a log file in the
bench's temporary directory, and is stopped by its own PID. :class:`CpuMeter` reads the CPU
time of each group of processes (and of the whole machine) at the start and end of a phase, so
the report can say how the two cores were shared, including by things outside the bench.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

__all__ = ["CpuMeter", "Proc", "wait_for_http"]


class Proc:
    """One child process; its output goes to ``log_path``."""

    def __init__(self, name: str, cmd: Sequence[str], env: Mapping[str, str],
                 log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.popen = subprocess.Popen(list(cmd), env=dict(env), stdout=self._log,
                                      stderr=subprocess.STDOUT, cwd=cwd)
        self.ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants (a worker forks RQ's scheduler)."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        """Resident memory of the process itself, in bytes (0 once it has gone)."""
        try:
            return int(self.ps.memory_info().rss)
        except psutil.NoSuchProcess:
            return 0

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def wait_for_http(port: int, proc: Proc, path: str = "/healthz", timeout: float = 30.0) -> None:
    """Return once ``GET path`` on 127.0.0.1:port answers 200."""
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(request)
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not answer on port {port} within {timeout} s")


def _cpu_seconds(processes: Sequence[psutil.Process]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in processes:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


class CpuMeter:
    """CPU time per named group of processes between :meth:`start` and :meth:`stop`.

    Groups are functions returning processes, re-evaluated at both ends (children come and go);
    a process seen only at the end counts from zero, one gone by the end counts what it had.
    """

    def __init__(self, groups: Mapping[str, Callable[[], Sequence[psutil.Process]]]) -> None:
        self.groups = dict(groups)
        self._start: dict[str, dict[int, float]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self._machine0 = psutil.cpu_times()
        self._t0 = time.monotonic()

    def start(self) -> CpuMeter:
        self._machine0 = psutil.cpu_times()
        self._t0 = time.monotonic()
        self._start = {name: _cpu_seconds(f()) for name, f in self.groups.items()}
        return self

    def sample(self) -> None:
        """Record the groups' CPU now (call before processes stop, to keep their totals)."""
        for name, f in self.groups.items():
            self._last.setdefault(name, {}).update(_cpu_seconds(f()))

    def stop(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        """Cores used on average per group, plus ``machine`` (all processes) and ``other``.

        ``extra``: CPU seconds of processes that reported their own (the load generator,
        which has exited and been reaped by the time its report is read).
        """
        self.sample()
        wall = max(1e-9, time.monotonic() - self._t0)
        m1 = psutil.cpu_times()
        busy = (sum(m1) - m1.idle - getattr(m1, "iowait", 0.0)) - (
            sum(self._machine0) - self._machine0.idle - getattr(self._machine0, "iowait", 0.0))
        out: dict[str, float] = {}
        for name in self.groups:
            start, last = self._start.get(name, {}), self._last.get(name, {})
            out[name] = sum(v - start.get(pid, 0.0) for pid, v in last.items()) / wall
        for name, seconds in (extra or {}).items():
            out[name] = seconds / wall
        ours = sum(v for v in out.values())
        out["machine"] = busy / wall
        out["other"] = max(0.0, out["machine"] - ours)
        out["wall"] = wall
        return out


def preemptions(processes: Sequence[psutil.Process]) -> int:
    """Involuntary context switches so far, summed: how often the kernel took a CPU away from
    these processes while they still had work (more processes than cores)."""
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.num_ctx_switches().involuntary
    return total


def pids_of(*procs: Proc | None) -> Callable[[], list[psutil.Process]]:
    def get() -> list[psutil.Process]:
        return [p for proc in procs if proc is not None for p in proc.tree()]

    return get


def by_pid(pids: Callable[[], Sequence[int]]) -> Callable[[], list[psutil.Process]]:
    def get() -> list[psutil.Process]:
        out = []
        for pid in pids():
            try:
                out.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return out

    return get


def this_process() -> list[psutil.Process]:
    return [psutil.Process(os.getpid())]
