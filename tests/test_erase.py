"""``ingest erase`` against real Redis (RQ jobs in every state), Postgres, spool and outbox.

Each place is checked by searching its raw content (RQ's zlib-compressed job data included)
for the address, in any case.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from rq import Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from ingest import constants
from ingest.commands.cli import main
from ingest.config import Settings
from ingest.rq_jobs import FastJSONSerializer, enqueue_batch, make_job
from ingest.commands.erase import EmailSubject, ResourceSubject, erase
from ingest.events import Delivery, Event
from ingest.acceptor.spool import encode_record, read_segment
from sinks.outbox import Outbox
from tests.helpers import SimpleWorker, drain, redis_values, rows
from tests.sinks.conftest import outboundry_delivery, outcaller_lead
from workers.runtime import Runtime

JANE = "Jane.Doe@Example.com"
BOB = "bob.stone@example.org"
TABLES = ("webhook_events", "webhook_deliveries", "webhook_records")


def _texts(value: bytes) -> list[str]:
    out = [value.decode("utf-8", "replace")]
    try:
        out.append(zlib.decompress(value).decode("utf-8", "replace"))
    except zlib.error:
        pass
    return out


def redis_mentions(rt: Runtime, namespace: str, needle: str) -> list[str]:
    """Keys of the namespace whose raw value (any type, decompressed when zlib) holds
    ``needle``, case-insensitively."""
    redis, needle = rt.redis, needle.lower()
    found = []
    for key, values in redis_values(redis, namespace):
        if any(needle in text.lower() for v in values for text in _texts(v)):
            found.append(key.decode())
    return found


def db_mentions(database_url: str, needle: str) -> dict[str, int]:
    out = {}
    with psycopg.connect(database_url) as conn:
        for table in (*TABLES, "webhook_erasures"):
            text_of = ("t::text || convert_from(t.body, 'UTF8')" if table == "webhook_deliveries"
                       else "t::text")
            (count,) = conn.execute(
                f"SELECT count(*) FROM {table} t WHERE strpos(lower({text_of}), %s) > 0",
                [needle.lower()]).fetchone() or (0,)
            out[table] = count
    return out


def spool_mentions(directory: Path, needle: str) -> int:
    return sum(needle.lower().encode() in p.read_bytes().lower() for p in directory.iterdir())


def job_args(rt: Runtime, job_id: str) -> list[Any]:
    raw = rt.redis.hget(Job.key_for(job_id), "data")
    assert raw is not None, f"job {job_id} is gone"
    return list(FastJSONSerializer.loads(zlib.decompress(raw))[2])


def event_jobs(rt: Runtime, *envelopes: dict[str, Any]) -> list[dict[str, Any]]:
    return [e.to_job() for env in envelopes
            for e in rt.providers[env["provider"]].events(Delivery.from_dict(env))]


@pytest.fixture
def scene(runtime: Runtime, settings: Settings, namespace: str) -> dict[str, Any]:
    """Jane's and Bob's data in every place erase looks, in every job state it handles."""
    rt = runtime
    jane = lambda: outboundry_delivery(name="Jane Doe", email=JANE)  # noqa: E731
    bob = lambda: outboundry_delivery(name="Bob Stone", email=BOB)  # noqa: E731
    # Stored in Postgres; the jobs that did it stay in the finished registries for a while.
    # Lead updates: state events, so each person also has a row in webhook_records.
    stored_jane = outcaller_lead("Jane Doe", email=JANE)
    stored_bob = outcaller_lead("Bob Stone", email=BOB)
    enqueue_batch(rt.ingest_queue, [stored_jane, stored_bob], rt.names.job_id("batch", "stored"))
    drain(rt)
    # Dead letter: a delivery that mentions Jane and cannot be normalized, alone in its job.
    poison = Delivery(id=str(uuid.uuid4()), provider="retired",  # no such provider installed
                      received_at=datetime.now(timezone.utc), headers={},
                      body=orjson.dumps({"event": 7, "data": {"lead": {"email": JANE.upper()}}})
                      .decode()).to_dict()
    enqueue_batch(rt.ingest_queue, [poison], rt.names.job_id("batch", "poison"))
    drain(rt)
    assert rt.ingest_queue.failed_job_registry.count == 1
    # Waiting for a retry: a deliver job of a sink that is not enabled here fails and is
    # scheduled again by RQ. It carries both people's events and raw deliveries.
    retry_jane, retry_bob = jane(), bob()
    crm = rt.queue(rt.names.sink_queue("crm"))
    job = make_job(crm, constants.DELIVER,
                   ("crm", event_jobs(rt, retry_jane, retry_bob), [retry_jane, retry_bob]),
                   rt.names.job_id("deliver-crm", "mixed"), Retry(max=3, interval=[3600]),
                   "deliver(crm, 2 events)")
    crm.enqueue_job(job)
    SimpleWorker([crm], connection=rt.redis, serializer=JSONSerializer).work(
        burst=True, logging_level="WARNING")
    assert crm.scheduled_job_registry.count == 1
    # Queued: a batch with both people in it, and one with Jane alone.
    queued_jane, queued_bob = jane(), bob()
    enqueue_batch(rt.ingest_queue, [queued_jane, queued_bob], rt.names.job_id("batch", "mixed"))
    enqueue_batch(rt.ingest_queue, [jane()], rt.names.job_id("batch", "jane"))
    # The spool: a sealed segment with both, and a segment a live acceptor holds.
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    spooled_jane, spooled_bob = jane(), bob()
    (spool / "seg-00000000000000000001-1-aa.log").write_bytes(
        encode_record(spooled_jane) + encode_record(spooled_bob))
    # The copy an earlier rewrite of that segment left when it was cut off before its rename.
    (spool / ".rewrite-seg-00000000000000000001-1-aa.log.tmp").write_bytes(
        encode_record(spooled_jane) + encode_record(spooled_bob))
    # The Slack outbox: both people's events waiting to be posted.
    box = Outbox(rt.redis, rt.names.key("slack:test:"), interval=1, digest_after=3,
                 digest_max=10, done_ttl=600, claim_seconds=10)
    box.park([Event.from_job(e) for e in event_jobs(rt, jane(), bob())])
    return {"rt": rt, "stored_bob": stored_bob, "queued_bob": queued_bob,
            "retry_bob": retry_bob, "spooled_bob": spooled_bob, "box": box, "spool": spool}


def test_erase_removes_the_address_everywhere_and_keeps_everyone_else(
        scene: dict[str, Any], settings: Settings, database_url: str, namespace: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rt: Runtime = scene["rt"]
    spool: Path = scene["spool"]
    assert redis_mentions(rt, namespace, JANE) and spool_mentions(spool, JANE)
    assert db_mentions(database_url, JANE) == {"webhook_events": 1, "webhook_deliveries": 1,
                                               "webhook_records": 1, "webhook_erasures": 0}
    for key, value in settings.raw.items():
        if key in ("REDIS_URL", "DATABASE_URL") or key.startswith("INGEST_"):
            monkeypatch.setenv(key, value)

    # Dry run: counts, changes nothing anywhere.
    before_redis = sorted(redis_mentions(rt, namespace, JANE))
    assert main(["erase", "--email", JANE.lower(), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and JANE.lower() not in out.lower()
    assert sorted(redis_mentions(rt, namespace, JANE)) == before_redis
    assert db_mentions(database_url, JANE)["webhook_events"] == 1
    assert spool_mentions(spool, JANE) == 2  # the segment and the leftover copy

    # Not a terminal and no --yes: refuses, says what to pass.
    assert main(["erase", "--email", JANE]) == 2
    assert "--yes" in capsys.readouterr().err
    assert db_mentions(database_url, JANE)["webhook_events"] == 1

    assert main(["erase", "--email", JANE.upper(), "--yes"]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(JANE.lower().encode()).hexdigest()
    assert digest in out and JANE.lower() not in out.lower()

    # Nothing holds the address any more: Redis, Postgres, the spool.
    assert redis_mentions(rt, namespace, JANE) == []
    assert db_mentions(database_url, JANE) == {t: 0 for t in (*TABLES, "webhook_erasures")}
    assert spool_mentions(spool, JANE) == 0
    (erasure,) = rows(database_url, "SELECT * FROM webhook_erasures")
    assert erasure["subject_sha256"] == digest
    counts = erasure["counts"]
    assert counts["webhook_events"] == counts["webhook_deliveries"] == 1
    assert counts["webhook_records"] == 1
    assert counts["spool records"] == 1 and counts["slack outbox"] == 1
    assert counts["spool rewrite leftovers"] == 1
    # finished stored batch, poison, queued mixed (rewritten), queued jane-only, crm retry
    assert counts["rq jobs removed"] == 2 and counts["rq jobs rewritten"] >= 3

    # Bob is untouched everywhere.
    assert db_mentions(database_url, BOB)["webhook_events"] == 1
    assert spool_mentions(spool, BOB) == 1
    (segment,) = [p for p in spool.iterdir()]
    assert read_segment(segment.read_bytes()).records == [scene["spooled_bob"]]
    assert job_args(rt, rt.names.job_id("batch", "mixed")) == [[scene["queued_bob"]]]
    assert not rt.redis.exists(Job.key_for(rt.names.job_id("batch", "jane")))
    sink, events, raw = job_args(rt, rt.names.job_id("deliver-crm", "mixed"))
    assert sink == "crm" and raw == [scene["retry_bob"]]
    assert [e["contact"]["email"] for e in events] == [BOB]
    assert [e["contact"]["email"] for e in scene["box"].claim()] == [BOB]

    # The rewritten batch still runs: Bob's delivery is stored, Jane's is not.
    drain(rt)
    emails = {r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")}
    assert emails == {BOB}
    assert len(rows(database_url, "SELECT * FROM webhook_events")) == 2


def test_a_segment_a_live_acceptor_holds_is_left_alone_and_reported(
        settings: Settings, database_url: str) -> None:
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / "seg-00000000000000000002-2-bb.log"
    path.write_bytes(encode_record(outboundry_delivery(email=JANE)))
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the acceptor holds its active one
        report = erase(settings, EmailSubject(JANE))
        assert report.counts["spool segments in use"] == 1
        assert spool_mentions(spool, JANE) == 1
    finally:
        os.close(fd)
    report = erase(settings, EmailSubject(JANE))  # sealed now: erased
    assert report.counts["spool records"] == 1 and not path.exists()


def test_erase_one_record_by_resource(runtime: Runtime, settings: Settings,
                                      database_url: str) -> None:
    keep, gone = outcaller_lead(email=BOB), outcaller_lead(email=JANE)
    enqueue_batch(runtime.ingest_queue, [keep, gone], runtime.names.job_id("batch", "r"))
    drain(runtime)
    (event,) = event_jobs(runtime, gone)
    queued = outcaller_lead(email=JANE, lead_id=event["resource_id"])
    enqueue_batch(runtime.ingest_queue, [queued, keep], runtime.names.job_id("batch", "q"))
    subject = ResourceSubject(event["provider"], event["resource_type"], event["resource_id"])

    report = erase(settings, subject)

    assert report.counts["webhook_events"] == 1 and report.counts["webhook_records"] == 1
    assert report.counts["rq deliveries removed"] >= 1
    left = rows(database_url, "SELECT resource_id FROM webhook_events")
    assert [r["resource_id"] for r in left] == [event_jobs(runtime, keep)[0]["resource_id"]]
    assert not rows(database_url, "SELECT 1 FROM webhook_records WHERE resource_id = %s",
                    event["resource_id"])
    assert job_args(runtime, runtime.names.job_id("batch", "q")) == [[keep]]


def test_a_running_job_is_waited_for_and_what_it_stored_is_erased(
        runtime: Runtime, settings: Settings, database_url: str, namespace: str) -> None:
    import subprocess
    import sys
    import threading

    from tests.helpers import wait_until

    rt = runtime
    jane, bob = outboundry_delivery(email=JANE), outboundry_delivery(email=BOB)
    queue = rt.sink_queue("postgres")
    job = make_job(queue, constants.DELIVER,
                   ("postgres", event_jobs(rt, jane, bob), [jane, bob]),
                   rt.names.job_id("deliver-postgres", "running"), None, "deliver(postgres)")
    queue.enqueue_job(job)
    env = dict(os.environ, **{k: v for k, v in settings.raw.items()
                              if k in ("REDIS_URL", "DATABASE_URL") or k.startswith("INGEST_")})
    # The sink's insert waits behind this lock: the job stays started until it is released.
    lock = psycopg.connect(database_url)
    lock.execute("LOCK TABLE webhook_events IN EXCLUSIVE MODE")
    worker = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli", "worker", "--burst",
                               "--queue", "sink-postgres"], env=env)
    reports: list[Any] = []
    try:
        wait_until(lambda: job.id in queue.started_job_registry.get_job_ids(), 60,
                   "the worker to start the job")
        eraser = threading.Thread(
            target=lambda: reports.append(erase(settings, EmailSubject(JANE), wait=60)))
        eraser.start()
        wait_until(lambda: JANE.lower() not in _texts(
            rt.redis.hget(job.key, "data") or b"")[-1].lower(), 30, "the job to be rewritten")
        lock.rollback()  # the worker now stores what it holds in memory: Jane included
        eraser.join(timeout=90)
        assert worker.wait(timeout=60) == 0
    finally:
        lock.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    (report,) = reports
    assert report.counts["rq jobs still running"] == 0
    assert report.counts["webhook_events"] == 1  # stored by the running job, then erased
    assert db_mentions(database_url, JANE) == {t: 0 for t in (*TABLES, "webhook_erasures")}
    assert [r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")] \
        == [BOB]
    assert redis_mentions(rt, namespace, JANE) == []


def test_suppress_drops_the_contacts_future_events_until_lifted(
        runtime: Runtime, settings: Settings, database_url: str, namespace: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    def suppressed() -> float:
        return REGISTRY.get_sample_value("ingest_suppressed_events_total",
                                         {"provider": "outboundry"}) or 0.0

    report = erase(settings, EmailSubject(JANE), suppress=True)
    assert report.counts["webhook_events"] == 0
    before = suppressed()
    enqueue_batch(runtime.ingest_queue, [outboundry_delivery(email=JANE.upper()),
                                         outboundry_delivery(email=BOB)],
                  runtime.names.job_id("batch", "later"))
    drain(runtime)
    assert [r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")] \
        == [BOB]
    assert not rows(database_url, "SELECT 1 FROM webhook_deliveries WHERE strpos(lower("
                                  "convert_from(body, 'UTF8')), %s) > 0", JANE.lower())
    assert suppressed() == before + 1
    # The list holds the hash, never the address.
    assert runtime.redis.smembers(runtime.names.key("suppressed")) == {
        hashlib.sha256(JANE.lower().encode()).hexdigest().encode()}
    assert runtime.redis.sismember(runtime.names.key("suppressed"),
                                   hashlib.sha256(JANE.lower().encode()).hexdigest())

    for key, value in settings.raw.items():
        if key in ("REDIS_URL", "DATABASE_URL") or key.startswith("INGEST_"):
            monkeypatch.setenv(key, value)
    assert main(["erase", "--email", JANE, "--unsuppress"]) == 0
    enqueue_batch(runtime.ingest_queue, [outboundry_delivery(email=JANE)],
                  runtime.names.job_id("batch", "lifted"))
    drain(runtime)
    assert {r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")} \
        == {BOB, JANE}


@pytest.mark.parametrize("spelled, given", [
    ("jane.fw＠example.com", "jane.fw@example.com"),  # stored with a fullwidth at-sign
    ("jane.fw@example.com", "jane.fw＠example.com"),  # typed with one
    ("ｊａｎｅ.fw﹫example.com", "JANE.FW@example.com"),  # fullwidth letters, small at-sign
])
def test_erase_finds_an_address_however_unicode_spells_its_at_sign(
        runtime: Runtime, settings: Settings, database_url: str, spelled: str,
        given: str) -> None:
    """NFKC: the fullwidth ＠ and the small ﹫ are the at-sign a person reads, in the data and
    in what they type."""
    rt = runtime
    jane = outboundry_delivery(name="Jane Wide", email=spelled)
    bob = outboundry_delivery(name="Bob Plain")
    enqueue_batch(rt.ingest_queue, [jane, bob], rt.names.job_id("batch", "wide"))
    drain(rt)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 2
    report = erase(settings, EmailSubject(given))
    assert report.counts["webhook_events"] == 1 and report.counts["webhook_deliveries"] == 1
    left = rows(database_url, "SELECT contact_email FROM webhook_events")
    assert [r["contact_email"] for r in left] == [bob["body"] and
                                                 orjson.loads(bob["body"])["data"]["lead"]["email"]]
    assert db_mentions(database_url, "example.com")["webhook_deliveries"] == 1
