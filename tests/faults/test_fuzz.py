"""Property-based: validly signed hostile bodies and headers, sent to a real acceptor together
with good deliveries, then processed by real RQ workers into a real Postgres.

For each hostile delivery exactly one of: a clear 4xx; a stored row; one dead letter with a
readable reason. Every good delivery sent alongside lands. No body, contact or credential
reaches a log line. Bounded: a fixed number of examples, no timing assertions.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq.registry import FailedJobRegistry, ScheduledJobRegistry

from ingest.acceptor.app import create_app
from ingest.config import Settings
from ingest.logs import JsonFormatter, RedactFilter
from tests.faults.conftest import PRESENTED_BAD_TOKENS, outcaller_delivery
from tests.helpers import SECRETS, drain, rows, serve
from workers.runtime import Runtime, install_runtime

pytestmark = pytest.mark.fault

TOKEN = SECRETS["outcaller"][0]
# Set in every hostile body, so its row or its dead letter can be found again.
MARK = "fz"


# -- hostile bodies -----------------------------------------------------------------------------

def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=10),  # controls
    st.just("\x00"), st.just("²"), st.just("<!channel>"), st.just("\u2028"),
    st.builds(lambda n: "x" * n, st.integers(2_000, 12_000)),  # past a btree entry
    st.just("https://crm.example/h?apikey=k-0123456789"),
)
hostile_time = st.one_of(
    st.just("2026-01-01T00:00:00Z"), st.just("²"), st.just("0001-01-01T00:00:00+14:00"),
    st.just("9999-12-31T23:59:59-14:00"), st.just(""), st.integers(-2**63, 2**63),
    st.just(None), hostile_text,
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False), hostile_text)


@dataclass
class Hostile:
    kind: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    marker = f"{MARK}{uuid.uuid4().hex[:12]}"
    shape = draw(st.sampled_from(["fields", "deep", "not_object", "bad_bytes", "headers"]))
    payload: dict[str, Any] = {
        "event": draw(st.one_of(st.just("lead.created"), st.just("call.completed"),
                                st.builds(lambda s: f"lead.{s}", hostile_text), hostile_text)),
        # The marker in the resource keeps every case's dedup key its own.
        "resource": draw(st.one_of(st.just(f"lead-{marker}"),
                                   st.builds(lambda t: marker + t, hostile_text))),
        "workspaceId": draw(json_scalar),
        "timestamp": draw(hostile_time),
        "data": {"id": draw(st.one_of(st.just(marker), st.builds(lambda s: marker + s,
                                                                  hostile_text), json_scalar)),
                 "marker": marker, "email": f"{marker}@contact.example",
                 "name": draw(hostile_text), "extra": draw(st.recursive(
                     json_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10))},
    }
    headers: dict[str, str] = {}
    if shape == "deep":
        depth = draw(st.sampled_from([63, 64, 65, 254, 256, 1000, 1023, 1100]))
        body = orjson.dumps(payload)[:-1] + b', "deep": ' + _deep(depth).encode() + b"}"
    elif shape == "not_object":
        body = draw(st.sampled_from([b"[]", b"1", b'"text"', b"null", b"{", b""]))
    elif shape == "bad_bytes":
        body = orjson.dumps(payload)[:-2] + draw(st.sampled_from(
            [b"\xff\xfe", b"\xc3", b"\xed\xa0\x80"])) + b'"}'  # invalid UTF-8, a lone surrogate
    else:
        body = orjson.dumps(payload)
        if shape == "headers":
            headers = draw(st.sampled_from([
                {"X-Long": "v" * 40_000},
                {f"X-H{i}": "v" for i in range(150)},
                {"Outreach-Webhook-Cleanup-Token": marker, "X-Api-Token": marker},
            ]))
    return Hostile(shape, body, headers)


# -- the run -------------------------------------------------------------------------------------

@dataclass
class Run:
    url: str
    sent: list[tuple[Hostile, int, bytes]] = field(default_factory=list)
    good: list[str] = field(default_factory=list)
    n: int = 0


@pytest.fixture
def run(make_env: Callable[..., dict[str, str]], database_url: str,
        fault_logs: Path) -> Iterator[tuple[Run, Runtime, io.StringIO]]:
    settings_ = Settings.from_env(make_env(database_url))
    # Production's formatter and filter, so the check below reads the lines operators read.
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactFilter([s for pair in SECRETS.values() for s in pair]))
    root = logging.getLogger()
    root.addHandler(handler)
    rt = Runtime(settings_)
    previous = install_runtime(rt)
    try:
        with serve(create_app(settings_)) as server:
            yield Run(f"{server.url}/webhooks/outcaller"), rt, output
    finally:
        root.removeHandler(handler)
        install_runtime(previous)
        rt.close()


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    try:
        answer = httpx.post(url, content=body, headers=headers, timeout=10)
        return answer.status_code, answer.content
    except httpx.HTTPError:
        return 0, b""  # closed without an answer: what the head limits may do


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(case=hostile())
def _send_hostile_with_good_ones(
        run: tuple[Run, Runtime, io.StringIO], case: Hostile) -> None:
    state, _, _ = run
    goods = []
    for _ in range(3):
        state.n += 1
        _, body, headers, resource_id = outcaller_delivery(10_000 + state.n)
        goods.append((body, headers))
        state.good.append(resource_id)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
               **case.headers}
    with ThreadPoolExecutor(4) as pool:  # together: the acceptor batches them as one job
        hostile_answer = pool.submit(_post, state.url, case.body, headers)
        good_answers = [pool.submit(_post, state.url, b, h) for b, h in goods]
        status, content = hostile_answer.result()
        assert [f.result()[0] for f in good_answers] == [200, 200, 200]
    assert status in (0, 200) or 400 <= status < 500, status
    if 400 <= status < 500:
        assert orjson.loads(content)["error"], "a 4xx says what is wrong"
    else:
        assert status == 200 or case.headers, "only an over-limit head may be cut off"
    state.sent.append((case, status, content))


def _job_text(job: Any) -> str:
    return orjson.dumps(job.args, default=str).decode()


def test_hostile_deliveries_fail_alone_and_good_ones_alongside_all_land(
        run: tuple[Run, Runtime, io.StringIO], database_url: str) -> None:
    """Send every example with good ones, then run the workers: every outcome accounted
    for, every good delivery stored, the logs clean."""
    state, rt, output = run
    _send_hostile_with_good_ones(run)
    assert len(state.sent) > 20
    drain(rt, rounds=6)

    stored = rows(database_url, "SELECT resource_id, data::text AS data FROM webhook_events")
    stored_ids = {r["resource_id"] for r in stored}
    assert set(state.good) <= stored_ids, "a good delivery was lost with a hostile one"

    failed: list[tuple[str, str]] = []  # (job args, reason)
    for name in rt.queue_names():
        queue = rt.queue(name)
        assert ScheduledJobRegistry(queue=queue).count == 0, \
            f"a retry is scheduled on {name}: an error retrying cannot fix was taken as transient"
        registry = FailedJobRegistry(queue=queue)
        for job_id in registry.get_job_ids():
            job = queue.fetch_job(job_id)
            reason = job.latest_result().exc_string.strip().splitlines()[-1]
            failed.append((_job_text(job), reason))
    for _, reason in failed:
        assert reason and "\x00" not in reason and len(reason) < 1000
        assert "k-0123456789" not in reason and TOKEN not in reason

    archived = " ".join(r["data"] for r in stored)
    outcomes: Counter[tuple[str, str]] = Counter()
    headers = rows(database_url, "SELECT headers::text AS h FROM webhook_deliveries")
    for case, status, _ in state.sent:
        if status != 200:
            continue
        marker = orjson.loads(case.body)["data"]["marker"]
        in_rows = archived.count(f'"marker": "{marker}"')
        in_dead = sum(1 for args, _ in failed if marker in args)
        assert in_rows + in_dead == 1, (case.kind, marker, in_rows, in_dead)
        outcomes[(case.kind, "row" if in_rows else "dead letter")] += 1
    for case, status, _ in state.sent:
        if status != 200:
            outcomes[(case.kind, str(status))] += 1
    print("\nfuzz outcomes:", dict(sorted(outcomes.items())))
    assert not any(MARK in h["h"] for h in headers), "a cleanup token was archived"

    lines = output.getvalue().splitlines()
    assert lines, "no log line was captured"
    text = "\n".join(lines)
    for needle in ["@contact.example", "@example.com", TOKEN, *PRESENTED_BAD_TOKENS,
                   "k-0123456789", '"data"']:
        assert needle not in text, f"{needle!r} in a log line"
    assert all(len(ln) < 16_000 for ln in lines)
