"""The beanstalkd protocol without I/O: commands as bytes, replies parsed, errors mapped.

trackbuf talks to beanstalkd from two places: ingest puts from its asyncio event loop
(``ingest/bsproto.py``) and the consumer reserves and deletes from blocking worker
threads (``trackbuf/beanstalk_client.py``). Both format their commands and read the server's
replies with this module, so there is one protocol layer; each side only owns a socket
and the way it waits on it.

Why no client library: the consumer pipelines, sending k ``reserve-with-timeout 0``
or k ``delete`` commands in one write and reading the k replies back (one round trip
instead of k, and one GIL hand-off instead of k between worker threads). beanstalkd
answers a connection's commands in order, so this is plain protocol, but no library
offers it through a public API, and reaching into one's private socket and buffer
breaks on its next release. Ingest needs asyncio, which the common libraries lack.

Reply functions take one reply line without its trailing CRLF. A reply that does not
fit the command raises ``ProtocolError``: the stream is out of step (or the peer is
not beanstalkd), and the caller must close the connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PRIORITY = 1 << 16
# beanstalkd's own rule for tube names (at most 200 bytes, no leading hyphen).
_TUBE_RE = re.compile(r"[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]{0,199}")


class BeanstalkError(Exception):
    """Base of every error this protocol layer and its clients raise."""


class ProtocolError(BeanstalkError):
    """A reply that does not fit the command (BAD_FORMAT, UNKNOWN_COMMAND,
    EXPECTED_CRLF, INTERNAL_ERROR or garbage): close the connection."""


class NotFound(BeanstalkError):
    """NOT_FOUND: no such job (or not ours: its TTR ran out), tube, or nothing to peek."""


class JobTooBig(BeanstalkError):
    """JOB_TOO_BIG: the body exceeds the server's max-job-size."""


class Refused(BeanstalkError):
    """OUT_OF_MEMORY or DRAINING: the server is up but takes no jobs now."""


class Buried(BeanstalkError):
    """BURIED <id>: stored, but buried (the server could not grow its ready heap)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"BURIED {job_id}")
        self.job_id = job_id


class ReserveTimedOut(BeanstalkError):
    """TIMED_OUT: no job became ready within the reserve timeout."""


class DeadlineSoon(BeanstalkError):
    """DEADLINE_SOON: a job this connection holds is within a second of its TTR."""


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    body: bytes


# Commands -------------------------------------------------------------------------------


def tube_name(tube: str) -> bytes:
    """``tube`` as the server takes it; a clear ValueError for a name it would refuse."""
    if not _TUBE_RE.fullmatch(tube):
        raise ValueError(
            f"bad tube name {tube!r}: 1-200 of A-Z a-z 0-9 + / ; . $ _ ( ) -, not starting with -"
        )
    return tube.encode("ascii")


def put(body: bytes, ttr: int, priority: int = DEFAULT_PRIORITY, delay: int = 0) -> bytes:
    return b"put %d %d %d %d\r\n%b\r\n" % (priority, delay, ttr, len(body), body)


def use(tube: str) -> bytes:
    return b"use " + tube_name(tube) + b"\r\n"


def watch(tube: str) -> bytes:
    return b"watch " + tube_name(tube) + b"\r\n"


def ignore(tube: str) -> bytes:
    return b"ignore " + tube_name(tube) + b"\r\n"


def reserve(timeout_s: int) -> bytes:
    return b"reserve-with-timeout %d\r\n" % timeout_s


def delete(job_id: int) -> bytes:
    return b"delete %d\r\n" % job_id


def release(job_id: int, priority: int = DEFAULT_PRIORITY, delay: int = 0) -> bytes:
    return b"release %d %d %d\r\n" % (job_id, priority, delay)


def bury(job_id: int, priority: int = DEFAULT_PRIORITY) -> bytes:
    return b"bury %d %d\r\n" % (job_id, priority)


def kick(bound: int) -> bytes:
    return b"kick %d\r\n" % bound


def pause_tube(tube: str, seconds: int) -> bytes:
    return b"pause-tube " + tube_name(tube) + b" %d\r\n" % seconds


PEEK_READY = b"peek-ready\r\n"
STATS = b"stats\r\n"


def stats_tube(tube: str) -> bytes:
    return b"stats-tube " + tube_name(tube) + b"\r\n"


def stats_job(job_id: int) -> bytes:
    return b"stats-job %d\r\n" % job_id


# Replies --------------------------------------------------------------------------------


def _number(value: bytes) -> int:
    if not value.isdigit():
        raise ProtocolError(f"expected a number, got {value!r}")
    return int(value)


def _fail(command: str, reply: bytes) -> BeanstalkError:
    """The error to raise for a reply that ``command`` does not expect."""
    word = reply.split(b" ", 1)[0]
    if word == b"NOT_FOUND":
        return NotFound(f"{command}: NOT_FOUND")
    if word == b"JOB_TOO_BIG":
        return JobTooBig(reply.decode(errors="replace"))
    if word in (b"OUT_OF_MEMORY", b"DRAINING"):
        return Refused(reply.decode(errors="replace"))
    return ProtocolError(f"{command} answered {reply!r}")


def put_reply(reply: bytes) -> int:
    """The new job's id; raises Buried (stored, but buried), JobTooBig or Refused."""
    word, _, rest = reply.partition(b" ")
    if word == b"INSERTED":
        return _number(rest)
    if word == b"BURIED":
        raise Buried(_number(rest))
    raise _fail("put", reply)


def use_reply(reply: bytes, tube: str) -> None:
    if reply != b"USING " + tube_name(tube):
        raise _fail("use", reply)


def watch_reply(reply: bytes) -> int:
    """How many tubes the connection now watches (``watch`` and ``ignore`` alike)."""
    word, _, count = reply.partition(b" ")
    if word != b"WATCHING":
        raise _fail("watch", reply)  # NOT_IGNORED: the last watched tube stays
    return _number(count)


def reserve_reply(reply: bytes) -> tuple[int, int]:
    """(job id, body size) of a reserved job: the body and its CRLF follow the line.
    Raises ReserveTimedOut or DeadlineSoon."""
    parts = reply.split(b" ")
    if parts[0] == b"RESERVED" and len(parts) == 3:
        return _number(parts[1]), _number(parts[2])
    if reply == b"TIMED_OUT":
        raise ReserveTimedOut("reserve: TIMED_OUT")
    if reply == b"DEADLINE_SOON":
        raise DeadlineSoon("reserve: DEADLINE_SOON")
    raise _fail("reserve", reply)


def found_reply(reply: bytes) -> tuple[int, int]:
    """(job id, body size) of a peeked job; raises NotFound when there is none."""
    parts = reply.split(b" ")
    if parts[0] == b"FOUND" and len(parts) == 3:
        return _number(parts[1]), _number(parts[2])
    raise _fail("peek", reply)


def delete_reply(reply: bytes) -> bool:
    """True if the job was deleted, False if it was not ours any more (NOT_FOUND)."""
    if reply == b"DELETED":
        return True
    if reply == b"NOT_FOUND":
        return False
    raise _fail("delete", reply)


def release_reply(reply: bytes, job_id: int) -> None:
    """Raises Buried (the server had no memory to queue it again) or NotFound."""
    if reply == b"RELEASED":
        return
    if reply == b"BURIED":
        raise Buried(job_id)  # the reply does not repeat the id
    raise _fail("release", reply)


def bury_reply(reply: bytes) -> None:
    if reply != b"BURIED":
        raise _fail("bury", reply)


def kick_reply(reply: bytes) -> int:
    """How many jobs were kicked."""
    word, _, count = reply.partition(b" ")
    if word != b"KICKED":
        raise _fail("kick", reply)
    return _number(count)


def pause_reply(reply: bytes) -> None:
    if reply != b"PAUSED":
        raise _fail("pause-tube", reply)


def ok_reply(reply: bytes) -> int:
    """Size of the YAML body that follows a stats reply; NotFound for an unknown tube
    or job."""
    word, _, size = reply.partition(b" ")
    if word != b"OK":
        raise _fail("stats", reply)
    return _number(size)


def body(data: bytes, size: int) -> bytes:
    """The ``size`` bytes of a body read together with its CRLF."""
    if len(data) != size + 2 or data[-2:] != b"\r\n":
        raise ProtocolError("connection closed or out of step while reading a body")
    return data[:-2]


def parse_stats(data: bytes) -> dict[str, int | str]:
    """A stats body (a flat YAML mapping) as a dict; whole numbers become ints."""
    out: dict[str, int | str] = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.startswith("---"):
            continue
        value = value.strip().strip('"')  # beanstalkd quotes a few strings (version)
        out[key.strip()] = int(value) if value.isdigit() else value
    return out
