"""JSON that keeps every value exact, at orjson's speed where orjson can.

Writing fails in one known way: :class:`Unserializable`, with a readable reason. orjson writes
nearly everything, fast; what it refuses (an integer past 64 bits, nesting past its 255
levels) the standard library writes, as RQ's JSON serializer would. What neither can write
(nesting near the interpreter's recursion limit raises ``RecursionError``) is an error
retrying cannot fix: callers treat it as permanent, for that one delivery or event alone.

Reading (:func:`loads`) is orjson's, which turns an integer past 64 bits into a float; text
that may hold one is read again by the standard library, which keeps it exact.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["Unserializable", "dumps", "loads", "utf16_units"]

# Nineteen digits in a row: the shortest integer outside what orjson reads exactly (a signed
# or an unsigned 64-bit integer) has that many. Digits inside strings match too, which costs
# only a second, exact parse.
_LONG_DIGITS = re.compile(r"[0-9]{19}")


def loads(text: str) -> Any:
    """orjson's reading, with integers past 64 bits exact. Invalid JSON raises
    ``orjson.JSONDecodeError``; orjson is the stricter of the two, so what it read the
    standard library reads too."""
    value = orjson.loads(text)
    if _LONG_DIGITS.search(text):
        return json.loads(text)
    return value


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


def utf16_units(char: str) -> tuple[int, ...]:
    """The UTF-16 code units of one character: what JSON's ``\\uXXXX`` escapes spell it with
    (two, a surrogate pair, past the Basic Multilingual Plane)."""
    code = ord(char)
    if code <= 0xFFFF:
        return (code,)
    code -= 0x10000
    return (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
