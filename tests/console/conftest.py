"""The console served by a real uvicorn on 127.0.0.1, over a real pipeline (Redis, Postgres,
RQ burst workers, the CRM receiver of tests/sinks), and what the tests log in with."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ingest.commands.console.app import create_console
from ingest.config import Settings
from tests.helpers import ServerThread
from tests.sinks.conftest import crm, crm_env, pipeline  # noqa: F401  (fixtures)
from workers.runtime import Runtime

TOKEN = "console-token-for-tests-0123456789"
BEARER = {"authorization": f"Bearer {TOKEN}"}


class Served:
    """A running console and a client for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = ServerThread(create_console(settings)).start()
        self.url = self.server.url
        self.client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)
        self.clients = [self.client]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()

    def login(self) -> httpx.Client:
        """A client with a session (and the page's CSRF token in ``csrf(page)``)."""
        client = httpx.Client(base_url=self.url, timeout=30, follow_redirects=False)
        self.clients.append(client)
        if self.settings.console_token is not None:
            form = client.get("/login")
            answer = client.post("/login", data={"csrf": csrf(form.text), "token": TOKEN})
            assert answer.status_code == 303, answer.text
        return client


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


@pytest.fixture
def console_for(pipeline: Callable[..., Runtime]  # noqa: F811
                ) -> Iterator[Callable[..., tuple[Runtime, Served]]]:
    """``console_for(**settings)``: a pipeline runtime and a console over the same
    settings, the token set unless overridden."""
    served: list[Served] = []

    def make(**overrides: str) -> tuple[Runtime, Served]:
        overrides.setdefault("INGEST_CONSOLE_TOKEN", TOKEN)
        rt = pipeline(**{k: v for k, v in overrides.items() if v is not None})
        one = Served(rt.settings)
        served.append(one)
        return rt, one

    yield make
    for one in served:
        one.close()


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        from ingest.logs import fields

        return "\n".join(f"{r.getMessage()} {fields(r)!r}" for r in self.records)


@pytest.fixture
def console_log() -> Iterator[Captured]:
    """Every line the console process logs (its own logger and uvicorn's)."""
    handler = Captured()
    loggers = [logging.getLogger(n) for n in ("ingest.console", "uvicorn", "uvicorn.access",
                                              "uvicorn.error")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in saved:
        lg.removeHandler(handler)
        lg.setLevel(level)


def api(served: Served, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return served.client.request(method, path, headers={**BEARER, **kwargs.pop("headers", {})},
                                 **kwargs)


__all__ = ["BEARER", "TOKEN", "Captured", "Served", "api", "crm", "crm_env", "csrf",
           "pipeline"]
