"""Stale events: which state events are older than what was already processed for their record.

Providers send concurrently and retry late, and batches run on several workers at once, so an
update can be processed after a newer one about the same record. Only state events take part
(``ingest.kinds``): an activity event (an open, a reply, a call) is a fact of its own, never
stale, and never moves a mark, so it cannot make a later state event stale either. Each record
(provider, resource_type, resource_id) has a mark in Redis, ``<occurred_at in µs> <event id>``
of the newest event processed for it. Events compare by (occurred_at, event id), the order the
Postgres sink applies to ``webhook_records`` too, so every worker breaks ties the same way.

:func:`mark_stale` decides for a whole batch in one Lua script call (atomic per record):

- within the batch, every event but the newest of its record is stale;
- the newest is stale when the mark holds a newer event; otherwise it becomes the mark.

A batch retried after a crash reaches the same decision for its own events: the mark then
holds the batch's own event, which is not newer than itself. (Only when a newer event was
processed in between does the retry find its event stale, which it then is.) Marks live
``INGEST_DEDUP_TTL`` seconds after their last change, like dedup records, so Redis holds one
small key per record that changed within that window; for anything older, ``webhook_records``
is the truth (the Postgres sink never lets older data replace newer).

Sinks that skip stale events (``<SINK>_SKIP_STALE``) do not even get them, and
:func:`superseded` checks their events once more right before each delivery attempt: an event
whose record moved on while its job waited (a retry, a queue) is skipped then too, so such a
sink never gets an older update after a newer one.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from redis import Redis
from redis.commands.core import Script

from ingest import metrics
from ingest.constants import Names
from ingest.events import Event

if TYPE_CHECKING:
    from sinks.registry import EnabledSink

__all__ = ["for_sink", "mark_stale", "still_current", "superseded"]

# KEYS: record marks. ARGV: TTL, then per key its event's occurred_at (µs) and id (32 hex
# digits). Per key: 1 when a newer event holds the mark (the event is stale), else 0 (it holds
# the mark now). Ids compare as numbers, 8 hex digits at a time: Lua compares strings with the
# server's locale, which need not be bytewise.
_MARK = """
local function newer(a_at, a_id, b_at, b_id)
    if a_at ~= b_at then return a_at > b_at end
    for j = 1, 32, 8 do
        local x = tonumber(string.sub(a_id, j, j + 7), 16)
        local y = tonumber(string.sub(b_id, j, j + 7), 16)
        if x ~= y then return x > y end
    end
    return false
end
local out = {}
for i, key in ipairs(KEYS) do
    local at, id = ARGV[2 * i], ARGV[2 * i + 1]
    local mark = at .. ' ' .. id
    local stored = redis.call('GET', key)
    local stale = false
    if stored and stored ~= mark then
        local sep = string.find(stored, ' ', 1, true)
        stale = newer(tonumber(string.sub(stored, 1, sep - 1)), string.sub(stored, sep + 1),
                      tonumber(at), id)
    end
    if stale then
        out[i] = 1
    else
        if stored ~= mark then
            redis.call('SET', key, mark, 'EX', ARGV[1])
        end
        out[i] = 0
    end
end
return out
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

_scripts: weakref.WeakKeyDictionary[Redis, Script] = weakref.WeakKeyDictionary()


def _script(redis: Redis) -> Script:
    script = _scripts.get(redis)
    if script is None:
        script = _scripts[redis] = redis.register_script(_MARK)
    return script


def _key(names: Names, record: tuple[str, str, str]) -> str:
    provider, resource_type, resource_id = record
    digest = hashlib.sha256(f"{resource_type}\0{resource_id}".encode()).hexdigest()[:40]
    # "state:", not the "record:" of releases whose activity events moved marks too: those
    # marks are ignored (and expire), so no pre-upgrade open makes a state event stale.
    return names.key(f"state:{provider}:{digest}")


def _order(event: Event) -> tuple[int, str]:
    """(occurred_at in microseconds since the epoch, event id as 32 hex digits): the order
    webhook_records uses (uuids compare by their bytes), exact in Lua's doubles until 2255."""
    return (event.occurred_at - _EPOCH) // _MICROSECOND, event.id.replace("-", "")


def mark_stale(redis: Redis, names: Names, events: Sequence[Event], ttl: int) -> list[Event]:
    """``events`` in the same order, ``stale`` set on the state events older than what their
    record has seen (in this batch or before). Activity events and events about no record are
    never stale. One Redis call."""
    newest: dict[tuple[str, str, str], Event] = {}
    for event in events:
        record = event.state_record
        if record is not None and (record not in newest
                                   or _order(event) > _order(newest[record])):
            newest[record] = event
    if not newest:
        return list(events)
    args: list[str | int] = [ttl]
    for event in newest.values():
        micros, event_id = _order(event)
        args += [micros, event_id]
    replies = _script(redis)(keys=[_key(names, r) for r in newest], args=args, client=redis)
    winners = {event.id for event, stale in zip(newest.values(), replies) if not stale}
    return [e if e.state_record is None or e.id in winners or e.stale
            else replace(e, stale=True) for e in events]


def superseded(redis: Redis, names: Names, events: Sequence[Event]) -> set[str]:
    """Ids of the state ``events`` whose record's mark now holds a newer event (one MGET)."""
    about = [(e, r) for e in events if (r := e.state_record) is not None]
    if not about:
        return set()
    marks = redis.mget([_key(names, r) for _, r in about])
    out: set[str] = set()
    for (event, _), mark in zip(about, marks):
        if mark is None:
            continue
        at, _, mark_id = (mark.decode() if isinstance(mark, bytes) else str(mark)).partition(" ")
        if (int(at), mark_id) > _order(event):
            out.add(event.id)
    return out


def _skipped(enabled: EnabledSink, events: Sequence[Event], kept: list[Event]) -> list[Event]:
    if len(kept) < len(events):
        metrics.SINK_EVENTS.labels(enabled.name, "stale").inc(len(events) - len(kept))
    return kept


def for_sink(enabled: EnabledSink, events: Sequence[Event]) -> list[Event]:
    """The events a sink gets: without the stale ones when it skips them (counted as
    ``ingest_sink_events_total{outcome="stale"}``)."""
    if not enabled.skip_stale:
        return list(events)
    return _skipped(enabled, events, [e for e in events if not e.stale])


def still_current(redis: Redis, names: Names, enabled: EnabledSink,
                  events: Sequence[Event]) -> list[Event]:
    """Right before a delivery attempt: for a sink that skips stale events, drop the state
    events whose record has seen a newer one since they were processed (counted like
    :func:`for_sink`). Activity always goes through."""
    if not enabled.skip_stale:
        return list(events)
    gone = superseded(redis, names, events)
    return _skipped(enabled, events, [e for e in events if not e.stale and e.id not in gone])
