"""What a receiver answers is not trusted: its text is redacted like our own data (emails,
phone numbers, signatures), only the start of its body is read, and a request ends within its
deadline however slowly the receiver answers."""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ingest.commands.cli import main
from ingest.exceptions import PermanentSinkError, TransientSinkError
from ingest.redaction import reason, receiver_text
from sinks._http import MAX_ANSWER_BYTES
from sinks.crm import CrmSink, parse_secret
from tests.helpers import serve
from tests.sinks.conftest import CRM_SECRET, crm_env, enqueue, outboundry_delivery, run_jobs
from tests.sinks.test_hostile_sinks import event
from ingest.commands.dlq import list_failures
from workers.runtime import Runtime

EMAIL = "grace.hopper@navy.example"
PHONES = ("+1 (415) 555-0134", "415-555-0134", "+44 20 7946 0958")
SIGNATURE = "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="


@pytest.mark.parametrize("text, hidden", [
    (f"422 Contact already exists: {EMAIL}", EMAIL),
    ("Kontakt existiert: grace＠navy.example", "grace"),
    (f"sig={SIGNATURE}", SIGNATURE.split(",")[1][:8]),
    (f"webhook-signature: {SIGNATURE} {SIGNATURE.replace('K5', 'Q7')}", "Q7oZ"),
    *((f"phone {p} is taken", p) for p in PHONES),
])
def test_receiver_text_masks_personal_data_and_whole_signatures(text: str, hidden: str) -> None:
    masked = receiver_text(text)
    assert hidden not in masked, masked
    assert "****" in masked


def test_our_own_text_keeps_its_numbers_and_a_signature_is_masked_whole() -> None:
    assert reason("3 of 1500 events refused at 2026-06-04") == "3 of 1500 events refused at 2026-06-04"
    assert reason(f"sig={SIGNATURE}") == "sig=****,****"
    assert reason(f"contact {EMAIL} refused") == "contact ****@**** refused"


@pytest.fixture
def echoing_crm() -> Iterator[str]:
    """A CRM that refuses every event, quoting the contact back in its reason phrase, its
    body (with phone numbers) and the signature it was sent."""

    async def hook(request: Request) -> Response:
        signature = request.headers["webhook-signature"]
        body = (f"Contact already exists: {EMAIL} / phones {', '.join(PHONES)} / "
                f"sig={signature}")
        return PlainTextResponse(body, status_code=422,
                                 headers={"x-echo": "1"})

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with serve(app) as server:
        # uvicorn writes the standard reason phrase; a receiver's own phrase is tested through
        # the sink directly below.
        yield f"{server.url}/hook"


def test_an_echoing_crm_leaks_no_email_phone_or_signature_anywhere(
        pipeline: Callable[..., Runtime], echoing_crm: str, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        make_env: Callable[..., dict[str, str]], database_url: str) -> None:
    caplog.set_level(logging.DEBUG)
    env = crm_env(echoing_crm)
    rt = pipeline(INGEST_SINKS="crm", **env)
    enqueue(rt, outboundry_delivery(name="Grace Hopper", email=EMAIL),
            outboundry_delivery(name="Ada Lovelace"))
    run_jobs(rt)
    failures = list_failures(rt.redis, rt.settings)
    assert len(failures) == 2 and all("answered 422" in f.reason for f in failures)
    assert any("Contact already exists" in f.reason for f in failures)
    texts = [f.reason for f in failures]
    texts += [r.getMessage() for r in caplog.records]
    texts += [r.exc_text or "" for r in caplog.records]
    texts += [str(v) for r in caplog.records for k, v in r.__dict__.items() if k == "reason"]
    for key, value in make_env(database_url, INGEST_SINKS="crm", **env).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    main(["status", "--json"])
    main(["status"])
    main(["dlq", "list"])
    captured = capsys.readouterr()
    texts += [captured.out, captured.err]
    assert "Contact already exists" in captured.out  # the reason is shown, redacted
    everything = "\n".join(texts)
    for leaked in (EMAIL, "grace.hopper", *PHONES, SIGNATURE.split(",")[1][:12]):
        assert leaked not in everything, leaked
    assert not re.search(r"v1,[A-Za-z0-9+/]{8}", everything)


def test_a_crm_reason_phrase_with_an_address_is_masked(redis_server: str) -> None:
    """A receiver's own reason phrase ("422 Contact already exists: <email>"), written by a
    raw HTTP server since uvicorn writes standard phrases only."""
    body = b"taken"
    answer = (b"HTTP/1.1 422 Contact already exists: " + EMAIL.encode() + b" +1 415 555 0134"
              b"\r\nContent-Length: 5\r\nConnection: close\r\n\r\n" + body)
    with raw_server(lambda conn: conn.sendall(answer)) as url:
        info = crm_send_fails(url, PermanentSinkError, timeout=5)
    # The receiver's address is in the reason; its random port may hold "555" by chance.
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", str(info.value))
    assert "422 Contact already exists" in text and "taken" in text
    assert EMAIL not in text and "555" not in text


def test_a_huge_answer_is_read_only_as_far_as_its_start(redis_server: str) -> None:
    """A 200 MB error page: the reason keeps its first bytes, and the rest is never read
    (the receiver cannot even send most of it before the connection closes)."""
    sent = [0]
    total = 200 * 1024 * 1024
    chunk = b"x" * 65536

    def huge(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 422 Unprocessable\r\nContent-Length: %d\r\n\r\n" % total)
        conn.sendall(f"Contact already exists: {EMAIL} ".encode())
        while sent[0] < total:
            conn.sendall(chunk)  # raises once the sink has closed the connection
            sent[0] += len(chunk)

    with raw_server(huge) as url:
        info = crm_send_fails(url, PermanentSinkError, timeout=10)
    assert "Contact already exists" in str(info.value) and EMAIL not in str(info.value)
    print(f"receiver got {sent[0] / 2**20:.1f} MiB of 200 MiB out; the sink reads "
          f"{MAX_ANSWER_BYTES // 1024} KiB")
    assert sent[0] < total / 4


def crm_send_fails(url: str, error: type[Exception],
                   timeout: float) -> pytest.ExceptionInfo[Exception]:
    """One event sent to the CRM at ``url``, which must fail with ``error``."""
    sink = CrmSink(url, [parse_secret(CRM_SECRET)], timeout=timeout)
    try:
        with pytest.raises(error) as info:
            sink.send([event(1)])
    finally:
        sink.close()
    return info


class raw_server:
    """A TCP server on 127.0.0.1 answering each connection with ``answer(conn)`` after
    reading the request head and body."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)  # accept() wakes up to see the stop
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(30)
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(rest) < length:
                    rest += conn.recv(65536)
                try:
                    self.answer(conn)
                except OSError:
                    pass


def test_a_dripping_receiver_is_cut_at_the_request_deadline(redis_server: str) -> None:
    """One byte every 0.2 s: each read is quick, so a per-read timeout never fires and the
    request would take 9 s; the total deadline (1 s) ends it as a transient failure first."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    dripped = [0]
    stop = threading.Event()

    def drip(conn: socket.socket) -> None:
        for byte in answer:
            if stop.wait(0.2):
                return
            conn.sendall(bytes([byte]))
            dripped[0] += 1

    with raw_server(drip) as url:
        try:
            info = crm_send_fails(url, TransientSinkError, timeout=1)
        finally:
            stop.set()
    assert "Timeout" in str(info.value)
    assert dripped[0] < len(answer), "the whole dripped answer was waited for"
