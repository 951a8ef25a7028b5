"""A webhook-ingest sink that appends every event to a JSON Lines file.

A complete third-party sink: a class with ``name``, ``default_events``, ``from_settings`` and
``send``, registered under the ``webhook_ingest.sinks`` entry point group (pyproject.toml).

Settings come from the sink's own prefix, ``JSONL_*`` in the environment or a ``[sinks.jsonl]``
table in the TOML file named by ``INGEST_CONFIG``:

- ``JSONL_PATH`` (required): the file to append to;
- ``JSONL_EVENTS`` (optional, handled by webhook-ingest): globs over ``kind``, default ``*``.

``send`` must be idempotent on ``event.id``: a job may run again after a crash or a retry. This
one skips ids already in the file, under an exclusive lock, so several workers can share it.
(Reading the file on each batch keeps the example short; a real sink would use its target's
own uniqueness, like ``ON CONFLICT DO NOTHING`` or an idempotency key.)

``erase`` (optional) lets ``ingest erase`` remove one person's events from the file, enabled
or not: a sink that keeps personal data should offer it (sinks.base says how).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from ingest.config import Settings
from ingest.events import Event
from ingest.exceptions import ConfigError, TransientSinkError
from ingest.subjects import Erasure

__all__ = ["JsonlSink"]


class JsonlSink:
    name: ClassVar[str] = "jsonl"
    default_events: ClassVar[tuple[str, ...]] = ("*",)

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def from_settings(cls, settings: Settings) -> JsonlSink:
        path = settings.section("JSONL").get("PATH")
        if not path:
            raise ConfigError("JSONL_PATH", "is not set (the file events are appended to)")
        if not Path(path).parent.is_dir():
            raise ConfigError("JSONL_PATH", f"directory {Path(path).parent} does not exist")
        return cls(Path(path))

    def send(self, events: Sequence[Event]) -> None:
        try:
            with open(self.path, "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                fh.seek(0)
                seen = {json.loads(line)["id"] for line in fh if line.strip()}
                new = [e for e in events if e.id not in seen]
                fh.write(b"".join(e.to_json() + b"\n" for e in new))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            # A full disk or a lost mount can come back: let webhook-ingest retry.
            raise TransientSinkError(f"cannot append to {self.path}: {exc.strerror}") from exc

    # `ingest erase` (optional): the places it reports, and removing one person's events.
    erases: ClassVar[tuple[str, ...]] = ("jsonl lines",)

    def erase(self, erasure: Erasure) -> dict[str, int]:
        """Remove (with ``erasure.dry_run``: count) the lines of the subject's events."""
        with open(self.path, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            lines = [line for line in fh if line.strip()]
            kept = [line for line in lines if not erasure.subject.in_event(json.loads(line))]
            if len(kept) < len(lines) and not erasure.dry_run:
                fh.seek(0)
                fh.truncate()
                fh.write(b"".join(kept))
                fh.flush()
                os.fsync(fh.fileno())
        return {"jsonl lines": len(lines) - len(kept)}

    def close(self) -> None:
        """Called when the worker stops (optional): nothing is held open between batches."""
