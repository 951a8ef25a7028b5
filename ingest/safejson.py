"""JSON writing that fails in one known way: :class:`Unserializable`, with a readable reason.

orjson writes nearly everything, fast; what it refuses (an integer past 64 bits, nesting past
its 255 levels) the standard library writes, as RQ's JSON serializer would. What neither can
write (nesting near the interpreter's recursion limit raises ``RecursionError``) is an error
retrying cannot fix: callers treat it as permanent, for that one delivery or event alone.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["Unserializable", "dumps"]


class Unserializable(ValueError):
    """A value neither orjson nor the standard library can write as JSON."""


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        return json.dumps(value).encode("utf-8")
    except RecursionError:
        raise Unserializable("cannot be written as JSON: nested too deeply") from None
    except (TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise Unserializable(f"cannot be written as JSON: {type(exc).__name__} {first}"
                             .rstrip()) from None
