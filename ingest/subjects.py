"""Whom ``ingest erase`` erases, how each place recognizes them, and how a raw delivery that
also holds other people's events is rewritten without theirs.

Recognizing an address. Raw bodies are the bytes a provider signed, and JSON lets them spell
any character as an escape: ``jane\\u0040example.com``, ``\\u004A`` for a letter, ``\\/`` for
a slash, hex in either case; a body inside an RQ job or a spool record is JSON inside JSON, so
the same escape there has more backslashes. Every place is therefore looked at in two steps:

1. ``might_be_in(text)``: a cheap test on the raw text: the address as is (any case), or, only
   when the text holds an escape of one of the address's characters (one fast pass:
   ``escapes_pattern``; the ``\\/`` in every URL does not count), a regular expression that
   takes each character of the address as itself or as an escape behind any number of
   backslashes. False means the text cannot hold the address however it is decoded; most jobs
   and rows stop here.
2. ``in_value(value)``: the decoded JSON (strings that are JSON themselves, such as an
   envelope's body, are decoded too), compared string by string, case-insensitively, as a whole
   address: ``mary.jane@example.com`` and ``jane@example.community`` are other people.

Other spellings of the address a person would call the same (Unicode NFKC): the address given
is normalized (``jane＠example.com`` typed with a fullwidth at-sign is ``jane@example.com``),
and text holding a compatibility character that NFKC turns into one of the address's (the
fullwidth ``＠``, the small ``﹫``, fullwidth letters and digits), as is or as a JSON escape, is
compared in its NFKC form too. Postgres pre-selects such rows by their at-sign (any of its
spellings); the rest of the address is confirmed in Python.

A record (``--resource``) is recognized by the events its deliveries normalize into; the same
cheap test on its id spares normalizing deliveries that cannot be about it.

Rewriting a delivery (:func:`without_subject`). A delivery that normalizes into several events,
some of them the subject's and some not (a Salesloft ``data`` array), is written again without
the subject's elements: its events are computed, then each list in the body (shallowest first)
is tried without the elements that are the subject's; a candidate is taken only when it no
longer mentions the subject and normalizes into exactly the other events, as they were. The
rewritten envelope carries ``erased_at``: its body is no longer what the provider signed. A
delivery whose events are all the subject's, that mentions the subject outside any such
element (a header, the wrapper), or that cannot be normalized, goes whole; a single event that
mentions several people is the subject's (as its ``webhook_events`` row is), so its delivery
goes whole too: one event's values cannot be split between people.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson

from ingest import safejson
from ingest.events import Delivery, isoformat
from ingest.providers import Provider

__all__ = ["EmailSubject", "Erasure", "ResourceSubject", "SqlMatch", "Subject",
           "escaped_pattern", "escapes_pattern", "normalized_address", "parse_resource",
           "without_subject"]

# How many strings-that-are-JSON deep a value is decoded: an RQ job's envelope body is 1, a
# JSON text inside that body 2; deeper than this is not something a provider sends.
_MAX_NESTING = 4
# Lists tried when rewriting a delivery (shallowest first), and how deep they may sit.
_MAX_LISTS = 32
_MAX_LIST_DEPTH = 4

# A whole address, not part of another: no address character just before it, no domain
# character (or a dot and one) just after. A quote, <, :, = or / before it is fine.
_BEFORE = r"(?<![\w.+-])"
_AFTER = r"(?![\w-]|\.[\w-])"


def escaped_pattern(text: str) -> str:
    """A regular expression (for Python's ``re`` and Postgres' ``~*`` alike) matching ``text``
    where any character may be a JSON ``\\uXXXX`` escape (of either case of a letter), a
    slash ``\\/``, a quote ``\\"``, behind any number of backslashes (JSON inside JSON).
    Match it case-insensitively: hex digits and letters come in either case."""
    parts = []
    for char in text:
        variants = {char, char.lower(), char.upper()}
        escapes = sorted({_json_escape(v) for v in variants if len(v) == 1})
        alternatives = [_literal(char), r"\\+" + "(?:" + "|".join(escapes) + ")"]
        if char in '/"':
            alternatives.append(r"\\+" + re.escape(char))
        elif char == "\\":
            alternatives = [r"\\+"]
        parts.append("(?:" + "|".join(alternatives) + ")")
    return "".join(parts)


def _json_escape(char: str) -> str:
    return r"\\+".join(f"u{unit:04x}" for unit in safejson.utf16_units(char))


def escapes_pattern(text: str) -> str:
    """A regular expression matching any JSON escape that may spell a character of ``text``
    (``\\u`` and the hex of either case of it, ``\\/``, ``\\"``), with hex digits in lower
    case: match it against lower-cased text. Bodies are full of escapes of other characters
    (``\\/`` in every URL, ``\\u00e9``); this finds in one fast pass whether any could be part
    of an escaped spelling of ``text``."""
    codes: set[str] = set()
    for char in text:
        for variant in {char, char.lower(), char.upper()}:
            if len(variant) == 1:
                code = ord(variant)
                if code > 0xFFFF:
                    code = 0xD800 + ((code - 0x10000) >> 10)
                codes.add(f"u{code:04x}")
    short = [re.escape(c) for c in sorted(set(text) & set('/"\\'))]
    return r"\\(?:" + "|".join(sorted(codes) + short) + ")"


def _literal(char: str) -> str:
    """``char`` in a pattern both regex dialects read alike: letters and digits as they are,
    anything else as a ``\\uXXXX`` (or ``\\UXXXXXXXX``) code point escape."""
    if char.isascii() and char.isalnum():
        return char
    code = ord(char)
    return rf"\u{code:04x}" if code <= 0xFFFF else rf"\U{code:08x}"


# Where the compatibility characters a person would read as an address's are: general
# punctuation, small form variants, halfwidth and fullwidth forms.
_COMPAT_RANGES = ((0x2000, 0x2070), (0xFE50, 0xFE70), (0xFF00, 0xFFF0))


@functools.cache
def _compat_spellings() -> dict[str, tuple[str, ...]]:
    """For each character, the other single characters NFKC turns into it (``@``: ``＠``,
    ``﹫``; ``a``: ``ａ``, ...), from the ranges above."""
    found: dict[str, list[str]] = {}
    for low, high in _COMPAT_RANGES:
        for code in range(low, high):
            char = chr(code)
            folded = unicodedata.normalize("NFKC", char)
            if len(folded) == 1 and folded != char:
                found.setdefault(folded.lower(), []).append(char)
    return {k: tuple(v) for k, v in found.items()}


def _variants_of(text: str) -> list[str]:
    """The compatibility spellings of every character of ``text`` (see above)."""
    spellings = _compat_spellings()
    return sorted({v for c in set(text.lower()) for v in spellings.get(c, ())})


def _looks_like_json(text: str) -> bool:
    head = text[:64].lstrip()
    return head[:1] in ("{", "[")


@dataclass(frozen=True)
class SqlMatch:
    """How Postgres finds the subject's rows.

    ``events`` and ``records`` select rows that are the subject's through an index
    (``webhook_events`` as ``e``, ``webhook_records`` as ``r``). ``text``, when set, is a
    condition on ``{x}``, a row's lower-cased text (a body, a row as text), that every row
    mentioning the subject passes; the rows it selects are confirmed in Python
    (``Subject.in_value``)."""

    events: str
    records: str
    params: dict[str, Any]
    text: str | None = None

    def mentions(self, expression: str) -> str:
        if self.text is None:
            return "false"
        return self.text.replace("{x}", f"({expression})")


class Subject(Protocol):
    """Whom or what to erase, and how to recognize it in each place."""

    @property
    def sha256(self) -> str: ...

    def might_be_in(self, text: str | bytes) -> bool:
        """False when ``text`` (raw JSON at any depth, or free text; UTF-8 bytes as well) cannot
        hold the subject."""
        ...

    def in_value(self, value: Any) -> bool:
        """A decoded JSON value (JSON texts inside it decoded too) mentions the subject."""
        ...

    def in_text(self, text: str) -> bool:
        """Free text (a traceback, damaged bytes) or a JSON text mentions the subject."""
        ...

    def in_event(self, event: dict[str, Any]) -> bool: ...

    def in_envelope(self, envelope: dict[str, Any]) -> bool: ...

    def sql(self) -> SqlMatch: ...


def normalized_address(text: str) -> str:
    """An email address as every lookup by address compares it (``lower(contact_email)``):
    NFKC (an address typed with a fullwidth ＠, or fullwidth letters, is the ASCII address),
    without surrounding blanks, lower-cased."""
    return unicodedata.normalize("NFKC", text).strip().lower()


@dataclass(frozen=True)
class EmailSubject:
    """A person by email address, matched case-insensitively, as a whole address, anywhere it
    appears, however JSON spells it."""

    address: str
    _loose: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _exact: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _escapes: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _escapes_b: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    _wide: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _wide_b: re.Pattern[bytes] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        address = normalized_address(self.address)
        if "@" not in address or len(address) < 3:
            raise ValueError("--email needs an email address")
        object.__setattr__(self, "address", address)
        # Text holding another spelling of one of the address's characters, as is or as a
        # JSON escape, is looked at again in its NFKC form.
        variants = _variants_of(address)
        wide = None
        wide_b = None
        if variants:
            escapes = "|".join(f"u{ord(v):04x}" for v in variants)
            wide = re.compile("[" + "".join(re.escape(v) for v in variants) + "]|\\\\+(?:"
                              + escapes + ")", re.IGNORECASE)
            wide_b = re.compile(b"|".join(re.escape(v.encode()) for v in variants)
                                + b"|\\\\+(?:" + escapes.encode() + b")", re.IGNORECASE)
        object.__setattr__(self, "_wide", wide)
        object.__setattr__(self, "_wide_b", wide_b)
        object.__setattr__(self, "_loose", re.compile(escaped_pattern(address), re.IGNORECASE))
        object.__setattr__(self, "_exact", re.compile(_BEFORE + re.escape(address) + _AFTER,
                                                      re.IGNORECASE))
        escapes = escapes_pattern(address)
        object.__setattr__(self, "_escapes", re.compile(escapes))
        object.__setattr__(self, "_escapes_b", re.compile(escapes.encode()))

    def __repr__(self) -> str:  # the address never prints
        return f"EmailSubject(sha256={self.sha256[:12]}...)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.address.encode()).hexdigest()

    def might_be_in(self, text: str | bytes) -> bool:
        if isinstance(text, bytes):
            if self.address.isascii():
                # Bytes as they are: ASCII lower-casing is all an ASCII address needs, and
                # UTF-8 never hides an ASCII byte inside another character.
                low_b = text.lower()
                if self.address.encode() in low_b:
                    return True
                if self._escapes_b.search(low_b) is None and (
                        self._wide_b is None or self._wide_b.search(text) is None):
                    return False
            text = text.decode("utf-8", "replace")
        low = text.lower()
        if self.address in low:
            return True
        if self._escapes.search(low) is not None and self._loose.search(text) is not None:
            return True
        # Another spelling (＠, fullwidth letters): as is, in NFKC form; escaped, maybe.
        if self._wide is None or (found := self._wide.search(text)) is None:
            return False
        return "\\" in found.group() or self.address in self._folded(text)

    @staticmethod
    def _folded(text: str) -> str:
        return unicodedata.normalize("NFKC", text).lower()

    def in_text(self, text: str) -> bool:
        return self._walk([(text, 0)])

    def in_value(self, value: Any) -> bool:
        return self._walk([(value, 0)])

    def in_event(self, event: dict[str, Any]) -> bool:
        return self.in_value(event)

    def in_envelope(self, envelope: dict[str, Any]) -> bool:
        return self.in_value(envelope)

    def _walk(self, stack: list[tuple[Any, int]]) -> bool:
        # Iterative: a body may nest deeper than Python's recursion limit.
        while stack:
            value, depth = stack.pop()
            if isinstance(value, str):
                if self._in_string(value, depth, stack):
                    return True
            elif isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, depth))
                    stack.append((item, depth))
            elif isinstance(value, list):
                stack.extend((item, depth) for item in value)
        return False

    def _in_string(self, text: str, depth: int, stack: list[tuple[Any, int]]) -> bool:
        """Whether ``text`` itself mentions the address; a JSON text that may hold it in an
        escaped spelling is pushed on ``stack``, decoded, to be looked at in turn."""
        if not self.might_be_in(text):
            return False
        if self._exact.search(text):
            return True
        if self._wide is not None and self._wide.search(text) is not None \
                and self._exact.search(self._folded(text)):
            return True
        if depth < _MAX_NESTING and _looks_like_json(text):
            try:
                stack.append((orjson.loads(text), depth + 1))
                return False
            except orjson.JSONDecodeError:
                pass
        # Free text with an escaped spelling of the address that cannot be decoded: a mention
        # (where it starts and ends cannot be told, so any such spelling counts).
        return any("\\" in m.group() for m in self._loose.finditer(text))

    def sql(self) -> SqlMatch:
        # strpos, not LIKE: an address may hold _ or %, which LIKE reads as wildcards. Postgres'
        # regular expressions are slow next to strpos (about 3 us a row for the escapes, 15 for
        # the address, against 1 for strpos): they run only on text holding an escape that
        # starts like one of the address's characters (``\u00`` for ASCII), which most rows
        # do not.
        starts = sorted({f"\\u{ord(v):04x}"[:4] for c in self.address
                         for v in {c, c.upper()} if len(v) == 1})
        starts += [f"\\{c}" for c in sorted(set(self.address) & set('/"'))]
        # An address whose at-sign is spelled otherwise (＠, ﹫), as is or escaped.
        ats = [a for c in _compat_spellings().get("@", ()) for a in (c, f"\\u{ord(c):04x}")]
        starts += ats
        guard = " OR ".join(f"strpos({{x}}, %(g{i})s) > 0" for i in range(len(starts)))
        wide = " OR ".join(f"strpos({{x}}, %(g{i})s) > 0"
                           for i in range(len(starts) - len(ats), len(starts)))
        return SqlMatch(
            events="lower(e.contact_email) = %(a)s",
            records="false",
            params={"a": self.address, "esc": escapes_pattern(self.address),
                    "rx": escaped_pattern(self.address),
                    **{f"g{i}": start for i, start in enumerate(starts)}},
            text=f"(strpos({{x}}, %(a)s) > 0 OR (({guard}) AND {{x}} ~ %(esc)s"
                 " AND {x} ~* %(rx)s)" + (f" OR {wide}" if wide else "") + ")",
        )


@dataclass(frozen=True)
class ResourceSubject:
    """One record: ``PROVIDER:TYPE:ID`` as in webhook_records."""

    provider: str
    resource_type: str
    resource_id: str
    _id: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _escapes: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_id", re.compile(escaped_pattern(self.resource_id),
                                                   re.IGNORECASE))
        object.__setattr__(self, "_escapes", re.compile(escapes_pattern(self.resource_id)))

    @property
    def sha256(self) -> str:
        text = f"{self.provider}:{self.resource_type}:{self.resource_id}"
        return hashlib.sha256(text.encode()).hexdigest()

    def might_be_in(self, text: str | bytes) -> bool:
        # The id as the body spells it (a number or a string, maybe escaped); the rest of the
        # record is found by normalizing.
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if self.resource_id in text:
            return True
        return self._escapes.search(text.lower()) is not None \
            and self._id.search(text) is not None

    def in_text(self, text: str) -> bool:
        return False  # a record is recognized by its normalized events, never by raw text

    def in_value(self, value: Any) -> bool:
        return False

    def in_event(self, event: dict[str, Any]) -> bool:
        return (event.get("provider"), event.get("resource_type"), event.get("resource_id")) == (
            self.provider, self.resource_type, self.resource_id)

    def in_envelope(self, envelope: dict[str, Any]) -> bool:
        from ingest.providers import load_providers

        if envelope.get("provider") != self.provider:
            return False
        body, headers = envelope.get("body"), envelope.get("headers") or {}
        if not isinstance(body, str) or not (self.might_be_in(body) or any(
                self.might_be_in(str(v)) for v in headers.values())):
            return False
        provider = load_providers().get(self.provider)
        if provider is None:
            return False
        try:
            events = provider.events(Delivery.from_dict(envelope))
        except Exception:  # a delivery that does not normalize is about no record we know
            return False
        return any(e.record == (self.provider, self.resource_type, self.resource_id)
                   for e in events)

    def sql(self) -> SqlMatch:
        match = "provider = %(p)s AND resource_type = %(t)s AND resource_id = %(i)s"
        return SqlMatch(
            events="e." + match.replace(" AND ", " AND e."),
            records="r." + match.replace(" AND ", " AND r."),
            params={"p": self.provider, "t": self.resource_type, "i": self.resource_id})


def parse_resource(value: str) -> ResourceSubject:
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError("--resource must be PROVIDER:TYPE:ID")
    return ResourceSubject(*parts)


# -- rewriting a raw delivery -----------------------------------------------------------------


def without_subject(envelope: dict[str, Any], subject: Subject,
                    providers: Mapping[str, Provider], now: datetime) -> dict[str, Any] | None:
    """``envelope`` itself when it holds nothing of the subject; None when it must go whole;
    otherwise a copy whose body keeps only the other events' data, with ``erased_at`` (the
    first erasure's time when it was rewritten before). See the module docstring."""
    if not subject.in_envelope(envelope):
        return envelope
    provider = providers.get(str(envelope.get("provider")))
    if provider is None:
        return None
    try:
        events = provider.events(Delivery.from_dict(envelope))
        payload = safejson.loads(envelope["body"])
    except Exception:  # it cannot be split if it cannot be read
        return None
    others = [job for job in (e.to_job() for e in events) if not subject.in_event(job)]
    if not others:
        return None
    erased_at = envelope.get("erased_at") or isoformat(now)
    for path, items in _lists(payload):
        theirs = {i for i, item in enumerate(items)
                  if _is_subjects(item, path, payload, envelope, subject, provider)}
        if not theirs or len(theirs) == len(items):
            continue
        body = _replaced(payload, path, [x for i, x in enumerate(items) if i not in theirs])
        candidate = dict(envelope, body=safejson.dumps(body).decode(), erased_at=erased_at)
        if subject.in_envelope(candidate):
            continue  # the subject is also elsewhere in it
        try:
            produced = [e.to_job() for e in provider.events(Delivery.from_dict(candidate))]
        except Exception:
            continue
        if produced == others:
            return candidate
    return None


def _is_subjects(item: Any, path: tuple[str | int, ...], payload: Any,
                 envelope: dict[str, Any], subject: Subject, provider: Provider) -> bool:
    """An element is the subject's when it mentions them, or when the delivery cut down to
    it alone normalizes into one of the subject's events (a record is found that way)."""
    if subject.in_value(item):
        return True
    alone = dict(envelope, body=safejson.dumps(_replaced(payload, path, [item])).decode())
    try:
        return any(subject.in_event(e.to_job()) for e in provider.events(
            Delivery.from_dict(alone)))
    except Exception:
        return False


def _lists(payload: Any) -> Iterator[tuple[tuple[str | int, ...], list[Any]]]:
    """(path, list) for the lists of two or more elements in ``payload``, shallowest first."""
    queue: deque[tuple[tuple[str | int, ...], Any]] = deque([((), payload)])
    found = 0
    while queue and found < _MAX_LISTS:
        path, value = queue.popleft()
        if len(path) > _MAX_LIST_DEPTH:
            continue
        children: Iterator[tuple[str | int, Any]]
        if isinstance(value, dict):
            children = iter(value.items())
        elif isinstance(value, list):
            if len(value) >= 2:
                found += 1
                yield path, value
            children = iter(enumerate(value))
        else:
            continue
        queue.extend((path + (key,), child) for key, child in children
                     if isinstance(child, (dict, list)))


def _replaced(value: Any, path: tuple[str | int, ...], new: list[Any]) -> Any:
    """A copy of ``value`` with the list at ``path`` replaced by ``new`` (only the containers
    on the path are copied)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    copy = list(value)
    assert isinstance(head, int)
    copy[head] = _replaced(value[head], rest, new)
    return copy


# -- one erasure, as the places that hold data see it ---------------------------------------


@dataclass
class Erasure:
    """One ``ingest erase`` run, as each place that holds data sees it: whom (``subject``),
    whether to change anything (``dry_run``), when (``now``: a rewritten delivery's
    ``erased_at``, the same everywhere), and ``counts``, per place, of what the run removed
    so far (a sink that keeps a log of erasures records them: the Postgres sink's
    ``webhook_erasures``). A sink's ``erase(erasure)`` (sinks.base.ErasingSink) returns its
    own counts, per place; the command adds them to ``counts``."""

    subject: Subject
    dry_run: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    counts: Counter[str] = field(default_factory=Counter)
    # Every place the run reports, in print order (``summary``).
    places: tuple[str, ...] = ()
    providers: Mapping[str, Provider] | None = None
    # The ids of the events a sink erased (or, dry, would): what else is keyed by them goes
    # too (the workers' outcome rows waiting in Redis while Postgres was away).
    erased_events: set[str] = field(default_factory=set)

    def summary(self, adding: Mapping[str, int] | None = None) -> dict[str, int]:
        """Count per place (every place of ``places``, then any other counted), with
        ``adding`` (a sink's own counts, not added to ``counts`` yet) added."""
        total = Counter(self.counts)
        total.update(adding or {})
        return {place: total[place] for place in dict.fromkeys([*self.places, *total])}

    def delivery(self, envelope: Any) -> Any:
        """``envelope`` itself, None (it goes whole), or a copy rewritten without the
        subject's events (:func:`without_subject`)."""
        if not isinstance(envelope, dict):
            return envelope
        if self.providers is None:
            from ingest.providers import load_providers

            self.providers = load_providers()
        return without_subject(envelope, self.subject, self.providers, self.now)
