"""``ingest erase`` removes a person from everything the console shows, and leaves everyone
else as they were.

Real parts: the console under uvicorn on 127.0.0.1, the acceptor (for a refused request),
Redis, Postgres, RQ burst workers, and the CRM receiver of tests/sinks (it verifies Standard
Webhooks signatures). The erase is the command's own: ``ingest erase --email ... --yes``, run
in-process as tests/test_erase.py runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from ingest.commands.cli import main
from tests.console.conftest import Served, api, csrf
from tests.helpers import redis_values, rows, wait_until
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outboundry_delivery,
    outcaller_lead,
    run_jobs,
)
from workers.runtime import Runtime

Make = Callable[..., tuple[Runtime, Served]]

# The subject: spelled with capitals, searched for and erased in other spellings.
EMAIL = "Zelda.Quimby-Erased@Example.ORG"
NAME = "Zelda Quimby"
OTHER_EMAIL = "bob.stone@example.org"
OTHER_NAME = "Bob Stone"


def _lead_id(envelope: dict[str, Any]) -> str:
    return str(orjson.loads(envelope["body"])["data"]["id"])


def _mentions(text: str) -> list[str]:
    """What of the subject ``text`` holds: the address in any case (also URL-encoded), the
    name, the surname."""
    low = text.lower()
    found = [needle for needle in (EMAIL.lower(), quote(EMAIL.lower()), NAME.lower(), "quimby")
             if needle in low]
    return found


def _person(rt: Runtime, receiver: CrmReceiver, name: str, email: str,
            dead_status: int) -> dict[str, Any]:
    """One person's data: a lead updated twice (a record with a timeline; the CRM takes the
    first update and refuses the second with 422: a dead letter) and an Outboundry reply the
    CRM refuses with ``dead_status`` (a 5xx: retries used up; a 4xx: dead at once)."""
    first = outcaller_lead(name, email=email)
    lead_id = _lead_id(first)
    time.sleep(0.01)  # a later update of the same lead: another event
    second = outcaller_lead(name, email=email, lead_id=lead_id)
    reply = outboundry_delivery(name=name, email=email)
    [first_id], [second_id], [reply_id] = (event_ids(first), event_ids(second),
                                           event_ids(reply))
    receiver.refuse[second_id] = 422
    receiver.refuse[reply_id] = dead_status
    for envelope in (first, second, reply):
        enqueue(rt, envelope)
        run_jobs(rt)
    return {"lead": lead_id, "delivered": first_id, "dead": [second_id, reply_id],
            "events": [first_id, second_id, reply_id],
            "record": f"/records/outcaller/lead/{quote(lead_id, safe='')}"}


def _search_page(client: httpx.Client, email: str) -> str:
    page = client.post("/events", data={"csrf": csrf(client.get("/events").text),
                                        "email": email})
    assert page.status_code == 200, page.text
    return page.text


def _pages(served: Served, client: httpx.Client, subject: dict[str, Any],
           other: dict[str, Any]) -> dict[str, httpx.Response]:
    """Every page and API answer the console has about these people, by name."""
    got: dict[str, httpx.Response] = {}
    for path in ("/", "/events", "/dead-letters", "/refused", subject["record"],
                 other["record"], *(f"/events/{i}" for i in subject["events"] + other["events"])):
        got[path] = client.get(path)
    for path in ("/api/overview", "/api/events", "/api/events?limit=500", "/api/dead-letters",
                 "/api/dead-letters?sink=crm", "/api/refused",
                 f"/api/events?email={quote(EMAIL)}",
                 f"/api/events?email={quote(EMAIL.lower())}",
                 f"/api/events?resource_id={quote(subject['lead'])}",
                 f"/api/records/outcaller/lead/{quote(subject['lead'], safe='')}",
                 f"/api/records/outcaller/lead/{quote(other['lead'], safe='')}",
                 *(f"/api/events/{i}" for i in subject["events"] + other["events"]),
                 *(f"/api/events?event_id={i}" for i in subject["events"])):
        got[path] = api(served, "GET", path)
    return got


def test_erase_removes_the_subject_from_every_page_and_answer_of_the_console(
        console_for: Make, crm: tuple[CrmReceiver, str], acceptor: Any,
        database_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="postgres,crm", **crm_env(url))
    subject = _person(rt, receiver, NAME, EMAIL, dead_status=503)  # retries used up
    other = _person(rt, receiver, OTHER_NAME, OTHER_EMAIL, dead_status=400)
    # A refused request (wrong token) whose body names the subject: the refusal log keeps
    # header names and the like, never a body.
    refused = httpx.post(f"{acceptor.url}/webhooks/outboundry", headers={
        "authorization": "Bearer not-the-token", "user-agent": "erase-test-agent"},
        content=orjson.dumps({"event": "email-replied", "data": {"lead": {
            "email": EMAIL, "name": NAME}}}))
    assert refused.status_code == 401
    wait_until(lambda: "erase-test-agent" in api(served, "GET", "/api/refused").text, 10,
               "the refusal in the log")
    client = served.login()

    # -- before: the console shows the subject everywhere ----------------------------------
    found = api(served, "GET", f"/api/events?email={quote(EMAIL.upper())}").json()
    assert sorted(e["id"] for e in found["events"]) == sorted(subject["events"])
    assert {e["contact"]["email"] for e in found["events"]} == {EMAIL}
    assert all(i in _search_page(client, EMAIL.lower()) for i in subject["events"])
    for event_id in subject["events"]:
        one = api(served, "GET", f"/api/events/{event_id}").json()
        assert EMAIL in one["delivery"]["body"]
        assert one["sinks"]["crm"]["state"] == ("delivered" if event_id == subject["delivered"]
                                                else "dead"), one["sinks"]
        assert one["sinks"]["postgres"]["state"] == "delivered"
        assert EMAIL in client.get(f"/events/{event_id}").text
    record = api(served, "GET", f"/api/records/outcaller/lead/{subject['lead']}").json()
    assert record["record"] is not None and EMAIL.lower() in orjson.dumps(record).decode().lower()
    assert [e["id"] for e in record["events"]] == subject["events"][:2]  # its timeline
    page = client.get(subject["record"])
    assert page.status_code == 200 and NAME in page.text
    assert all(i in page.text for i in subject["events"][:2])
    letters = api(served, "GET", "/api/dead-letters").json()["dead_letters"]
    assert {d["event_id"] for d in letters} == {*subject["dead"], *other["dead"]}
    assert all(i in client.get("/dead-letters").text for i in subject["dead"])
    assert api(served, "GET", "/api/overview").json()["sink_hour"]["crm"]["dead"] == 4
    # Every sink outcome row of the subject's events, as the workers wrote them.
    outcomes = rows(database_url, "SELECT event_id::text, sink, state FROM webhook_sink_outcomes"
                                  " WHERE event_id = ANY(%s::uuid[])", subject["events"])
    assert {(r["event_id"], r["sink"], r["state"]) for r in outcomes} == {
        (subject["delivered"], "crm", "delivered"),
        *((i, "crm", "dead") for i in subject["dead"])}
    other_outcomes = rows(database_url, "SELECT * FROM webhook_sink_outcomes"
                                        " WHERE event_id = ANY(%s::uuid[])", other["events"])
    assert len(other_outcomes) == 3
    # The dead jobs that hold the subject's events: each alone in its job.
    failed = rt.queue(rt.names.sink_queue("crm")).failed_job_registry
    dead_jobs = {job_id: Job.fetch(job_id, connection=rt.redis,
                                     serializer=JSONSerializer).args
                 for job_id in failed.get_job_ids()}
    subjects_jobs = [j for j, args in dead_jobs.items()
                     if {e["id"] for e in args[1]} & set(subject["dead"])]
    others_jobs = [j for j in dead_jobs if j not in subjects_jobs]
    assert len(subjects_jobs) == 2 and len(others_jobs) == 2
    shown_before = _pages(served, client, subject, other)
    assert all(a.status_code == 200 for a in shown_before.values()), {
        p: a.status_code for p, a in shown_before.items() if a.status_code != 200}

    # -- the erase, as `ingest erase --email ... --yes` runs ------------------------------
    for key, value in rt.settings.raw.items():
        if key in ("REDIS_URL", "DATABASE_URL") or key.startswith(("INGEST_", "CRM_")):
            monkeypatch.setenv(key, value)
    assert main(["erase", "--email", EMAIL.swapcase(), "--yes"]) == 0
    assert not _mentions(capsys.readouterr().out)
    (erasure,) = rows(database_url, "SELECT counts FROM webhook_erasures")
    counts = erasure["counts"]
    assert counts["webhook_events"] == 3 and counts["webhook_deliveries"] == 3
    assert counts["webhook_records"] == 1  # the lead's latest state: its row goes
    assert counts["webhook_sink_outcomes"] == 3
    # Jobs, each holding only the subject's data, deleted whole: the three batches and the
    # three Postgres deliveries (finished), the CRM's first delivery (finished) and its two
    # dead letters (failed).
    assert counts["rq jobs removed"] == 9 and counts["rq jobs rewritten"] == 0

    # -- after: nothing the console shows holds the subject ---------------------------------
    shown = _pages(served, client, subject, other)
    shown["POST /events (search)"] = client.post(
        "/events", data={"csrf": csrf(client.get("/events").text), "email": EMAIL})
    for what, answer in shown.items():
        text = answer.text
        if what == "POST /events (search)":
            # The form shows back what was typed (the search, not stored data): only there.
            echo = f'name="email" value="{EMAIL}"'
            assert text.count(echo) == 1, text
            text = text.replace(echo, "")
            assert "No event matches" in text
        assert not _mentions(text), (what, _mentions(text))
        assert not [i for i in subject["events"] if i in text], (what, text)
        gone = {subject["record"], *(f"{p}/{i}" for p in ("/events", "/api/events")
                                      for i in subject["events"])}
        # Gone, not hidden: the subject's event and record pages are not found.
        assert answer.status_code == (404 if what in gone else 200), (what, answer.status_code)
    for path in (f"/api/events?email={quote(EMAIL)}", f"/api/events?email={quote(EMAIL.lower())}",
                 f"/api/events?resource_id={quote(subject['lead'])}"):
        assert shown[path].json() == {"events": [], "next": None}
    assert shown[f"/api/records/outcaller/lead/{quote(subject['lead'], safe='')}"].json() == {
        "record": None, "events": []}
    assert api(served, "GET", "/api/overview").json()["sink_hour"]["crm"]["dead"] == 2

    # The sink outcome rows of the erased events are gone; the dead jobs holding only the
    # subject's events are deleted (out of the failed registry, their keys gone).
    assert rows(database_url, "SELECT * FROM webhook_sink_outcomes"
                              " WHERE event_id = ANY(%s::uuid[])", subject["events"]) == []
    assert rows(database_url, "SELECT * FROM webhook_records WHERE resource_id = %s",
                subject["lead"]) == []
    assert sorted(failed.get_job_ids()) == sorted(others_jobs)
    assert not any(rt.redis.exists(Job.key_for(j)) for j in subjects_jobs)
    # Nor does anything else in Redis hold the address (job results, failure texts).
    held = [key for key, values in redis_values(rt.redis, namespace)
            if any(_mentions(v.decode("utf-8", "replace")) for v in values)]
    assert held == []

    # -- the other contact is all still there ---------------------------------------------
    theirs = api(served, "GET", f"/api/events?email={quote(OTHER_EMAIL)}").json()["events"]
    assert sorted(e["id"] for e in theirs) == sorted(other["events"])
    for event_id in other["events"]:
        one = shown[f"/api/events/{event_id}"].json()
        assert OTHER_EMAIL in one["delivery"]["body"]
        assert one["sinks"]["crm"]["state"] == ("delivered" if event_id == other["delivered"]
                                                else "dead")
    assert rows(database_url, "SELECT * FROM webhook_sink_outcomes"
                              " WHERE event_id = ANY(%s::uuid[])", other["events"]) == \
        other_outcomes
    record = shown[f"/api/records/outcaller/lead/{quote(other['lead'], safe='')}"].json()
    assert record["record"] is not None and [e["id"] for e in record["events"]] == \
        other["events"][:2]
    assert OTHER_NAME in shown[other["record"]].text
    assert {d["event_id"] for d in shown["/api/dead-letters"].json()["dead_letters"]} == \
        set(other["dead"])
    unfiltered = {e["id"] for e in shown["/api/events?limit=500"].json()["events"]}
    assert unfiltered == set(other["events"])
    # The refusal is still listed: it never held the subject.
    assert "erase-test-agent" in shown["/api/refused"].text
    assert "erase-test-agent" in shown["/refused"].text
