"""The local spool: an fsynced journal that holds deliveries while Redis cannot take them.

Layout: ``INGEST_SPOOL_DIR`` holds segment files ``seg-<time ns>-<process token>.log``. Each
record is ``MAGIC | length (u32) | crc32 (u32) | payload`` where the payload is the envelope as
JSON. A process appends only to its own active segment, which it holds under an exclusive
``flock``; sealed segments are immutable, except that :func:`rewrite_segment` (``ingest
erase``) may replace one whole, atomically, with a copy that leaves some records out or
changes them.

Why each piece:

- **Length prefix + CRC32**: a crash in the middle of a write leaves a torn last record. The
  reader stops at the first record whose header or checksum does not hold, so a torn record is
  never replayed as garbage. A torn *tail* is normal after a crash (that record was never
  acknowledged: the acceptor answers only after the fsync). A bad record *followed by more
  data* is corruption: the valid records before it are drained and the file is kept, renamed
  ``.corrupt``, for a human to look at.
- **Group fsync**: requests that arrive while a write is in flight wait for the next one, which
  writes all of them and fsyncs once (as
  :class:`ingest.acceptor.enqueue.BatchEnqueuer` does for Redis).
- **Segments, deleted only when drained**: the drainer seals the active segment, turns each
  sealed segment into ``process_batch`` jobs, and unlinks it only after every one of its jobs
  is in Redis. A crash mid-drain leaves the segment in place; draining it again writes the same
  job ids (derived from the delivery ids of each chunk, and the chunks of an immutable segment
  are always the same), so RQ refuses the copies (``DuplicateJobError``). Should a job have
  finished and expired in between, the worker's dedup records still drop the copies.
- **flock per segment**: several acceptor processes may share one directory. A segment whose
  lock can be taken belongs to no live process (its writer died or sealed it), so any drainer
  may adopt it; two drainers never drain one segment at once. A new segment is created and
  locked under a name no drainer looks at, and only then renamed to its segment name: between
  its creation and its lock, a drainer (of this process or another) could otherwise take it
  for an orphan, find it empty and remove it, and the writer would then fsync deliveries into
  a file that is gone.
- **Rewriting a sealed segment** (:func:`rewrite_segment`) takes the same lock, writes the new
  contents to a temporary file, fsyncs it, renames it over the segment and fsyncs the
  directory: a crash leaves the old segment or the new one, never a mix. A drainer that opened
  the old file finds it unlinked (``st_nlink == 0``) and skips it; the new file is adopted like
  any sealed segment. Its chunks differ from the old one's, so a drain that crashed before the
  rewrite and runs again after it may enqueue deliveries again under other job ids: the
  worker's dedup records drop the copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rq import Queue

from ingest import constants
from ingest.rq_jobs import enqueue_batch

__all__ = ["SegmentContents", "SegmentRewrite", "Spool", "encode_record", "read_segment",
           "remove_stale_rewrites", "rewrite_segment", "segment_files"]

log = logging.getLogger("ingest.acceptor.spool")

MAGIC = b"WIS1"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32 of the payload
_PREFIX = "seg-"
_SUFFIX = ".log"
_CORRUPT = ".corrupt"  # a damaged segment kept for a human (see read_segment)
# rewrite_segment's copy of a segment, until it is renamed over it.
_REWRITE_PREFIX, _REWRITE_SUFFIX = ".rewrite-", ".tmp"
# A segment being created, before it is locked and renamed to its segment name.
_NEW_PREFIX = ".new-"


def encode_record(envelope: dict[str, Any]) -> bytes:
    payload = orjson.dumps(envelope)
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class SegmentContents:
    """What a segment holds: its valid records, and what (if anything) stopped the reader."""

    records: list[dict[str, Any]]
    torn_tail: bool = False  # the last record was cut short by a crash: normal, never replayed
    corrupt: bool = False  # a bad record with data after it: keep the file for a human


def read_segment(data: bytes) -> SegmentContents:
    """Parse a segment's bytes, stopping at the first record that does not check out."""
    records: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            return SegmentContents(records, torn_tail=True)
        magic, length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        if magic != MAGIC or length > constants.SPOOL_MAX_RECORD_BYTES:
            return SegmentContents(records, corrupt=True)
        if start + length > len(data):
            return SegmentContents(records, torn_tail=True)
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            # A checksum failure on the very last record is a torn write; anywhere else it is
            # damage to data that was once complete.
            end = start + length == len(data)
            return SegmentContents(records, torn_tail=end, corrupt=not end)
        try:
            envelope = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return SegmentContents(records, corrupt=True)
        if not isinstance(envelope, dict):
            return SegmentContents(records, corrupt=True)
        records.append(envelope)
        offset = start + length
    return SegmentContents(records)


def segment_files(directory: Path) -> list[Path]:
    """Every segment file in ``directory``, oldest first: active, sealed, and damaged ones kept
    as ``.corrupt``. Empty when the directory does not exist."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.name.startswith(_PREFIX) and p.suffix in (_SUFFIX, _CORRUPT))


@dataclass(frozen=True)
class SegmentRewrite:
    """What :func:`rewrite_segment` did to one segment (in a dry run: would do)."""

    in_use: bool = False  # a live process holds it: not read, not changed
    gone: bool = False  # drained (or removed) before it could be read
    removed: int = 0  # records left out
    replaced: int = 0  # records written again, changed
    rest_dropped: bool = False  # what followed the valid records (torn tail, damage) left out
    deleted: bool = False  # nothing was left: the file is removed

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.replaced or self.rest_dropped)


def _rewrite_copy(segment: Path) -> Path:
    """Where :func:`rewrite_segment` writes a segment's new contents before renaming them
    over it: not a segment name, so never drained."""
    return segment.with_name(f"{_REWRITE_PREFIX}{segment.name}{_REWRITE_SUFFIX}")


def rewrite_segment(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any] | None], *,
                    keep_rest: Callable[[bytes], bool] = lambda rest: True,
                    dry_run: bool = False) -> SegmentRewrite:
    """Replace the sealed segment ``path`` with a copy holding each record as ``edit`` returns
    it: the record itself (kept byte for byte), another envelope (written in its place), or
    None (left out). What follows the valid records (a torn tail, or damage kept for a human)
    stays when ``keep_rest(those bytes)`` is true. A segment left empty is removed.

    Atomic: the copy goes to a temporary file, is fsynced and renamed over the segment, then
    the directory is fsynced. A segment a live process holds (an acceptor's active segment, a
    drainer moving it to Redis) is left alone: ``in_use``. ``dry_run`` changes nothing and
    says what would change."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return SegmentRewrite(gone=True)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return SegmentRewrite(in_use=True)
        if os.fstat(fd).st_nlink == 0:  # unlinked after we opened it: drained meanwhile
            return SegmentRewrite(gone=True)
        data = _read_all(fd)
        contents = read_segment(data)
        parts: list[bytes] = []
        removed = replaced = offset = 0
        for record in contents.records:
            _, length, _ = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            new = edit(record)
            if new is None:
                removed += 1
            elif new is record:
                parts.append(data[offset:end])  # as written, not encoded again
            else:
                parts.append(encode_record(new))
                replaced += 1
            offset = end
        rest = data[offset:]
        rest_dropped = bool(rest) and not keep_rest(rest)
        if not rest_dropped:
            parts.append(rest)
        new_data = b"".join(parts)
        result = SegmentRewrite(removed=removed, replaced=replaced, rest_dropped=rest_dropped,
                                deleted=not new_data)
        if dry_run or not result.changed:
            return result
        if new_data:
            tmp = _rewrite_copy(path)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(new_data)
                while view:
                    view = view[os.write(out, view):]
                os.fsync(out)
            finally:
                os.close(out)
            os.replace(tmp, path)
        else:
            path.unlink()
        _fsync_dir(path.parent)
        return result
    finally:
        os.close(fd)


def remove_stale_rewrites(directory: Path) -> int:
    """Remove the temporary copies :func:`rewrite_segment` left when it was cut off before
    its rename (a crash, a kill). Such a copy is never drained and would keep what it holds
    (other people's deliveries) past any erase or retention. A copy whose segment is locked
    belongs to a rewrite in progress (or a drainer) and stays. Returns how many went."""
    if not directory.is_dir():
        return 0
    removed = 0
    for tmp in directory.glob(f"{_REWRITE_PREFIX}*{_REWRITE_SUFFIX}"):
        segment = directory / tmp.name[len(_REWRITE_PREFIX):-len(_REWRITE_SUFFIX)]
        try:
            fd = os.open(segment, os.O_RDONLY)
        except FileNotFoundError:
            fd = -1  # the segment was drained or removed since: the copy is of nothing
        try:
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being rewritten (or drained) right now
            tmp.unlink(missing_ok=True)
            removed += 1
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        _fsync_dir(directory)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a file's creation or removal durable (the directory entry is data too)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; nothing more to do
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _sync(fd: int) -> None:
    (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)


class _Active:
    """This process's open segment."""

    __slots__ = ("count", "fd", "path", "size")

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self.count = 0


class Spool:
    """An fsynced, crash-safe journal of envelopes in ``directory``. See the module docstring."""

    def __init__(self, directory: Path | str,
                 segment_bytes: int = constants.SPOOL_SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsyncs = 0  # how many fsyncs appends cost (group commit makes this < appends)
        self._token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._active: _Active | None = None
        self._sealed: dict[Path, int] = {}  # sealed or adopted segments -> record count
        self._lock = threading.Lock()  # guards _sealed: the writer and the drainer both change it
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # One thread: writes and seals are sequential by design, so no lock is needed for them.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-write")
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Spool {self.directory} depth={self.depth()}>"

    # -- appending -----------------------------------------------------------------------------

    async def append(self, envelope: dict[str, Any]) -> None:
        """Return once ``envelope`` is written and fsynced; raise ``OSError`` if it could not be."""
        record = encode_record(envelope)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((record, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        # shield: a client hanging up must not cancel the write other requests share.
        await asyncio.shield(future)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._writer, self._write, [r for r, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _write(self, records: list[bytes]) -> None:
        """Writer thread: append ``records`` to the active segment with a single fsync."""
        active = self._active
        if active is None or active.size >= self.segment_bytes:
            self._seal_active()
            active = self._active = self._open_segment()
        data = b"".join(records)
        try:
            view = memoryview(data)
            while view:
                written = os.write(active.fd, view)
                view = view[written:]
            _sync(active.fd)
            self.fsyncs += 1
        except OSError:
            # The file may now end in a partial write, and after a failed fsync its pages are in
            # an unknown state: undo what we can and never append to this segment again.
            with contextlib.suppress(OSError):
                os.ftruncate(active.fd, active.size)
            self._seal_active()
            raise
        active.size += len(data)
        active.count += len(records)

    def _open_segment(self) -> _Active:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{_PREFIX}{time.time_ns():020d}-{self._token}{_SUFFIX}"
        # Locked under a name drainers ignore, then given its segment name (module docstring).
        fresh = self.directory / f"{_NEW_PREFIX}{path.name}"
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(fresh, path)
            _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            for leftover in (fresh, path):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise
        return _Active(path, fd)

    def _seal_active(self) -> None:
        """Writer thread: close the active segment (its records are already fsynced)."""
        active, self._active = self._active, None
        if active is None:
            return
        with contextlib.suppress(OSError):
            os.close(active.fd)  # also releases the flock: from now on any drainer may take it
        if active.count:
            with self._lock:
                self._sealed[active.path] = active.count
        else:
            with contextlib.suppress(OSError):
                active.path.unlink()

    # -- state ---------------------------------------------------------------------------------

    def depth(self) -> int:
        """Deliveries in the spool that are not in Redis yet."""
        active = self._active
        with self._lock:
            sealed = sum(self._sealed.values())
        return sealed + (active.count if active is not None else 0)

    async def start(self) -> None:
        """Adopt segments left by processes that died (they are drained like our own)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self.adopt_orphans)
        except OSError as exc:
            # Not fatal: Redis is the first choice, and the directory may become usable later.
            log.error("spool directory %s is not usable yet: %s", self.directory, exc)

    async def stop(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        await asyncio.get_running_loop().run_in_executor(self._writer, self._seal_active)
        self._stopped = True
        self._writer.shutdown(wait=True)

    def adopt_orphans(self) -> int:
        """Count segments in the directory that no live process holds. Returns how many."""
        adopted = 0
        for path in self._segment_paths():
            active = self._active
            with self._lock:
                known = path in self._sealed
            if known or (active is not None and path == active.path):
                continue
            with self._locked(path) as fd:
                if fd is None:
                    continue  # a live process is writing it, or another drainer has it
                contents = read_segment(_read_all(fd))
                with self._lock:
                    self._sealed[path] = len(contents.records)
                adopted += 1
                log.info("adopted spool segment %s with %d deliveries", path.name,
                         len(contents.records))
        return adopted

    def _segment_paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX))

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[int | None]:
        """An fd of ``path`` under an exclusive lock, or None when someone else holds it or the
        file is already gone (drained by another process)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(path)
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if os.fstat(fd).st_nlink == 0:  # unlinked after we opened it: someone drained it
                self._forget(path)
                yield None
                return
            yield fd
        finally:
            os.close(fd)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._sealed.pop(path, None)

    # -- draining ------------------------------------------------------------------------------

    def seal(self) -> None:
        """Close the active segment so the drainer can take it; later appends open a new one."""
        if not self._stopped:  # after stop() there is no active segment left to seal
            self._writer.submit(self._seal_active).result()

    def drain(self, queue: Queue, names: constants.Names,
              max_batch: int = constants.MAX_BATCH_SIZE,
              confirm: Callable[[], None] | None = None) -> int:
        """Move every sealed segment into ``queue`` as process_batch jobs; return deliveries
        moved. Raises the Redis error that stopped it (what is not moved stays spooled).
        ``confirm``: called once a segment's jobs are written, before the segment is removed;
        raising keeps it (``INGEST_REDIS_MIN_REPLICAS``: its jobs reached too few replicas)."""
        self.seal()
        self.adopt_orphans()
        with self._lock:
            paths = sorted(self._sealed)
        moved = 0
        for path in paths:
            with self._locked(path) as fd:
                if fd is None:
                    continue
                contents = read_segment(_read_all(fd))
                records = contents.records
                for i in range(0, len(records), max_batch):
                    chunk = records[i:i + max_batch]
                    enqueue_batch(queue, chunk, names.job_id("spool", _chunk_digest(chunk)))
                    _note_drained(queue, names, chunk)
                if confirm is not None and records:
                    confirm()
                if contents.corrupt:
                    target = path.with_suffix(".corrupt")
                    path.rename(target)
                    log.error("spool segment %s is damaged after %d valid deliveries (all "
                              "moved to Redis); kept as %s for inspection",
                              path.name, len(records), target.name)
                else:
                    if contents.torn_tail:
                        log.warning("spool segment %s ends in a torn record (a crash during "
                                    "a write that was never acknowledged); ignored", path.name)
                    path.unlink()
                _fsync_dir(self.directory)
                self._forget(path)
                moved += len(records)
                log.info("drained %d spooled deliveries into Redis", len(records),
                         extra={"count": len(records)})
        return moved


def _note_drained(queue: Queue, names: constants.Names, chunk: list[dict[str, Any]]) -> None:
    """Last accepted per provider (ingest.activity) for deliveries answered 200 while Redis
    was away: as of their receipt. Best effort: it never stops the drain."""
    from ingest.activity import note_accepted, received_at

    try:
        pipe = queue.connection.pipeline(transaction=False)
        note_accepted(pipe, names, chunk, at=max(received_at(e) for e in chunk))
        pipe.execute()
    except Exception as exc:
        log.warning("could not record the drained deliveries' activity: %r", exc)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _chunk_digest(chunk: list[dict[str, Any]]) -> str:
    ids = "\n".join(str(envelope.get("id")) for envelope in chunk)
    return hashlib.sha256(ids.encode()).hexdigest()[:32]
