"""Logging: one JSON object per line in production, readable lines in ``ingest dev``.

Lines about a delivery carry ``delivery_id`` and ``provider`` (pass them in ``extra``). Only
the fields in ``ALLOWED_FIELDS`` (ids, provider, kind, queue, timings, reasons) are written:
anything else a library passes in ``extra`` (RQ passes a failed job's arguments, i.e. bodies
and contacts) is dropped. No credential reaches a log line: :class:`RedactFilter` masks every
configured secret, URL path, query string and authorization credential. Every line is bounded
(``MAX_MESSAGE_CHARS``, ``MAX_FIELD_CHARS``, ``MAX_EXC_CHARS``), and the formatters never
raise, whatever the record holds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import orjson

from ingest.exceptions import ConfigError
from ingest.redaction import clean_line, redact_text

__all__ = ["ALLOWED_FIELDS", "JsonFormatter", "RedactFilter", "RqPerJobFilter", "TextFormatter",
           "log_level", "setup_logging"]

# The extra fields a line may carry; any other is dropped (it may hold a body or a contact).
ALLOWED_FIELDS = frozenset({
    "provider", "delivery_id", "event_id", "job_id", "sink", "queue", "kind", "event_type",
    "count", "seconds", "reason", "result", "status", "port", "attempt", "worker", "outcome",
})
# Longest message written (characters); the rest is cut with an ellipsis.
MAX_MESSAGE_CHARS = 2000
# Longest value of one extra field (characters).
MAX_FIELD_CHARS = 200
# Longest traceback written (characters): its start and its end, where the error is.
MAX_EXC_CHARS = 8000
# Extra fields shown in text mode, in this order.
_TEXT_FIELDS = ("provider", "delivery_id", "event_id", "sink", "queue", "job_id", "count")
# Loggers of webhook-ingest itself: the only ones INGEST_LOG_LEVEL=debug opens up.
_OWN_LOGGERS = ("ingest", "workers", "sinks")
# The level names INGEST_LOG_LEVEL accepts.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _message(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except Exception:  # bad arguments for the format: say so, never raise from logging
        text = f"{_safe_str(record.msg)} (unformattable arguments)"
    # One line: a message may end in a multi-line traceback (RQ's); exc carries that.
    return _cut(" | ".join(clean_line(ln, MAX_MESSAGE_CHARS)
                           for ln in _safe_str(text)[: 4 * MAX_MESSAGE_CHARS].splitlines()
                           if ln.strip()), MAX_MESSAGE_CHARS)


def _safe_str(value: Any) -> str:
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    try:
        return str(value).encode("utf-8", "replace").decode("utf-8")
    except Exception:  # a hostile __str__, or nesting past the recursion limit
        return f"<{type(value).__name__}>"


def _field(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return clean_line(_safe_str(value)[: 4 * MAX_FIELD_CHARS], MAX_FIELD_CHARS)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The allowed extra fields of ``record``, each bounded and on one line."""
    return {k: _field(v) for k, v in record.__dict__.items() if k in ALLOWED_FIELDS}


def _exc(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if not (record.exc_info or record.exc_text):
        return None
    try:
        # RedactFilter leaves the redacted traceback in exc_text: use it, never re-format.
        text = record.exc_text or formatter.formatException(record.exc_info or (None,) * 3)
    except Exception:
        text = "(traceback could not be formatted)"
    text = _safe_str(text)
    if len(text) > MAX_EXC_CHARS:
        half = MAX_EXC_CHARS // 2
        text = f"{text[:half]}\n… ({len(text) - MAX_EXC_CHARS} characters cut) …\n{text[-half:]}"
    return text.replace("\x00", "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        out.update(fields(record))
        exc = _exc(self, record)
        if exc is not None:
            out["exc"] = exc
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.asctime = self.formatTime(record, self.datefmt)
        line = f"{record.asctime} {record.levelname:<7} {record.name}: {_message(record)}"
        allowed = fields(record)
        extras = [f"{k}={allowed[k]}" for k in _TEXT_FIELDS if k in allowed]
        line = f"{line} [{' '.join(extras)}]" if extras else line
        exc = _exc(self, record)
        return f"{line}\n{exc}" if exc else line


class RqPerJobFilter(logging.Filter):
    """Drops the two INFO lines RQ's worker writes for every job (taken from the queue, done):
    our own line per job ("batch processed", "delivered") says the same with the job id. With
    RQ's result-lifespan line (off in workers.worker) they cost the workers a few percent of
    their CPU per event (docs/performance.md). RQ's other lines (start, stop, warnings,
    failures) pass; at INGEST_LOG_LEVEL=debug these pass too."""

    _PER_JOB = frozenset({"Worker %s: %s: %s", "Worker %s: %s: %s (%s)"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self._PER_JOB)


class RedactFilter(logging.Filter):
    """Masks configured secrets, URL paths, query strings and credentials in a record's
    message, traceback and fields (defence in depth: no line is meant to hold them)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would redact innocent text; real secrets are long (tokens >= 16).
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        return redact_text(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = _safe_str(record.msg) + " (unformattable arguments)"
        message = _safe_str(message)[: 4 * MAX_MESSAGE_CHARS]
        record.msg, record.args = self.redact(message), None
        # A traceback can quote a URL or a header value too (RQ logs every failed job's).
        if record.exc_info and not record.exc_text:
            try:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            except Exception:
                record.exc_text = "(traceback could not be formatted)"
        if record.exc_text:
            record.exc_text = self.redact(_safe_str(record.exc_text)[: 4 * MAX_EXC_CHARS])
        for key in ALLOWED_FIELDS & record.__dict__.keys():
            value = record.__dict__[key]
            if isinstance(value, str):
                setattr(record, key, self.redact(value[: 4 * MAX_FIELD_CHARS]))
        return True


def log_level(settings: Any) -> int:
    """The level named by ``INGEST_LOG_LEVEL`` (default info). ``debug`` adds one line per
    delivery processed, with its id: for tracing, too many lines for busy production."""
    name = (settings.raw.get("INGEST_LOG_LEVEL") or "info").lower()
    if name not in _LEVELS:
        raise ConfigError("INGEST_LOG_LEVEL", f"must be one of {', '.join(_LEVELS)}, got {name!r}")
    return _LEVELS[name]


def setup_logging(fmt: str = "json", secrets: Iterable[str] = (), level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RedactFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # debug is for tracing our own deliveries; libraries' debug lines (every Redis command
    # RQ sends) would bury them, so they stay at info.
    root.setLevel(max(level, logging.INFO))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # uvicorn and rq configure their own loggers; route them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    rq_worker = logging.getLogger("rq.worker")
    rq_worker.filters[:] = [f for f in rq_worker.filters if not isinstance(f, RqPerJobFilter)]
    if level > logging.DEBUG:
        rq_worker.addFilter(RqPerJobFilter())
    # Access lines would repeat every request; our own lines say what matters.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
