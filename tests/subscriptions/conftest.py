"""Fake provider APIs on 127.0.0.1 (tests.subscriptions.fake_apis), a deployment's environment
pointing at them, and ``ingest`` run in this process as a user runs it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ingest.commands.cli import main
from tests.helpers import ServerThread
from tests.subscriptions.fake_apis import FakeOutreach, FakeSalesloft

PUBLIC_URL = "https://hooks.example.test"
OUTREACH_TOKEN = "outreach-api-token-5f0c2e9a7b3d41c8"
SALESLOFT_KEY = "ak" + "3b9d" * 16


@pytest.fixture
def outreach_api() -> Iterator[FakeOutreach]:
    fake = FakeOutreach()
    fake.tokens.static.add(OUTREACH_TOKEN)
    server = ServerThread(fake.app()).start()
    fake.base = server.url
    try:
        yield fake
    finally:
        server.stop()


@pytest.fixture
def outreach_url(outreach_api: FakeOutreach) -> str:
    return outreach_api.base


@pytest.fixture
def salesloft_api() -> Iterator[tuple[FakeSalesloft, str]]:
    fake = FakeSalesloft()
    fake.tokens.static.add(SALESLOFT_KEY)
    server = ServerThread(fake.app()).start()
    try:
        yield fake, server.url
    finally:
        server.stop()


@pytest.fixture
def sub_env(make_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
            salesloft_api: tuple[FakeSalesloft, str]) -> Callable[..., dict[str, str]]:
    """A deployment with API access to both fakes (overrides change or remove settings)."""

    def make(**overrides: str) -> dict[str, str]:
        env = {"INGEST_PUBLIC_URL": PUBLIC_URL,
               "OUTREACH_API_URL": outreach_api.base, "OUTREACH_API_TOKEN": OUTREACH_TOKEN,
               "SALESLOFT_API_URL": salesloft_api[1], "SALESLOFT_API_KEY": SALESLOFT_KEY}
        env.update(overrides)
        return make_env(**env)

    return make


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``ingest <argv>`` in this process with exactly ``env``'s settings: (status, stdout,
    stderr)."""

    def go(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
        import os

        for key in list(os.environ):
            if key.startswith(("OUTREACH_", "SALESLOFT_", "INGEST_", "OUTCALLER_",
                               "OUTBOUNDRY_", "MAILSTAND_")):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        # `ingest subscriptions` sets up logging as every command does: undone right after,
        # so nothing logs later into this test's captured (then closed) stderr.
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            code = main(list(argv))
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return code, out, err

    return go


def wanted(provider: str) -> list[str]:
    """Every event name the provider's kind table maps: the subscriptions a deployment wants."""
    from ingest.providers import load_providers

    return sorted(getattr(load_providers()[provider], "kinds"))


def all_output(*texts: Any) -> str:
    return "\n".join(str(t) for t in texts)
