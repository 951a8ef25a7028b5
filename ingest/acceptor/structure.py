"""Is a delivery body a JSON object nested at most ``MAX_JSON_DEPTH`` levels? Cheaply, for all.

Parsing costs what the body's values cost to build, not what it weighs: 1 MiB of text parses
in well under a millisecond, 1 MiB of 340,000 empty arrays in about 110 ms, and walking those
for the nesting check took another 230 ms. On the event loop, a few such bodies (one leaked
token is enough) delay every other provider's deliveries by seconds. So each body is first
sized up at C speed (:func:`cost`: its brackets and commas, counted by ``bytes.count``):

- a cheap body (nearly all: at most ``INLINE_MAX_CONTAINERS`` brackets and
  ``INLINE_MAX_COMMAS`` commas, a couple of milliseconds at worst) is checked in line;
- an expensive one is checked in a separate process (:class:`StructureCheck`), so the event
  loop only hands it over. A provider has at most ``EXPENSIVE_BODIES_PER_PROVIDER`` there at
  once; its others wait their turn, so one sender's bodies queue among themselves and cannot
  take the processes from other providers. A body that waits longer than
  ``EXPENSIVE_BODY_WAIT`` is refused with :class:`Busy` (503), for its sender to retry.

Only the verdict comes back: the acceptor stores the body's bytes, never the parsed value.
This module imports nothing but orjson and the constants, as it is what those processes load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import threading
import time
from typing import Any

import orjson

from ingest import constants

__all__ = ["Busy", "NOT_AN_OBJECT", "OK", "StructureCheck", "TOO_DEEP", "Unavailable", "cost",
           "verdict"]

# Verdicts.
OK = 0
NOT_AN_OBJECT = 1  # not JSON, not an object, or nested past orjson's own limit
TOO_DEEP = 2


class Busy(Exception):
    """The provider's expensive bodies already fill its turn for longer than it may wait."""


class Unavailable(Exception):
    """The structure-check processes failed (one died): this body could not be checked."""


def cost(body: bytes) -> tuple[int, bool]:
    """(JSON containers in ``body``, whether it must be checked off the event loop).

    Brackets and commas inside strings count too: an overestimate, which only ever sends a
    body to the separate process."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > constants.INLINE_MAX_CONTAINERS:
        return containers, True
    # A body this short cannot hold that many commas: spare it the third pass.
    if len(body) > 2 * constants.INLINE_MAX_COMMAS and \
            body.count(b",") > constants.INLINE_MAX_COMMAS:
        return containers, True
    return containers, False


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) has containers nested more than ``limit`` deep."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                if child:  # an empty one adds its level, checked just above, and no more
                    stack.append((child, depth + 1))
    return False


def verdict(body: bytes, containers: int | None = None) -> int:
    """:data:`OK`, :data:`NOT_AN_OBJECT` or :data:`TOO_DEEP` for ``body``."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return NOT_AN_OBJECT  # also covers nesting past orjson's recursion limit
    if not isinstance(parsed, dict):
        return NOT_AN_OBJECT
    if containers is None:
        containers = body.count(b"[") + body.count(b"{")
    # A body with at most MAX_JSON_DEPTH brackets cannot nest deeper: nearly every delivery.
    if containers > constants.MAX_JSON_DEPTH and nests_deeper(parsed, constants.MAX_JSON_DEPTH):
        return TOO_DEEP
    return OK


def _watch_parent(parent: int) -> None:
    """In each checking process: exit once the acceptor that started it is gone. A pool's
    processes hold both ends of its task pipe, so a parent killed without shutting the pool
    down would leave them waiting for work forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _workers() -> int:
    """One process per core but one (the event loop keeps a core), at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    return max(1, min(constants.MAX_STRUCTURE_WORKERS, cores - 1))


class StructureCheck:
    """The acceptor's side: :meth:`check` a body in line or in the separate processes.

    The processes start when the first expensive body comes (most deployments never see one)
    and are spawned, not forked, from a process that runs an event loop and threads.
    """

    def __init__(self, workers: int | None = None,
                 per_provider: int = constants.EXPENSIVE_BODIES_PER_PROVIDER,
                 wait: float = constants.EXPENSIVE_BODY_WAIT) -> None:
        self.workers = workers or _workers()
        self.per_provider = per_provider
        self.wait = wait
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._starting: asyncio.Lock | None = None
        self._turns: dict[str, asyncio.Semaphore] = {}
        # Per provider: expensive bodies being checked now, and the most there ever were.
        self.in_hand: dict[str, int] = {}
        self.most_in_hand: dict[str, int] = {}
        from ingest import metrics  # here: the checking processes import this module too

        self._counted = metrics.EXPENSIVE_BODIES

    async def check(self, provider: str, body: bytes) -> int:
        containers, expensive = cost(body)
        if not expensive:
            return verdict(body, containers)
        turn = self._turns.get(provider)
        if turn is None:
            turn = self._turns[provider] = asyncio.Semaphore(self.per_provider)
        try:
            async with asyncio.timeout(self.wait):
                await turn.acquire()
        except TimeoutError:
            self._counted.labels(provider, "busy").inc()
            raise Busy from None
        self.in_hand[provider] = n = self.in_hand.get(provider, 0) + 1
        self.most_in_hand[provider] = max(n, self.most_in_hand.get(provider, 0))
        try:
            try:
                pool = await self._ready()
            except OSError as exc:  # no process could start (out of memory, of processes)
                raise Unavailable(f"could not start a structure-check process: {exc}") from None
            try:
                result: int = await asyncio.get_running_loop().run_in_executor(
                    pool, verdict, body, containers)
            except concurrent.futures.BrokenExecutor as exc:
                if self._pool is pool:
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                raise Unavailable(f"a structure-check process died: {exc}") from None
            self._counted.labels(provider, "checked").inc()
            return result
        finally:
            self.in_hand[provider] -= 1
            turn.release()

    async def _ready(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._pool is None:
                # Starting processes takes a few milliseconds each: not on the event loop.
                self._pool = await asyncio.get_running_loop().run_in_executor(None, self._start)
            return self._pool

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_watch_parent, initargs=(os.getpid(),))
        # Start them now rather than on the event loop at the first submit.
        for future in [pool.submit(int) for _ in range(self.workers)]:
            future.result()
        return pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False, cancel_futures=True)
