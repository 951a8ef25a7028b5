"""A paced outbox in Redis: events for one rate-limited target, shared by every worker.

Slack accepts about one message per second per incoming webhook, and workers on many
machines post to the same one. So instead of each job posting its own events, jobs *park*
their events here and wait; whichever worker next gets the target's *slot* (a Redis key that
exists for ``interval`` seconds after each message, ``SET NX PX``) *claims* what is waiting
and posts it as one message: the oldest single event when only a few wait, or a digest of up
to ``digest_max`` of them when more than ``digest_after`` wait, i.e. when posting them one by
one would take more than a few seconds. A burst from many workers so becomes one digest, and
the message rate never exceeds one per ``interval`` however many workers there are.

Per event, the state lives in Redis (every key under the namespace's ``names.key``):

- ``queue`` (sorted set, by park time) and ``items`` (hash: id -> event JSON): waiting;
- ``inflight`` (sorted set, by claim expiry): claimed by a worker that is posting it. A worker
  that dies mid-post leaves its claim to expire; the next claimer puts it back in the queue;
- ``sent:<id>`` (expires with the dedup TTL): posted; parking it again is a no-op, which is
  what makes the sink idempotent on ``event.id``;
- ``solo`` (set): events that were in a digest the target refused. Each goes alone from then
  on, so one bad event cannot fail the others with it;
- ``failed:<id>`` (holds the reason): the target refused the message carrying it alone. The
  job that parked it raises the permanent error; parking it again (``ingest dlq retry``)
  clears it.

A worker that crashes after the target accepted a message but before marking it sent makes
the next claimer post it again: at least once, like every HTTP receiver without an
idempotency key.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from redis import Redis

from ingest import safejson
from ingest.events import Event

if TYPE_CHECKING:
    from ingest.subjects import Subject

__all__ = ["Outbox", "erase_waiting"]

# KEYS: queue, items, inflight. ARGV: key prefix, ttl seconds, then id, json pairs.
_PARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local parked = 0
for i = 3, #ARGV, 2 do
    local id = ARGV[i]
    if redis.call('EXISTS', ARGV[1] .. 'sent:' .. id) == 0 then
        redis.call('DEL', ARGV[1] .. 'failed:' .. id)
        redis.call('HSET', KEYS[2], id, ARGV[i + 1])
        if not redis.call('ZSCORE', KEYS[3], id) then
            redis.call('ZADD', KEYS[1], 'NX', now, id)
        end
        parked = parked + 1
    end
end
for k = 1, 4 do redis.call('EXPIRE', KEYS[k], ARGV[2]) end
return parked
"""

# KEYS: queue, items, inflight, solo. ARGV: key prefix, digest_after, digest_max, claim ms.
# Returns id, json, id, json, ...: one message's worth of waiting events. An event in "solo"
# (it was in a digest the target refused) is only ever sent alone, so that one bad event
# fails by itself.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
    redis.call('ZREM', KEYS[3], id)
    if redis.call('EXISTS', ARGV[1] .. 'sent:' .. id) == 0
            and redis.call('HEXISTS', KEYS[2], id) == 1 then
        redis.call('ZADD', KEYS[1], 0, id)
    end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if #first == 0 then return {} end
local ids = first
if redis.call('SISMEMBER', KEYS[4], first[1]) == 0
        and redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[2]) then
    ids = {}
    local most = tonumber(ARGV[3])
    for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, 4 * most)) do
        if #ids >= most then break end
        if redis.call('SISMEMBER', KEYS[4], id) == 0 then table.insert(ids, id) end
    end
end
local out = {}
for _, id in ipairs(ids) do
    redis.call('ZREM', KEYS[1], id)
    local item = redis.call('HGET', KEYS[2], id)
    if item and redis.call('EXISTS', ARGV[1] .. 'sent:' .. id) == 0 then
        redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), id)
        table.insert(out, id)
        table.insert(out, item)
    end
end
return out
"""

# KEYS: queue, items, inflight. ARGV: key prefix, then ids. Back to the front of the queue.
_GIVE_BACK = """
for i = 2, #ARGV do
    local id = ARGV[i]
    redis.call('ZREM', KEYS[3], id)
    if redis.call('EXISTS', ARGV[1] .. 'sent:' .. id) == 0
            and redis.call('HEXISTS', KEYS[2], id) == 1 then
        redis.call('ZADD', KEYS[1], 0, id)
    end
end
return 1
"""

# KEYS: slot. ARGV: token. Frees the slot only if this worker still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Outbox:
    """The waiting events of one paced target. Every key starts with ``prefix``, which names
    the target by a digest, never by its URL."""

    def __init__(self, redis: Redis, prefix: str, *, interval: float, digest_after: int,
                 digest_max: int, done_ttl: int, claim_seconds: float) -> None:
        if interval <= 0 or digest_after < 1 or digest_max < 1:
            raise ValueError("Outbox needs interval > 0, digest_after >= 1 and digest_max >= 1")
        self.redis = redis
        self.prefix = prefix
        self.interval_ms = max(1, int(interval * 1000))
        self.digest_after = digest_after
        self.digest_max = digest_max
        self.done_ttl = done_ttl
        self.claim_ms = max(1, int(claim_seconds * 1000))
        self._keys = [prefix + "queue", prefix + "items", prefix + "inflight", prefix + "solo"]
        self._slot = prefix + "slot"
        self._token = secrets.token_hex(8)
        self._park = redis.register_script(_PARK)
        self._claim = redis.register_script(_CLAIM)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._release = redis.register_script(_RELEASE)

    def __repr__(self) -> str:
        return f"<Outbox {self.prefix} every {self.interval_ms} ms>"

    # -- a job's side ----------------------------------------------------------------------

    def park(self, events: Sequence[Event]) -> int:
        """Queue events not posted yet (clearing an earlier refusal). Returns how many.
        Raises :class:`ingest.safejson.Unserializable` (parking nothing) when an event cannot
        be written: the caller parks the others without it."""
        args: list[Any] = [self.prefix, self.done_ttl]
        for event in events:
            args += [event.id, safejson.dumps(event.to_job())]
        return int(self._park(keys=self._keys, args=args))

    def status(self, ids: Sequence[str]) -> tuple[set[str], dict[str, str]]:
        """Which of ``ids`` were posted, and which were refused (with the reason)."""
        if not ids:
            return set(), {}
        values = self.redis.mget([self.prefix + f"sent:{i}" for i in ids]
                                 + [self.prefix + f"failed:{i}" for i in ids])
        sent = {i for i, v in zip(ids, values[: len(ids)]) if v is not None}
        failed = {i: v.decode() if isinstance(v, bytes) else str(v)
                  for i, v in zip(ids, values[len(ids):]) if v is not None and i not in sent}
        return sent, failed

    # -- the slot holder's side ------------------------------------------------------------

    def try_slot(self) -> float:
        """0 when this worker now holds the slot (and may post one message), else the
        seconds until it may ask again."""
        if self.redis.set(self._slot, self._token, nx=True, px=self.interval_ms):
            return 0.0
        left = int(self.redis.pttl(self._slot))
        return left / 1000 if left > 0 else 0.001

    def slot_wait(self) -> float:
        """Seconds until the slot frees (0 when free), without taking it."""
        return max(0, int(self.redis.pttl(self._slot))) / 1000

    def release_slot(self) -> None:
        """Give back a slot that carried no message."""
        self._release(keys=[self._slot], args=[self._token])

    def hold(self, seconds: float) -> None:
        """Nobody posts to this target for ``seconds`` (the target said 429 Retry-After)."""
        self.redis.set(self._slot, self._token, px=max(self.interval_ms, int(seconds * 1000)))

    def claim(self) -> list[dict[str, Any]]:
        """One message's worth of waiting events (job dicts), now in flight with this worker."""
        reply = self._claim(keys=self._keys, args=[self.prefix, self.digest_after,
                                                   self.digest_max, self.claim_ms])
        return [orjson.loads(reply[i + 1]) for i in range(0, len(reply), 2)]

    def done(self, ids: Iterable[str]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for i in ids:
            pipe.set(self.prefix + f"sent:{i}", b"1", ex=self.done_ttl)
            pipe.zrem(self._keys[2], i)
            pipe.hdel(self._keys[1], i)
            pipe.srem(self._keys[3], i)
        pipe.execute()

    def isolate(self, ids: Sequence[str]) -> None:
        """The target refused a message carrying several events: send each alone from now
        on (back at the front of the queue), so only the event at fault fails."""
        if ids:
            self.redis.sadd(self._keys[3], *ids)
            self.redis.expire(self._keys[3], self.done_ttl)
            self.give_back(ids)

    def fail(self, ids: Iterable[str], reason: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for i in ids:
            pipe.set(self.prefix + f"failed:{i}", reason.encode(), ex=self.done_ttl)
            pipe.zrem(self._keys[2], i)
            pipe.hdel(self._keys[1], i)
        pipe.execute()

    def give_back(self, ids: Sequence[str]) -> None:
        """Claimed events that could not be posted go back to the front of the queue."""
        if ids:
            self._give_back(keys=self._keys, args=[self.prefix, *ids])


def erase_waiting(redis: Redis, prefixes: str, subject: Subject, dry_run: bool = False) -> int:
    """Remove one subject's events waiting in every outbox whose prefix matches the glob
    ``prefixes`` (``<namespace>slack:*:``: every Slack webhook's); returns how many (dry: would
    go). An event being posted right now is removed too: its claimer then finds it gone."""
    removed = 0
    for items in redis.scan_iter(match=prefixes + "items", count=500):
        prefix = items[: -len(b"items")]
        for event_id, value in redis.hgetall(items).items():
            if not subject.might_be_in(value):
                continue
            try:
                event = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if not (subject.in_event(event) if isinstance(event, dict) else False):
                continue
            removed += 1
            if dry_run:
                continue
            pipe = redis.pipeline(transaction=True)
            pipe.hdel(items, event_id)
            pipe.zrem(prefix + b"queue", event_id)
            pipe.zrem(prefix + b"inflight", event_id)
            pipe.srem(prefix + b"solo", event_id)
            pipe.execute()
    return removed
