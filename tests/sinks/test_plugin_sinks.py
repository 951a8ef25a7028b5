"""Sink plugins: a third-party package, installed for real, receives events through real
workers; a broken one stops start-up naming itself.

Packages are installed with ``pip install --no-deps --target`` into a temporary directory and
used by ``ingest`` subprocesses through ``PYTHONPATH``, so the shared virtualenv never changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from ingest.commands.samples import build_sample
from ingest.config import Settings
from ingest.events import Event
from sinks.base import Sink
from tests.helpers import SECRETS, rows
from tests.sinks.suite import ErasingSinkSuite

PLUGINS = Path(__file__).parent.parent / "plugins"


def _install(package: str, tmp: Path) -> Path:
    source = tmp / "src" / package
    shutil.copytree(PLUGINS / package, source)  # builds write into the source tree
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=180)
    return target


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _install("example_sink", tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _install("broken_sink", tmp_path_factory.mktemp("broken"))


def _ingest(args: list[str], env: dict[str, str], site: Path) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    child.update(env)
    child["PYTHONPATH"] = str(site)
    child["INGEST_LOG_FORMAT"] = "text"
    return subprocess.run([sys.executable, "-m", "ingest.commands.cli", *args], env=child,
                          capture_output=True, text=True, timeout=120)


def test_an_installed_sink_plugin_receives_events_through_real_workers(
        example_site: Path, acceptor: Any, make_env: Callable[..., dict[str, str]],
        database_url: str, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    config = tmp_path / "ingest.toml"
    config.write_text(f'[sinks.jsonl]\npath = "{out}"\nevents = "contact.*,email.*,linkedin.*"\n')
    env = make_env(database_url, INGEST_SINKS="postgres,jsonl", INGEST_CONFIG=str(config))

    token = SECRETS["outboundry"][0]
    for _ in range(3):
        body, headers = build_sample("outboundry", token)
        assert httpx.post(f"{acceptor.url}/webhooks/outboundry", content=body,
                          headers=headers, timeout=10).status_code == 200

    check = _ingest(["check"], env, example_site)
    assert check.returncode == 0, check.stderr
    assert "jsonl" in check.stdout and "contact.*,email.*,linkedin.*" in check.stdout

    worker = _ingest(["worker", "--burst"], env, example_site)
    assert worker.returncode == 0, worker.stderr
    stored = [r["id"] for r in rows(database_url, "SELECT id::text FROM webhook_events")]
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(stored) == 3
    assert sorted(e["id"] for e in written) == sorted(stored)
    assert all(e["provider"] == "outboundry" and e["kind"] for e in written)

    # The environment prefix works too, and wins over the TOML table.
    moved = tmp_path / "moved.jsonl"
    check = _ingest(["check"], {**env, "JSONL_PATH": str(tmp_path / "no-such-dir" / "x")},
                    example_site)
    assert check.returncode == 2 and "JSONL_PATH" in check.stderr
    body, headers = build_sample("outboundry", token)
    assert httpx.post(f"{acceptor.url}/webhooks/outboundry", content=body, headers=headers,
                      timeout=10).status_code == 200
    worker = _ingest(["worker", "--burst"], {**env, "JSONL_PATH": str(moved)}, example_site)
    assert worker.returncode == 0, worker.stderr
    assert len(moved.read_bytes().splitlines()) == 1
    assert len(out.read_bytes().splitlines()) == 3


def test_a_sink_plugin_that_cannot_load_stops_start_up_naming_itself(
        broken_site: Path, make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    env = make_env(database_url, INGEST_SINKS="postgres")
    for args in (["check"], ["worker", "--burst"]):
        result = _ingest(args, env, broken_site)
        assert result.returncode == 2, result.stderr
        assert "plugin 'broken'" in result.stderr
        assert "webhook_ingest_broken_missing_dependency" in result.stderr


def test_without_the_plugin_installed_the_sink_name_is_refused(
        make_env: Callable[..., dict[str, str]], database_url: str, tmp_path: Path) -> None:
    env = make_env(database_url, INGEST_SINKS="postgres,jsonl")
    result = _ingest(["check"], env, tmp_path)
    assert result.returncode == 2
    assert "INGEST_SINKS" in result.stderr and "'jsonl'" in result.stderr


class TestExamplePluginSuite(ErasingSinkSuite):
    """The shared sink contract (tests/sinks/suite.py) against the example plugin as a user
    installs it (pip, into a directory of its own), appending to a real file (which takes
    every event it is given: nothing to refuse, so no RefusingTargetSuite)."""

    sink = "jsonl"

    @pytest.fixture
    def target(self, example_site: Path, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path]:
        import importlib

        monkeypatch.syspath_prepend(str(example_site))
        module = importlib.import_module("webhook_ingest_jsonl")
        assert Path(module.__file__ or "").is_relative_to(example_site)  # the installed copy
        return module.JsonlSink, tmp_path / "events.jsonl"

    def make(self, target: tuple[Any, Path]) -> Sink:
        cls, path = target
        return cls.from_settings(Settings.from_env({"JSONL_PATH": str(path)}))

    def delivered(self, target: tuple[Any, Path], events: Sequence[Event]) -> list[str]:
        path, wanted = target[1], {e.id for e in events}
        lines = path.read_bytes().splitlines() if path.exists() else []
        return [i for i in (orjson.loads(line)["id"] for line in lines) if i in wanted]

    def unreachable(self, target: tuple[Any, Path]) -> Sink:
        return target[0](target[1].parent / "no-such-directory" / "events.jsonl")

