from __future__ import annotations

import resource
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ingest.spool import MAX_RECORD, Spool
from trackbuf import codec

HEADER_BYTES = 8  # length and crc32, both 4 bytes


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (body := spool.peek()) is not None:
        spool.replayed(body)
        out.append(body)
    return out


def test_append_then_replay_in_order_and_empty_afterwards(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    bodies = [f"job-{i}".encode() for i in range(10)]
    assert all(spool.append(b) for b in bodies)
    assert spool.pending_records == 10 and spool.pending_bytes > 0
    assert drain(spool) == bodies
    assert spool.empty and spool.pending_bytes == 0
    assert list(tmp_path.glob("*.spool")) == []
    spool.close()


def test_a_stopped_replay_resumes_where_it_stopped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    for i in range(5):
        spool.append(b"x%d" % i)
    first = spool.peek()
    assert first == b"x0"
    spool.replayed(first)  # one put succeeded...
    assert spool.peek() == b"x1"  # ...the next one failed: it is offered again
    assert drain(spool) == [b"x1", b"x2", b"x3", b"x4"]
    spool.close()


def test_a_crashed_writers_spool_is_claimed_and_replayed(tmp_path: Path) -> None:
    crashed = Spool(tmp_path, max_bytes=1 << 20)
    crashed.open()
    crashed.append(b"acknowledged-1")
    crashed.append(b"acknowledged-2")
    # The process dies: its file handles close, which releases its lock.
    assert crashed._active is not None
    crashed._active.close()
    crashed._active = None

    successor = Spool(tmp_path, max_bytes=1 << 20)
    successor.open()
    assert successor.pending_records == 2
    assert drain(successor) == [b"acknowledged-1", b"acknowledged-2"]
    successor.close()


def test_a_live_writers_spool_is_left_alone(tmp_path: Path) -> None:
    live = Spool(tmp_path, max_bytes=1 << 20)
    live.open()
    live.append(b"mine")
    neighbour = Spool(tmp_path, max_bytes=1 << 20)
    neighbour.open()
    assert neighbour.empty
    assert drain(live) == [b"mine"]
    live.close()
    neighbour.close()


def test_a_torn_tail_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    writer = Spool(tmp_path, max_bytes=1 << 20)
    writer.open()
    writer.append(b"whole")
    assert writer._active is not None and writer._active_path is not None
    writer._active.write(b"\x00\x00\x00\x10\x00\x00")  # a crash mid-append
    writer._active.close()
    writer._active = None
    reader = Spool(tmp_path, max_bytes=1 << 20)
    reader.open()
    assert drain(reader) == [b"whole"]
    assert list(tmp_path.glob("*.spool")) == []
    reader.close()


def test_a_full_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100)
    spool.open()
    assert spool.append(b"a" * 50)
    assert not spool.append(b"b" * 50)
    assert spool.pending_records == 1
    spool.close()


def test_a_failed_sync_does_not_break_the_spool(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    assert spool.append(b"first")
    real = os.fdatasync

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    assert not spool.append(b"unsynced")  # not acknowledged
    monkeypatch.setattr(os, "fdatasync", real)
    assert spool.append(b"third")  # a fresh file, the spool carries on
    replayed = drain(spool)
    assert replayed[0] == b"first" and replayed[-1] == b"third"
    spool.close()


def test_a_zero_filled_tail_is_not_replayed(tmp_path: Path) -> None:
    writer = Spool(tmp_path, max_bytes=1 << 20)
    writer.open()
    writer.append(b"real")
    assert writer._active is not None
    writer._active.write(b"\x00" * 4096)  # what a crash can leave after the last record
    writer._active.close()
    writer._active = None
    reader = Spool(tmp_path, max_bytes=1 << 20)
    reader.open()
    assert drain(reader) == [b"real"]
    reader.close()


def job(*names: str) -> bytes:
    """A real job frame, so a test can see how many events a record held."""
    return codec.encode_job([b'{"r":"%s"}' % name.encode() for name in names])


def record_offset(bodies: list[bytes], index: int) -> int:
    return sum(HEADER_BYTES + len(body) for body in bodies[:index])


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Make the kernel refuse writes past ``nbytes`` in any file (EFBIG), the way a full
    disk refuses them (ENOSPC): a real failed write, part-way through a record,
    without root or a tmpfs. Python ignores SIGXFSZ, so the write raises instead."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_full_disk_keeps_every_acknowledged_record_for_replay(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="never")
    spool.open()
    acked = []
    with file_size_limit(16 * 1024):
        for i in range(40):
            body = b"%03d" % i + b"x" * 1000
            if not spool.append(body):
                break  # the write that hit the limit: not acknowledged
            acked.append(body)
    assert 0 < len(acked) < 40, "the limit was never hit"
    # The disk has room again. The sealed file's acknowledged records are still
    # counted and replayed by this same process, not left on disk for a restart.
    assert spool.append(b"after")
    assert spool.pending_records == len(acked) + 1
    assert drain(spool) == [*acked, b"after"]
    assert spool.empty and list(tmp_path.glob("*.spool")) == []
    spool.close()


def test_a_disk_that_refuses_every_byte_leaves_no_files_behind(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="never")
    spool.open()
    with file_size_limit(0):
        assert not any(spool.append(b"refused-%d" % i) for i in range(5))
    # Nothing was acknowledged, so nothing waits for replay and no handle is held.
    assert spool.empty and spool._replay == []
    assert list(tmp_path.glob("*.spool")) == []
    assert spool.append(b"later") and drain(spool) == [b"later"]
    spool.close()


def test_a_corrupt_record_mid_file_is_skipped_counted_and_the_rest_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.open()
    bodies = [job("a"), job("b"), job("c1", "c2", "c3"), job("d"), job("e")]
    assert all(spool.append(body) for body in bodies)
    assert spool._active_path is not None
    # One flipped byte inside the third record's events (its frame intact, so the
    # count is known): disk corruption, not a crash.
    at = record_offset(bodies, 3) - 10
    with open(spool._active_path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    assert drain(spool) == [bodies[0], bodies[1], bodies[3], bodies[4]]
    assert spool.lost_events == 3
    assert "event=spool_record_corrupt" in caplog.text and "events_lost=3" in caplog.text
    assert list(tmp_path.glob("*")) == []
    spool.close()


def crashed_writer_with(tmp_path: Path, bodies: list[bytes]) -> tuple[Spool, Path]:
    """A spool holding ``bodies`` whose writer died (its file left unlocked)."""
    writer = Spool(tmp_path, max_bytes=1 << 30)
    writer.open()
    assert all(writer.append(body) for body in bodies)
    assert writer._active is not None and writer._active_path is not None
    path = writer._active_path
    writer._active.close()
    writer._active = None
    return writer, path


def test_a_garbage_length_field_costs_only_its_own_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the next record starts cannot be read from a garbage length field; replay
    finds it by its CRC and replays every acknowledged record after the damage."""
    bodies = [job(str(i)) for i in range(6)]
    _, path = crashed_writer_with(tmp_path, bodies)
    for garbage in (b"\x00\x00\x00\x05", b"\xff\xff\xff\xff", b"\x00\x00\x7f\x00"):
        with open(path, "r+b") as f:
            f.seek(record_offset(bodies, 2))
            f.write(garbage)
        reader = Spool(tmp_path, max_bytes=1 << 30)
        reader.open()
        assert reader.pending_records == 5, garbage
        assert drain(reader) == bodies[:2] + bodies[3:], garbage
        assert reader.lost_events == 1 and reader.empty
        assert "event=spool_record_corrupt" in caplog.text
        assert list(tmp_path.glob("*")) == []
        reader.close()
        _, path = crashed_writer_with(tmp_path, bodies)


def test_damage_with_no_whole_record_after_it_keeps_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The last record damaged, with data (not zeros) after it and no whole record to
    resume at: it cannot be a torn append, so it is counted lost and the file kept."""
    bodies = [job(str(i)) for i in range(3)]
    _, path = crashed_writer_with(tmp_path, bodies)
    with open(path, "r+b") as f:
        f.seek(record_offset(bodies, 2))
        f.write(b"\x7f\x00\x00\x00garbage")
    reader = Spool(tmp_path, max_bytes=1 << 20)
    reader.open()
    assert drain(reader) == bodies[:2]
    assert reader.lost_events >= 1 and reader.empty
    assert "event=spool_file_corrupt" in caplog.text
    assert list(tmp_path.glob("*.spool")) == []
    assert len(list(tmp_path.glob("*.corrupt"))) == 1  # kept for an operator
    reader.close()
    caplog.clear()
    restarted = Spool(tmp_path, max_bytes=1 << 20)
    restarted.open()  # and reminded of at every start, never replayed again
    assert restarted.empty and "event=spool_corrupt_files_kept" in caplog.text
    restarted.close()


def test_a_record_replay_could_not_read_is_never_acknowledged(tmp_path: Path) -> None:
    """append() refuses a body over MAX_RECORD (callers split first) rather than
    acknowledge an event that replay could not read back; the spool carries on."""
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.open()
    with pytest.raises(ValueError, match="over"):
        spool.append(b"x" * (MAX_RECORD + 1))
    assert spool.append(b"x" * MAX_RECORD)
    assert spool.append(b"after")
    assert drain(spool) == [b"x" * MAX_RECORD, b"after"]
    spool.close()


def test_a_large_record_from_an_older_release_is_still_replayed(tmp_path: Path) -> None:
    """Releases before the job-size bound could spool records over MAX_RECORD; at a
    trusted boundary replay still reads them (and the put path splits them)."""
    big = job(*(f"r{i:06d}" for i in range(200_000)))
    assert len(big) > MAX_RECORD
    path = tmp_path / "active-0123456789abcdef.spool"
    with open(path, "wb") as f:
        for body in (job("a"), big, job("z")):
            f.write(struct.pack(">II", len(body), zlib.crc32(body)) + body)
    reader = Spool(tmp_path, max_bytes=1 << 30)
    reader.open()
    assert drain(reader) == [job("a"), big, job("z")]
    assert reader.lost_events == 0
    reader.close()


def test_a_bad_crc_on_the_last_record_is_a_torn_append_not_a_loss(tmp_path: Path) -> None:
    writer = Spool(tmp_path, max_bytes=1 << 20)
    writer.open()
    assert writer.append(b"whole")
    assert writer._active is not None
    # A crash after the file grew but before all of the last record reached the disk.
    writer._active.write(b"\x00\x00\x00\x04\x12\x34\x56\x78" + b"\x00\x00\x00\x00")
    writer._active.close()
    writer._active = None
    reader = Spool(tmp_path, max_bytes=1 << 20)
    reader.open()
    assert drain(reader) == [b"whole"]
    assert reader.lost_events == 0
    reader.close()
