"""The console in a real browser: Playwright driving Debian's Chromium (never a downloaded
browser), headless, one browser for the module.

A person logs in, searches a contact's email, opens the event, and sees the CRM's outcome go
from retrying to delivered once the receiver recovers (a real worker runs between two page
loads); retries a dead letter; and sees a payload's markup (a contact named
``<script>alert(1)</script>``, an ``<img onerror>`` in the data) as text, with no dialog.

``CONSOLE_SCREENSHOTS=docs pytest tests/console/test_console_browser.py`` also writes the
overview, event and record pages' screenshots into docs/ (README links them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import TOKEN, Served
from tests.sinks.conftest import (
    CrmReceiver,
    crm_env,
    enqueue,
    event_ids,
    outcaller_lead,
    run_jobs,
)
from workers.runtime import Runtime

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")

Make = Callable[..., tuple[Runtime, Served]]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    one = context.new_page()
    dialogs: list[str] = []
    one.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    one.dialogs = dialogs
    try:
        yield one
    finally:
        context.close()


def _login(page: Any, served: Served) -> None:
    page.goto(served.url + "/")
    assert page.url.endswith("/login")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(served.url + "/")


def _screenshot(page: Any, name: str) -> None:
    if os.environ.get("CONSOLE_SCREENSHOTS") == "docs":
        page.screenshot(path=str(DOCS / f"console-{name}.png"), full_page=True)


def test_find_a_contacts_event_and_watch_the_crm_recover(
        console_for: Make, crm: tuple[CrmReceiver, str], page: Any) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="postgres,crm", **crm_env(url))
    email = "mira.hostile@example.com"
    lead = outcaller_lead("<script>alert(1)</script>", email=email)
    # Markup in the data too: an image whose error handler would run script.
    import orjson

    body = orjson.loads(lead["body"])
    body["data"]["notes"] = '<img src=x onerror="alert(2)">'
    lead["body"] = orjson.dumps(body).decode()
    [event_id] = event_ids(lead)
    receiver.script = [(503, {})]  # the CRM is down for the first attempt
    enqueue(rt, lead)
    run_jobs(rt, rounds=0)  # the first attempt only: the CRM's job now waits for its retry

    _login(page, served)
    _screenshot(page, "overview")
    page.click("text=Events")
    page.fill("input[name=email]", email)
    page.click("form.search button[type=submit]")
    assert "/events" in page.url and email not in page.url
    page.click(f"a[href='/events/{event_id}']")
    page.wait_for_url(f"{served.url}/events/{event_id}")
    crm_row = page.locator("table.outcomes tr", has_text="crm")
    assert "retrying" in crm_row.inner_text()
    assert "503" in crm_row.inner_text()

    run_jobs(rt)  # the receiver answers 200 now; RQ's scheduler runs the retry
    assert event_id in receiver.accepted
    page.reload()
    crm_row = page.locator("table.outcomes tr", has_text="crm")
    assert "delivered" in crm_row.inner_text()
    _screenshot(page, "event")

    # The payload's markup is text on the page; nothing ran.
    assert "<script>alert(1)</script>" in page.locator("table.fields").inner_text()
    assert '"notes": "<img src=x onerror=' in page.locator("pre").first.inner_text()
    assert page.locator("img").count() == 0 and page.dialogs == []

    # A later update of the same lead: the record's timeline shows both, oldest first, each
    # with what it changed, and the record's state is the newer one.
    later = outcaller_lead("<script>alert(1)</script>", email=email,
                           lead_id=body["data"]["id"])
    update = orjson.loads(later["body"])
    update["data"]["status"], update["previousData"] = "qualified", {"status": "contacted"}
    later["body"] = orjson.dumps(update).decode()
    enqueue(rt, later)
    run_jobs(rt)
    page.click("table.fields a[href^='/records/']")
    page.wait_for_selector("ol.timeline")
    steps = page.locator("ol.timeline > li").all_inner_texts()
    assert len(steps) == 2, steps
    assert '"new" → "contacted"' in steps[0] and '"contacted" → "qualified"' in steps[1]
    assert '"status": "qualified"' in page.locator("pre").first.inner_text()
    assert event_ids(later)[0] in page.locator("table.fields").inner_text()
    _screenshot(page, "record")
    assert page.dialogs == []


def test_retry_a_dead_letter_from_the_page(console_for: Make, crm: tuple[CrmReceiver, str],
                                          page: Any) -> None:
    receiver, url = crm
    rt, served = console_for(INGEST_SINKS="crm", **crm_env(url))
    leads = [outcaller_lead("Dead Letter One"), outcaller_lead("Dead Letter Two")]
    ids = [event_ids(lead)[0] for lead in leads]
    for event_id in ids:
        receiver.refuse[event_id] = 422
    for lead in leads:
        enqueue(rt, lead)
    run_jobs(rt)
    receiver.refuse.clear()

    _login(page, served)
    page.click("text=Dead letters")
    assert page.locator("input[name=event_id]").count() == 2
    page.check(f"input[name=event_id][value='{ids[0]}']")
    page.click("text=Retry selected")
    assert "re-queued 1 on crm" in page.locator(".notice").inner_text()
    run_jobs(rt)
    assert ids[0] in receiver.accepted and ids[1] not in receiver.accepted
    page.goto(served.url + "/dead-letters")
    assert page.locator("input[name=event_id]").count() == 1
