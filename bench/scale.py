"""What one event costs each shared server: the inputs of the scale model (docs/performance.md).

:func:`snapshot` reads the bench's own Redis (``INFO commandstats``, ``INFO stats``, the AOF
size) and Postgres (``pg_current_wal_lsn()``, ``pg_stat_database`` for the bench database)
before and after a phase; :func:`per_event` turns two snapshots into figures per event. Both
servers belong to the bench alone, so every command, byte and WAL record between the two
snapshots is the pipeline's, apart from the bench's own reads: one INFO per snapshot, subtracted, and
its polling queries, which write nothing and so add no WAL and take no transaction id.

:func:`cpu_per_event` turns a phase's CPU split (cores, from bench.procs.CpuMeter) into
microseconds of CPU per event per process type, and their sum over the pipeline's processes:
a cost that does not depend on how many cores were idle, so scaling can be judged on a
machine that has none to spare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis import Redis

__all__ = ["PIPELINE", "cpu_per_event", "per_event", "snapshot"]

# The processes an event passes through; the load generator and the bench are not the product.
PIPELINE = ("acceptor", "workers", "redis", "postgres")


def cpu_per_event(cpu: dict[str, float], events: int) -> dict[str, float]:
    """Microseconds of CPU per event for each pipeline process type, and ``pipeline``, their sum."""
    seconds = {k: cpu.get(k, 0.0) * cpu["wall"] for k in PIPELINE}
    out = {k: v / events * 1e6 if events else 0.0 for k, v in seconds.items()}
    out["pipeline"] = sum(out[k] for k in PIPELINE)
    return out


def snapshot(redis: Redis, sql: Callable[..., list[tuple[Any, ...]]]) -> dict[str, Any]:
    info = redis.info("all")
    commands = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()
                if k.startswith("cmdstat_")}
    # Transaction ids, not pg_stat_database: a backend publishes its statistics up to 10 s
    # late once idle, while an id is taken the moment a transaction first writes, and the
    # bench's own polls (read-only) take none.
    (lsn, xid), = sql("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn,"
                      " pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
    return {
        "t": time.monotonic(),
        "redis_commands": commands,
        "redis_in": int(info["total_net_input_bytes"]),
        "redis_out": int(info["total_net_output_bytes"]),
        "redis_aof": int(info.get("aof_current_size", 0)),
        "redis_memory": int(info["used_memory"]),
        "wal": int(lsn), "xid": int(xid),
    }


def per_event(before: dict[str, Any], after: dict[str, Any], events: int,
              own_redis_commands: int = 1) -> dict[str, Any]:
    """Costs per event between two snapshots. ``own_redis_commands``: the bench's INFO calls.

    Redis counts every command it runs, those a Lua script runs included (the dedup claim
    and the stale check are one script call per batch, a SET or GET per event inside).
    """
    commands = {k: after["redis_commands"].get(k, 0) - before["redis_commands"].get(k, 0)
                for k in after["redis_commands"]}
    commands = {k: v for k, v in commands.items() if v > 0}
    commands["info"] = max(0, commands.get("info", 0) - own_redis_commands)
    total = sum(commands.values())
    n = max(1, events)
    return {
        "events": events,
        "redis_commands": total / n,
        "redis_by_command": {k: v / n for k, v in sorted(commands.items(),
                                                         key=lambda kv: -kv[1]) if v},
        "redis_in_bytes": (after["redis_in"] - before["redis_in"]) / n,
        "redis_out_bytes": (after["redis_out"] - before["redis_out"]) / n,
        # None when Redis rewrote its append-only file during the phase (the file shrank).
        "redis_aof_bytes": ((after["redis_aof"] - before["redis_aof"]) / n
                            if after["redis_aof"] >= before["redis_aof"] else None),
        # Held until the keys expire: dedup records and record marks for INGEST_DEDUP_TTL,
        # finished jobs for a minute (so an upper bound of what stays).
        "redis_memory_bytes": (after["redis_memory"] - before["redis_memory"]) / n,
        "wal_bytes": (after["wal"] - before["wal"]) / n,
        "pg_write_transactions": (after["xid"] - before["xid"]) / n,
    }
