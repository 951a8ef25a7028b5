"""Progress per event at the CRM: a retried job never re-posts what the receiver accepted."""

from __future__ import annotations

from collections.abc import Callable

from tests.helpers import drain
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    run_jobs,
)
from workers.runtime import Runtime


def test_a_retried_job_posts_only_what_the_receiver_did_not_take(
        pipeline: Callable[..., Runtime], crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    rt = pipeline(INGEST_SINKS="crm", **crm_env(url))
    deliveries = [outboundry_delivery(name=f"Person {n}") for n in range(5)]
    ids = event_ids(*deliveries)
    receiver.refuse = {ids[3]: 503}  # busy for this one: the job fails half way
    enqueue(rt, *deliveries)
    drain(rt)
    assert set(receiver.accepted) == set(ids[:3])  # a transient error ends the attempt
    receiver.refuse = {}
    run_jobs(rt)  # the retry
    assert set(receiver.accepted) == set(ids)
    assert receiver.posts[ids[3]] == 2
    assert all(receiver.posts[i] == 1 for i in ids if i != ids[3]), receiver.posts


def test_a_changed_body_is_posted_again(crm: tuple[CrmReceiver, str], redis_server: str,
                                        namespace: str) -> None:
    """The mark holds a digest of the body: the same event again is not posted, the same event
    with other content (a replay after a mapping change) is."""
    from ingest.constants import Names
    from sinks.crm import CrmSink, SentMarks, parse_secret
    from tests.sinks.conftest import CRM_SECRET, CRM_TOKEN
    from tests.sinks.test_hostile_sinks import event

    receiver, url = crm
    marks = SentMarks(redis_server, Names(namespace).key("crm:t:sent:"), 600)
    sink = CrmSink(url, [parse_secret(CRM_SECRET)], {"Authorization": f"Bearer {CRM_TOKEN}"},
                   timeout=5, marks=marks)
    first = event(1)
    try:
        sink.send([first])
        sink.send([first])
        assert receiver.posts[first.id] == 1
        changed = event(1, data={"lead": {"id": 1}, "note": "normalized anew"})
        assert changed.id == first.id
        sink.send([changed])
        assert receiver.posts[first.id] == 2
    finally:
        sink.close()
