"""``ingest erase`` keeps other people's events in a raw delivery that also holds the
subject's (a Salesloft ``data`` array): the delivery is rewritten without the subject's
elements in the spool, in RQ job arguments and in ``webhook_deliveries``, marked
``erased_at``, and it still processes and replays into exactly the others' events. Real
Redis, Postgres, RQ workers and spool files."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from rq import Retry
from rq.serializers import JSONSerializer

from ingest import constants
from ingest.acceptor.spool import Spool, encode_record, read_segment
from ingest.commands.erase import EmailSubject, ResourceSubject, erase
from ingest.commands.replay import Selection, replay
from ingest.config import Settings
from ingest.constants import Names
from ingest.events import Delivery
from ingest.rq_jobs import enqueue_batch, make_job
from tests.helpers import SimpleWorker, drain, rows
from tests.test_erase import event_jobs, job_args
from tests.test_erase_escapes import db_holding, holds, redis_holding, spool_holding
from workers.runtime import Runtime

JANE = "Jane.Doe@Example.com"
BOB = "bob.stone@example.org"
CAROL = "carol.hart@example.net"


def person(email: str, name: str) -> dict[str, Any]:
    return {"id": uuid.uuid4().int % 10**9, "updated_at": datetime.now(timezone.utc).isoformat(),
            "email_address": email, "display_name": name, "title": "VP Sales",
            "phone": "+1 415 555 0134"}


def array(escaped: bool = True) -> dict[str, Any]:
    """A Salesloft delivery of three people, Jane second; her address JSON-escaped."""
    people = [person(BOB, "Bob Stone"), person(JANE, "Jane Doe"), person(CAROL, "Carol Hart")]
    body = orjson.dumps({"event_type": "person_updated", "data": people}).decode()
    if escaped:
        body = body.replace(JANE, r"\u004Aane.Doe\u0040Example.com")
    return Delivery(id=str(uuid.uuid4()), provider="salesloft",
                    received_at=datetime.now(timezone.utc),
                    headers={"x-salesloft-event": "person_updated"}, body=body).to_dict()


def emails(envelope: dict[str, Any]) -> list[str]:
    return [p["email_address"] for p in orjson.loads(envelope["body"])["data"]]


def stored_emails(database_url: str) -> list[str]:
    return sorted(r["contact_email"] for r in rows(
        database_url, "SELECT contact_email FROM webhook_events"))


@pytest.fixture
def scene(runtime: Runtime, settings: Settings) -> dict[str, Any]:
    """A three-person delivery in each place: stored, queued, waiting for a retry, spooled."""
    rt = runtime
    stored = array()
    enqueue_batch(rt.ingest_queue, [stored], rt.names.job_id("batch", "stored"))
    drain(rt)
    retrying = array()
    crm = rt.queue(rt.names.sink_queue("crm"))
    crm.enqueue_job(make_job(crm, constants.DELIVER, ("crm", event_jobs(rt, retrying),
                                                      [retrying]),
                             rt.names.job_id("deliver-crm", "array"),
                             Retry(max=3, interval=[3600]), "deliver(crm)"))
    SimpleWorker([crm], connection=rt.redis, serializer=JSONSerializer).work(
        burst=True, logging_level="WARNING")
    queued = array()
    enqueue_batch(rt.ingest_queue, [queued], rt.names.job_id("batch", "queued"))
    spool = settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    spooled = array(escaped=False)
    (spool / "seg-00000000000000000001-1-aa.log").write_bytes(encode_record(spooled))
    return {"rt": rt, "stored": stored, "retrying": retrying, "queued": queued,
            "spooled": spooled, "spool": spool}


def test_a_multi_person_delivery_keeps_the_others_everywhere_and_still_replays(
        scene: dict[str, Any], settings: Settings, database_url: str, namespace: str) -> None:
    rt: Runtime = scene["rt"]
    spool: Path = scene["spool"]
    assert stored_emails(database_url) == sorted([BOB, JANE, CAROL])

    report = erase(settings, EmailSubject(JANE))

    counts = report.counts
    assert (counts["spool records"], counts["spool records rewritten"]) == (0, 1)
    # The queued batch, the retrying deliver job, and the finished jobs RQ still keeps.
    assert counts["rq deliveries removed"] == 0 and counts["rq deliveries rewritten"] >= 3
    assert (counts["webhook_deliveries"], counts["webhook_deliveries rewritten"]) == (0, 1)
    assert counts["webhook_events"] == 1 and counts["rq events removed"] >= 1
    # Jane (address and name) is nowhere; Bob's and Carol's events stay, in the same bodies.
    for needle in (JANE, "Jane Doe"):
        assert redis_holding(rt, namespace, needle) == []
        assert spool_holding(spool, needle) == 0
        assert set(db_holding(database_url, needle).values()) == {0}
    assert stored_emails(database_url) == sorted([BOB, CAROL])

    # webhook_deliveries: the row is rewritten, marked, and still the events' delivery.
    (archived,) = rows(database_url, "SELECT id::text, body, erased_at FROM webhook_deliveries")
    assert archived["id"] == scene["stored"]["id"] and archived["erased_at"] is not None
    assert [p["email_address"] for p in orjson.loads(bytes(archived["body"]))["data"]] \
        == [BOB, CAROL]
    assert {r["delivery_id"] for r in rows(database_url, "SELECT delivery_id::text "
                                           "FROM webhook_events")} == {archived["id"]}
    # The spool record, the queued batch and the retrying deliver job hold the same rewrite.
    (record,) = read_segment(next(spool.iterdir()).read_bytes()).records
    (queued,) = job_args(rt, rt.names.job_id("batch", "queued"))[0]
    sink, events, (raw,) = job_args(rt, rt.names.job_id("deliver-crm", "array"))
    for envelope, original in ((record, scene["spooled"]), (queued, scene["queued"]),
                               (raw, scene["retrying"])):
        assert envelope["id"] == original["id"] and envelope["erased_at"]
        assert emails(envelope) == [BOB, CAROL]
    assert [e["contact"]["email"] for e in events] == [BOB, CAROL]
    assert {e["delivery_id"] for e in events} == {raw["id"]}  # still linked to its delivery

    # Processing what is left stores exactly the others' events, archived as rewritten.
    Spool(spool).drain(rt.ingest_queue, Names(namespace))
    drain(rt)
    assert stored_emails(database_url) == sorted([BOB, CAROL] * 3)
    marked = rows(database_url, "SELECT id::text, erased_at FROM webhook_deliveries")
    assert {r["id"] for r in marked} == {scene[k]["id"] for k in ("stored", "queued", "spooled")}
    assert all(r["erased_at"] is not None for r in marked)

    # Replay reads the rewritten bodies into the same events, and brings no one back.
    before = rows(database_url, "SELECT id, contact_email, data FROM webhook_events ORDER BY id")
    result = replay(settings, Selection())
    assert result.ok and result.deliveries == result.rewritten == 3
    assert (result.events, result.new, result.changed, result.unchanged) == (6, 0, 0, 6)
    assert rows(database_url, "SELECT id, contact_email, data FROM webhook_events "
                              "ORDER BY id") == before


def test_a_dry_run_counts_the_rewrites_and_changes_nothing(
        scene: dict[str, Any], settings: Settings, database_url: str, namespace: str) -> None:
    rt: Runtime = scene["rt"]
    spool: Path = scene["spool"]
    keys = sorted(k for k in rt.redis.scan_iter(match=f"*{namespace}*:job:*"))
    jobs_before = {k: rt.redis.hgetall(k) for k in keys}
    spool_before = {p.name: p.read_bytes() for p in spool.iterdir()}
    db_before = rows(database_url, "SELECT id, body, erased_at FROM webhook_deliveries")

    report = erase(settings, EmailSubject(JANE), dry_run=True)

    assert report.counts["spool records rewritten"] == 1
    assert report.counts["rq deliveries rewritten"] >= 2
    assert report.counts["webhook_deliveries rewritten"] == 1
    assert {k: rt.redis.hgetall(k) for k in keys} == jobs_before
    assert {p.name: p.read_bytes() for p in spool.iterdir()} == spool_before
    assert rows(database_url, "SELECT id, body, erased_at FROM webhook_deliveries") == db_before
    assert stored_emails(database_url) == sorted([BOB, JANE, CAROL])
    assert not rows(database_url, "SELECT 1 FROM webhook_erasures")


def test_erasing_one_record_rewrites_its_array_without_it(
        runtime: Runtime, settings: Settings, database_url: str) -> None:
    stored = array(escaped=False)
    enqueue_batch(runtime.ingest_queue, [stored], runtime.names.job_id("batch", "r"))
    drain(runtime)
    carol = orjson.loads(stored["body"])["data"][2]

    report = erase(settings, ResourceSubject("salesloft", "person", str(carol["id"])))

    assert report.counts["webhook_events"] == 1 and report.counts["webhook_records"] == 1
    assert report.counts["webhook_deliveries rewritten"] == 1
    assert stored_emails(database_url) == sorted([BOB, JANE])
    (archived,) = rows(database_url, "SELECT body FROM webhook_deliveries")
    assert not holds(bytes(archived["body"]), CAROL)
    assert [p["email_address"] for p in orjson.loads(bytes(archived["body"]))["data"]] \
        == [BOB, JANE]


def test_a_delivery_whose_events_all_mention_the_subject_goes_whole(
        runtime: Runtime, settings: Settings, database_url: str) -> None:
    only_jane = array(escaped=False)
    payload = orjson.loads(only_jane["body"])
    payload["data"] = [payload["data"][1]]
    only_jane["body"] = orjson.dumps(payload).decode()
    # Bob's event names Jane too (his assistant): it is hers as well and goes with her.
    with_assistant = array(escaped=False)
    payload = orjson.loads(with_assistant["body"])
    payload["data"] = [dict(payload["data"][0], assistant_email=JANE), payload["data"][1]]
    with_assistant["body"] = orjson.dumps(payload).decode()
    enqueue_batch(runtime.ingest_queue, [only_jane, with_assistant],
                  runtime.names.job_id("batch", "w"))
    drain(runtime)
    assert len(stored_emails(database_url)) == 3

    report = erase(settings, EmailSubject(JANE))

    assert report.counts["webhook_deliveries"] == 2
    assert report.counts["webhook_deliveries rewritten"] == 0
    assert report.counts["webhook_events"] == 3
    assert stored_emails(database_url) == []
    assert not rows(database_url, "SELECT 1 FROM webhook_deliveries")


def test_a_rewritten_body_keeps_integers_past_64_bits_exact(
        runtime: Runtime, settings: Settings, database_url: str) -> None:
    """The others' part of a rewritten body is the bytes they sent, in meaning: a number past
    64 bits stays that number, and the body is rewritten, not removed whole."""
    stored = array(escaped=False)
    payload = json.loads(stored["body"])
    payload["data"][0]["crm_id"] = 2**64 + 1  # Bob's
    stored["body"] = json.dumps(payload)
    enqueue_batch(runtime.ingest_queue, [stored], runtime.names.job_id("batch", "big"))
    drain(runtime)

    report = erase(settings, EmailSubject(JANE))

    assert report.counts["webhook_deliveries rewritten"] == 1
    (archived,) = rows(database_url, "SELECT body FROM webhook_deliveries")
    people = json.loads(bytes(archived["body"]))["data"]
    assert [p["email_address"] for p in people] == [BOB, CAROL]
    assert people[0]["crm_id"] == 2**64 + 1
    (bob,) = rows(database_url, "SELECT data FROM webhook_events WHERE contact_email = %s", BOB)
    assert bob["data"]["crm_id"] == 2**64 + 1
