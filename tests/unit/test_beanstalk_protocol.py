"""The beanstalkd protocol layer both clients share: commands, replies, errors."""

from __future__ import annotations

import pytest

from trackbuf import beanstalk


def test_commands_are_the_documented_lines() -> None:
    assert beanstalk.put(b"hi", ttr=120) == b"put 65536 0 120 2\r\nhi\r\n"
    assert beanstalk.use("trackbuf-events") == b"use trackbuf-events\r\n"
    assert beanstalk.reserve(0) * 2 == b"reserve-with-timeout 0\r\n" * 2
    assert beanstalk.release(7, priority=1, delay=3) == b"release 7 1 3\r\n"
    assert beanstalk.pause_tube("t", 10) == b"pause-tube t 10\r\n"


@pytest.mark.parametrize("tube", ["", "-leading", "two words", "x" * 201, "é"])
def test_a_tube_name_the_server_would_refuse_is_a_clear_error(tube: str) -> None:
    with pytest.raises(ValueError, match="bad tube name"):
        beanstalk.use(tube)


def test_put_replies() -> None:
    assert beanstalk.put_reply(b"INSERTED 42") == 42
    with pytest.raises(beanstalk.Buried) as buried:
        beanstalk.put_reply(b"BURIED 43")
    assert buried.value.job_id == 43
    with pytest.raises(beanstalk.JobTooBig):
        beanstalk.put_reply(b"JOB_TOO_BIG")
    for refusal in (b"OUT_OF_MEMORY", b"DRAINING"):
        with pytest.raises(beanstalk.Refused):
            beanstalk.put_reply(refusal)


OUT_OF_STEP = [b"BAD_FORMAT", b"UNKNOWN_COMMAND", b"EXPECTED_CRLF", b"INTERNAL_ERROR",
               b"INSERTED", b"INSERTED x", b"HTTP/1.1 400 Bad Request"]  # fmt: skip


@pytest.mark.parametrize("reply", OUT_OF_STEP)
def test_a_reply_out_of_step_is_a_protocol_error(reply: bytes) -> None:
    with pytest.raises(beanstalk.ProtocolError):
        beanstalk.put_reply(reply)


def test_reserve_replies() -> None:
    assert beanstalk.reserve_reply(b"RESERVED 5 11") == (5, 11)
    with pytest.raises(beanstalk.ReserveTimedOut):
        beanstalk.reserve_reply(b"TIMED_OUT")
    with pytest.raises(beanstalk.DeadlineSoon):
        beanstalk.reserve_reply(b"DEADLINE_SOON")
    with pytest.raises(beanstalk.ProtocolError):
        beanstalk.reserve_reply(b"RESERVED 5")


def test_delete_release_and_peek_replies() -> None:
    assert beanstalk.delete_reply(b"DELETED") is True
    assert beanstalk.delete_reply(b"NOT_FOUND") is False  # not ours any more: no error
    beanstalk.release_reply(b"RELEASED", 9)
    with pytest.raises(beanstalk.Buried) as buried:
        beanstalk.release_reply(b"BURIED", 9)
    assert buried.value.job_id == 9
    with pytest.raises(beanstalk.NotFound):
        beanstalk.release_reply(b"NOT_FOUND", 9)
    with pytest.raises(beanstalk.NotFound):
        beanstalk.found_reply(b"NOT_FOUND")
    assert beanstalk.kick_reply(b"KICKED 3") == 3


def test_a_body_must_end_where_its_size_says() -> None:
    assert beanstalk.body(b"abc\r\n", 3) == b"abc"
    with pytest.raises(beanstalk.ProtocolError):
        beanstalk.body(b"ab", 3)  # connection closed mid-body
    with pytest.raises(beanstalk.ProtocolError):
        beanstalk.body(b"abcd\r", 3)


def test_stats_bodies_become_dicts_with_numbers() -> None:
    data = b'---\ncurrent-jobs-ready: 0\nversion: "1.13"\nmax-job-size: 65535\nos: Linux\n'
    assert beanstalk.parse_stats(data) == {
        "current-jobs-ready": 0, "version": "1.13", "max-job-size": 65535, "os": "Linux",
    }  # fmt: skip
