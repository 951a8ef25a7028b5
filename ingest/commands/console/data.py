"""What the console's pages and its JSON API show, gathered from the same functions the CLI
uses: ``ingest status`` (build_status), ``ingest refused`` (read_refusals), ``ingest dlq``
(list/retry/purge), ``ingest replay`` (replay), and the sinks' own readers of what they
store (sinks.browse: events, records; sinks.outcomes: each sink's outcome per event).

Pages and API call the same functions here, so the two never disagree. Every function is
synchronous (Redis and psycopg): Starlette runs them in its thread pool.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from ingest import constants
from ingest.config import Settings

if TYPE_CHECKING:
    import psycopg
    from redis import Redis

__all__ = ["BadInput", "Console", "SearchForm", "event_id_or_400"]

# The keys of a sink's outcome the API shows (DESIGN.md, "Added in the third round").
OUTCOME_KEYS = ("state", "at", "attempts", "reason")


class BadInput(ValueError):
    """A request the console cannot act on: answered 400 with this message."""


def event_id_or_400(value: str) -> str:
    """``value`` as an event id (a UUID, lower case), or :class:`BadInput`."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadInput("not an event id: an event id is a UUID "
                       "(e.g. 0b6ad3d2-5c2e-5d0a-9a55-3b1a3c1f8e21)") from None


@dataclass(frozen=True)
class SearchForm:
    """The events search, from the API's query string or the page's POSTed form."""

    email: str | None = None
    resource_id: str | None = None
    event_id: str | None = None
    delivery_id: str | None = None
    provider: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = constants.CONSOLE_PAGE_SIZE
    after: str | None = None
    # What the person typed for since/until (shown back in the form).
    since_text: str = ""
    until_text: str = ""

    FIELDS = ("email", "resource_id", "event_id", "delivery_id", "provider", "kind", "since",
              "until", "limit", "after")

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> SearchForm:
        from ingest.commands.choices import kind_problem, provider_problem
        from ingest.commands.replay import parse_when

        def text(name: str) -> str | None:
            value = values.get(name)
            value = str(value).strip() if value is not None else ""
            return value or None

        unknown = sorted(set(values) - set(cls.FIELDS) - {"csrf"})
        if unknown:
            raise BadInput(f"unknown search field {unknown[0]!r} (fields: {', '.join(cls.FIELDS)})")
        provider = text("provider")
        if provider is not None and (problem := provider_problem(provider)):
            raise BadInput(problem)
        kind = text("kind")
        if kind is not None and (problem := kind_problem(kind)):
            raise BadInput(problem)
        for name in ("event_id", "delivery_id"):
            value = text(name)
            if value is not None:
                try:
                    uuid.UUID(value)
                except ValueError:
                    raise BadInput(f"{name} must be a UUID, got a value that is not") from None
        when: dict[str, datetime | None] = {}
        for name in ("since", "until"):
            value = text(name)
            try:
                when[name] = parse_when(value) if value is not None else None
            except ValueError:
                raise BadInput(f"{name} must be an ISO 8601 time (2026-03-01T10:00Z) or a "
                               "span back from now (30m, 6h, 7d)") from None
        limit_text = text("limit")
        try:
            limit = int(limit_text) if limit_text is not None else constants.CONSOLE_PAGE_SIZE
        except ValueError:
            raise BadInput("limit must be a whole number") from None
        if not 1 <= limit <= constants.CONSOLE_MAX_PAGE_SIZE:
            raise BadInput(f"limit must be between 1 and {constants.CONSOLE_MAX_PAGE_SIZE}")
        return cls(email=text("email"), resource_id=text("resource_id"),
                   event_id=text("event_id"), delivery_id=text("delivery_id"),
                   provider=provider, kind=kind, since=when["since"], until=when["until"],
                   limit=limit, after=text("after"), since_text=text("since") or "",
                   until_text=text("until") or "")

    def fields(self) -> dict[str, str]:
        """The form's fields as typed (for the page's form and its "Older" button)."""
        out = {"email": self.email, "resource_id": self.resource_id, "event_id": self.event_id,
               "delivery_id": self.delivery_id, "provider": self.provider, "kind": self.kind,
               "since": self.since_text, "until": self.until_text}
        return {k: v or "" for k, v in out.items()}


def _api_outcomes(outcomes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {sink: {k: o.get(k) for k in OUTCOME_KEYS} for sink, o in outcomes.items()}


class Console:
    """The console's data, for one process: its settings and a Redis client; a Postgres
    connection per call (a console is used by people, a few requests a minute)."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis

    @contextmanager
    def _db(self) -> Iterator[psycopg.Connection[Any]]:
        from sinks.postgres import connect

        with connect(self.settings.require_database(), autocommit=True) as conn:
            yield conn

    def close(self) -> None:
        self.redis.close()

    # -- overview ---------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """``ingest status``'s object (providers, sinks, queues, attention), and per sink the
        last hour's outcomes where the outcomes table keeps them."""
        from ingest.commands.status import build_status

        from ingest.commands.errors import explain

        status = build_status(self.redis, self.settings)
        status["sink_hour"], status["sink_hour_error"] = {}, None
        try:
            status["sink_hour"] = self._sink_hour()
        except Exception as exc:
            # Postgres away: the rest of the page (all from Redis) still answers.
            known = explain(exc)
            if known is None:
                raise
            status["sink_hour_error"] = known[0]
        return status

    def _sink_hour(self) -> dict[str, dict[str, int]]:
        """Per enabled sink: events delivered, failing (retrying), dead-lettered and skipped as
        stale in the last hour, as the sinks' outcomes table has them now
        (sinks.outcome_counts)."""
        from sinks.outcome_counts import outcome_counts

        since = datetime.now(timezone.utc) - timedelta(hours=1)
        derived = "postgres" if "postgres" in self.settings.sinks else None
        with self._db() as conn:
            counts = outcome_counts(conn, since, derived)
        return {sink: {"delivered": counts.get(sink, {}).get("delivered", 0),
                       "failed": counts.get(sink, {}).get("retrying", 0),
                       "dead": counts.get(sink, {}).get("dead", 0),
                       "stale": counts.get(sink, {}).get("stale", 0)}
                for sink in self.settings.sinks}

    # -- events and records -----------------------------------------------------------------

    def _with_outcomes(self, conn: psycopg.Connection[Any],
                       events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from sinks.outcomes import enabled_sink_globs, sink_outcomes

        found = sink_outcomes(conn, events, enabled_sink_globs(self.settings)) if events else {}
        return [{**e, "sinks": dict(found.get(str(e["id"]), {}))} for e in events]

    def search(self, form: SearchForm) -> tuple[list[dict[str, Any]], str | None]:
        from sinks.browse import search_events

        with self._db() as conn:
            try:
                events, cursor = search_events(
                    conn, email=form.email, resource_id=form.resource_id,
                    event_id=form.event_id, delivery_id=form.delivery_id,
                    provider=form.provider, kind=form.kind, since=form.since,
                    until=form.until, limit=form.limit, after=form.after)
            except ValueError as exc:
                raise BadInput(str(exc)) from None
            return self._with_outcomes(conn, events), cursor

    def event(self, event_id: str) -> dict[str, Any] | None:
        from sinks.browse import get_event

        with self._db() as conn:
            found = get_event(conn, event_id_or_400(event_id))
            if found is None:
                return None
            return self._with_outcomes(conn, [found])[0]

    def record(self, provider: str, resource_type: str,
               resource_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        from sinks.browse import record_timeline

        with self._db() as conn:
            row, events = record_timeline(conn, provider, resource_type, resource_id)
            return row, self._with_outcomes(conn, events)

    @staticmethod
    def api_event(event: Mapping[str, Any]) -> dict[str, Any]:
        """An event as the API shows it: each sink's outcome with the documented keys."""
        return {**event, "sinks": _api_outcomes(event.get("sinks") or {})}

    # -- replay to one sink -----------------------------------------------------------------

    def replay(self, event: Mapping[str, Any], sink: str) -> str:
        """Hand one stored event to one enabled sink again, through ``ingest replay`` (the
        archived delivery normalized by today's code); a line saying what happened."""
        from ingest.commands.replay import Selection, replay
        from ingest.exceptions import ConfigError

        if sink not in self.settings.sinks:
            raise BadInput(f"sink {sink!r} is not enabled here (enabled: "
                           f"{', '.join(self.settings.sinks) or 'none'})")
        delivery_id = event.get("delivery_id")
        if not delivery_id:
            raise BadInput("this event has no archived delivery to replay")
        selection = Selection(provider=str(event["provider"]), delivery_id=str(delivery_id),
                              event_ids=(str(event["id"]),))
        try:
            report = replay(self.settings, selection, [sink])
        except ConfigError as exc:
            raise BadInput(str(exc)) from None
        if report.not_normalized:
            return f"the delivery no longer normalizes: {next(iter(report.not_normalized.values()))}"
        if report.failed.get(sink):
            return f"{sink} failed: {report.failed[sink][0]}"
        if report.stale[sink]:
            return f"not sent: {sink} skips stale events and this one is superseded"
        if not report.sent[sink]:
            return f"not sent: {sink} does not take events of this kind"
        return f"sent to {sink}"

    # -- dead letters -----------------------------------------------------------------------

    def sink_labels(self) -> list[str]:
        from ingest.commands.dlq import queues

        return [label for label, _ in queues(self.settings, None, self.redis)]

    def check_sink(self, sink: str | None) -> str | None:
        if sink is None or sink == "":
            return None
        labels = self.sink_labels()
        if sink not in labels:
            raise BadInput(f"no sink {sink!r} (have: {', '.join(labels)})")
        return sink

    def dead_letters(self, sink: str | None = None) -> list[dict[str, Any]]:
        """One entry per dead event (a failed job of several events gives several), newest
        first: ``{"sink", "event_id", "reason", "failed_at"}``."""
        from ingest.commands.dlq import list_failures

        out: list[dict[str, Any]] = []
        for failure in list_failures(self.redis, self.settings, self.check_sink(sink)):
            for event_id in failure.ids or ("",):
                out.append({"sink": failure.sink, "event_id": event_id or None,
                            "reason": failure.reason, "failed_at": failure.failed_at})
        out.sort(key=lambda d: (d["failed_at"] is not None, d["failed_at"] or datetime.min),
                 reverse=True)
        return out

    def act_on_dead_letters(self, action: str, body: Mapping[str, Any]) -> int:
        """``retry`` or ``discard`` the dead letters ``{"sink", "event_ids": [...]}`` or
        ``{"sink", "all": true}`` select; how many events (or, with ``all``, jobs) it took."""
        from ingest.commands.dlq import purge_failures, retry_failures

        sink = body.get("sink")
        if not isinstance(sink, str) or not sink:
            raise BadInput('"sink" is required: the sink whose dead letters to act on')
        sink = self.check_sink(sink)
        every = body.get("all")
        ids = body.get("event_ids")
        if every is True and ids is None:
            selected = None
        elif every in (None, False) and isinstance(ids, list) and ids \
                and all(isinstance(i, str) and i for i in ids):
            selected = set(ids)
        else:
            raise BadInput('give either "event_ids": [...] (a non-empty list of ids) or '
                           '"all": true')
        act = retry_failures if action == "retry" else purge_failures
        return act(self.redis, self.settings, sink, selected)

    # -- refused requests -------------------------------------------------------------------

    def refused(self) -> list[dict[str, Any]]:
        from ingest.providers import load_providers
        from ingest.refusals import UNKNOWN, read_refusals

        return read_refusals(self.redis, self.settings.names,
                             [*sorted(load_providers()), UNKNOWN])
