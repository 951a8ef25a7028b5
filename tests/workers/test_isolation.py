"""One bad delivery in a group-commit batch fails alone; the metric labels it feeds stay
bounded. Real RQ workers, real Redis, real Postgres."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from prometheus_client import REGISTRY
from rq.registry import FailedJobRegistry

from tests.helpers import drain, rows
from tests.workers.test_process_batch import enqueue, envelope, lead
from workers.labels import MAX_EVENT_TYPE_LABELS, MAX_LABEL_CHARS


def deep_lead(n: int, depth: int) -> bytes:
    inner = b"[" * depth + b"]" * depth
    return (b'{"event": "lead.created", "resource": "lead", "workspaceId": "w", '
            b'"timestamp": "2026-01-01T00:00:00Z", "data": {"id": "lead_deep_%d", "x": '
            % n + inner + b"}}")


def failed_reasons(runtime: Any) -> list[str]:
    registry = FailedJobRegistry(queue=runtime.ingest_queue)
    return [runtime.ingest_queue.fetch_job(i).latest_result().exc_string
            for i in registry.get_job_ids()]


def test_nesting_no_serializer_can_write_fails_only_that_delivery(
        runtime: Any, database_url: str) -> None:
    good = [envelope("outcaller", lead(i)) for i in range(6)]
    deep = envelope("outcaller", deep_lead(1, 1000))
    assert orjson.loads(deep["body"])  # the provider can read it; nothing can write it
    enqueue(runtime, good[:3] + [deep] + good[3:])
    drain(runtime)
    stored = {r["resource_id"] for r in rows(database_url, "SELECT resource_id FROM webhook_events")}
    assert stored == {f"lead_{i}" for i in range(6)}
    [why] = failed_reasons(runtime)
    assert "nested too deeply" in why
    assert "RecursionError" not in why, "the reason is one line, not a traceback of recursion"


def test_a_malformed_envelope_fails_alone(runtime: Any, database_url: str) -> None:
    broken = {"id": "not-a-delivery", "provider": "outcaller", "received_at": "yesterday",
              "body": "{}"}
    enqueue(runtime, [envelope("outcaller", lead(1)), broken, envelope("outcaller", lead(2))])
    drain(runtime)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 2
    [why] = failed_reasons(runtime)
    assert "ValueError" in why


def test_a_nul_byte_and_a_secret_in_a_failure_make_a_readable_redacted_reason(
        runtime: Any, database_url: str) -> None:
    # No usable id: the provider refuses it, and its reason quotes what it read.
    bad = envelope("outcaller", {"event": "lead.created\x00?token=abcdef0123",
                                 "data": {"url": "https://x.example/p?apikey=k0123456"}})
    enqueue(runtime, [bad, envelope("outcaller", lead(3))])
    drain(runtime)
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == 1
    [why] = failed_reasons(runtime)
    last = why.strip().splitlines()[-1]
    assert "\x00" not in last and "abcdef0123" not in why and "k0123456" not in why


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_unknown_event_type_labels_stay_bounded_after_thousands_of_names(
        runtime: Any, database_url: str) -> None:
    provider = "outcaller"
    before = {s.labels["event_type"] for m in REGISTRY.collect()
              if m.name == "ingest_unknown_events" for s in m.samples
              if s.labels.get("provider") == provider}
    tag = uuid.uuid4().hex[:6]
    names = [f"lead.{tag}{i}" for i in range(1500)] + [f"call.{'z' * 5000}\x00{tag}"]
    batch = [envelope(provider, lead(i, event=name)) for i, name in enumerate(names)]
    for start in range(0, len(batch), 250):
        enqueue(runtime, batch[start:start + 250])
    drain(runtime, rounds=8)
    # The one with a NUL byte is stored sanitized (migrations/0009): every one lands.
    assert len(rows(database_url, "SELECT id FROM webhook_events")) == len(names)
    assert FailedJobRegistry(queue=runtime.sink_queue("postgres")).count == 0
    series = {s.labels["event_type"]: s.value for m in REGISTRY.collect()
              if m.name == "ingest_unknown_events" for s in m.samples
              if s.labels.get("provider") == provider and s.name.endswith("_total")}
    ours = {k for k in series if tag in k}
    assert 0 < len(ours) <= MAX_EVENT_TYPE_LABELS
    assert len(set(series) - before - {"other"}) <= MAX_EVENT_TYPE_LABELS
    # The call.* one has a kind (OutCallerAI keeps any call suffix): not an unknown event.
    assert series.get("other", 0) >= len(names) - 1 - MAX_EVENT_TYPE_LABELS
    for m in REGISTRY.collect():
        if m.name in ("ingest_events", "ingest_unknown_events"):
            for s in m.samples:
                assert all(len(v) <= MAX_LABEL_CHARS and v.isprintable()
                           for v in s.labels.values())
