"""A fault proxy between the acceptor and Redis drops the reply to an enqueue.

Redis has executed the write; the acceptor never hears so. Its Redis client retries on a new
connection, the unique-enqueue script finds the job already there, and that counts as success:
one job, answered 200 from Redis. When the retry's reply is lost too, the delivery goes to the
spool and is drained into a second job; the worker's dedup records still store it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ingest.acceptor.app import create_app
from ingest.config import Settings
from tests.faults.conftest import outcaller_delivery
from tests.helpers import drain, rows, serve, wait_until

pytestmark = pytest.mark.fault


class ReplyDropper:
    """An asyncio TCP proxy on 127.0.0.1. While ``armed`` > 0, it lets Redis execute the next
    job-saving script call (EVALSHA on an ``rq:job:`` key) and then closes the client's
    connection instead of relaying the reply."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.armed = 0
        self.dropped = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> ReplyDropper:
        self._thread.start()
        self._ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        drop_next = asyncio.Event()

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if self.armed > 0 and b"EVALSHA" in data.upper() and b"rq:job:" in data:
                    drop_next.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if drop_next.is_set() and not data.startswith(b"-NOSCRIPT"):
                    # Redis has executed the write: lose its answer and hang up.
                    self.armed -= 1
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.close()
                    return
                drop_next.clear()
                writer.write(data)
                await writer.drain()
            writer.close()

        tasks = [asyncio.ensure_future(client_to_server()),
                 asyncio.ensure_future(server_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()


@pytest.fixture
def dropper(redis_server: str) -> Iterator[ReplyDropper]:
    parts = urlsplit(redis_server)
    proxy = ReplyDropper(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    yield proxy
    proxy.stop()


def results(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for result, value in re.findall(
            r'ingest_deliveries_total\{provider="outcaller",result="(\w+)"\} (\S+)', text):
        out[result] = float(value)
    return out


def post(url: str, n: int) -> httpx.Response:
    provider, body, headers, _ = outcaller_delivery(n)
    return httpx.post(f"{url}/webhooks/{provider}", content=body, headers=headers, timeout=10)


def test_a_lost_enqueue_reply_never_doubles_the_job(
        make_env: Callable[..., dict[str, str]], database_url: str, runtime: Any,
        dropper: ReplyDropper, fault_logs: Any) -> None:
    settings = Settings.from_env(make_env(database_url,
                                          REDIS_URL=f"redis://127.0.0.1:{dropper.port}/0"))
    with serve(create_app(settings)) as acceptor:
        assert post(acceptor.url, 0).status_code == 200  # warm up: script loaded, pool open
        drain(runtime)
        before = results(acceptor.url)

        dropper.armed = 1
        answer = post(acceptor.url, 1)
        assert answer.status_code == 200 and dropper.dropped == 1
        after = results(acceptor.url)
        # Answered from Redis, not from the spool: the retry found the job already written.
        assert after.get("accepted", 0) - before.get("accepted", 0) == 1
        assert after.get("spooled", 0) == before.get("spooled", 0)
        assert runtime.ingest_queue.count == 1
        (job,) = runtime.ingest_queue.get_jobs()
        assert len(job.args[0]) == 1
        drain(runtime)
    stored = rows(database_url, "SELECT resource_id FROM webhook_events ORDER BY resource_id")
    assert [r["resource_id"] for r in stored] == ["lead_0", "lead_1"]


def test_when_every_reply_is_lost_the_spool_and_dedup_still_store_it_once(
        make_env: Callable[..., dict[str, str]], database_url: str, runtime: Any,
        dropper: ReplyDropper, fault_logs: Any) -> None:
    settings = Settings.from_env(make_env(database_url,
                                          REDIS_URL=f"redis://127.0.0.1:{dropper.port}/0"))
    with serve(create_app(settings)) as acceptor:
        assert post(acceptor.url, 0).status_code == 200
        drain(runtime)
        before = results(acceptor.url)

        dropper.armed = 2  # the first attempt and redis-py's one retry
        answer = post(acceptor.url, 1)
        assert answer.status_code == 200 and dropper.dropped == 2
        assert results(acceptor.url).get("spooled", 0) - before.get("spooled", 0) == 1
        # Redis did take it (twice, as one job), and the drainer adds the spooled copy.
        wait_until(lambda: httpx.get(f"{acceptor.url}/readyz").json()["spool_depth"] == 0,
                   15, "the spool to drain")
        assert runtime.ingest_queue.count == 2
        drain(runtime)
    stored = rows(database_url, "SELECT resource_id FROM webhook_events ORDER BY resource_id")
    assert [r["resource_id"] for r in stored] == ["lead_0", "lead_1"]
    archived = rows(database_url, "SELECT count(*) AS n FROM webhook_deliveries")[0]["n"]
    assert archived == 2
