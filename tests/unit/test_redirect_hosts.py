from __future__ import annotations

import pytest

from trackbuf.redirect_hosts import RedirectHosts, RedirectHostsError
from trackbuf.settings import SettingsError, load

HOSTS = RedirectHosts.parse("shop.example.com, *.news.example.org,Blog.Example.NET")


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example.com/sale",
        "http://SHOP.example.com:8443/x?y=1#z",  # any port, any case
        "https://user@shop.example.com/",
        "https://a.news.example.org/",
        "https://deep.a.news.example.org/p",
        "https://blog.example.net/",
    ],
)
def test_listed_hosts_are_allowed(url: str) -> None:
    assert HOSTS.allows(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/",
        "https://news.example.org/",  # *.x matches hosts under x, not x itself
        "https://shop.example.com.evil.example/",
        "https://evilshop.example.com/",
        "https://xnews.example.org/",
        "https://shop.example.com@evil.example/",  # the host is after the '@'
        "https://shop.example.com./",  # another spelling: not on the list as written
        "https://shop%2Eexample.com/",  # a browser decodes it; the list was not written so
        "https://evil.example%2F.news.example.org/",
        "https://[::1]/",
        "https://203.0.113.7/",
    ],
)
def test_other_hosts_are_refused(url: str) -> None:
    assert not HOSTS.allows(url)


def test_an_empty_list_allows_every_host() -> None:
    assert RedirectHosts.parse(" , ").allows("https://anything.example/")
    assert not RedirectHosts.parse("").restricted


@pytest.mark.parametrize(
    "spec", ["https://shop.example.com", "shop.example.com:443", "*", "*.", "shop/x", "a..b"]
)
def test_bad_entries_are_refused_naming_the_variable(spec: str) -> None:
    with pytest.raises(RedirectHostsError, match="expected a host name"):
        RedirectHosts.parse(spec)
    with pytest.raises(SettingsError, match="TRACKBUF_REDIRECT_HOSTS"):
        load({"TRACKBUF_REDIRECT_HOSTS": spec})
