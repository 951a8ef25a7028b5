"""The fault-test harness: an isolated stack, continuous traffic, and the invariant check.

Each fault test that stops or kills a server gets its own: an embedded Redis with the
append-only file on (as docker-compose runs it) on a random port, and where Postgres is the
victim, its own pgserver Postgres. Workers are real ``ingest worker`` processes; the acceptor
is the real app under uvicorn. Everything listens on 127.0.0.1 (Postgres on a Unix socket).

The invariant every test ends with (:meth:`Stack.assert_invariants`): every delivery answered
200 appears exactly once in ``webhook_events``; the raw archive holds exactly one delivery per
event (a duplicate that lost the race is never archived: the sink's effect happened once); no
job is left failed, queued or running. And, for the whole run (an autouse fixture), no
configured secret and no credential a caller presented appears in any log line of the acceptor
or the workers, nor in a stored header.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from ingest.config import Settings
from ingest.constants import Names
from ingest.commands.embedded import EmbeddedRedis
from ingest.redis_conn import redis_client
from tests.helpers import SECRETS, rows, wait_for_queue_workers, wait_until

ROOT = Path(__file__).resolve().parents[2]
# Credentials an attacker presents: wrong, so never configured, so never redacted by the
# logging filter either. They must still never reach a log line.
PRESENTED_BAD_TOKENS = ("presented-bad-token-7f3a9c1e", "presented-bad-hmac-key-52b8d0aa")


# -- deliveries -------------------------------------------------------------------------------


def outcaller_delivery(n: int) -> tuple[str, bytes, dict[str, str], str]:
    """(provider, body, headers, resource_id) of a new OutCallerAI lead."""
    body = orjson.dumps({
        "event": "lead.created", "resource": "lead", "action": "created", "workspaceId": "ws",
        "timestamp": (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=n)).isoformat(),
        "data": {"id": f"lead_{n}", "email": f"p{n}@example.com"},
    })
    return "outcaller", body, {"Authorization": f"Bearer {SECRETS['outcaller'][0]}",
                               "Content-Type": "application/json"}, f"lead_{n}"


def outreach_delivery(n: int) -> tuple[str, bytes, dict[str, str], str]:
    """(provider, body, headers, resource_id) of a new Outreach prospect update, signed."""
    updated = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=n)
    body = orjson.dumps({
        "data": {"type": "prospect", "id": n,
                 "attributes": {"updatedAt": updated.isoformat().replace("+00:00", "Z"),
                                "emails": [f"o{n}@example.com"]}},
        "meta": {"eventName": "prospect.updated",
                 "deliveredAt": datetime.now(timezone.utc).isoformat()},
    })
    signature = hmac.new(SECRETS["outreach"][1].encode(), body, hashlib.sha256).hexdigest()
    return "outreach", body, {"Outreach-Webhook-Signature": signature,
                              "Content-Type": "application/json"}, str(n)


def delivery(n: int) -> tuple[str, bytes, dict[str, str], str]:
    return outreach_delivery(n) if n % 2 else outcaller_delivery(n)


class Traffic(threading.Thread):
    """Continuous deliveries, as providers send them, until stopped.

    Every 5th delivery is sent twice (providers redeliver). A delivery that gets no answer
    (connection dropped, timeout) is sent again, as Outreach does; one answered 200 is recorded
    in ``accepted`` as (provider, resource_id). Every 25th request presents a wrong credential,
    to prove those never reach the logs either.
    """

    def __init__(self, base_url: str, start: int = 0, concurrency: int = 3) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.next = start
        self.concurrency = concurrency
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.accepted: set[tuple[str, str]] = set()
        self.sent: set[tuple[str, str]] = set()
        self.statuses: dict[Any, int] = {}
        # (time.monotonic(), status or error name) of every answer that was not 200.
        self.failures: list[tuple[float, Any]] = []
        self.unanswered = 0

    def _take(self) -> int:
        with self.lock:
            n, self.next = self.next, self.next + 1
            return n

    def _count(self, key: Any) -> None:
        with self.lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if key != 200:
                self.failures.append((time.monotonic(), key))

    def _send_one(self, client: httpx.Client) -> None:
        n = self._take()
        provider, body, headers, resource_id = delivery(n)
        if n % 25 == 0:
            bad = dict(headers, Authorization=f"Bearer {PRESENTED_BAD_TOKENS[0]}")
            if provider == "outreach":
                bad["Outreach-Webhook-Signature"] = hmac.new(
                    PRESENTED_BAD_TOKENS[1].encode(), body, hashlib.sha256).hexdigest()
            self._post(client, provider, body, bad, params={"token": PRESENTED_BAD_TOKENS[0]})
        with self.lock:
            self.sent.add((provider, resource_id))
        copies = 2 if n % 5 == 0 else 1
        for _ in range(copies):
            for _attempt in range(20):
                status = self._post(client, provider, body, headers)
                if status is not None:
                    break
                if self.stop_event.is_set():
                    return
                time.sleep(0.2)
            if status == 200:
                with self.lock:
                    self.accepted.add((provider, resource_id))

    def _post(self, client: httpx.Client, provider: str, body: bytes, headers: dict[str, str],
              params: dict[str, str] | None = None) -> int | None:
        try:
            response = client.post(f"{self.base_url}/webhooks/{provider}", content=body,
                                   headers=headers, params=params)
        except httpx.HTTPError as exc:
            self._count(type(exc).__name__)
            with self.lock:
                self.unanswered += 1
            return None
        self._count(response.status_code)
        return response.status_code

    def _lane(self) -> None:
        # Outreach's own deadline is 5 s: a slower answer counts as no answer.
        with httpx.Client(timeout=5.0) as client:
            while not self.stop_event.is_set():
                self._send_one(client)

    def run(self) -> None:
        lanes = [threading.Thread(target=self._lane, daemon=True) for _ in range(self.concurrency)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive(), "traffic did not stop"

    def wait_for_accepted(self, count: int, timeout: float = 30.0) -> None:
        wait_until(lambda: len(self.accepted) >= count, timeout, f"{count} accepted deliveries")

    @contextlib.contextmanager
    def flowing(self, accepted: int = 20) -> Iterator[Traffic]:
        """Start sending; enter once ``accepted`` deliveries were answered 200; stop sending
        when the block ends, however it ends."""
        self.start()
        try:
            self.wait_for_accepted(accepted)
            yield self
        finally:
            self.stop()


# -- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    """One isolated deployment: Redis, Postgres database, env, workers, logs."""

    env: dict[str, str]
    database_url: str
    logs: Path
    redis_server: EmbeddedRedis | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def names(self) -> Names:
        return Names(self.env["INGEST_NAMESPACE"])

    def redis(self) -> Redis:
        return redis_client(self.env["REDIS_URL"], socket_timeout=5)

    def queue_names(self) -> list[str]:
        return [self.names.ingest_queue, self.names.sink_queue("postgres")]

    def start_workers(self, *queues: str) -> subprocess.Popen[bytes]:
        """``ingest worker`` (the supervisor, one child per queue) or one ``--queue`` worker."""
        args = [sys.executable, "-m", "ingest.commands.cli", "worker"]
        for q in queues:
            args += ["--queue", q]
        log = open(self.logs / f"worker-{len(self.processes)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        log.close()
        self.processes.append(proc)
        return proc

    def children(self, proc: subprocess.Popen[bytes]) -> dict[str, psutil.Process]:
        """The supervisor's live worker children, by the queue each serves."""
        out: dict[str, psutil.Process] = {}
        for child in psutil.Process(proc.pid).children():
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "--queue" in cmd:
                out[cmd[cmd.index("--queue") + 1]] = child
        return out

    def wait_for_workers(self, timeout: float = 30.0) -> None:
        """Until every queue has a live worker registered in Redis."""
        wait_for_queue_workers(self.settings.require_redis(), self.queue_names(), timeout)

    def stop_processes(self) -> None:
        for proc in self.processes:
            try:
                tree = [proc_ for proc_ in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                tree = []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for child in tree:  # ours: descendants of a process this test started
                try:
                    child.wait(timeout=5)
                except psutil.TimeoutExpired:
                    child.kill()
                except psutil.Error:
                    pass

    # -- the invariant --------------------------------------------------------------------

    def settled(self) -> bool:
        """True when no job is queued, scheduled for retry or running, on any queue."""
        redis = self.redis()
        try:
            for name in self.queue_names():
                queue = Queue(name, connection=redis, serializer=JSONSerializer)
                # (A job popped but not started when Redis went away waits in the
                # intermediate queue until the watchdog puts it back.)
                if queue.count or queue.scheduled_job_registry.count or \
                        StartedJobRegistry(name, connection=redis).count or \
                        queue.intermediate_queue.get_job_ids():
                    return False
            return True
        except Exception:
            return False
        finally:
            redis.close()

    def stored(self) -> dict[tuple[str, str], int]:
        found = rows(self.database_url, "SELECT provider, resource_id, count(*) AS n FROM "
                                        "webhook_events GROUP BY provider, resource_id")
        return {(r["provider"], r["resource_id"]): r["n"] for r in found}

    def wait_for_pipeline(self, traffic: Traffic, timeout: float = 60.0) -> None:
        wait_until(lambda: traffic.accepted <= set(self.stored()) and self.settled(),
                   timeout, "every accepted delivery in webhook_events and all queues idle",
                   interval=0.25)

    def assert_invariants(self, traffic: Traffic) -> None:
        stored = self.stored()
        assert traffic.accepted, "the test sent nothing that was accepted"
        missing = traffic.accepted - set(stored)
        assert not missing, \
            f"{len(missing)} deliveries answered 200 are not stored: {sorted(missing)[:5]}"
        doubled = {k: n for k, n in stored.items() if n != 1}
        assert not doubled, f"stored more than once: {doubled}"
        unknown = set(stored) - traffic.sent
        assert not unknown, f"rows nobody sent: {sorted(unknown)[:5]}"
        events = rows(self.database_url, "SELECT count(*) AS n, count(DISTINCT delivery_id) AS d, "
                                         "count(*) FILTER (WHERE delivery_id NOT IN "
                                         "(SELECT id FROM webhook_deliveries)) AS orphans "
                                         "FROM webhook_events")[0]
        archived = rows(self.database_url, "SELECT count(*) AS n FROM webhook_deliveries")[0]["n"]
        assert events["orphans"] == 0, "an event whose raw delivery was not archived"
        assert events["d"] == events["n"] == archived, (
            f"{events['n']} events, {events['d']} delivery ids, {archived} archived deliveries: "
            "the postgres sink's effect happened more than once for some event")
        # No credential in a stored header (the archive keeps only the headers a worker needs).
        headers = " ".join(str(r["headers"]) for r in rows(
            self.database_url, "SELECT headers FROM webhook_deliveries"))
        for secret in [s for pair in SECRETS.values() for s in pair] + list(PRESENTED_BAD_TOKENS):
            assert secret not in headers, "a credential was stored with a delivery"
        assert "authorization" not in headers.lower()
        redis = self.redis()
        try:
            for name in self.queue_names():
                failed = FailedJobRegistry(name, connection=redis, serializer=JSONSerializer)
                assert failed.count == 0, f"failed jobs on {name}: {failed.get_job_ids()}"
        finally:
            redis.close()


@pytest.fixture
def fault_logs(tmp_path: Path) -> Iterator[Path]:
    """Every log line of the test: in-process (acceptor) records, and the worker processes'
    output. At teardown, none may contain a configured secret or a presented credential."""
    logs = tmp_path / "logs"
    logs.mkdir()
    records: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name.startswith(("httpx", "httpcore")):
                return  # the test's own HTTP client, not the service
            line = formatter.format(record)
            if record.exc_info:
                line += "\n" + formatter.formatException(record.exc_info)
            records.append(line)

    root = logging.getLogger()
    handler = Keep(level=logging.DEBUG)
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield logs
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    text = "\n".join(records)
    for path in logs.iterdir():
        text += "\n" + path.read_text(errors="replace")
    (logs / "in-process.log").write_text("\n".join(records))
    needles = [s for pair in SECRETS.values() for s in pair] + list(PRESENTED_BAD_TOKENS)
    leaked = [n for n in needles if n in text]
    assert not leaked, f"credentials in logs: {leaked} (see {logs})"
    assert text.strip(), "no log output was captured at all"


def make_stack_env(make_env: Callable[..., dict[str, str]], redis_url: str, database_url: str,
                   tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(make_env(database_url, REDIS_URL=redis_url,
                        INGEST_NAMESPACE="f" + uuid.uuid4().hex[:10],
                        INGEST_SPOOL_DIR=str(tmp_path / "spool"),
                        INGEST_ABANDONED_AFTER="3",
                        INGEST_LOG_FORMAT="json",
                        PYTHONUNBUFFERED="1"))
    return env


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, append-only file on, that the test may stop and kill."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def stack(make_env: Callable[..., dict[str, str]], own_redis: EmbeddedRedis, database_url: str,
          tmp_path: Path, fault_logs: Path) -> Iterator[Stack]:
    s = Stack(env=make_stack_env(make_env, own_redis.url, database_url, tmp_path),
              database_url=database_url, logs=fault_logs, redis_server=own_redis)
    try:
        yield s
    finally:
        s.stop_processes()
