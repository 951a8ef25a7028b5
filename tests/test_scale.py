"""The queries docs/operations.md suggests use indexes on a table large enough to matter,
and migrating a filled database keeps every row."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.commands.erase import EmailSubject, ResourceSubject
from sinks.postgres_data import DELETE_BATCH, DELIVERIES, EVENTS_BY_INDEX
from sinks.postgres import migrate
from tests.helpers import with_database

DOCS = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
ROWS = 200_000


def suggested_queries() -> list[str]:
    text = DOCS.read_text()
    section = text.split("### Queries that stay fast", 1)[1]
    block = re.search(r"```sql\n(.*?)```", section, re.S)
    assert block, "the section lists its queries in a sql block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("--")]


def fill(conn: psycopg.Connection[Any], count: int) -> None:
    """Events spread over 50 kinds, 20,000 contacts and 50,000 records, a year of times."""
    conn.execute(
        "INSERT INTO webhook_events (id, provider, dedup_key, event_type, kind, resource_type, "
        "resource_id, occurred_at, received_at, contact_email, data) "
        "SELECT gen_random_uuid(), (ARRAY['outreach','salesloft'])[1 + g %% 2], 'k' || g, 'x', "
        "CASE WHEN g %% 50 = 0 THEN 'email.replied' ELSE 'kind.' || (g %% 50) END, 'prospect', "
        "(g %% 50000)::text, now() - (g %% 525600) * interval '1 minute', "
        "now() - (g %% 525600) * interval '1 minute', "
        "CASE WHEN g %% 3 = 0 THEN NULL ELSE 'Person' || (g %% 20000) || '@Example.com' END, "
        "'{}' FROM generate_series(1, %s) g", [count])
    conn.execute(
        "INSERT INTO webhook_records (provider, resource_type, resource_id, occurred_at, kind, "
        "event_id, data) SELECT 'outreach', 'prospect', g::text, now(), 'k', gen_random_uuid(), "
        "'{}' FROM generate_series(1, %s) g", [count // 4])
    conn.execute("ANALYZE webhook_events")
    conn.execute("ANALYZE webhook_records")


def explain(conn: psycopg.Connection[Any], query: str) -> dict[str, Any]:
    row = conn.execute("EXPLAIN (FORMAT JSON) " + query).fetchone()
    assert row is not None
    return dict(row[0][0]["Plan"])


def scans(plan: dict[str, Any]) -> list[tuple[str, str | None]]:
    out = [(plan["Node Type"], plan.get("Index Name") or plan.get("Relation Name"))]
    for child in plan.get("Plans", ()):
        out += scans(child)
    return out


def test_the_suggested_queries_use_indexes(database_url: str) -> None:
    queries = suggested_queries()
    assert len(queries) == 5
    with psycopg.connect(database_url, autocommit=True) as conn:
        fill(conn, ROWS)
        for query in queries:
            plan = explain(conn, query)
            nodes = scans(plan)
            assert not [n for n in nodes if n[0] == "Seq Scan"], (query, nodes)
            assert any("Index" in kind for kind, _ in nodes), (query, nodes)


def test_the_console_overviews_sink_counts_read_only_the_last_hour(database_url: str) -> None:
    # The overview runs on every page load: its count of the Postgres sink's deliveries reads
    # the window through the received_at index, never the whole table.
    from sinks.outcome_counts import _STORED, outcome_counts

    with psycopg.connect(database_url, autocommit=True) as conn:
        fill(conn, ROWS)
        since = datetime.now(timezone.utc) - timedelta(hours=1)
        with conn.cursor() as cur:
            cur.execute("EXPLAIN (FORMAT JSON) " + _STORED, {"since": since})
            row = cur.fetchone()
        assert row is not None
        nodes = scans(row[0][0]["Plan"])
        assert ("Seq Scan", "webhook_events") not in nodes, nodes
        assert any(name == "webhook_events_received" for _, name in nodes), nodes
        # fill() received one event a minute, all stored just now: the last hour's are counted.
        (expected,) = conn.execute("SELECT count(*) FROM webhook_events WHERE received_at >= %s",
                                   [since]).fetchone() or (0,)
        assert 55 <= expected <= 61
        assert outcome_counts(conn, since)["postgres"]["delivered"] == expected


def test_the_retention_delete_and_the_erase_lookup_use_indexes(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        fill(conn, ROWS)
        conn.execute(
            "INSERT INTO webhook_deliveries (id, provider, received_at, body) "
            "SELECT gen_random_uuid(), 'outreach', now() - g * interval '1 minute', '' "
            "FROM generate_series(1, %s) g", [ROWS])
        conn.execute("ANALYZE webhook_deliveries")
        # Retention's own statement, as it runs it: through the received_at index, and the
        # delete itself by ctid (a Tid Scan), with no lookup per row through the primary key.
        for table, days in (("webhook_deliveries", 130), ("webhook_events", 360)):
            statement = DELETE_BATCH.format(table=table, at="received_at")
            with conn.cursor() as cur:
                cur.execute("EXPLAIN (FORMAT JSON) " + statement, [
                    datetime(1970, 1, 1, tzinfo=timezone.utc),
                    datetime.now(timezone.utc) - timedelta(days=days), 1000])
                row = cur.fetchone()
            assert row is not None
            nodes = scans(row[0][0]["Plan"])
            assert f"{table}_received" in [name for _, name in nodes], (table, nodes)
            assert ("Tid Scan", table) in nodes, (table, nodes)
            assert f"{table}_pkey" not in [name for _, name in nodes], (table, nodes)
        # What `ingest erase` runs: the subject's events through the contact or the record
        # index, and (for a record) their deliveries through the primary key.
        by_contact, by_record = (EmailSubject("Person7@Example.com").sql(),
                                 ResourceSubject("outreach", "prospect", "7").sql())
        for match, index in ((by_contact, "webhook_events_contact_received"),
                             (by_record, "webhook_events_resource_received")):
            row = conn.execute("EXPLAIN (FORMAT JSON) " + EVENTS_BY_INDEX.format(
                events=match.events), match.params).fetchone()
            assert row is not None
            assert index in [name for _, name in scans(row[0][0]["Plan"])], (match, row)
        row = conn.execute("EXPLAIN (FORMAT JSON) " + DELIVERIES.format(
            mentions=by_record.mentions("t.x")), dict(by_record.params, deliveries=[
                "6f2b6c1e-9a57-4c8e-9d0a-1f3b5e7c9a21"])).fetchone()
        assert row is not None
        nodes = scans(row[0][0]["Plan"])
        assert "webhook_deliveries_pkey" in [name for _, name in nodes], nodes
        assert not [n for n in nodes if n[0] == "Seq Scan"], nodes


@pytest.fixture
def old_database(postgres_server: str) -> Any:
    """A database at the schema before migration 0005."""
    import uuid

    name = "wi_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(postgres_server, name)
    yield url
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrating_a_filled_database_keeps_every_row(old_database: str) -> None:
    from importlib import resources

    files = sorted(f for f in resources.files("sinks.migrations").iterdir()
                   if f.name.endswith(".sql") and f.name < "0005")
    with psycopg.connect(old_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE webhook_ingest_migrations (name text PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for f in files:
            conn.execute(f.read_text())
            conn.execute("INSERT INTO webhook_ingest_migrations (name) VALUES (%s)", [f.name])
        fill(conn, 5000)
        before = conn.execute("SELECT count(*), md5(string_agg(to_jsonb(t)::text, ','"
                              " ORDER BY id)) FROM webhook_events t").fetchone()
    assert migrate(old_database) == ["0005_personal_data.sql", "0006_rewritten_deliveries.sql",
                                     "0007_drop_dedup_digest_index.sql",
                                     "0008_activity_is_not_state.sql",
                                     "0009_sanitized_events.sql",
                                     "0010_sink_outcomes.sql", "0011_search_indexes.sql"]
    with psycopg.connect(old_database) as conn:
        # The columns later migrations add (sanitized: false for every stored row) aside.
        after = conn.execute("SELECT count(*), md5(string_agg((to_jsonb(t) - 'sanitized')::text,"
                             " ',' ORDER BY id)) FROM webhook_events t").fetchone()
        assert conn.execute("SELECT count(*) FROM webhook_events WHERE sanitized").fetchone() \
            == (0,)
        assert after == before
        assert conn.execute("SELECT count(*) FROM webhook_erasures").fetchone() == (0,)
