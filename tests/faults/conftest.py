"""Fixtures for fault tests across simulated hosts (tests/netns.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import netns


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[netns.Network]:
    """A bridge for this test module's hosts; removed with every host and process on
    it however the tests end. Skipped, with the reason, where namespaces cannot be made
    (not root, no iproute2): a condition of the machine, not of the code."""
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    netns.remove_leftovers()
    net = netns.Network(tmp_path_factory.mktemp("netns"))
    try:
        yield net
    finally:
        net.close()
