"""Provider plugins: a third-party package registering under ``webhook_ingest.providers``.

The example packages under tests/plugins/ are really built and pip-installed, into a
directory of their own (``pip install --target``) rather than the shared virtualenv, so other
test runs never see them. Subprocesses get that directory on PYTHONPATH: entry points are
found from the installed dist-info there, exactly as from site-packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
import httpx
import orjson
import pytest

from ingest.commands.embedded import free_port
from ingest.providers import load_providers
from tests.helpers import rows

PLUGINS = Path(__file__).parent.parent / "plugins"
ACME_TOKENS = ("acme-token-old-0001", "acme-token-new-0002")
ACME_EVENT = {
    "id": "evt_acme_000123", "type": "deal.won", "occurred_at": "2026-06-04T07:49:10+02:00",
    "workspace": "ws_77", "contact": {"email": "dana@example.com", "name": "Dana Li"},
    "deal": {"id": 4711, "pipeline": "enterprise", "amount": 120000},
}


def _pip_install(source: Path, work: Path) -> Path:
    """Build and install ``source`` into a directory of its own; returns that directory."""
    # Build from a copy: an in-tree build writes build/ and *.egg-info next to the sources.
    copy = work / f"{source.name}-src"
    shutil.copytree(source, copy)
    target = work / f"{source.name}-site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(copy)],
        check=True, capture_output=True, timeout=120,
    )
    return target


@pytest.fixture(scope="module")
def plugin_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("plugins")
    return {name: _pip_install(PLUGINS / name, work)
            for name in ("example_provider", "broken_provider")}


def _env(make_env: Callable[..., dict[str, str]], database_url: str, site: Path) -> dict[str, str]:
    env = make_env(database_url, ACME_WEBHOOK_TOKENS=",".join(ACME_TOKENS))
    env.update({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site),
                "INGEST_LOG_FORMAT": "text"})
    return env


def _ingest(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ingest.commands.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture
def plugin_acceptor(plugin_sites: dict[str, Path], make_env: Callable[..., dict[str, str]],
                    database_url: str, tmp_path: Path) -> Iterator[str]:
    """``ingest serve`` in its own process, with the example plugin installed."""
    env = _env(make_env, database_url, plugin_sites["example_provider"])
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ingest.commands.cli",
                             "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):  # at most ~20 s
            if proc.poll() is not None:
                raise AssertionError(f"ingest serve exited: {(tmp_path / 'serve.log').read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("ingest serve did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def test_the_test_process_itself_does_not_see_the_plugin() -> None:
    # The plugin lives only on the subprocesses' PYTHONPATH: other tests are unaffected.
    assert "acme" not in load_providers()


def test_ingest_check_lists_an_installed_plugin_with_its_token_masked(
    plugin_sites: dict[str, Path], make_env: Callable[..., dict[str, str]], database_url: str
) -> None:
    result = _ingest(_env(make_env, database_url, plugin_sites["example_provider"]), "check")
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if ln.strip().startswith("acme ")]
    assert "ACME_WEBHOOK_TOKENS" in line and "****" in line
    for token in ACME_TOKENS:
        assert token not in result.stdout + result.stderr
    for builtin in ("outreach", "salesloft", "outcaller", "outboundry", "mailstand"):
        assert f"  {builtin} " in result.stdout  # the built-ins load the same way, alongside


def test_a_delivery_to_a_plugin_provider_lands_once_in_postgres(
    plugin_acceptor: str, plugin_sites: dict[str, Path],
    make_env: Callable[..., dict[str, str]], database_url: str,
) -> None:
    url = f"{plugin_acceptor}/webhooks/acme"
    body = orjson.dumps(ACME_EVENT)
    bad = httpx.post(url, content=body, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401
    for token in ACME_TOKENS:  # rotation: both accepted; the same event twice
        answer = httpx.post(url, content=body, headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
        assert answer.status_code == 200, answer.text
    answer = httpx.post(url, content=body, params={"token": ACME_TOKENS[0]}, timeout=10)
    assert answer.status_code == 200

    worker = _ingest(_env(make_env, database_url, plugin_sites["example_provider"]),
                     "worker", "--burst", timeout=120)
    assert worker.returncode == 0, worker.stderr
    (row,) = rows(database_url, "SELECT * FROM webhook_events")
    assert row["provider"] == "acme"
    assert row["dedup_key"] == "evt_acme_000123"
    assert (row["event_type"], row["kind"]) == ("deal.won", "deal.won")
    assert (row["resource_type"], row["resource_id"], row["action"]) == ("deal", "4711", "won")
    assert row["occurred_at"].isoformat() == "2026-06-04T05:49:10+00:00"
    assert (row["contact_email"], row["contact_name"]) == ("dana@example.com", "Dana Li")
    assert (row["workspace_id"], row["campaign_id"]) == ("ws_77", "enterprise")
    assert row["data"] == ACME_EVENT["deal"]
    (delivery,) = rows(database_url, "SELECT body FROM webhook_deliveries")
    assert bytes(delivery["body"]) == body


def test_ingest_send_uses_the_plugins_own_sample_builder_and_kind_table(
    plugin_acceptor: str, plugin_sites: dict[str, Path],
    make_env: Callable[..., dict[str, str]], database_url: str,
) -> None:
    # A plugin supplies samples and its table the way a built-in does: `ingest send` and the
    # workers find them through the loaded provider.
    env = _env(make_env, database_url, plugin_sites["example_provider"])
    sent = _ingest(env, "send", "acme", "--url", plugin_acceptor, "--count", "6", "--seed", "3")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    worker = _ingest(env, "worker", "--burst", timeout=120)
    assert worker.returncode == 0, worker.stderr
    stored = rows(database_url, "SELECT event_type, kind FROM webhook_events WHERE provider = 'acme'")
    assert len(stored) == 6
    assert all(r["kind"] == r["event_type"] for r in stored), stored  # Acme's table maps 1:1


def test_a_broken_plugin_stops_start_up_naming_it_and_the_reason(
    plugin_sites: dict[str, Path], make_env: Callable[..., dict[str, str]], database_url: str
) -> None:
    env = _env(make_env, database_url, plugin_sites["broken_provider"])
    for args in (("check",), ("serve", "--host", "127.0.0.1", "--port", str(free_port()))):
        result = _ingest(env, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "plugin 'broken'" in result.stderr, args
        assert "acme_sdk_that_is_not_installed" in result.stderr, args
