"""Masking what an operator must not read in a reason: used for dead-letter reasons, log lines
and ``ingest check``.

>>> reason("CRM answered 404: no page https://crm.example/hook/abc?apikey=k1 (Bearer tok123456)")
'CRM answered 404: no page https://crm.example/… (Bearer ****)'
>>> receiver_text("Contact already exists: jane@example.com, +1 (415) 555-0134")
'Contact already exists: ****@****, ****'

A receiver may echo the request back (its 404 page quotes the URL, its 401 the header, its 422
the contact's address), so everything that looks like a URL path, a query string, a credential
parameter, an authorization scheme, a signature (the whole ``v1,<base64>``) or an email address
is masked, as is every configured secret; text a receiver wrote (:func:`receiver_text`) also
has its phone numbers masked. A reason is one readable line: its first line, control
characters removed, bounded in length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "clean_line", "mask_dsn", "mask_secrets", "mask_url", "reason",
           "receiver_text", "redact_text"]

MASK = "****"
# Longest reason kept (characters): enough for a status line and the start of an answer.
MAX_REASON_CHARS = 500
# Secrets shorter than this are not masked: they would mask innocent text (tokens are >= 16).
MIN_SECRET_CHARS = 8

# scheme://[userinfo@]host[:port] then whatever path, query or fragment follows.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{1,15}://)([^\s/?#'\"<>|]*)([/?#][^\s'\"<>|]*)?")
# An absolute path of two segments or more that is not part of a URL (a webhook path).
_PATH = re.compile(r"(?<![\w/:.~%+-])/(?:[\w.~%+-]+/)+[\w.~%+-]*")
# A query string anywhere (a relative URL echoed back).
_QUERY = re.compile(r"\?[^\s'\"<>|]*=[^\s'\"<>|]*")
# name=value pairs whose value is a credential, in any text.
_PARAM = re.compile(
    r"(?i)\b((?:(?:api[_-]?key|apikey|access[_-]?token|refresh[_-]?token|token|secret|"
    r"client[_-]?secret|password|passwd|signature)\"?\s*[=:]|(?:key|sig|pwd|auth|code)=)\s*)"
    r"(\"?)[^\s&\"',;]+")
# Authorization schemes followed by their credential.
_AUTH = re.compile(r"(?i)\b(bearer|basic|token|digest)(\s+)[A-Za-z0-9._~+/=:-]{6,}")
# Standard Webhooks and provider signatures: v1,<base64> (v1a, asymmetric) / sha256=<hex>.
# Masked before credential parameters: ``sig=v1,<base64>`` would otherwise lose only "v1".
_SIGNATURE = re.compile(r"(?i)\b(v1a?,|sha256=|sha1=)[A-Za-z0-9+/=_-]{16,}")
# An email address, also spelled with a fullwidth or small commercial at (NFKC gives "@").
_EMAIL = re.compile(r"(?<![\w.+-])[\w.!#$%&'*+=?^`{|}~-]{1,64}[@\uff20\ufe6b]"
                    r"[\w-]+(?:\.[\w-]+)+")
EMAIL_MASK = "****@****"
# Something that may be a phone number: digits with the separators people write, 7 to 15
# digits in all (counted in _phone_sub), optionally behind + or 00.
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().\-/]{4,}\d(?![\w])")
_PHONE_DIGITS = (7, 15)
# Every control character (C0, DEL and C1), and line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The first non-empty line of ``text``, control characters removed, at most ``limit``
    characters (an ellipsis marks a cut)."""
    first = ""
    for line in text.splitlines():
        if line.strip():
            first = line
            break
    first = _CONTROL.sub(" ", first)
    first = first.encode("utf-8", "replace").decode("utf-8")
    first = " ".join(first.split())
    return first if len(first) <= limit else first[: limit - 1] + "…"


def mask_url(url: str) -> str:
    """``scheme://host[:port]`` of a URL, any user info replaced by ``****``; a path, query or
    fragment becomes ``/…``. Used where a URL must be shown at all (``ingest check``)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
        rest = parts.path not in ("", "/") or parts.query or parts.fragment
        return urlunsplit((parts.scheme, netloc, "/…" if rest else parts.path, "", ""))
    except ValueError:
        return "(unparseable URL)"


def mask_dsn(url: str) -> str:
    """A database or Redis URL with its password masked wherever it is (user info or a
    ``password=`` query parameter); host, port, database and other parameters stay."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = _PARAM.sub(lambda m: m.group(1) + m.group(2) + MASK, parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _url_sub(match: re.Match[str]) -> str:
    authority = match.group(2)
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    return match.group(1) + authority + ("/…" if match.group(3) else "")


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """Every one of ``secrets`` (at least ``MIN_SECRET_CHARS`` long) in ``text`` as ``****``."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len,
                         reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with configured secrets, URL paths, query strings, credential parameters,
    authorization credentials and signatures masked. Line structure is kept."""
    text = mask_secrets(text, secrets)
    text = _URL.sub(_url_sub, text)
    text = _QUERY.sub("?…", text)
    text = _PATH.sub("/…", text)
    text = _EMAIL.sub(EMAIL_MASK, text)
    text = _SIGNATURE.sub(lambda m: m.group(1) + MASK, text)
    text = _PARAM.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    return _AUTH.sub(lambda m: m.group(1) + m.group(2) + MASK, text)


def _phone_sub(match: re.Match[str]) -> str:
    digits = sum(c.isdigit() for c in match.group())
    low, high = _PHONE_DIGITS
    return MASK if low <= digits <= high else match.group()


def receiver_text(text: object, secrets: Iterable[str] = (),
                  limit: int = MAX_REASON_CHARS) -> str:
    """What a receiver wrote (its reason phrase, the start of its answer) as a reason may
    quote it: :func:`reason`, and phone numbers masked too. A receiver's error often quotes
    the contact it refused (``422 Contact already exists: jane@example.com``); our own text
    never holds one, so only the receiver's is searched for numbers that may be phones."""
    try:
        raw = str(text)
    except Exception:  # a hostile __str__
        raw = type(text).__name__
    return reason(_PHONE.sub(_phone_sub, raw[: 20 * limit]), secrets, limit)


def reason(text: object, secrets: Iterable[str] = (), limit: int = MAX_REASON_CHARS) -> str:
    """A reason an operator reads: one clean, redacted line."""
    try:
        raw = str(text)
    except Exception:  # a hostile __str__
        raw = type(text).__name__
    # Redact before cutting, so that a secret straddling the limit is still found whole.
    return clean_line(redact_text(raw[: 20 * limit], secrets), limit)
