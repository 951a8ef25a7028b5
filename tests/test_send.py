"""`ingest send`: signed sample deliveries, a progress bar and a closing summary."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ingest.commands.send import send
from tests.helpers import SECRETS


def console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=120, force_terminal=False), buffer


def test_summary_counts_sent_accepted_duplicates_and_latency(acceptor: Any) -> None:
    out, buffer = console()
    report = send("outcaller", f"{acceptor.url}/webhooks/outcaller", SECRETS["outcaller"][0],
                  count=20, concurrency=4, duplicates=0.3, seed=3, console=out)
    text = buffer.getvalue()
    assert report.ok and report.sent == 20 and report.accepted == 20 and report.rejected == 0
    assert 0 < report.duplicates < 20
    assert "20/20" in text, "the progress bar reached the end"
    assert re.search(rf"sent\s+.*20 \({report.duplicates} of them duplicates\)", text)
    assert re.search(r"accepted \(200\)\s+.*20", text)
    assert re.search(r"rejected\s+.*\b0\b", text)
    assert re.search(r"p50 / p99\s+.*[\d.]+ ms / [\d.]+ ms", text)


def test_rejections_are_counted_by_status(acceptor: Any) -> None:
    out, buffer = console()
    report = send("outcaller", f"{acceptor.url}/webhooks/outcaller", "not-the-token-123",
                  count=3, console=out)
    assert not report.ok and report.rejected == 3
    assert re.search(r"rejected\s+.*3 \(3 x 401\)", buffer.getvalue())


def test_send_uses_the_secret_ingest_dev_generated(
        acceptor: Any, make_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    """`ingest dev` in one terminal, `ingest send outreach` in another: no secret to copy."""
    state = tmp_path / ".ingest-dev"
    state.mkdir()
    (state / "secrets.toml").write_text(f'OUTREACH_WEBHOOK_SECRETS = "{SECRETS["outreach"][1]}"\n')
    env = {"PATH": os.environ.get("PATH", ""), **make_env(OUTREACH_WEBHOOK_SECRETS="")}
    result = subprocess.run([sys.executable, "-m", "ingest.commands.cli",
                             "send", "outreach", "--url",
                             acceptor.url, "--count", "2"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert SECRETS["outreach"][1] not in result.stdout + result.stderr
    missing = subprocess.run([sys.executable, "-m", "ingest.commands.cli",
                              "send", "outreach", "--url",
                              acceptor.url, "--state-dir", str(tmp_path / "none")], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "OUTREACH_WEBHOOK_SECRETS" in missing.stderr
