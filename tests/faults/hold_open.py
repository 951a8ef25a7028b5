"""A hostile sender's idle connections: ``python -m tests.faults.hold_open PORT COUNT FIRST``.

Opens COUNT TCP connections to 127.0.0.1:PORT that never send a byte, 4,000 a second and at
most 256 being set up at a time, and holds them.
Prints one JSON line once every connection is open or has failed:
``{"opened": n, "failed": m, "seconds": s}``; then, after a line on stdin,
``{"closed_by_server": k}`` (connections the server has closed since) and exits. It raises its
own file-descriptor limit to the hard limit first; gives up connecting after 60 s. Its local
ports are FIRST and up (skipping ports in use), below the kernel's ephemeral range.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import sys
import time

WINDOW = 256
# Connections started per second: about what a busy acceptor accepts, so its accept queue does
# not overflow (the kernel would drop the rest and their senders retry a second later).
RATE = float(os.environ.get("HOLD_OPEN_RATE", "4000"))
DEADLINE = 60.0


def _bind(sock: socket.socket, port: int) -> int:
    """Bind ``sock`` to the first free local port from ``port`` on; return the one after.

    Explicitly: past some 14,000 connections to one address, the kernel's search for a free
    ephemeral port costs more than the rest of connecting."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # over our own TIME_WAITs
    while port < 65536:
        try:
            sock.bind(("127.0.0.1", port))
            return port + 1
        except OSError:
            port += 1
    raise OSError("no free local port left")


def main(port: int, count: int, first_port: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    poller = select.epoll()
    opened: list[socket.socket] = []
    pending: dict[int, socket.socket] = {}
    failed = tried = 0
    next_port = first_port
    # A failed attempt (a local port the kernel will not pair with the server) is made again
    # from the next port, at most `count` times in all.
    while len(opened) < count and failed <= count and time.monotonic() - started < DEADLINE:
        # A window of connections being set up: one the kernel drops (a full accept queue)
        # is retried a second later without holding up the others.
        due = int((time.monotonic() - started) * RATE) + 1 + failed
        while tried < due and len(opened) + len(pending) < count and len(pending) < WINDOW:
            tried += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            next_port = _bind(sock, next_port)
            code = sock.connect_ex(("127.0.0.1", port))
            if code not in (0, errno.EINPROGRESS):
                failed += 1
                sock.close()
                continue
            pending[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLOUT)
        for fd, _ in poller.poll(0.01):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                opened.append(sock)
            else:
                failed += 1
                sock.close()
    for sock in pending.values():
        sock.close()
    print(json.dumps({"opened": len(opened), "failed": failed,
                      "seconds": round(time.monotonic() - started, 2)}), flush=True)
    sys.stdin.readline()
    closed = 0
    for sock in opened:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass  # still open, nothing sent
        except OSError:
            closed += 1  # reset by the server
    print(json.dumps({"closed_by_server": closed}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
