"""Managed Redis as its services offer it: TLS with a private CA (``rediss://...?ssl_ca_certs=``)
and an ACL user (``rediss://user:password@host/db``) limited to what webhook-ingest needs.

A real redis-server with TLS on a random port and a self-signed certificate made by
``openssl`` for 127.0.0.1; the acceptor takes a delivery into Redis (not the spool) and a real
worker stores it in Postgres, both over TLS as the ACL user.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from ingest.acceptor.app import create_app
from ingest.commands.embedded import free_port
from ingest.config import Settings
from ingest.startup import wait_for_redis
from tests.faults.conftest import outcaller_delivery
from ingest.rq_jobs import FastJSONSerializer
from rq import SimpleWorker
from tests.helpers import rows, serve
from workers.runtime import Runtime, install_runtime

# The ACL docs/operations.md recommends ("Redis in production"): every key and channel,
# every command but the dangerous ones, and INFO (the acceptor reads the server's version
# once, as RQ records it on every job).
ACL_RULES = ["on", "~*", "&*", "+@all", "-@dangerous", "+info"]
USER, PASSWORD = "ingest", "acl-pass-5d1e9b7c"


class _Worker(SimpleWorker):
    """A burst worker without RQ's command channel: stopping RQ's pubsub thread can wait out
    its 60 s poll (redis-py 8 joins it with no timeout), which this test is not about."""

    def subscribe(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass


def _tls_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("needs the system's redis-server and openssl (Debian: redis-server, openssl)")
    probe = subprocess.run([binary, "--tls-port", "0", "--port", "0", "--test-memory", "0"],
                           capture_output=True, text=True, timeout=10)
    if "TLS" in probe.stderr and "not supported" in probe.stderr.lower():
        pytest.skip("this redis-server was built without TLS")
    return binary


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS, on 127.0.0.1; yields (port, CA file)."""
    binary = _tls_server_binary()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                             "--logfile", str(tmp_path / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert), socket_timeout=2)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except RedisError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"TLS redis-server did not start ({tmp_path}/redis.log)")
                time.sleep(0.05)
        admin.execute_command("ACL", "SETUSER", USER, *ACL_RULES, f">{PASSWORD}")
        yield port, cert
    finally:
        admin.close()
        proc.kill()
        proc.wait(timeout=10)


def test_tls_with_a_private_ca_and_an_acl_user_carry_the_whole_pipeline(
        tls_redis: tuple[int, Path], make_env: Callable[..., dict[str, str]],
        database_url: str) -> None:
    port, ca = tls_redis
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    settings = Settings.from_env(make_env(database_url, REDIS_URL=url))
    wait_for_redis(url, 5)  # what `ingest worker` and `ingest migrate` do first
    provider, body, headers, resource_id = outcaller_delivery(7)
    with serve(create_app(settings)) as acceptor:
        response = httpx.post(f"{acceptor.url}/webhooks/{provider}", content=body,
                              headers=headers, timeout=5)
        assert response.status_code == 200
        ready = httpx.get(f"{acceptor.url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["spool_depth"] == 0  # in Redis
    rt = Runtime(settings)
    previous = install_runtime(rt)
    try:
        for name in rt.queue_names():  # pipeline order: ingest jobs make the sink jobs
            _Worker([rt.queue(name)], connection=rt.redis, serializer=FastJSONSerializer,
                    log_job_description=False).work(burst=True, logging_level="WARNING")
    finally:
        install_runtime(previous)
        rt.close()
    stored = rows(database_url, "SELECT resource_id FROM webhook_events")
    assert [r["resource_id"] for r in stored] == [resource_id]


def test_a_wrong_ca_is_refused_not_trusted(tls_redis: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = tls_redis
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(other / "k.pem"), "-out", str(other / "c.pem"),
                    "-subj", "/CN=127.0.0.1"], check=True, capture_output=True, timeout=60)
    from ingest.startup import redis_problem

    problem = redis_problem(f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
                            f"?ssl_ca_certs={other / 'c.pem'}")
    assert problem is not None and "certificate" in problem.lower()
    assert PASSWORD not in problem
