"""Logging: one JSON object per line in production, readable lines in ``ingest dev``.

Lines about a delivery carry ``delivery_id`` and ``provider`` (pass them in ``extra``). No
credential ever reaches a log line: nothing here logs headers, and :class:`RedactFilter`
replaces every configured secret that might still appear in a message with ``****``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import orjson

from ingest.exceptions import ConfigError

__all__ = ["JsonFormatter", "RedactFilter", "TextFormatter", "log_level", "setup_logging"]

# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
    | {"color_message"}  # uvicorn's copy of the message with terminal colour codes
)
# Extra fields shown in text mode, in this order.
_TEXT_FIELDS = ("provider", "delivery_id", "event_id", "sink", "queue", "job_id", "count")
# Loggers of webhook-ingest itself: the only ones INGEST_LOG_LEVEL=debug opens up.
_OWN_LOGGERS = ("ingest", "workers", "sinks")
# The level names INGEST_LOG_LEVEL accepts.
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info or record.exc_text:
            # RedactFilter leaves the redacted traceback in exc_text: use it, never re-format.
            out["exc"] = record.exc_text or self.formatException(record.exc_info or (None,) * 3)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={record.__dict__[k]}" for k in _TEXT_FIELDS if k in record.__dict__]
        return f"{line} [{' '.join(extras)}]" if extras else line


class RedactFilter(logging.Filter):
    """Replaces any configured secret in a formatted message (defence in depth)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would redact innocent text; real secrets are long.
        self.secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "****")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        # A traceback can quote a URL or a header value too (RQ logs every failed job's).
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, self.redact(value))
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
    # Access lines would repeat every request; our own lines say what matters.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
