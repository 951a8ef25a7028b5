"""Exactly-once claims in Redis.

Each event's dedup record goes through two states:

- ``claimed:<job id>`` (expires after ``CLAIM_TTL``): a batch job owns the event and is
  handing it to the sinks. If that job dies, RQ retries it with the same id, and the retry
  recognises its own claim and carries on. If it never comes back, the claim expires and a
  redelivery of the event gets processed.
- ``done`` (expires after ``INGEST_DEDUP_TTL``): the sink jobs for it exist. Any later copy is
  a duplicate.

A copy that finds the event claimed by *another* live job is dropped: that job (or its retry)
delivers it. All claims of a batch are one Lua script call, and so are all ``done`` marks: one
command for the whole batch instead of two per event, which is most of what the claims cost
the worker's CPU in redis-py (the script also makes each set-or-read atomic).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence

from redis import Redis
from redis.commands.core import Script

from ingest.constants import CLAIM_TTL, Names
from ingest.events import Event

__all__ = ["claim", "mark_done"]

_DONE = b"done"

# KEYS: dedup keys. ARGV: claim TTL, then each key's owner mark. Per key: 1 when its job owns
# the event.
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
    local mine = ARGV[i + 1]
    if redis.call('SET', key, mine, 'NX', 'EX', ARGV[1]) then
        out[i] = 1
    elseif redis.call('GET', key) == mine then
        out[i] = 1
    else
        out[i] = 0
    end
end
return out
"""

# KEYS: dedup keys. ARGV: done mark, TTL.
_MARK_DONE = """
for _, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[1], 'EX', ARGV[2])
end
return #KEYS
"""

# Registered scripts per client (EVALSHA, loaded again by redis-py if the server lost them).
_scripts: weakref.WeakKeyDictionary[Redis, tuple[Script, Script]] = weakref.WeakKeyDictionary()


def _registered(redis: Redis) -> tuple[Script, Script]:
    scripts = _scripts.get(redis)
    if scripts is None:
        scripts = _scripts[redis] = (redis.register_script(_CLAIM),
                                     redis.register_script(_MARK_DONE))
    return scripts


def _key(names: Names, event: Event) -> str:
    digest = hashlib.sha256(event.dedup_key.encode()).hexdigest()[:40]
    return names.dedup_key(event.provider, digest)


def claim(redis: Redis, names: Names, owner: str | Sequence[str],
          events: Sequence[Event]) -> list[bool]:
    """For each event, True when its job should deliver it (new, or already that job's).
    ``owner``: the job id, or one per event when the events come from several jobs run
    together (workers.grouping): each job's retry then recognises its own claims."""
    if not events:
        return []
    owners = [owner] * len(events) if isinstance(owner, str) else list(owner)
    if len(owners) != len(events):
        raise ValueError(f"{len(owners)} owners for {len(events)} events")
    marks = {o: f"claimed:{o}".encode() for o in set(owners)}
    claim_script, _ = _registered(redis)
    replies = claim_script(keys=[_key(names, e) for e in events],
                           args=[CLAIM_TTL, *(marks[o] for o in owners)], client=redis)
    return [bool(r) for r in replies]


def mark_done(redis: Redis, names: Names, events: Sequence[Event], ttl: int) -> None:
    if not events:
        return
    _, done_script = _registered(redis)
    done_script(keys=[_key(names, e) for e in events], args=[_DONE, ttl], client=redis)
