"""Which beanstalkd servers of a pool each consumer thread reserves from."""

from __future__ import annotations

import pytest

from consumer.worker import assign


@pytest.mark.parametrize("servers", [1, 2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2, 3, 4, 7])
def test_every_server_has_a_thread_and_threads_share_evenly(threads: int, servers: int) -> None:
    shares = [assign(i, threads, servers) for i in range(threads)]
    covered = sorted(s for share in shares for s in share)
    assert set(covered) == set(range(servers))  # none left unwatched
    assert all(shares)  # no thread without a server
    if threads < servers:
        assert covered == list(range(servers))  # each server exactly once
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert shares == [[i % servers] for i in range(threads)]  # round-robin


def test_one_server_is_every_threads_server() -> None:
    assert [assign(i, 4, 1) for i in range(4)] == [[0]] * 4
