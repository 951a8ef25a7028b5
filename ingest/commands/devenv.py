"""The settings an ``ingest dev`` running from this directory hands over (``.ingest-dev/env``).

``ingest dev`` writes its stack's settings as ``export`` lines (ingest.commands.devserver);
:func:`dev_environment` reads them back for any ``ingest`` command run from the same directory
in a shell that configures nothing of its own. Standard library only: every command reads it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEV_ENV", "DEV_STATE_DIR", "PID_LINE", "URL_LINE", "DevStack", "dev_stack",
           "read_dev_stack"]

# Where `ingest dev` keeps its state by default (--state-dir).
DEV_STATE_DIR = ".ingest-dev"
# The state directory's file of `export` lines that hands the stack's settings over.
DEV_ENV = "env"
# The comment lines of that file that name the pid of the `ingest dev` that wrote it, and the
# URL its acceptor listens on (`ingest send`'s default there).
PID_LINE = "# ingest-dev-pid="
URL_LINE = "# ingest-dev-url="
# Settings that, set in a shell, mean it is configured for something else: no hand-over then.
_OWN_SETTINGS = ("REDIS_URL", "DATABASE_URL", "INGEST_CONFIG")


@dataclass(frozen=True)
class DevStack:
    """A running ``ingest dev``: its settings and its acceptor's URL."""

    values: Mapping[str, str]
    url: str


def dev_stack(state_dir: str = DEV_STATE_DIR,
              environ: Mapping[str, str] | None = None) -> DevStack | None:
    """The ``ingest dev`` stack running from this directory, when this shell sets none of the
    settings that would point elsewhere (``REDIS_URL``, ``DATABASE_URL``, ``INGEST_CONFIG``),
    else None."""
    environ = os.environ if environ is None else environ
    if any(environ.get(key) for key in _OWN_SETTINGS):
        return None
    return read_dev_stack(state_dir)


def read_dev_stack(state_dir: str = DEV_STATE_DIR) -> DevStack | None:
    """The ``ingest dev`` stack whose state is ``state_dir``, when it runs, whatever this
    shell sets (``ingest send`` finds its URL there)."""
    try:
        text = (Path(state_dir) / DEV_ENV).read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    pid, url = 0, ""
    for line in text.splitlines():
        if line.startswith(PID_LINE):
            pid = int(line[len(PID_LINE):].strip() or 0)
        elif line.startswith(URL_LINE):
            url = line[len(URL_LINE):].strip()
        elif line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            parsed = shlex.split(value)
            values[key] = parsed[0] if parsed else ""
    if not pid or not _running(pid):
        return None  # left behind by a stack that was killed
    return DevStack(values, url)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
