"""Every provider at once, with duplicates, through the real acceptor and real workers."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timezone
from typing import Any

import httpx
from prometheus_client import REGISTRY

from ingest.events import Delivery
from ingest.providers import load_providers
from ingest.commands.samples import build_sample
from tests.helpers import SECRETS, drain, rows
from tests.providers.suite import suite_of

# Every registered provider (each has a ProviderSuite: tests/providers/test_registry.py).
BUILTINS = tuple(load_providers())
DISTINCT_PER_PROVIDER = 15
MAX_COPIES = 3  # each distinct delivery is sent 1..3 times, byte for byte
CONCURRENCY = 16

Planned = tuple[str, bytes, dict[str, str]]  # provider, body, headers


def _unknown_event(provider: str, suffix: str) -> tuple[Planned, str]:
    """A delivery whose event type no kind table knows (a provider sending something new),
    and that event type: the provider's suite makes it (ProviderSuite.unknown_delivery)."""
    body, headers, event = suite_of(provider).unknown_delivery(SECRETS[provider][0], suffix)
    return (provider, body, headers), event


def _keys(delivered: Planned) -> set[tuple[str, str]]:
    """(provider, dedup key) of every event a delivery holds, by the provider's own
    normalizer (a Salesloft array holds several)."""
    name, body, headers = delivered
    provider = load_providers()[name]
    kept = {k.lower(): v for k, v in headers.items() if k.lower() in provider.kept_headers}
    delivery = Delivery(id=str(uuid.uuid4()), provider=name,
                        received_at=datetime.now(timezone.utc), headers=kept, body=body.decode())
    return {(name, e.dedup_key) for e in provider.events(delivery)}


async def _fire(base_url: str, plan: list[Planned]) -> list[int]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(timeout=20) as client:

        async def one(name: str, body: bytes, headers: dict[str, str]) -> int:
            async with limit:
                answer = await client.post(f"{base_url}/webhooks/{name}", content=body,
                                           headers={"Content-Type": "application/json",
                                                    **headers})
                return answer.status_code

        return list(await asyncio.gather(*(one(*item) for item in plan)))


def _unknown_count(provider: str, event_type: str) -> float:
    value = REGISTRY.get_sample_value("ingest_unknown_events_total",
                                      {"provider": provider, "event_type": event_type})
    return value or 0.0


def test_mixed_traffic_with_duplicates_lands_exactly_once_per_event(
    acceptor: Any, runtime: Any, database_url: str
) -> None:
    rng = random.Random(20260604)
    suffix = uuid.uuid4().hex[:8]
    distinct: list[Planned] = []
    unknown_types: dict[str, str] = {}
    for name in BUILTINS:
        for _ in range(DISTINCT_PER_PROVIDER):
            body, headers = build_sample(name, SECRETS[name][0], rng)
            distinct.append((name, body, headers))
        delivered, unknown_types[name] = _unknown_event(name, suffix)
        distinct.append(delivered)
    per_delivery = [_keys(d) for d in distinct]
    expected = set().union(*per_delivery)
    assert len(expected) == sum(map(len, per_delivery)), "distinct deliveries hold distinct events"
    plan = [item for item in distinct for _ in range(rng.randint(1, MAX_COPIES))]
    rng.shuffle(plan)
    assert len(plan) > len(distinct), "the plan must hold duplicates"

    statuses = asyncio.run(_fire(acceptor.url, plan))
    assert statuses == [200] * len(plan)
    drain(runtime)

    stored = rows(database_url, "SELECT provider, dedup_key, kind, event_type FROM webhook_events")
    assert len(stored) == len(expected)
    assert {(r["provider"], r["dedup_key"]) for r in stored} == expected
    for name in BUILTINS:
        assert sum(1 for p, _ in expected if p == name) > DISTINCT_PER_PROVIDER, name
        # What no table maps is stored as unknown, and counted once per provider and type.
        unknown = [r["event_type"] for r in stored if r["provider"] == name
                   and r["kind"] == "unknown"]
        assert unknown == [unknown_types[name]], name
        assert _unknown_count(name, unknown_types[name]) == 1.0, name
    # Each distinct delivery produced new events, so each is archived once, copies never.
    archived = rows(database_url, "SELECT count(*) AS n FROM webhook_deliveries")[0]["n"]
    assert archived == len(distinct)


def test_ingest_send_signs_every_provider_correctly(acceptor: Any, runtime: Any,
                                                    database_url: str) -> None:
    from ingest.commands.send import send

    for name in BUILTINS:
        report = send(name, f"{acceptor.url}/webhooks/{name}", SECRETS[name][1], count=20,
                      concurrency=4, duplicates=0.3, seed=7, quiet=True)
        assert report.ok and report.accepted == 20, (name, report.statuses, report.errors)
    drain(runtime)
    stored = rows(database_url, "SELECT provider, kind FROM webhook_events")
    assert {r["provider"] for r in stored} == set(BUILTINS)
    assert not [r for r in stored if r["kind"] == "unknown"], "samples use documented events"
