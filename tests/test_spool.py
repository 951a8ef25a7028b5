"""The spool: fsynced journal, crash safety, torn and damaged records, draining into real Redis."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from ingest.acceptor.app import create_app
from ingest.config import Settings
from ingest.constants import Names
from ingest.acceptor.durable import Durable
from ingest.commands.embedded import EmbeddedRedis, free_port
from ingest.acceptor.enqueue import BatchEnqueuer
from ingest.redis_conn import acceptor_async_redis, acceptor_redis
from ingest.acceptor.spool import (
    Spool,
    encode_record,
    read_segment,
    remove_stale_rewrites,
    rewrite_segment,
    segment_files,
)
from tests.helpers import SECRETS, serve


def envelope(n: int = 0) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "provider": "outcaller",
            "received_at": datetime.now(timezone.utc).isoformat(), "headers": {},
            "body": orjson.dumps({"event": "lead.created", "n": n}).decode()}


def append_all(spool: Spool, envelopes: list[dict[str, Any]]) -> None:
    async def run() -> None:
        await spool.start()
        await asyncio.gather(*(spool.append(e) for e in envelopes))
        await spool.stop()

    asyncio.run(run())


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.log"))


@pytest.fixture
def queue(redis_server: str, namespace: str) -> Iterator[Queue]:
    redis = Redis.from_url(redis_server)
    yield Queue(Names(namespace).ingest_queue, connection=redis, serializer=JSONSerializer)
    redis.close()


def queued_envelopes(queue: Queue) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job in queue.get_jobs():
        out.extend(job.args[0])
    return out


def test_concurrent_appends_share_one_fsync_and_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    sent = [envelope(i) for i in range(50)]
    append_all(spool, sent)
    assert spool.fsyncs == 1  # 50 requests arriving together cost one fsync
    again = Spool(tmp_path)  # a new process over the same directory
    assert again.adopt_orphans() == 1
    assert again.depth() == 50
    (segment,) = segments(tmp_path)
    assert read_segment(segment.read_bytes()).records == sent


def test_drain_moves_everything_into_redis_once_and_removes_the_segment(
        tmp_path: Path, queue: Queue, namespace: str) -> None:
    sent = [envelope(i) for i in range(600)]
    spool = Spool(tmp_path)
    append_all(spool, sent)
    assert spool.drain(queue, Names(namespace), max_batch=256) == 600
    assert [e["id"] for e in queued_envelopes(queue)] == [e["id"] for e in sent]
    assert queue.count == 3  # 256 + 256 + 88
    assert segments(tmp_path) == [] and spool.depth() == 0


def test_a_crash_between_enqueue_and_delete_does_not_double_any_job(
        tmp_path: Path, queue: Queue, namespace: str) -> None:
    spool = Spool(tmp_path)
    append_all(spool, [envelope(i) for i in range(300)])
    (segment,) = segments(tmp_path)
    kept = segment.read_bytes()
    spool.drain(queue, Names(namespace))
    jobs_before = sorted(queue.get_job_ids())
    segment.write_bytes(kept)  # as if the process died after enqueueing, before the unlink
    again = Spool(tmp_path)
    assert again.drain(queue, Names(namespace)) == 300
    assert sorted(queue.get_job_ids()) == jobs_before
    assert len(queued_envelopes(queue)) == 300


def test_a_torn_last_record_is_never_replayed(tmp_path: Path, queue: Queue,
                                              namespace: str) -> None:
    good = [envelope(i) for i in range(3)]
    torn = encode_record(envelope(99))
    path = tmp_path / "seg-00000000000000000001-dead-0000.log"
    path.write_bytes(b"".join(encode_record(e) for e in good) + torn[: len(torn) // 2])
    contents = read_segment(path.read_bytes())
    assert contents.records == good and contents.torn_tail and not contents.corrupt
    spool = Spool(tmp_path)
    assert spool.drain(queue, Names(namespace)) == 3
    assert queued_envelopes(queue) == good
    assert not path.exists()


def test_a_damaged_record_in_the_middle_keeps_the_file_for_inspection(
        tmp_path: Path, queue: Queue, namespace: str) -> None:
    first, second, third = (encode_record(envelope(i)) for i in range(3))
    damaged = bytearray(second)
    damaged[-2] ^= 0xFF  # one flipped bit in the payload: the CRC no longer matches
    path = tmp_path / "seg-00000000000000000001-dead-0000.log"
    path.write_bytes(first + bytes(damaged) + third)
    spool = Spool(tmp_path)
    assert spool.drain(queue, Names(namespace)) == 1
    assert [e["body"] for e in queued_envelopes(queue)] == [orjson.loads(first[12:])["body"]]
    assert not path.exists() and path.with_suffix(".corrupt").exists()


def test_segments_of_a_live_process_are_left_alone(tmp_path: Path, queue: Queue,
                                                   namespace: str) -> None:
    """Two acceptors on one directory: one never drains the segment the other is writing."""
    writer = Spool(tmp_path)

    async def run() -> None:
        await writer.append(envelope())  # the segment stays open and locked: writer is "live"
        other = Spool(tmp_path)
        assert other.drain(queue, Names(namespace)) == 0
        assert writer.depth() == 1
        await writer.stop()
        assert other.drain(queue, Names(namespace)) == 1

    asyncio.run(run())


def test_deliveries_spooled_by_a_process_killed_with_sigkill_are_drained(
        tmp_path: Path, queue: Queue, namespace: str) -> None:
    script = (
        "import asyncio, os, signal, sys\n"
        "from ingest.acceptor.spool import Spool\n"
        "async def main():\n"
        "    s = Spool(sys.argv[1])\n"
        "    await asyncio.gather(*(s.append({'id': str(i), 'provider': 'outcaller',\n"
        "        'received_at': '2026-01-01T00:00:00Z', 'headers': {}, 'body': '{}'})\n"
        "        for i in range(20)))\n"
        "    print('acknowledged', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "acknowledged" in proc.stdout
    spool = Spool(tmp_path)
    assert spool.drain(queue, Names(namespace)) == 20
    assert sorted(int(e["id"]) for e in queued_envelopes(queue)) == list(range(20))


def test_an_unusable_spool_directory_refuses_instead_of_pretending(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = Spool(blocker / "spool")  # mkdir fails here, even for root

    async def run() -> None:
        await spool.start()
        with pytest.raises(OSError):
            await spool.append(envelope())
        await spool.stop()

    asyncio.run(run())
    assert spool.depth() == 0


def test_durable_spools_while_redis_is_down_then_drains_when_it_returns(
        tmp_path: Path, namespace: str) -> None:
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = acceptor_redis(redis_url)
    names = Names(namespace)
    durable = Durable(redis, BatchEnqueuer(redis, acceptor_async_redis(redis_url), names),
                      Spool(tmp_path / "spool"),
                      drain_interval=0.05)
    server = EmbeddedRedis(tmp_path / "redis", port=port)

    async def run() -> list[str]:
        await durable.start()
        try:
            results = [await durable.store(envelope(i)) for i in range(5)]
            assert durable.spool_depth() == 5 and durable.redis_failing
            await asyncio.get_running_loop().run_in_executor(None, server.start)
            for _ in range(200):  # bounded: 10 s
                if durable.spool_depth() == 0 and not durable.redis_failing:
                    break
                await asyncio.sleep(0.05)
            results.append(await durable.store(envelope(5)))
            return results
        finally:
            await durable.stop()

    try:
        results = asyncio.run(run())
        assert results == ["spooled"] * 5 + ["accepted"]
        queue = Queue(names.ingest_queue, connection=Redis.from_url(server.url),
                      serializer=JSONSerializer)
        assert len(queued_envelopes(queue)) == 6
        assert segments(tmp_path / "spool") == []
    finally:
        server.stop()
        redis.close()


def test_outreach_sees_a_dropped_connection_and_others_503_when_nothing_is_durable(
        make_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    from tests.test_acceptor import outreach_headers

    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = Settings.from_env(make_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                                          INGEST_SPOOL_DIR=str(blocker / "spool")))
    body = b'{"data": {"type": "prospect", "id": 1, "attributes": {}}, "meta": {"eventName": "x"}}'
    with serve(create_app(settings)) as server:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            httpx.post(f"{server.url}/webhooks/outreach", content=body,
                       headers=outreach_headers(body), timeout=10)
        answer = httpx.post(f"{server.url}/webhooks/outcaller", content=b'{"event": "x"}',
                            headers={"Authorization": f"Bearer {SECRETS['outcaller'][0]}"},
                            timeout=10)
    assert answer.status_code == 503


def test_spooled_deliveries_are_answered_200_and_counted_in_readyz_and_metrics(
        make_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    settings = Settings.from_env(make_env(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"))
    with serve(create_app(settings)) as server:
        for i in range(3):
            answer = httpx.post(f"{server.url}/webhooks/outcaller",
                                content=orjson.dumps({"event": "lead.created", "i": i}),
                                headers={"Authorization": f"Bearer {SECRETS['outcaller'][0]}"},
                                timeout=10)
            assert answer.status_code == 200
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert ready.status_code == 503 and ready.json()["spool_depth"] == 3
    assert "ingest_spool_depth 3.0" in metrics
    assert 'ingest_deliveries_total{provider="outcaller",result="spooled"}' in metrics
    assert len(segments(settings.spool_dir)) == 1  # kept for the next start to drain


def test_rewrite_segment_leaves_out_and_replaces_records_atomically(
        tmp_path: Path, queue: Queue, namespace: str) -> None:
    keep, drop, change = envelope(1), envelope(2), envelope(3)
    torn = encode_record(envelope(99))
    path = tmp_path / "seg-00000000000000000001-dead-0000.log"
    original = encode_record(keep) + encode_record(drop) + encode_record(change)
    path.write_bytes(original + torn[:20])
    changed = dict(change, body='{"event": "lead.created", "n": 33}')

    def edit(record: dict[str, Any]) -> dict[str, Any] | None:
        return None if record == drop else changed if record == change else record

    dry = rewrite_segment(path, edit, dry_run=True)
    assert (dry.removed, dry.replaced, dry.rest_dropped, dry.deleted) == (1, 1, False, False)
    assert path.read_bytes() == original + torn[:20]  # a dry run writes nothing

    done = rewrite_segment(path, edit)
    assert (done.removed, done.replaced, done.in_use) == (1, 1, False)
    data = path.read_bytes()
    # The record kept is the same bytes; the torn tail stays (it is still ignored).
    assert data == encode_record(keep) + encode_record(changed) + torn[:20]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file is left
    assert segment_files(tmp_path) == [path]
    assert Spool(tmp_path).drain(queue, Names(namespace)) == 2
    assert queued_envelopes(queue) == [keep, changed]


def test_rewrite_segment_drops_an_unreadable_rest_on_request_and_removes_an_empty_one(
        tmp_path: Path) -> None:
    first, second = encode_record(envelope(1)), bytearray(encode_record(envelope(2)))
    second[-2] ^= 0xFF
    path = tmp_path / "seg-00000000000000000001-dead-0000.corrupt"
    path.write_bytes(first + bytes(second) + encode_record(envelope(3)))
    assert segment_files(tmp_path) == [path]  # damaged segments are listed too
    done = rewrite_segment(path, lambda r: r, keep_rest=lambda rest: False)
    assert done.rest_dropped and not done.removed
    assert path.read_bytes() == first
    gone = rewrite_segment(path, lambda r: None)
    assert gone.deleted and not path.exists()
    assert rewrite_segment(path, lambda r: None).gone


def test_copies_a_cut_off_rewrite_left_are_removed_unless_a_rewrite_holds_their_segment(
        tmp_path: Path) -> None:
    record = encode_record(envelope(1))
    held, idle = (tmp_path / f"seg-0000000000000000000{n}-dead-0000.log" for n in (1, 2))
    for segment in (held, idle):
        segment.write_bytes(record)
        (tmp_path / f".rewrite-{segment.name}.tmp").write_bytes(record)
    (tmp_path / ".rewrite-seg-00000000000000000003-dead-0000.log.tmp").write_bytes(record)
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a rewrite in progress
        # The idle segment's copy and the copy of a segment drained since go; the held stays.
        assert remove_stale_rewrites(tmp_path) == 2
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".rewrite-{held.name}.tmp", held.name, idle.name]
    assert idle.read_bytes() == record  # segments themselves are never touched
    assert remove_stale_rewrites(tmp_path) == 1
    assert remove_stale_rewrites(tmp_path / "missing") == 0


def test_rewrite_segment_leaves_a_segment_a_live_process_holds(tmp_path: Path) -> None:
    writer = Spool(tmp_path)

    async def run() -> None:
        await writer.append(envelope())
        (active,) = segment_files(tmp_path)
        before = active.read_bytes()
        assert rewrite_segment(active, lambda r: None).in_use
        assert active.read_bytes() == before
        await writer.stop()
        assert rewrite_segment(active, lambda r: None).deleted  # sealed now

    asyncio.run(run())


def test_a_drainer_never_takes_a_segment_while_it_is_being_created(
        tmp_path: Path, queue: Queue, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another acceptor's drainer (same directory) runs in the instant between a new
    segment's creation and its writer's lock. It must not find the segment, take it for an
    orphan, see it empty and remove it: the writer would then fsync the delivery into a file
    that no longer exists, and answer 200 for it."""
    import fcntl

    from ingest.acceptor import spool as spool_module

    other = Spool(tmp_path)
    real_flock = fcntl.flock
    raced: list[int] = []

    def flock_after_a_drain(fd: int, operation: int) -> None:
        if not raced and operation & fcntl.LOCK_NB and operation & fcntl.LOCK_EX:
            raced.append(fd)  # the writer's first lock: its new segment exists by now
            other.drain(queue, Names(namespace))
        real_flock(fd, operation)

    monkeypatch.setattr(spool_module.fcntl, "flock", flock_after_a_drain)
    sent = [envelope(1)]
    spool = Spool(tmp_path)
    append_all(spool, sent)
    monkeypatch.setattr(spool_module.fcntl, "flock", real_flock)
    assert raced, "the writer never locked a new segment"
    assert Spool(tmp_path).drain(queue, Names(namespace)) == 1
    assert [e["id"] for e in queued_envelopes(queue)] == [sent[0]["id"]]
