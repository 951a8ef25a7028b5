"""The Procfile, run as a platform runs it, driven by `ingest send` for every provider.

Each Procfile line becomes its own process (``sh -c "exec <line>"`` with ``$PORT`` set, as
honcho or a Procfile platform does), configured only through the environment. Sample traffic
comes from real ``ingest send`` processes, with duplicates, plus one delivery no normalizer can
read. Then: the rows in Postgres, the counters on the acceptor's and the workers' /metrics,
and every line the processes wrote to stderr (one JSON object each; every line about a
delivery names it and its provider; no secret anywhere).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.registry import FailedJobRegistry

from ingest.constants import Names
from ingest.commands.embedded import free_port
from ingest.providers import load_providers
from ingest.commands.samples import sample_sources
from tests.helpers import SECRETS, rows, wait_for_queue_workers, wait_until
from tests.test_deploy_files import procfile

BIN = Path(sys.executable).parent
COUNT = 16  # deliveries per provider, duplicates included


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@dataclass
class Process:
    name: str
    command: str
    popen: subprocess.Popen[bytes]
    stderr: Path
    port: int  # $PORT of the acceptor, INGEST_METRICS_PORT of a worker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.read_text().splitlines() if ln.strip()]


@pytest.fixture
def stack_env(redis_server: str, database_url: str, namespace: str,
              tmp_path: Path) -> dict[str, str]:
    """What an operator sets on the platform: connections and secrets, nothing else."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "REDIS_URL": redis_server,
        "DATABASE_URL": database_url,
        "INGEST_NAMESPACE": namespace,
        "INGEST_SINKS": "postgres",
        "INGEST_SPOOL_DIR": str(tmp_path / "spool"),
        # Listen on loopback only (the defaults, 0.0.0.0, are for containers).
        "INGEST_HOST": "127.0.0.1",
        "INGEST_METRICS_HOST": "127.0.0.1",
        # One line per delivery processed, so every delivery can be traced in the logs.
        "INGEST_LOG_LEVEL": "debug",
        "PYTHONUNBUFFERED": "1",
    }
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    for name, provider in load_providers().items():
        if name in SECRETS:
            env[provider.secret_setting] = ",".join(SECRETS[name])
    return env


@pytest.fixture
def procfile_stack(stack_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, Process]]:
    """Every Procfile line as its own process; stopped with SIGTERM by PID afterwards."""
    started: dict[str, Process] = {}
    try:
        for name, command in procfile().items():
            env = dict(stack_env)
            port = free_port()
            env[{"web": "PORT", "console": "INGEST_CONSOLE_PORT"}.get(
                name, "INGEST_METRICS_PORT")] = str(port)
            err = tmp_path / f"{name}.stderr"
            with open(tmp_path / f"{name}.stdout", "wb") as out, open(err, "wb") as errf:
                popen = subprocess.Popen(["/bin/sh", "-c", f"exec {command}"], env=env,
                                         stdout=out, stderr=errf, cwd=tmp_path)
            started[name] = Process(name, command, popen, err, port)
        yield started
    finally:
        stop(started.values())


def stop(processes: Any) -> None:
    for proc in processes:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()


def wait_ready(stack: dict[str, Process], env: dict[str, str]) -> None:
    def up(proc: Process) -> bool:
        assert proc.popen.poll() is None, f"{proc.name} exited: {proc.stderr.read_text()[-3000:]}"
        try:
            path = {"web": "/readyz", "console": "/healthz"}.get(proc.name, "/metrics")
            return httpx.get(proc.url + path, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    for proc in stack.values():
        wait_until(lambda: up(proc), 60, f"{proc.name} to answer")
    names = Names(env["INGEST_NAMESPACE"])
    wait_for_queue_workers(env["REDIS_URL"], [names.ingest_queue, names.sink_queue("postgres")])


def worker_for(stack: dict[str, Process], queue: str) -> Process:
    return next(p for p in stack.values()
                if shlex.split(p.command)[1:] == ["worker", "--queue", queue])


@pytest.mark.timeout(300)
def test_procfile_processes_carry_sample_traffic_to_postgres_with_metrics_and_json_logs(
        procfile_stack: dict[str, Process], stack_env: dict[str, str], database_url: str,
        tmp_path: Path) -> None:
    stack = procfile_stack
    assert {"web", "worker"} <= stack.keys()
    wait_ready(stack, stack_env)
    acceptor = stack["web"]
    providers = sorted(p for p in sample_sources() if p in SECRETS)
    assert {"outreach", "outcaller"} <= set(providers)

    # -- traffic: one `ingest send` per provider, all at once, with duplicates ------------------
    senders = {
        p: subprocess.Popen(
            ["ingest", "send", p, "--url", acceptor.url, "--count", str(COUNT),
             "--concurrency", "4", "--duplicates", "0.25", "--seed", str(i)],
            env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        for i, p in enumerate(providers)
    }
    duplicates: dict[str, int] = {}
    send_output = ""
    for provider, sender in senders.items():
        out, err = sender.communicate(timeout=120)
        send_output += out + err
        assert sender.returncode == 0, f"ingest send {provider}: {err[-2000:]}"
        match = re.search(r"(\d+) of them duplicates", err)
        assert match, f"ingest send {provider} printed no summary: {err[-2000:]}"
        duplicates[provider] = int(match.group(1))
        assert "p50" in err and "p99" in err and "accepted" in err
    assert sum(duplicates.values()) > 0, "the seeds chosen must produce some duplicates"

    # A signed delivery no normalizer can read: it must fail alone, traceably.
    poison = orjson.dumps({"meta": {"eventName": "prospect.updated"}, "data": {}})
    signature = hmac.new(SECRETS["outreach"][0].encode(), poison, hashlib.sha256).hexdigest()
    answer = httpx.post(f"{acceptor.url}/webhooks/outreach", content=poison, timeout=10,
                        headers={"Outreach-Webhook-Signature": signature,
                                 "Content-Type": "application/json"})
    assert answer.status_code == 200

    # -- rows: one archived delivery per distinct delivery sent --------------------------------
    def archived() -> dict[str, int]:
        return {r["provider"]: r["n"] for r in rows(
            database_url, "SELECT provider, count(*) AS n FROM webhook_deliveries GROUP BY 1")}

    expected = {p: COUNT - duplicates[p] for p in providers}
    wait_until(lambda: archived() == expected, 120, f"archived deliveries {expected}")
    events = {r["provider"]: r["n"] for r in rows(
        database_url, "SELECT provider, count(*) AS n FROM webhook_events GROUP BY 1")}
    for provider in providers:
        assert events[provider] >= expected[provider], provider
    orphans = rows(database_url, "SELECT count(*) AS n FROM webhook_events e LEFT JOIN "
                                 "webhook_deliveries d ON d.id = e.delivery_id WHERE d.id IS NULL")
    assert orphans[0]["n"] == 0

    names = Names(stack_env["INGEST_NAMESPACE"])
    redis = Redis.from_url(stack_env["REDIS_URL"])
    try:
        failed = FailedJobRegistry(names.ingest_queue, connection=redis)
        wait_until(lambda: failed.count == 1, 60, "the poison delivery in the failed registry")
    finally:
        redis.close()

    # -- metrics: acceptor, ingest worker, sink worker -----------------------------------------
    text = acceptor.metrics()
    for provider in providers:
        sent = COUNT + (1 if provider == "outreach" else 0)
        assert metric(text, "ingest_deliveries_total", provider=provider,
                      result="accepted") == sent, provider
    ingest_worker = worker_for(stack, "ingest")
    sink_worker = worker_for(stack, "sink-postgres")
    total_events = sum(events.values())

    def worker_counters_settled() -> bool:
        return metric(sink_worker.metrics(), "ingest_sink_events_total", sink="postgres",
                      outcome="delivered") == total_events

    wait_until(worker_counters_settled, 60, "the sink worker's counters")
    text = ingest_worker.metrics()
    for provider in providers:
        assert metric(text, "ingest_events_total", provider=provider) == events[provider]
        assert metric(text, "ingest_duplicates_total", provider=provider) >= duplicates[provider]
    assert metric(text, "ingest_poison_deliveries_total", provider="outreach") == 1
    sink_text = sink_worker.metrics()
    assert metric(sink_text, "ingest_lag_seconds_count", sink="postgres") == total_events
    assert metric(sink_text, "ingest_sink_seconds_count", sink="postgres") > 0

    # -- stop as the platform does: SIGTERM, and each process ends cleanly ----------------------
    stop(stack.values())
    for proc in stack.values():
        assert proc.popen.returncode == 0, f"{proc.name}: {proc.stderr.read_text()[-3000:]}"
    assert "Application shutdown complete" in acceptor.stderr.read_text()

    # -- logs: JSON lines; deliveries traceable by id and provider; no secrets ------------------
    secrets = [s for pair in SECRETS.values() for s in pair]
    traced: dict[str, str] = {}
    poison_lines = []
    for proc in stack.values():
        for line in proc.lines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                pytest.fail(f"{proc.name} wrote a line that is not JSON: {line[:300]}")
            assert isinstance(record, dict) and {"ts", "level", "logger", "message"} <= \
                record.keys(), f"{proc.name}: {line[:300]}"
            if "delivery_id" in record:
                assert record.get("provider"), f"{proc.name}: delivery without provider: {line}"
                traced[record["delivery_id"]] = record["provider"]
                if record["level"] == "error" and "cannot be processed" in record["message"]:
                    poison_lines.append(record)
        output = proc.stderr.read_text() + (tmp_path / f"{proc.name}.stdout").read_text()
        for secret in secrets:
            assert secret not in output, f"{proc.name} logged a secret"
    for secret in secrets:
        assert secret not in send_output
    archived_ids = rows(database_url, "SELECT id::text AS id, provider FROM webhook_deliveries")
    for row in archived_ids:
        assert traced.get(row["id"]) == row["provider"], f"delivery {row['id']} is in no log line"
    assert [r["provider"] for r in poison_lines] == ["outreach"]
