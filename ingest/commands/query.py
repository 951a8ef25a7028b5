"""``ingest events`` and ``ingest sql``: look at what is stored without psql.

A machine with only Python (the quick start's) has no psql. ``ingest events`` shows the newest
events; ``ingest sql "select ..."`` runs one query in a read-only transaction and prints its
rows as a table that fits the terminal (or as JSON lines, ``--json``). Both read
``DATABASE_URL`` (from the ``ingest dev`` running here when the shell sets none)::

    ingest events --limit 5 --kind 'email.*'
    ingest sql "select kind, count(*) from webhook_events group by 1 order by 2 desc"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from ingest.config import Settings

__all__ = ["add_command"]

# Most rows `ingest sql` prints; a bigger answer is cut, and says so.
MAX_ROWS = 1000


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds").replace("+00:00", "Z")
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def _print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(dict(zip(columns, row)), default=str).decode() + "\n")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Values are never cut: a column folds its cells before it drops a character.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    Console().print(table)


def _query(settings: Settings, sql: str, params: Sequence[Any] = ()) -> tuple[
        list[str], list[tuple[Any, ...]], bool]:
    """Columns, at most MAX_ROWS rows, and whether there were more; read-only."""
    from sinks.postgres import connect

    with connect(settings.require_database()) as conn:
        conn.read_only = True
        cur = conn.execute(sql, params)
        if cur.description is None:
            return [], [], False
        rows = cur.fetchmany(MAX_ROWS + 1)
        return [c.name for c in cur.description], rows[:MAX_ROWS], len(rows) > MAX_ROWS


def cmd_events(args: argparse.Namespace) -> int:
    from sinks.base import matches_any

    from ingest.commands.choices import kind_problem, provider_problem

    problem = ((provider_problem(args.provider) if args.provider else None)
               or (kind_problem(args.kind) if args.kind else None))
    if problem:
        print(f"ingest events: {problem}", file=sys.stderr)
        return 2
    from sinks.postgres_data import newest_events

    settings = Settings.from_env()
    # The kind filter is a glob (as <SINK>_EVENTS): read newest first, keep the matching ones.
    wanted = args.limit if not args.kind else MAX_ROWS
    sql, params = newest_events(args.provider, wanted)
    columns, rows, _ = _query(settings, sql, params)
    if args.kind:
        rows = [r for r in rows if matches_any(r[2], (args.kind,))][:args.limit]
    _print_rows(columns, rows, args.json)
    if not args.json and not rows:
        print("no events stored yet" if not (args.provider or args.kind)
              else "no stored event matches", file=sys.stderr)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import psycopg

    settings = Settings.from_env()
    try:
        columns, rows, more = _query(settings, args.query)
    except psycopg.errors.ReadOnlySqlTransaction:
        print("ingest sql: only reading queries run here (the transaction is read-only)",
              file=sys.stderr)
        return 2
    except psycopg.errors.UndefinedTable as exc:
        if "webhook_" in str(exc):
            raise  # one of ours: not migrated yet (ingest.commands.errors says so)
        print(f"ingest sql: Postgres refused the query: {_first_line(exc)}", file=sys.stderr)
        return 2
    except (psycopg.ProgrammingError, psycopg.DataError) as exc:
        print(f"ingest sql: Postgres refused the query: {_first_line(exc)}", file=sys.stderr)
        return 2
    _print_rows(columns, rows, args.json)
    if more:
        print(f"(only the first {MAX_ROWS} rows: add a LIMIT)", file=sys.stderr)
    return 0


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest events`` and ``ingest sql`` (called by ingest.commands.cli)."""
    from sinks.postgres_data import EXAMPLE_QUERY

    p = add("events", cmd_events, "the newest stored events (without psql)")
    p.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    p.add_argument("--provider", help="only this provider's")
    p.add_argument("--kind", metavar="GLOB", help="only these kinds, e.g. 'email.*'")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p = add("sql", cmd_sql, "run one read-only SQL query against DATABASE_URL (without psql)")
    p.add_argument("query", help=f'e.g. "{EXAMPLE_QUERY}"')
    p.add_argument("--json", action="store_true", help="one JSON object a line")
