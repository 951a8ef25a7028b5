"""``ingest dlq``: dead letters per sink and per namespace, with their reasons."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timezone

import orjson
import pytest

from ingest.commands.cli import main
from ingest.events import Delivery
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from ingest.commands.dlq import list_failures, purge_failures, retry_failures
from sinks.outcomes import DISCARDED
from workers.runtime import Runtime


def _poison() -> dict[str, object]:
    """A delivery no dedup key can be formed from: it must fail alone, with its reason."""
    return Delivery(id=str(uuid.uuid4()), provider="outboundry",
                    received_at=datetime.now(timezone.utc), headers={},
                    body=orjson.dumps({"data": {"lead": {"id": 1}}}).decode()).to_dict()


def test_list_shows_sink_ids_and_reason_and_purge_is_per_sink(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    refused = outboundry_delivery()
    [refused_id] = event_ids(refused)
    receiver.refuse[refused_id] = 410
    poison = _poison()
    enqueue(rt, refused)
    enqueue(rt, poison)
    run_jobs(rt)

    failures = {f.sink: f for f in list_failures(rt.redis, rt.settings)}
    assert set(failures) == {"crm", "ingest"}
    assert failures["crm"].ids == (refused_id,) and "410" in failures["crm"].reason
    assert failures["ingest"].ids == (poison["id"],)
    assert "NormalizationError" in failures["ingest"].reason
    assert "no event name" in failures["ingest"].reason

    for key in ("REDIS_URL", "INGEST_NAMESPACE", "INGEST_SINKS", "CRM_WEBHOOK_URL",
                "CRM_WEBHOOK_SECRET", "CRM_HEADERS"):
        monkeypatch.setenv(key, rt.settings.raw[key])
    assert main(["dlq", "list", "--sink", "ingest"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("ingest") and str(poison["id"]) in out[0]
    assert "no event name" in out[1] and all(len(line) <= 80 for line in out[:1])

    assert main(["dlq", "purge", "--sink", "ingest"]) == 0
    assert "purged 1" in capsys.readouterr().out
    assert [f.sink for f in list_failures(rt.redis, rt.settings)] == ["crm"]
    assert purge_failures(rt.redis, rt.settings) == 1
    assert list_failures(rt.redis, rt.settings) == []


def test_retry_gives_a_fresh_retry_schedule(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from ingest import constants

    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelope = outboundry_delivery()
    [event_id] = event_ids(envelope)
    receiver.refuse[event_id] = 400
    enqueue(rt, envelope)
    run_jobs(rt)
    [failure] = list_failures(rt.redis, rt.settings)
    job = Job.fetch(failure.job_id, connection=rt.redis, serializer=JSONSerializer)
    assert job.retries_left == 0  # a permanent error spent them

    assert retry_failures(rt.redis, rt.settings, "crm") == 1
    job = Job.fetch(failure.job_id, connection=rt.redis, serializer=JSONSerializer)
    assert job.retries_left == len(constants.DELIVER_RETRY_INTERVALS)
    assert job.get_status() == "queued"
    del receiver.refuse[event_id]
    run_jobs(rt)
    assert list(receiver.accepted) == [event_id]


def test_each_namespace_sees_only_its_own_dead_letters(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime]) -> None:
    _, url = crm
    ours = pipeline(INGEST_SINKS="crm", **crm_env(url))
    # Contains ours, so the namespace fixture's cleanup removes its keys too.
    theirs = pipeline(INGEST_SINKS="crm", INGEST_NAMESPACE=f"{ours.names.namespace}-other",
                      **crm_env(url))
    try:
        enqueue(theirs, _poison())
        run_jobs(theirs)
        assert len(list_failures(theirs.redis, theirs.settings)) == 1
        assert list_failures(ours.redis, ours.settings) == []
        assert retry_failures(ours.redis, ours.settings) == 0
        assert purge_failures(ours.redis, ours.settings) == 0
        assert len(list_failures(theirs.redis, theirs.settings)) == 1
    finally:
        purge_failures(theirs.redis, theirs.settings)


def test_chosen_events_of_a_dead_job_of_several_are_retried_or_discarded_alone(
        crm: tuple[CrmReceiver, str], pipeline: Callable[..., Runtime], database_url: str) -> None:
    """One dead deliver job holding three events: retry one, discard one, then retry what is
    left, through the functions ``ingest dlq`` and the console call."""
    from tests.sinks.test_outcomes_delivery import outcome_rows

    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    envelopes = [outboundry_delivery(name=n) for n in ("Ada Lovelace", "Grace Hopper",
                                                        "Alan Turing")]
    ids = event_ids(*envelopes)
    # A refusal naming an event splits it off into a job of its own (workers.jobs.deliver); a
    # receiver failing every request until the retries are used up leaves the job whole.
    for event_id in ids:
        receiver.refuse[event_id] = 503
    enqueue(rt, *envelopes)  # one batch: one deliver job holding the three events
    run_jobs(rt)

    def dead_letters() -> dict[tuple[str, ...], str]:
        return {f.ids: f.reason for f in list_failures(rt.redis, rt.settings, "crm")}

    def states() -> dict[str, str]:
        kept = outcome_rows(database_url)
        return {i: kept[i, "crm"]["state"] for i in ids if (i, "crm") in kept}

    [(dead_ids, why)] = dead_letters().items()
    assert sorted(dead_ids) == sorted(ids) and "503" in why
    assert states() == {i: "dead" for i in ids}
    assert all(why.endswith(outcome_rows(database_url)[i, "crm"]["reason"]) for i in ids)
    assert not receiver.accepted
    posted_while_down = dict(receiver.posts)

    receiver.refuse.clear()  # the CRM is fixed
    first, second, third = ids[1], ids[0], ids[2]
    assert retry_failures(rt.redis, rt.settings, "crm", event_ids=[first]) == 1
    # The rest stays dead, as one job, with the reason it had; the retried one is pending
    # (no row) until its job runs.
    assert dead_letters() == {tuple(i for i in ids if i != first): why}
    assert states() == {second: "dead", third: "dead"}
    run_jobs(rt)
    assert list(receiver.accepted) == [first]
    assert states() == {first: "delivered", second: "dead", third: "dead"}
    assert outcome_rows(database_url)[first, "crm"]["reason"] is None
    assert dead_letters() == {tuple(i for i in ids if i != first): why}

    assert purge_failures(rt.redis, rt.settings, "crm", event_ids=[second]) == 1
    assert dead_letters() == {(third,): why}
    run_jobs(rt)  # nothing to run: the discarded event went nowhere
    assert list(receiver.accepted) == [first]
    assert states() == {first: "delivered", second: "dead", third: "dead"}
    # Discarded says so; the one still waiting in the dead letters keeps its reason alone.
    kept = outcome_rows(database_url)
    assert kept[second, "crm"]["reason"].startswith(DISCARDED + ": ")
    assert why.endswith(kept[second, "crm"]["reason"].removeprefix(DISCARDED + ": "))
    assert not kept[third, "crm"]["reason"].startswith(DISCARDED)

    assert retry_failures(rt.redis, rt.settings, "crm") == 1
    run_jobs(rt)
    assert sorted(receiver.accepted) == sorted([first, third])
    assert states() == {first: "delivered", second: "dead", third: "delivered"}
    assert dead_letters() == {}
    # Each retried event was sent once after the fix; none twice, the discarded one never.
    assert receiver.duplicates == 0
    sent_after_fix = {i: receiver.posts[i] - posted_while_down.get(i, 0) for i in ids}
    assert sent_after_fix == {first: 1, second: 0, third: 1}
    for name in rt.queue_names():
        queue = rt.queue(name)
        assert (queue.count, queue.scheduled_job_registry.count,
                queue.failed_job_registry.count) == (0, 0, 0), name


def test_a_discarded_events_raw_delivery_leaves_the_dead_job_and_is_never_archived(
        pipeline: Callable[..., Runtime], database_url: str) -> None:
    """The Postgres sink's jobs carry the raw deliveries: the job left in the dead letters
    keeps only its own events' ones, and retried it archives those alone."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from sinks.postgres import connect
    from tests.helpers import rows

    rt = pipeline(INGEST_SINKS="postgres")
    envelopes = [outboundry_delivery(name=n) for n in ("Ada Lovelace", "Grace Hopper",
                                                        "Alan Turing")]
    ids = event_ids(*envelopes)
    with connect(database_url, autocommit=True) as conn:  # the job is dead as a whole
        conn.execute("ALTER TABLE webhook_events RENAME TO webhook_events_away")
    enqueue(rt, *envelopes)
    run_jobs(rt)
    [failure] = list_failures(rt.redis, rt.settings, "postgres")
    assert sorted(failure.ids) == sorted(ids)

    assert purge_failures(rt.redis, rt.settings, "postgres", event_ids=[ids[1]]) == 1
    job = Job.fetch(failure.job_id, connection=rt.redis, serializer=JSONSerializer)
    assert [e["id"] for e in job.args[1]] == [ids[0], ids[2]]
    assert sorted(d["id"] for d in job.args[2]) == sorted(
        e["delivery_id"] for e in job.args[1])
    assert envelopes[1]["body"] not in orjson.dumps(job.args).decode()

    with connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE webhook_events_away RENAME TO webhook_events")
    assert retry_failures(rt.redis, rt.settings, "postgres") == 1
    run_jobs(rt)
    assert sorted(str(r["id"]) for r in rows(database_url, "SELECT id FROM webhook_events")) \
        == sorted([ids[0], ids[2]])
    assert sorted(str(r["id"]) for r in rows(database_url, "SELECT id FROM webhook_deliveries")) \
        == sorted(str(envelopes[i]["id"]) for i in (0, 2))
    assert list_failures(rt.redis, rt.settings) == []
