"""Bounded metric labels from signed but untrusted input.

Every label value a payload can choose is cut to ``MAX_LABEL_CHARS`` printable characters;
``kind`` is a label only when it is one of the kinds our tables produce (else ``unknown``);
``event_type`` of unknown events takes at most ``MAX_EVENT_TYPE_LABELS`` distinct values per
provider, the rest counted as ``other``. The set of admitted event types lives in Redis, so the
bound holds across every worker process, and each process asks Redis once per new value.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from ingest.kinds import UNKNOWN, VOCABULARY
from ingest.providers import load_providers
from ingest.providers.base import KindTable

__all__ = ["MAX_EVENT_TYPE_LABELS", "MAX_LABEL_CHARS", "OTHER", "event_type_label",
           "kind_label", "label"]

# Longest label value (characters) a payload can put into a metric.
MAX_LABEL_CHARS = 100
# Most distinct event_type label values of ingest_unknown_events_total, per provider.
MAX_EVENT_TYPE_LABELS = 100
# The event_type label of unknown events past the bound.
OTHER = "other"


@functools.cache
def _label_kinds() -> frozenset[str]:
    """Kinds the loaded providers' tables produce without a wildcard, plus the vocabulary:
    the kind label's values (bounded: tables are code, not payload)."""
    tables = [p.kinds for p in load_providers().values() if isinstance(p, KindTable)]
    return VOCABULARY | {kind for table in tables for kind in table.values()
                         if not kind.endswith("*")} | {UNKNOWN}

# KEYS: the provider's set. ARGV: value, bound. 1 when the value is (now) admitted.
_ADMIT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('SADD', KEYS[1], ARGV[1])
    return 1
end
return 0
"""

_lock = threading.Lock()
_decided: dict[tuple[str, str, str], str] = {}


def label(value: str) -> str:
    """``value`` with control and other unprintable characters removed, at most
    ``MAX_LABEL_CHARS`` characters."""
    if value.isprintable() and len(value) <= MAX_LABEL_CHARS:
        return value
    cleaned = "".join(c for c in value[: 4 * MAX_LABEL_CHARS] if c.isprintable())
    return cleaned[:MAX_LABEL_CHARS] or UNKNOWN


def kind_label(kind: str) -> str:
    return kind if kind in _label_kinds() else UNKNOWN


def event_type_label(rt: Any, provider: str, event_type: str) -> str:
    """``event_type`` (cleaned) while the provider has fewer than ``MAX_EVENT_TYPE_LABELS``
    admitted values or it is one of them; ``other`` after that."""
    value = label(event_type)
    key = (rt.names.namespace, provider, value)
    decided = _decided.get(key)
    if decided is not None:
        return decided
    try:
        admitted = rt.redis.eval(_ADMIT, 1, rt.names.key(f"metrics:event_types:{provider}"),
                                 value, MAX_EVENT_TYPE_LABELS)
    except Exception:  # metrics must never fail a batch: count it as other, decide later
        return OTHER
    out = value if int(admitted) else OTHER
    with _lock:
        # The cache itself is bounded: a flood of distinct names would otherwise grow it.
        if len(_decided) < 100 * MAX_EVENT_TYPE_LABELS:
            _decided[key] = out
    return out
