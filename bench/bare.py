"""The HTTP ceiling: a bare Starlette POST route under the uvicorn settings of ``ingest serve``.

It reads the body and answers the acceptor's 200 JSON, nothing else: no signature check, no
Redis. ``python -m bench.bare --port P``. Keep the ``uvicorn.run`` arguments identical to
``ingest.commands.cli.cmd_serve``, or the ratio compares two different servers.
"""

from __future__ import annotations

import argparse
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["app", "main"]


async def receive(request: Request) -> Response:
    await request.body()
    return JSONResponse({"status": "accepted"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/webhooks/{provider}", receive, methods=["POST"]),
                        Route("/healthz", healthz, methods=["GET"])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # The same arguments as `ingest serve` (ingest.commands.cli.cmd_serve).
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_config=None, access_log=False,
                http="httptools", loop="uvloop", timeout_keep_alive=5,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
