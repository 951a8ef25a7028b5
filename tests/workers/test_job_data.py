"""Job data as the acceptor and the workers write and read it: orjson both ways where that
gives the same values, the standard library where it would not, and compressed at level 1."""

from __future__ import annotations

import json
import uuid
import zlib
from datetime import datetime, timezone
from typing import Any

import orjson
import redis.connection as rc
from rq.job import Job
from rq.serializers import JSONSerializer

from ingest import constants
from ingest.events import Event
from ingest.rq_jobs import FastJSONSerializer, enqueue_batch, enqueue_new

from tests.helpers import drain, rows

BIG = 123456789012345678901234567890  # past 64 bits: orjson would read it back as a float


def envelope(data: dict[str, Any]) -> dict[str, Any]:
    body = {"event": "lead.created", "resource": "lead", "workspaceId": "ws",
            "timestamp": "2026-06-04T05:49:00Z", "data": data}
    return {"id": str(uuid.uuid4()), "provider": "outcaller",
            "received_at": datetime.now(timezone.utc).isoformat(), "headers": {},
            "body": json.dumps(body)}


def test_an_integer_past_64_bits_from_a_parser_reaches_postgres_exactly(
        runtime: Any, database_url: str) -> None:
    """A plugin's parser may put one in an event (the built-in ones read bodies with orjson,
    which makes it a float first): its deliver job is written and read by the standard
    library, and the row holds every digit."""
    now = datetime.now(timezone.utc)
    event = Event(provider="outcaller", dedup_key="big-1", event_type="lead.created",
                  kind="contact.created", occurred_at=now, received_at=now,
                  resource_type="lead", resource_id="lead_big", data={"score": BIG})
    enqueue_new(runtime.sink_queue("postgres"), constants.DELIVER,
                ("postgres", [event.to_job()], None),
                runtime.names.job_id("deliver-postgres", uuid.uuid4().hex), None, "deliver")
    drain(runtime)
    (row,) = rows(database_url, "SELECT data->>'score' AS score FROM webhook_events"
                  " WHERE resource_id = 'lead_big'")
    assert row["score"] == str(BIG)


def test_job_data_is_read_with_orjson_only_when_orjson_wrote_it() -> None:
    plain = ("workers.jobs.deliver", None, ["postgres", [{"n": 1, "s": "a, b"}]], {})
    written = FastJSONSerializer.dumps(plain)
    assert written == orjson.dumps(plain)  # orjson wrote it: read back the same
    assert FastJSONSerializer.loads(written) == json.loads(written)

    big = ("workers.jobs.deliver", None, ["postgres", [{"n": BIG}]], {})
    written = FastJSONSerializer.dumps(big)  # orjson refuses it; the standard library writes
    assert FastJSONSerializer.loads(written)[2][1][0]["n"] == BIG
    # What RQ's JSONSerializer writes (from ``ingest dlq retry``, say) is read exactly too.
    assert FastJSONSerializer.loads(JSONSerializer.dumps(big))[2][1][0]["n"] == BIG
    # Not job data (a result, a dict): the standard library.
    assert FastJSONSerializer.loads(b'{"n": %d}' % BIG) == {"n": BIG}


def test_job_data_is_compressed_at_level_1_and_plain_rq_reads_it(runtime: Any) -> None:
    envelopes = [envelope({"id": f"lead_{i}", "email": f"p{i}@example.com"}) for i in range(8)]
    job_id = runtime.names.job_id("batch", uuid.uuid4().hex)
    enqueue_batch(runtime.ingest_queue, envelopes, job_id)
    raw = runtime.redis.hget(f"rq:job:{job_id}", "data")
    data = zlib.decompress(raw)
    assert raw == zlib.compress(data, constants.JOB_DATA_COMPRESSION)
    assert constants.JOB_DATA_COMPRESSION == 1
    job = Job.fetch(job_id, connection=runtime.redis, serializer=JSONSerializer)
    assert list(job.args) == [envelopes]


def test_a_queue_joins_rqs_set_of_queues_once_per_period_not_per_job(runtime: Any) -> None:
    queue = runtime.sink_queue("postgres")
    sent: list[bytes] = []
    original = rc.AbstractConnection.send_packed_command

    def counting(conn: Any, command: Any, check_health: bool = True) -> None:
        sent.append(b"".join(command) if isinstance(command, list) else command)
        original(conn, command, check_health)

    job_ids = [runtime.names.job_id("deliver-postgres", uuid.uuid4().hex) for _ in range(3)]
    rc.AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        for job_id in job_ids:
            assert enqueue_new(queue, constants.DELIVER, ("postgres", [], None), job_id, None,
                               "deliver")
        assert not enqueue_new(queue, constants.DELIVER, ("postgres", [], None), job_ids[0],
                               None, "deliver")  # the same id again: not written twice
    finally:
        rc.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
    assert queue.get_job_ids() == job_ids
    assert runtime.redis.sismember("rq:queues", queue.key)
    assert sum(b"SADD" in command and b"rq:queues" in command for command in sent) == 1
    assert sum(b"EVALSHA" in command for command in sent) == 4  # one script call per write
