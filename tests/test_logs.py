"""Logs: one JSON object per line, delivery fields carried, secrets never printed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from ingest.config import Settings
from ingest.exceptions import ConfigError
from ingest.logs import log_level, setup_logging

SECRET = "outreach-secret-new-0002"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    levels = {n: logging.getLogger(n).level for n in ("ingest", "workers", "sinks", "rq")}
    yield
    root.handlers[:], level = saved
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln]


def test_json_lines_carry_the_delivery_and_its_provider(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", [SECRET])
    logging.getLogger("workers.jobs").warning(
        "setting aside: %s", "bad", extra={"provider": "outreach", "delivery_id": "d-1"})
    [line] = lines(capsys)
    record = orjson.loads(line)
    assert record["message"] == "setting aside: bad"
    assert record["provider"] == "outreach" and record["delivery_id"] == "d-1"
    assert record["level"] == "warning" and record["logger"] == "workers.jobs"


def test_text_lines_are_readable_and_keep_the_delivery_fields(
        capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text", [SECRET])
    logging.getLogger("ingest.acceptor").info("refused", extra={"provider": "outcaller",
                                                                "delivery_id": "d-2"})
    [line] = lines(capsys)
    assert "refused" in line and "provider=outcaller" in line and "delivery_id=d-2" in line
    assert not line.startswith("{")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_secret_never_reaches_a_line_not_even_through_a_traceback_or_a_field(
        capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    setup_logging(fmt, [SECRET])
    log = logging.getLogger("workers.jobs")
    log.info("key is %s", SECRET)
    try:
        raise RuntimeError(f"receiver said: bad key {SECRET}")
    except RuntimeError:
        log.exception("sink failed", extra={"sink": f"crm {SECRET}"})
    output = "\n".join(lines(capsys))
    assert SECRET not in output
    assert output.count("****") >= 3
    assert "RuntimeError" in output, "the traceback itself is kept"


def test_debug_opens_our_loggers_only(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", [], log_level(Settings.from_env({"INGEST_LOG_LEVEL": "debug"})))
    logging.getLogger("workers.jobs").debug("delivery processed")
    logging.getLogger("rq.queue").debug("Enqueueing job ...")
    messages = [orjson.loads(ln)["message"] for ln in lines(capsys)]
    assert messages == ["delivery processed"]


def test_info_is_the_default_and_a_bad_level_names_the_variable() -> None:
    assert log_level(Settings.from_env({})) == logging.INFO
    with pytest.raises(ConfigError, match="INGEST_LOG_LEVEL"):
        log_level(Settings.from_env({"INGEST_LOG_LEVEL": "verbose"}))


class _Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no")


def _nested(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_job_arguments_bodies_and_contacts_never_reach_a_line(
        capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    """RQ logs a failed job's arguments in ``extra``; only allowed fields are written."""
    setup_logging(fmt, [SECRET])
    body = '{"data": {"email": "ada@example.com", "name": "Ada Lovelace"}}'
    logging.getLogger("rq.worker").error(
        "job failed", extra={"func": "workers.jobs.process_batch", "arguments": [[{"body": body}]],
                             "kwargs": {"contact": "ada@example.com"}, "job_id": "j-1",
                             "queue": "ingest"})
    output = "\n".join(lines(capsys))
    assert "ada@example.com" not in output and "Lovelace" not in output
    assert "j-1" in output and "ingest" in output


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_formatter_survives_odd_records_and_bounds_every_line(
        capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    setup_logging(fmt, [SECRET])
    log = logging.getLogger("workers.jobs")
    log.warning("deep %s", _nested(5000), extra={"reason": _nested(5000)})
    log.warning("nul \x00 byte", extra={"provider": "out\x00reach", "kind": "x" * 100_000})
    log.warning("hostile %s", _Hostile(), extra={"reason": _Hostile()})
    log.warning("bad format %d", "not a number")
    log.warning("huge " + "y" * 1_000_000 + " surrogate \ud800")
    log.warning("multi\nline\r\nmessage", extra={"event_type": "\u2028call.x"})
    try:
        raise RecursionError("x" * 100_000)
    except RecursionError:
        log.exception("recursion")
    out = lines(capsys)
    if fmt == "json":
        records = [orjson.loads(ln) for ln in out]  # every line is one valid object
        assert len(records) == 7
        assert all(len(ln) < 12_000 for ln in out)
        assert "\x00" not in "".join(r["message"] + str(r.get("provider")) for r in records)
        assert records[5]["message"] == "multi | line | message"
    else:
        assert len([ln for ln in out if "workers.jobs" in ln]) == 7
        assert all(len(ln) < 12_000 for ln in out) and "\x00" not in "".join(out)


def test_urls_queries_and_credentials_are_masked_in_lines(
        capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json", [SECRET])
    logging.getLogger("sinks.crm").warning(
        "CRM said: Cannot POST https://crm.example/hooks/abc?apikey=k-123456 with "
        "Authorization: Bearer abcdef123456 and /services/T1/B2/slackpath")
    [line] = lines(capsys)
    message = orjson.loads(line)["message"]
    for leaked in ("k-123456", "abcdef123456", "slackpath", "/hooks/abc"):
        assert leaked not in message
    assert "https://crm.example/…" in message


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_worker_writes_one_line_per_job_of_its_own_and_rqs_only_at_debug(
        make_env: Any, database_url: str, capsys: pytest.CaptureFixture[str], level: str) -> None:
    """At info, each job gives our own line with its job id ("batch processed", "delivered");
    RQ's own two lines per job (taken, OK) and its result-lifespan line are not written.
    At debug, RQ's per-job lines are there again, for tracing."""
    import uuid
    from datetime import datetime, timezone

    from ingest.rq_jobs import enqueue_batch
    from workers.processes import run_worker
    from workers.runtime import Runtime, install_runtime

    settings = Settings.from_env(make_env(database_url, INGEST_LOG_LEVEL=level))
    setup_logging("json", level=log_level(settings))  # as `ingest worker` does
    rt = Runtime(settings)
    body = orjson.dumps({"event": "lead.created", "resource": "lead", "action": "created",
                         "workspaceId": "ws", "timestamp": "2026-06-04T05:49:00Z",
                         "data": {"id": "lead_1", "email": "p1@example.com"}}).decode()
    job_id = rt.names.job_id("batch", uuid.uuid4().hex)
    enqueue_batch(rt.ingest_queue, [{"id": str(uuid.uuid4()), "provider": "outcaller",
                                     "received_at": datetime.now(timezone.utc).isoformat(),
                                     "headers": {}, "body": body}], job_id)
    previous = install_runtime(None)
    try:
        for queue in (rt.names.ingest_queue, rt.names.sink_queue("postgres")):
            try:
                assert run_worker(settings, [queue], burst=True) == 0
            finally:
                workers_own = install_runtime(None)  # run_worker installs one of its own
                if workers_own is not None:
                    workers_own.close()
    finally:
        install_runtime(previous)
        rt.close()
    records = [orjson.loads(line) for line in lines(capsys)]
    ours = {r["message"].split(":")[0]: r for r in records if r["logger"] == "workers.jobs"}
    assert ours["batch processed"]["job_id"] == job_id
    assert ours["delivered 1 events to postgres"]["job_id"].startswith(
        rt.names.job_id("deliver-postgres", ""))
    rq_per_job = [r for r in records if r["logger"] == "rq.worker"
                  and ("Job OK" in r["message"] or r["message"].endswith(job_id)
                       or "result is kept" in r["message"])]
    if level == "info":
        assert rq_per_job == []
        # RQ's other lines still pass: the worker saying it starts.
        assert any("started with PID" in r["message"] for r in records
                   if r["logger"] == "rq.worker")
    else:
        assert any("Job OK" in r["message"] for r in rq_per_job)
