"""``ingest erase`` finds an address however a raw body spells it: JSON escapes (``\\u0040``,
``\\u004A``, upper- or lower-case hex, ``\\/`` around it), any case, and JSON texts inside
JSON strings. Real Redis (RQ jobs in every state, the Slack outbox), Postgres and spool files.

Each place is searched afterwards by decoding its raw content with the standard library's
json (every string that is JSON is decoded again), independently of erase's own matching.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Iterator
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
from ingest.acceptor.spool import encode_record, read_segment
from ingest.commands.erase import EmailSubject, erase
from ingest.config import Settings
from ingest.events import Delivery, Event
from ingest.rq_jobs import enqueue_batch, make_job
from sinks.outbox import Outbox
from tests.helpers import SimpleWorker, drain, redis_values, rows
from tests.sinks.conftest import outboundry_delivery, outcaller_lead
from tests.test_erase import event_jobs, job_args
from workers.runtime import Runtime

JANE = "Jane.Doe@Example.com"
BOB = "bob.stone@example.org"
# How raw bodies may spell Jane's address; none holds it as plain text, in any case.
SPELLINGS = (r"jane.doe\u0040example.com", r"\u004Aane.Doe\u0040Example.com",
             r"JANE.DOE\u0040EXAMPLE\u002ECOM", r"\u006aane.doe@example.com",
             r"\u004a\u0061ne.doe\u0040example.com")


# -- searching raw content, decoded -----------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    """Every string in ``value``, and in every JSON text among them, decoded (any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
            if item.lstrip()[:1] in ("{", "["):
                try:
                    stack.append(json.loads(item))
                except ValueError:
                    pass
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def holds(raw: bytes | str, needle: str) -> bool:
    """``raw`` (zlib-compressed or not, JSON or not) holds ``needle`` once decoded."""
    if isinstance(raw, bytes):
        try:
            raw = zlib.decompress(raw)
        except zlib.error:
            pass
        raw = raw.decode("utf-8", "replace")
    return any(needle.lower() in text.lower() for text in _strings(raw))


def redis_holding(rt: Runtime, namespace: str, needle: str) -> list[str]:
    """Keys of the namespace (any type) one of whose values holds ``needle``, decoded."""
    redis, found = rt.redis, []
    for key, values in redis_values(redis, namespace):
        if any(holds(v, needle) for v in values):
            found.append(key.decode())
    return found


def db_holding(database_url: str, needle: str) -> dict[str, int]:
    """Rows per table holding ``needle``: each row as JSON, the raw body decoded."""
    out = {}
    with psycopg.connect(database_url) as conn:
        for table in ("webhook_events", "webhook_deliveries", "webhook_records",
                      "webhook_erasures"):
            extra = ", convert_from(t.body, 'UTF8')" if table == "webhook_deliveries" else ""
            found = conn.execute(f"SELECT to_jsonb(t)::text{extra} FROM {table} t").fetchall()
            out[table] = sum(any(holds(v, needle) for v in r) for r in found)
    return out


def spool_holding(directory: Path, needle: str) -> int:
    """Segment files holding ``needle``: raw bytes, and each record decoded."""
    count = 0
    for path in directory.iterdir():
        data = path.read_bytes()
        records = read_segment(data).records
        count += holds(data, needle) or any(holds(orjson.dumps(r), needle) for r in records)
    return count


# -- deliveries that spell the address with escapes -------------------------------------------


def spelled(spelling: str, *, lead: bool = False, **kwargs: Any) -> dict[str, Any]:
    """An Outboundry delivery about Jane (``lead``: an OutCallerAI lead update, a state event
    that also writes her record to webhook_records) whose raw body spells her address
    ``spelling``, and escapes its slashes (as PHP's json_encode does)."""
    envelope = (outcaller_lead("Jane Doe", email=JANE, **kwargs) if lead
                else outboundry_delivery(name="Jane Doe", email=JANE, **kwargs))
    body = envelope["body"].replace(JANE, spelling).replace("/", "\\/")
    data = json.loads(body)["data"]
    assert JANE.lower() not in body.lower() and (
        data["email"] if lead else data["lead"]["email"]).lower() == JANE.lower()
    return dict(envelope, body=body)


def forwarding(*, lead: bool = False) -> dict[str, Any]:
    """Lee's delivery, whose message (``lead``: lead notes) quotes a JSON text that spells
    Jane's address: the address is two decodings deep (and so in Lee's event's data as an
    escaped string)."""
    quoted = '{"cc": "jane.doe\\u0040example.com"}'
    if lead:
        envelope = outcaller_lead("Lee Park", email="lee.park@example.net")
        payload = orjson.loads(envelope["body"])
        payload["data"]["notes"] = quoted
    else:
        envelope = outboundry_delivery(name="Lee Park", email="lee.park@example.net")
        payload = orjson.loads(envelope["body"])
        payload["data"]["actionData"]["message"] = quoted
    return dict(envelope, body=orjson.dumps(payload).decode())


def bob() -> dict[str, Any]:
    return outboundry_delivery(name="Bob Stone", email=BOB)


@pytest.fixture
def scene(runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """Escaped spellings of Jane's address in every place erase looks, next to Bob's data."""
    rt = runtime
    # Stored in Postgres (the raw bodies keep the escapes); the finished jobs hold them too.
    # Lead updates: state events, so webhook_records holds them as well.
    enqueue_batch(rt.ingest_queue, [spelled(SPELLINGS[0], lead=True), bob(),
                                    forwarding(lead=True)],
                  rt.names.job_id("batch", "stored"))
    drain(rt)
    # A dead letter: a delivery no installed provider reads, alone in its job.
    poison = Delivery(id=str(uuid.uuid4()), provider="retired",
                      received_at=datetime.now(timezone.utc), headers={},
                      body='{"lead": {"email": "' + SPELLINGS[1] + '"}}').to_dict()
    enqueue_batch(rt.ingest_queue, [poison], rt.names.job_id("batch", "poison"))
    drain(rt)
    assert rt.ingest_queue.failed_job_registry.count == 1
    # Waiting for a retry: a deliver job with both people's events and raw deliveries.
    retry_jane, retry_bob = spelled(SPELLINGS[2]), bob()
    crm = rt.queue(rt.names.sink_queue("crm"))
    crm.enqueue_job(make_job(
        crm, constants.DELIVER, ("crm", event_jobs(rt, retry_jane, retry_bob),
                                 [retry_jane, retry_bob]),
        rt.names.job_id("deliver-crm", "mixed"), Retry(max=3, interval=[3600]), "deliver(crm)"))
    SimpleWorker([crm], connection=rt.redis, serializer=JSONSerializer).work(
        burst=True, logging_level="WARNING")
    assert crm.scheduled_job_registry.count == 1
    # Queued: both people in one batch; Jane alone in another.
    queued_bob = bob()
    enqueue_batch(rt.ingest_queue, [spelled(SPELLINGS[3]), queued_bob],
                  rt.names.job_id("batch", "mixed"))
    enqueue_batch(rt.ingest_queue, [spelled(SPELLINGS[4])], rt.names.job_id("batch", "jane"))
    # A sealed spool segment with both.
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    spooled_bob = bob()
    (spool / "seg-00000000000000000001-1-aa.log").write_bytes(
        encode_record(spelled(SPELLINGS[1])) + encode_record(spooled_bob))
    # The Slack outbox: Jane's event, Lee's (quoting Jane two decodings deep), Bob's.
    box = Outbox(rt.redis, rt.names.key("slack:test:"), interval=1, digest_after=3,
                 digest_max=10, done_ttl=600, claim_seconds=10)
    box.park([Event.from_job(e) for e in event_jobs(rt, spelled(SPELLINGS[0]), forwarding(),
                                                       bob())])
    return {"rt": rt, "spool": spool, "box": box, "queued_bob": queued_bob,
            "retry_bob": retry_bob, "spooled_bob": spooled_bob}


def test_escaped_addresses_are_found_and_erased_in_every_place(
        scene: dict[str, Any], settings: Settings, database_url: str, namespace: str) -> None:
    rt: Runtime = scene["rt"]
    spool: Path = scene["spool"]
    # Every place holds Jane, though no raw body spells her address as plain text.
    assert spool_holding(spool, JANE) == 1
    assert JANE.lower().encode() not in next(spool.iterdir()).read_bytes().lower()
    assert db_holding(database_url, JANE) == {"webhook_events": 2, "webhook_deliveries": 2,
                                              "webhook_records": 2, "webhook_erasures": 0}
    assert not rows(database_url, "SELECT 1 FROM webhook_deliveries WHERE strpos(lower("
                                  "convert_from(body, 'UTF8')), %s) > 0", JANE.lower())
    jane_alone = zlib.decompress(rt.redis.hget(Job.key_for(rt.names.job_id("batch", "jane")),
                                               "data") or b"")
    assert JANE.lower().encode() not in jane_alone.lower() and holds(jane_alone, JANE)
    holding = redis_holding(rt, namespace, JANE)
    assert any("slack" in k for k in holding) and any(":job:" in k for k in holding)

    report = erase(settings, EmailSubject(JANE))

    counts = report.counts
    assert counts["spool records"] == 1 and counts["slack outbox"] == 2
    assert (counts["webhook_events"], counts["webhook_deliveries"],
            counts["webhook_records"]) == (2, 2, 2)
    assert counts["rq jobs removed"] >= 2 and counts["rq jobs rewritten"] >= 3
    # Nothing holds Jane's address any more, decoded.
    assert redis_holding(rt, namespace, JANE) == []
    assert db_holding(database_url, JANE) == {t: 0 for t in ("webhook_events",
                                              "webhook_deliveries", "webhook_records",
                                              "webhook_erasures")}
    assert spool_holding(spool, JANE) == 0
    # Bob's data is where it was.
    (segment,) = spool.iterdir()
    assert read_segment(segment.read_bytes()).records == [scene["spooled_bob"]]
    assert job_args(rt, rt.names.job_id("batch", "mixed")) == [[scene["queued_bob"]]]
    sink, events, raw = job_args(rt, rt.names.job_id("deliver-crm", "mixed"))
    assert raw == [scene["retry_bob"]] and [e["contact"]["email"] for e in events] == [BOB]
    assert [e["contact"]["email"] for e in scene["box"].claim()] == [BOB]
    assert [r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")] \
        == [BOB]
    drain(rt)
    assert {r["contact_email"] for r in rows(database_url, "SELECT * FROM webhook_events")} \
        == {BOB}


def test_a_dry_run_counts_escaped_addresses_and_changes_nothing(
        scene: dict[str, Any], settings: Settings, database_url: str, namespace: str) -> None:
    rt: Runtime = scene["rt"]
    spool: Path = scene["spool"]
    before_redis = sorted(redis_holding(rt, namespace, JANE))
    before_db = db_holding(database_url, JANE)
    before_spool = {p.name: p.read_bytes() for p in spool.iterdir()}

    report = erase(settings, EmailSubject(JANE), dry_run=True)

    assert report.counts["spool records"] == 1 and report.counts["webhook_events"] == 2
    assert report.counts["slack outbox"] == 2
    assert sorted(redis_holding(rt, namespace, JANE)) == before_redis
    assert db_holding(database_url, JANE) == before_db
    assert {p.name: p.read_bytes() for p in spool.iterdir()} == before_spool


def test_only_the_whole_address_is_erased(runtime: Runtime, settings: Settings,
                                          database_url: str) -> None:
    """mary.jane.doe@ and jane.doe@example.community are other people than jane.doe@."""
    others = [outboundry_delivery(name="Mary Jane", email="Mary.Jane.Doe@Example.com"),
              outboundry_delivery(name="Jane Doe", email="jane.doe@example.community")]
    quoting = outboundry_delivery(name="Ann Lee", email="ann@example.net")
    payload = orjson.loads(quoting["body"])
    payload["data"]["actionData"]["message"] = "forwarded by mary.jane.doe@example.com"
    others.append(dict(quoting, body=orjson.dumps(payload).decode()))
    enqueue_batch(runtime.ingest_queue, [*others, spelled(SPELLINGS[0])],
                  runtime.names.job_id("batch", "near"))
    drain(runtime)
    queued = [outboundry_delivery(name="Mary Jane", email="mary.jane.doe@example.com")]
    enqueue_batch(runtime.ingest_queue, queued, runtime.names.job_id("batch", "queued"))

    report = erase(settings, EmailSubject(JANE))

    assert report.counts["webhook_events"] == 1 and report.counts["webhook_deliveries"] == 1
    assert sorted(r["contact_email"] for r in rows(
        database_url, "SELECT contact_email FROM webhook_events")) == [
        "Mary.Jane.Doe@Example.com", "ann@example.net", "jane.doe@example.community"]
    assert len(rows(database_url, "SELECT 1 FROM webhook_deliveries")) == 3
    assert job_args(runtime, runtime.names.job_id("batch", "queued")) == [queued]
