"""The local spool: where events go while beanstalkd cannot take them.

An append-only file of records, each ``length(4) crc32(4) job-body``. A record is
appended (and, with ``fsync=always``, synced) *before* the request is answered, so an
acknowledged event is on disk even if ingest is killed a moment later.

Files and ownership, so several ingest processes can share one directory:

- ``active-*.spool``: the file one live process appends to, held with ``flock``.
- ``replay-*.spool``: sealed files waiting to be put into beanstalkd.
- ``*.corrupt``: a file that ends in damage replay could not read (not a torn append),
  kept for an operator after every whole record in it was replayed.

On start, a process claims every file in the directory that no live process holds
(a crashed ingest's spool) and replays it. Replay puts records in order and deletes a
file once all of it is in beanstalkd. A crash mid-replay replays the file again from
the start; the duplicates this makes are dropped by the consumer (``event_id``).

Files are read with ``pread`` only, never through the writer's buffer: after a failed
write (a full disk) a buffered writer still holds the bytes it could not write and
raises again on every flush, so nothing may depend on flushing it.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trackbuf import codec
from trackbuf.log import kv

log = logging.getLogger("trackbuf.ingest.spool")

_HEADER = struct.Struct(">II")
_LENGTH = struct.Struct(">I")
# The largest record append() writes. Settings bound TRACKBUF_MAX_JOB_BYTES below it,
# and larger bodies are split before they are spooled, so replay can read them all.
MAX_RECORD = codec.MAX_JOB_BYTES
# Where a record boundary is trusted (the file start, or just after a good record),
# replay reads a record up to this size: files written by releases that did not bound
# the job size may hold such records. Past damage it only trusts MAX_RECORD.
_READ_LIMIT = 64 << 20
FSYNC_POLICIES = ("always", "never")
_SCAN_BLOCK = 1 << 16


@dataclass
class _ReplayFile:
    path: Path
    handle: BinaryIO  # kept open: it carries our flock; read through pread on its fd
    records: int  # still to replay
    size: int  # bytes still to replay
    events: int = 0  # in the records still to replay
    offset: int = 0


class Spool:
    def __init__(self, directory: Path, max_bytes: int, fsync: str = "always") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"spool fsync must be one of {FSYNC_POLICIES}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._active: BinaryIO | None = None
        self._active_path: Path | None = None
        self._active_bytes = 0
        self._active_records = 0
        self._active_events = 0
        self._replay: list[_ReplayFile] = []
        # Events in damaged records that replay had to skip; only ever grows, so the
        # event loop can read it while the disk thread replays (see Enqueuer).
        self.lost_events = 0
        self.left_at_close = 0

    # Setup ----------------------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.spool")):
            self._claim(path)
        if self._replay:
            log.info(
                kv("spool_found", files=len(self._replay), records=self.pending_records,
                   bytes=self.pending_bytes)
            )  # fmt: skip
        kept = sorted(path.name for path in self.directory.glob("*.corrupt"))
        if kept:
            # Left by an earlier replay that could not get past damage: say so on every
            # start until an operator has looked at them.
            log.warning(kv("spool_corrupt_files_kept", files=len(kept), first=kept[0]))

    def _claim(self, path: Path) -> None:
        """Take over a spool file nobody holds (its writer died) for replay."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 - kept open to hold the lock
        except FileNotFoundError:
            return  # another process claimed and renamed it first
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # a live process owns it
            return
        if not path.exists():  # renamed by a claimer between our open and our lock
            handle.close()
            return
        target = path
        if not path.name.startswith("replay-"):
            target = self.directory / f"replay-{uuid.uuid4().hex}.spool"
            path.rename(target)
        records, size, events = _count(handle.fileno())
        self._replay.append(_ReplayFile(target, handle, records, size, events))

    def close(self) -> None:
        # What was still waiting, for whoever reports on the stop.
        self.left_at_close = self.pending_events
        if self._active is not None:
            self._active.close()
            self._active = None
            if self._active_records == 0 and self._active_path is not None:
                self._active_path.unlink(missing_ok=True)
        for replay in self._replay:
            replay.handle.close()
        self._replay.clear()

    # Writing --------------------------------------------------------------------------

    def has_room(self, nbytes: int = 0) -> bool:
        return self.pending_bytes + nbytes + _HEADER.size <= self.max_bytes

    def append(self, body: bytes) -> bool:
        """Append one job body; True once it is on disk (synced with fsync=always).

        A body over ``MAX_RECORD`` is refused with ValueError: replay could not read it
        back, so accepting it would acknowledge an event that is lost. Callers split."""
        if len(body) > MAX_RECORD:
            raise ValueError(f"spool record of {len(body)} bytes is over {MAX_RECORD}")
        if not self.has_room(len(body)):
            return False
        record = _HEADER.pack(len(body), zlib.crc32(body)) + body
        try:
            handle = self._writer()
            _write_all(handle, record)
            if self.fsync == "always":
                os.fdatasync(handle.fileno())
        except Exception as exc:
            log.error(kv("spool_write_failed", error=repr(exc)))
            self._reset_writer(write_failed=True)
            return False
        self._active_bytes += len(record)
        self._active_records += 1
        self._active_events += _events(body)
        return True

    def _writer(self) -> BinaryIO:
        if self._active is None:
            path = self.directory / f"active-{uuid.uuid4().hex}.spool"
            # Unbuffered: a write either reaches the file or fails right here; no bytes
            # linger in a buffer to be flushed (and to fail again) later.
            handle = open(path, "a+b", buffering=0)  # noqa: SIM115 - lives with the process
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if self.fsync == "always":
                    _sync_dir(self.directory)  # the new file's name must survive a crash
            except BaseException:
                handle.close()
                path.unlink(missing_ok=True)
                raise
            self._active, self._active_path = handle, path
            self._active_bytes = self._active_records = self._active_events = 0
        return self._active

    def _reset_writer(self, write_failed: bool) -> None:
        """After a failed write the file may end in a torn record: seal it and start
        a new one. Its whole records (every acknowledged one among them) are replayed;
        the torn one at its end never was acknowledged and is skipped."""
        if self._active is not None:
            self._seal(write_failed)

    # Replay ---------------------------------------------------------------------------

    @property
    def pending_records(self) -> int:
        return sum(r.records for r in self._replay) + self._active_records

    @property
    def pending_events(self) -> int:
        return sum(r.events for r in self._replay) + self._active_events

    @property
    def pending_bytes(self) -> int:
        return sum(r.size for r in self._replay) + self._active_bytes

    @property
    def empty(self) -> bool:
        # A sealed file counts until replay has looked at it, even one whose records
        # could not be counted: emptiness must never hide a file on disk.
        return not self._replay and not self._active_records

    def _seal(self, write_failed: bool = False) -> None:
        """Move the active file to the replay queue; new appends start a fresh file.

        The handle stays open: it keeps the lock, so no other process can claim the
        file between the rename and the replay. Nothing here may keep a sealed file
        with records out of the replay queue: they were acknowledged."""
        assert self._active is not None and self._active_path is not None
        handle, path = self._active, self._active_path
        acked_records, acked_bytes = self._active_records, self._active_bytes
        acked_events = self._active_events
        self._active = self._active_path = None
        self._active_bytes = self._active_records = self._active_events = 0
        target = self.directory / f"replay-{uuid.uuid4().hex}.spool"
        try:
            path.rename(target)
        except OSError as exc:
            # The name is only a label (the lock is what protects the file), so an
            # unrenamed file is replayed all the same.
            log.error(kv("spool_rename_failed", file=path.name, error=repr(exc)))
            target = path
        records, size, events = acked_records, acked_bytes, acked_events
        if write_failed:
            try:
                # Counted from the file, not from what append() acknowledged: a record
                # whose sync failed may be whole on disk, and it will be replayed too.
                # (Only then: reading a large file back would hold up the replay.)
                records, size, events = _count(handle.fileno())
            except OSError as exc:
                log.error(kv("spool_count_failed", file=target.name, error=repr(exc)))
        if records == 0 and acked_records == 0:
            # Nothing acknowledged in it (a write failed into a fresh file): drop it now,
            # so a disk that stays full does not pile up empty files and open handles.
            with contextlib.suppress(OSError):  # a sealing error must not fail the write
                target.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                handle.close()
            return
        self._replay.append(_ReplayFile(target, handle, records, size, events))

    def peek(self) -> bytes | None:
        """The oldest spooled job body, not yet removed; None when nothing is left.

        The caller puts it into beanstalkd and calls ``replayed()`` once the put
        succeeded; if the put fails, the same body comes back on the next ``peek()``.
        """
        while True:
            if not self._replay:
                if self._active is None or not self._active_records:
                    return None
                self._seal()
                continue
            current = self._replay[0]
            found = _read_record(current.handle.fileno(), current.offset)
            if found.kind is _Found.RECORD:
                return found.body
            if found.kind is _Found.DAMAGED:
                self._skip(current, found)
                continue
            if found.kind is _Found.TORN:
                # Never acknowledged: the writer died (or failed) mid-append.
                log.error(kv("spool_torn_record", file=current.path.name, offset=current.offset))
                self._finish(current)
            elif found.kind is _Found.UNREADABLE:
                self._give_up(current)
            else:
                self._finish(current)

    def replayed(self, body: bytes) -> None:
        current = self._replay[0]
        current.offset += _HEADER.size + len(body)
        current.records = max(current.records - 1, 0)
        current.size = max(current.size - _HEADER.size - len(body), 0)
        current.events = max(current.events - _events(body), 0)

    def _skip(self, current: _ReplayFile, found: _Record) -> None:
        """A damaged record with a whole record after it: the disk corrupted it (only
        the last record of a file can be torn by a crash). Skip to the next whole one."""
        events = codec.event_count(found.body) or 1  # the frame may be damaged too
        self.lost_events += events
        log.error(
            kv("spool_record_corrupt", file=current.path.name, offset=current.offset,
               bytes=len(found.body), events_lost=events)
        )  # fmt: skip
        current.offset = found.next_offset

    def _give_up(self, current: _ReplayFile) -> None:
        """Damage at the end of the file with no whole record after it, and not zeros
        (so not a torn append): keep the file for an operator and count the loss (at
        least one event; how many the damaged bytes held is unknown)."""
        left = os.fstat(current.handle.fileno()).st_size - current.offset
        kept = current.path.with_suffix(".corrupt")
        try:
            current.path.rename(kept)
        except OSError:
            kept = current.path
        self.lost_events += 1
        log.critical(
            kv("spool_file_corrupt", file=kept.name, offset=current.offset, bytes_left=left,
               records_not_replayed=current.records, action="kept for an operator")
        )  # fmt: skip
        current.handle.close()
        self._replay.pop(0)

    def _finish(self, current: _ReplayFile) -> None:
        current.path.unlink(missing_ok=True)
        current.handle.close()
        self._replay.pop(0)
        log.info(kv("spool_file_replayed", file=current.path.name))


# Reading records ------------------------------------------------------------------------


class _Found(enum.Enum):
    RECORD = "record"  # a whole record whose CRC matches
    END = "end"  # the file ends cleanly here
    TORN = "torn"  # an unfinished last record (or a zero-filled tail): never acknowledged
    DAMAGED = "damaged"  # a bad record followed by a whole one: skip it
    UNREADABLE = "unreadable"  # damage with no trustworthy record boundary after it


@dataclass(frozen=True)
class _Record:
    kind: _Found
    body: bytes = b""
    next_offset: int = 0


def _read_record(fd: int, offset: int) -> _Record:
    """Read the record at ``offset`` and say what it is.

    A crash can only tear the *last* record (appends are sequential and an append is
    acknowledged only once it is whole). So a bad record is torn when nothing but
    zeros follows it, or when the file ends inside it and no whole record follows.
    Otherwise the disk damaged it, and replay goes on at the next whole record: where
    the bad record's length field says it is, or else the first offset after it where
    a whole record with a matching CRC starts (random bytes pass a CRC-32 check once
    in 4 billion). Every acknowledged record after a damaged one is replayed.
    """
    header = os.pread(fd, _HEADER.size, offset)
    if not header:
        return _Record(_Found.END)
    if len(header) < _HEADER.size:
        return _Record(_Found.TORN)
    length, crc = _HEADER.unpack(header)
    plausible = 0 < length <= _READ_LIMIT
    body = os.pread(fd, length, offset + _HEADER.size) if plausible else b""
    whole = plausible and len(body) == length
    if whole and zlib.crc32(body) == crc:
        return _Record(_Found.RECORD, body, offset + _HEADER.size + length)
    if whole:
        after = offset + _HEADER.size + length
        if _only_zeros(fd, after):
            return _Record(_Found.TORN)  # the last record's data never reached the disk
        if _whole_record_at(fd, after):
            return _Record(_Found.DAMAGED, body, after)  # its length field holds
    elif _only_zeros(fd, offset):
        return _Record(_Found.TORN)  # the file grew, but no data reached the disk
    resume = _next_whole_record(fd, offset + 1)
    if resume is not None:
        return _Record(_Found.DAMAGED, body if whole else b"", resume)
    if plausible and not whole:
        return _Record(_Found.TORN)  # the file ends inside it: an unfinished append
    return _Record(_Found.UNREADABLE)


def _whole_record_at(fd: int, offset: int, limit: int = MAX_RECORD) -> bool:
    header = os.pread(fd, _HEADER.size, offset)
    if len(header) < _HEADER.size:
        return False
    length, crc = _HEADER.unpack(header)
    if not 0 < length <= limit:
        return False
    body = os.pread(fd, length, offset + _HEADER.size)
    return len(body) == length and zlib.crc32(body) == int(crc)


def _next_whole_record(fd: int, start: int) -> int | None:
    """The first offset from ``start`` on where a whole, CRC-checked record begins.

    Used only past damage, so it may be slow: it looks at every offset, but reads a
    body only where the length field is plausible (at most ``MAX_RECORD``, which every
    record written since appends were bounded respects)."""
    offset = start
    while True:
        window = os.pread(fd, _SCAN_BLOCK + _HEADER.size, offset)
        if len(window) < _HEADER.size:
            return None
        for i in range(len(window) - _HEADER.size + 1):
            length = _LENGTH.unpack_from(window, i)[0]
            if 0 < length <= MAX_RECORD and _whole_record_at(fd, offset + i):
                return offset + i
        offset += len(window) - _HEADER.size + 1


def _only_zeros(fd: int, offset: int) -> bool:
    """True when the file holds nothing but zero bytes from ``offset`` on."""
    while True:
        block = os.pread(fd, _SCAN_BLOCK, offset)
        if not block:
            return True
        if block.count(0) != len(block):
            return False
        offset += len(block)


def _count(fd: int) -> tuple[int, int, int]:
    """Records, bytes and events that replay will put, read the way replay reads them."""
    records = size = events = offset = 0
    while True:
        found = _read_record(fd, offset)
        if found.kind is _Found.RECORD:
            records += 1
            size += found.next_offset - offset
            events += _events(found.body)
        elif found.kind is not _Found.DAMAGED:
            return records, size, events
        offset = found.next_offset


def _events(body: bytes) -> int:
    # A body that is not a well-framed job still holds at least one event.
    return codec.event_count(body) or 1


def _write_all(handle: BinaryIO, data: bytes) -> None:
    # An unbuffered write may take only part of the data (a disk filling up does that),
    # and the next call then reports why.
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError("spool write made no progress")
        view = view[written:]


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
