"""Client networks and the failed-login back-off (``trioproxy._server.admission``).

Pure bookkeeping: time is a number passed in, so these tests need no clock.
"""

from __future__ import annotations

import ipaddress

import pytest

from trioproxy._server.admission import ClientFilter, LoginThrottle, peer_host, throttle_key
from trioproxy.config import parse_config
from trioproxy.errors import ConfigError


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("127.0.0.1:5432", "127.0.0.1"),
        ("::1:40000", "::1"),
        ("[::1]:40000", "::1"),
        ("fe80::1%eth0:1234", "fe80::1%eth0"),
        ("/tmp/.s.PGSQL.6432", "/tmp/.s.PGSQL.6432"),
        ("", ""),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def _nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def test_client_filter_default_allows_everybody() -> None:
    allow_all = ClientFilter(None)
    assert allow_all.allows("203.0.113.9")
    assert allow_all.allows("not an address")


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.255.0.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped: judged as the IPv4 address
        ("10.0.0.1", False),
        ("::2", False),
        ("fe80::1%eth0", False),
        ("garbage", False),  # unparsable: refused, never allowed by accident
        ("", False),
    ],
)
def test_client_filter(host: str, allowed: bool) -> None:
    assert ClientFilter(_nets("127.0.0.0/8", "::1/128")).allows(host) is allowed


def test_config_cidrs() -> None:
    config = parse_config({"proxy": {"allowed_client_cidrs": ["10.0.0.0/8", "::1/128"]}})
    assert config.proxy.allowed_client_cidrs == tuple(_nets("10.0.0.0/8", "::1/128"))
    assert parse_config({}).proxy.allowed_client_cidrs is None


@pytest.mark.parametrize(
    "value",
    [[], "10.0.0.0/8", ["10.0.0.1/8"], ["10.0.0.0/33"], ["nonsense"], [8]],
)
def test_config_cidrs_invalid(value: object) -> None:
    with pytest.raises(ConfigError, match=r"\[proxy\] allowed_client_cidrs"):
        parse_config({"proxy": {"allowed_client_cidrs": value}})


def test_throttle_keys() -> None:
    assert throttle_key("192.0.2.7") == "192.0.2.7"
    assert throttle_key("::ffff:192.0.2.7") == "192.0.2.7"
    # One IPv6 host owns a /64: its addresses are counted together.
    assert throttle_key("2001:db8::1") == throttle_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert throttle_key("2001:db8:0:1::1") != throttle_key("2001:db8::1")


def test_backoff_doubles_up_to_the_cap() -> None:
    throttle = LoginThrottle(free_attempts=2, base_delay=0.5, max_delay=3, window=100)
    delays = []
    for i in range(8):
        delays.append(throttle.delay_for("192.0.2.1", now=i))
        throttle.record_failure("192.0.2.1", now=i)
    # Two free failures; after the k-th failure beyond them: base * 2**(k-1), capped.
    assert delays == [0, 0, 0, 0.5, 1, 2, 3, 3]
    # Other addresses are not affected.
    assert throttle.delay_for("192.0.2.2", now=8) == 0


def test_failures_expire_after_the_window() -> None:
    throttle = LoginThrottle(free_attempts=0, base_delay=1, max_delay=60, window=10)
    for now in range(3):
        throttle.record_failure("192.0.2.1", now=now)
    assert throttle.failures("192.0.2.1", now=12) == 3
    assert throttle.delay_for("192.0.2.1", now=12) == 4
    assert throttle.failures("192.0.2.1", now=12.5) == 0  # last failure at 2, window 10
    assert throttle.delay_for("192.0.2.1", now=13) == 0
    assert len(throttle) == 0
    # A failure after expiry starts a new count.
    throttle.record_failure("192.0.2.1", now=30)
    assert throttle.failures("192.0.2.1", now=30) == 1


def test_zero_delay_turns_the_backoff_off() -> None:
    throttle = LoginThrottle(free_attempts=0, base_delay=0, max_delay=10)
    for now in range(50):
        throttle.record_failure("192.0.2.1", now=now)
    assert throttle.delay_for("192.0.2.1", now=50) == 0


def test_huge_failure_counts_do_not_overflow() -> None:
    throttle = LoginThrottle(free_attempts=0, base_delay=1, max_delay=30, window=1e9)
    for now in range(5000):
        throttle.record_failure("192.0.2.1", now=now)
    assert throttle.delay_for("192.0.2.1", now=5000) == 30


def test_memory_is_bounded_lru() -> None:
    throttle = LoginThrottle(free_attempts=0, base_delay=1, max_delay=60, max_entries=100)
    throttle.record_failure("198.51.100.1", now=0)
    for i in range(10_000):
        host = str(ipaddress.IPv4Address("10.0.0.0") + i)
        throttle.record_failure(host, now=1 + i / 10_000)
        # The one address that keeps failing stays: it is the most recent, not the oldest.
        if i % 50 == 0:
            throttle.record_failure("198.51.100.1", now=1 + i / 10_000)
        assert len(throttle) <= 100
    assert len(throttle) == 100
    assert throttle.failures("198.51.100.1", now=2) > 100
    assert throttle.failures("10.0.0.0", now=2) == 0  # forgotten: least recently failing


def test_default_cap_is_ten_thousand() -> None:
    throttle = LoginThrottle()
    for i in range(12_000):
        throttle.record_failure(str(ipaddress.IPv4Address("10.0.0.0") + i), now=0)
    assert len(throttle) == 10_000


def test_config_keys() -> None:
    proxy = parse_config(
        {
            "proxy": {
                "failed_login_free_attempts": 1,
                "failed_login_delay": 0.25,
                "failed_login_max_delay": 4,
                "failed_login_window": 30,
            }
        }
    ).proxy
    assert (proxy.failed_login_free_attempts, proxy.failed_login_delay) == (1, 0.25)
    assert (proxy.failed_login_max_delay, proxy.failed_login_window) == (4, 30)
    with pytest.raises(ConfigError, match="failed_login_window"):
        parse_config({"proxy": {"failed_login_window": 0}})
