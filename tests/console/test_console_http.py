"""``ingest console`` over HTTP: access (token, cookie, CSRF, loopback), headers, logs without
search terms, the JSON API's shapes, dead letters, replay, and bad input.

Real parts: the console under uvicorn on 127.0.0.1, Redis, Postgres, RQ burst workers, and the
CRM receiver of tests/sinks (it verifies Standard Webhooks signatures)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest

from ingest.commands.cli import main
from ingest.commands.console import check_access
from ingest.config import Settings
from ingest.exceptions import ConfigError
from tests.console.conftest import TOKEN, Captured, Served, api, csrf
from tests.helpers import wait_until
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outcaller_lead,
    run_jobs,
)
from workers.runtime import Runtime

Make = Callable[..., tuple[Runtime, Served]]


# -- access -----------------------------------------------------------------------------------

def test_the_api_wants_the_bearer_token_and_pages_a_login_with_a_strict_cookie(
        console_for: Make) -> None:
    _, served = console_for()
    c = served.client
    assert c.get("/api/dead-letters").status_code == 401
    assert c.get("/api/events", headers={"authorization": "Bearer " + "x" * 40}).status_code == 401
    assert c.get("/api/dead-letters", headers={"authorization": TOKEN}).status_code == 401
    assert api(served, "GET", "/api/dead-letters").json() == {"dead_letters": []}
    page = c.get("/")
    assert page.status_code == 303 and page.headers["location"] == "/login"

    form = c.get("/login")
    wrong = c.post("/login", data={"csrf": csrf(form.text), "token": "not-the-token-at-all!"})
    assert wrong.status_code == 401 and "ingest_console=" not in wrong.headers.get(
        "set-cookie", "")
    form = c.get("/login")
    right = c.post("/login", data={"csrf": csrf(form.text), "token": TOKEN})
    assert right.status_code == 303
    cookie = next(v for k, v in right.headers.multi_items()
                  if k == "set-cookie" and v.startswith("ingest_console="))
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags, cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert TOKEN not in value and TOKEN not in right.text
    assert c.get("/").status_code == 200  # the cookie jar now holds the session

    # A login form without its own cookie (another site's form) is refused.
    other = httpx.Client(base_url=served.url)
    try:
        assert other.post("/login", data={"csrf": csrf(form.text),
                                          "token": TOKEN}).status_code == 403
    finally:
        other.close()


def test_every_answer_carries_a_strict_policy(console_for: Make) -> None:
    _, served = console_for()
    client = served.login()
    for path in ("/", "/login", "/events", "/dead-letters", "/refused", "/static/console.css",
                 "/api/overview", "/no-such-page"):
        answer = client.get(path, headers={"authorization": f"Bearer {TOKEN}"})
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "style-src 'self'" in csp
        assert "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "script-src" not in csp  # nothing to run: default-src 'none' forbids scripts
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert answer.headers["cache-control"] == "no-store"
    page = client.get("/")
    assert "<script" not in page.text.lower()


def test_a_post_without_this_sessions_csrf_token_changes_nothing(
        console_for: Make, crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="crm", **crm_env(url))
    lead = outcaller_lead()
    [event_id] = event_ids(lead)
    receiver.refuse[event_id] = 410
    enqueue(rt, lead)
    run_jobs(rt)
    assert len(api(served, "GET", "/api/dead-letters").json()["dead_letters"]) == 1

    alice, mallory = served.login(), served.login()
    mallorys = csrf(mallory.get("/dead-letters").text)
    for data in ({"sink": "crm", "all": "true"},
                 {"sink": "crm", "all": "true", "csrf": "forged"},
                 {"sink": "crm", "all": "true", "csrf": mallorys}):
        answer = alice.post("/dead-letters/discard", data=data)
        assert answer.status_code == 403, answer.text
    # The API takes JSON only: a cross-site form (urlencoded, text/plain) cannot reach it.
    answer = api(served, "POST", "/api/dead-letters/discard", content='{"sink": "crm", "all": true}',
                 headers={"content-type": "text/plain"})
    assert answer.status_code == 415
    assert len(api(served, "GET", "/api/dead-letters").json()["dead_letters"]) == 1
    ok = alice.post("/dead-letters/discard",
                    data={"sink": "crm", "all": "true", "csrf": csrf(alice.get("/").text)})
    assert ok.status_code == 200 and "discarded 1 on crm" in ok.text
    assert api(served, "GET", "/api/dead-letters").json() == {"dead_letters": []}


def test_without_a_token_only_loopback_serves_and_only_loopback_names_are_answered(
        console_for: Make, make_env: Callable[..., dict[str, str]], database_url: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env(database_url)
    for host in ("0.0.0.0", "192.0.2.10", "console.example.com", "::"):
        with pytest.raises(ConfigError, match="INGEST_CONSOLE_TOKEN"):
            check_access(Settings.from_env(env), host)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_access(Settings.from_env(env), host)
    check_access(Settings.from_env({**env, "INGEST_CONSOLE_TOKEN": TOKEN}), "0.0.0.0")
    with pytest.raises(ConfigError, match="at least 16"):
        Settings.from_env({**env, "INGEST_CONSOLE_TOKEN": "short"})

    # The command refuses to start, with one line and the configuration status.
    for key, value in {**env, "INGEST_CONSOLE_HOST": "0.0.0.0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("INGEST_CONSOLE_TOKEN", raising=False)
    assert main(["console"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ingest console: configuration error: "
                                               "INGEST_CONSOLE_TOKEN: is required"), err

    _, served = console_for(INGEST_CONSOLE_TOKEN=None)
    c = served.client
    assert c.get("/api/dead-letters").status_code == 200
    page = c.get("/")
    assert page.status_code == 200 and "Overview" in page.text
    assert "ingest_console=" in page.headers["set-cookie"]  # a session, to carry CSRF tokens
    # A page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) names
    # its host in the request: not answered.
    for host in ("evil.example", "evil.example:8001", "127.0.0.1.evil.example"):
        assert c.get("/api/dead-letters", headers={"host": host}).status_code == 421
    assert c.get("/", headers={"host": "localhost:8001"}).status_code == 200
    assert c.get("/", headers={"host": "[::1]:8001"}).status_code == 200


# -- logs -------------------------------------------------------------------------------------

def test_what_is_searched_for_never_reaches_the_log(
        console_for: Make, console_log: Captured) -> None:
    rt, served = console_for()
    email = "zoe.searched@example.com"
    lead = outcaller_lead("Zoe Searched", email=email)
    enqueue(rt, lead)
    run_jobs(rt)
    found = api(served, "GET", f"/api/events?email={quote(email)}&limit=5").json()
    assert len(found["events"]) == 1
    client = served.login()
    page = client.post("/events", data={"csrf": csrf(client.get("/events").text),
                                        "email": email})
    assert page.status_code == 200 and email in page.text
    record = found["events"][0]
    path = (f"/records/{record['provider']}/{record['resource_type']}/"
            f"{quote(record['resource_id'], safe='')}")
    assert client.get(path).status_code == 200
    # The access line is written once the answer is sent: wait for it.
    wait_until(lambda: "/records/{provider}" in console_log.text(), 10, "the access line")
    logged = console_log.text()
    assert "GET /api/events 200" in logged and "POST /events 200" in logged
    for secret in (email, quote(email), "zoe.searched", record["resource_id"], TOKEN, "?"):
        assert secret not in logged, f"{secret!r} reached the log"


# -- the API's shapes and bad input -----------------------------------------------------------

EVENT_KEYS = {"id", "provider", "event_type", "kind", "resource_type", "resource_id", "action",
              "occurred_at", "received_at", "workspace_id", "contact", "campaign_id", "data",
              "previous", "stale", "changes", "delivery_id", "sinks"}


def test_the_api_answers_as_the_design_says(console_for: Make,
                                            crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="postgres,crm", **crm_env(url))
    first = outcaller_lead("Ana Example", email="ana@example.com")
    lead_id = str(orjson_loads(str(first["body"]))["data"]["id"])  # type: ignore[index]
    time.sleep(0.01)  # a later update of the same lead: another event
    second = outcaller_lead("Ana Example", email="ana@example.com", lead_id=lead_id)
    enqueue(rt, first)
    run_jobs(rt)
    enqueue(rt, second)
    run_jobs(rt)

    page = api(served, "GET", "/api/events?email=ana@example.com&limit=1").json()
    assert set(page) == {"events", "next"} and len(page["events"]) == 1 and page["next"]
    newest = page["events"][0]
    assert EVENT_KEYS <= set(newest), EVENT_KEYS - set(newest)
    assert set(newest["sinks"]) == {"postgres", "crm"}
    for outcome in newest["sinks"].values():
        assert set(outcome) == {"state", "at", "attempts", "reason"}
        assert outcome["state"] == "delivered"
    older = api(served, "GET", f"/api/events?email=ana@example.com&limit=1&after="
                               f"{quote(page['next'])}").json()
    assert [e["id"] for e in older["events"]] != [newest["id"]] and len(older["events"]) == 1
    assert older["events"][0]["received_at"] <= newest["received_at"]

    one = api(served, "GET", f"/api/events/{newest['id']}").json()
    assert EVENT_KEYS <= set(one) and set(one["delivery"]) >= {"id", "received_at", "headers",
                                                                "body"}
    assert one["delivery"]["id"] == newest["delivery_id"]
    assert "ana@example.com" in one["delivery"]["body"]

    record = api(served, "GET", f"/api/records/outcaller/lead/{quote(lead_id)}").json()
    assert set(record) == {"record", "events"} and record["record"] is not None
    assert [e["id"] for e in record["events"]] == [older["events"][0]["id"], newest["id"]]

    letters = api(served, "GET", "/api/dead-letters").json()
    assert letters == {"dead_letters": []}

    # Bad input: a clear 400 naming the problem, never a 500.
    for path, words in [("/api/events?after=not-a-cursor", "cursor"),
                        ("/api/events?event_id=123", "UUID"),
                        ("/api/events?limit=0", "limit"),
                        ("/api/events?since=yesterday-ish", "since"),
                        ("/api/events?provider=nosuch", "nosuch"),
                        ("/api/events?colour=red", "colour"),
                        ("/api/events/not-a-uuid", "UUID"),
                        ("/api/dead-letters?sink=nosuch", "nosuch")]:
        answer = api(served, "GET", path)
        assert answer.status_code == 400, (path, answer.text)
        assert words in answer.json()["error"], (path, answer.json())
    assert api(served, "GET", f"/api/events/{uuid.uuid4()}").status_code == 404
    for body in ('{"sink": "crm"}', '{"sink": "crm", "event_ids": []}', "[1]", "{",
                 '{"sink": "nosuch", "all": true}', '{"all": true}'):
        answer = api(served, "POST", "/api/dead-letters/retry", content=body,
                     headers={"content-type": "application/json"})
        assert answer.status_code == 400, (body, answer.text)
    client = served.login()
    bad = client.post("/events", data={"csrf": csrf(client.get("/events").text),
                                       "after": "garbage"})
    assert bad.status_code == 400 and "cursor" in bad.text
    assert client.get("/events/not-a-uuid").status_code == 400


def orjson_loads(text: str) -> dict[str, object]:
    import orjson

    value = orjson.loads(text)
    assert isinstance(value, dict)
    return value


# -- dead letters and replay ------------------------------------------------------------------

def test_dead_letters_retry_and_discard_one_or_all(console_for: Make,
                                                    crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="crm", **crm_env(url))
    leads = [outcaller_lead(f"Dead Letter{i}") for i in range(4)]
    ids = [event_ids(lead)[0] for lead in leads]
    for event_id in ids:
        receiver.refuse[event_id] = 422
    for lead in leads:
        enqueue(rt, lead)
    run_jobs(rt)
    listed = api(served, "GET", "/api/dead-letters?sink=crm").json()["dead_letters"]
    assert {d["event_id"] for d in listed} == set(ids)
    assert all(d["sink"] == "crm" and "422" in d["reason"] and d["failed_at"] for d in listed)

    receiver.refuse.clear()  # the CRM is fixed
    one = api(served, "POST", "/api/dead-letters/retry", json={"sink": "crm",
                                                               "event_ids": [ids[0]]})
    assert one.json() == {"retried": 1}
    run_jobs(rt)
    assert ids[0] in receiver.accepted and not set(ids[1:]) & set(receiver.accepted)
    gone = api(served, "POST", "/api/dead-letters/discard", json={"sink": "crm",
                                                                   "event_ids": [ids[1]]})
    assert gone.json() == {"discarded": 1}
    left = {d["event_id"] for d in api(served, "GET", "/api/dead-letters").json()["dead_letters"]}
    assert left == set(ids[2:])

    client = served.login()
    page = client.get("/dead-letters")
    answer = client.post("/dead-letters/retry", data={"csrf": csrf(page.text), "sink": "crm",
                                                      "all": "true"})
    assert answer.status_code == 200 and "re-queued 2 on crm" in answer.text
    run_jobs(rt)
    assert set(ids) - {ids[1]} == set(receiver.accepted)
    assert api(served, "GET", "/api/dead-letters").json() == {"dead_letters": []}


def test_replay_hands_one_event_to_one_sink(console_for: Make,
                                            crm: tuple[CrmReceiver, str]) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="postgres,crm", **crm_env(url))
    lead = outcaller_lead("Replay Me")
    [event_id] = event_ids(lead)
    receiver.refuse[event_id] = 400
    enqueue(rt, lead)
    run_jobs(rt)
    assert event_id not in receiver.accepted
    assert api(served, "GET", f"/api/events/{event_id}").json()["sinks"]["crm"]["state"] == "dead"
    receiver.refuse.clear()
    client = served.login()
    page = client.get(f"/events/{event_id}")
    assert page.status_code == 200 and "Replay" in page.text
    answer = client.post(f"/events/{event_id}/replay",
                         data={"csrf": csrf(page.text), "sink": "crm"})
    assert answer.status_code == 200 and "sent to crm" in answer.text
    assert event_id in receiver.accepted
    # The page it answers with, and the API, show what the replay did.
    crm_row = next(line for line in answer.text.split("<tr>") if "<td>crm</td>" in line)
    assert "delivered" in crm_row and "dead" not in crm_row
    after = api(served, "GET", f"/api/events/{event_id}").json()["sinks"]["crm"]
    assert after["state"] == "delivered" and after["reason"] is None
    assert api(served, "POST", f"/api/events/{event_id}/replay",
               json={"sink": "nosuch"}).status_code == 400


def test_a_payloads_markup_is_shown_as_text(console_for: Make) -> None:
    rt, served = console_for()
    lead = outcaller_lead("<script>alert(1)</script>")
    [event_id] = event_ids(lead)
    enqueue(rt, lead)
    run_jobs(rt)
    client = served.login()
    page = client.get(f"/events/{event_id}")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script>" not in page.text


def test_postgres_or_redis_away_is_a_503_that_says_what_to_fix(
        console_for: Callable[..., tuple[Runtime, Served]]) -> None:
    """Every page reads Postgres or Redis: when one does not answer, the console says which,
    and what to check, instead of a bare 500; the overview still shows what Redis holds."""
    import dataclasses

    from ingest.commands.embedded import free_port

    rt, _ = console_for(INGEST_SINKS="postgres")
    nowhere = f"postgresql://postgres:hunter2-secret@127.0.0.1:{free_port()}/nowhere"
    no_postgres = Served(dataclasses.replace(rt.settings, database_url=nowhere))
    try:
        answer = api(no_postgres, "GET", "/api/events")
        assert answer.status_code == 503
        assert "cannot reach Postgres" in answer.json()["error"]
        assert "DATABASE_URL" in answer.json()["error"]
        client = no_postgres.login()
        page = client.get(f"/events/{uuid.uuid4()}")
        assert page.status_code == 503 and "cannot reach Postgres" in page.text
        overview = client.get("/")
        assert overview.status_code == 200  # Redis answers: providers, queues, dead letters
        assert "Counts unavailable: cannot reach Postgres" in overview.text
        assert api(no_postgres, "GET", "/api/overview").json()["sink_hour_error"]
        for text in (answer.text, page.text, overview.text):
            assert "hunter2-secret" not in text
    finally:
        no_postgres.close()

    no_redis = Served(dataclasses.replace(rt.settings,
                                          redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        answer = api(no_redis, "GET", "/api/dead-letters")
        assert answer.status_code == 503 and "cannot reach Redis" in answer.json()["error"]
        assert "REDIS_URL" in answer.json()["error"]
    finally:
        no_redis.close()


def test_a_defect_is_a_500_with_the_security_headers_and_nothing_of_the_error(
        console_for: Callable[..., tuple[Runtime, Served]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ingest.commands.console.data import Console

    def broken(self: Console) -> None:
        raise RuntimeError("secret detail of a defect")

    monkeypatch.setattr(Console, "overview", broken)
    _, served = console_for(INGEST_SINKS="postgres")
    answer = api(served, "GET", "/api/overview")
    assert answer.status_code == 500
    assert answer.headers["content-security-policy"].startswith("default-src 'none'")
    assert answer.headers["x-frame-options"] == "DENY"
    assert "secret detail" not in answer.text and "Traceback" not in answer.text
