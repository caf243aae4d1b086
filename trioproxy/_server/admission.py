"""Who may try to log in, and how fast: client networks and failed-login back-off.

Pure bookkeeping: no trio, no sockets, no clock (``now`` comes in as an argument, from
``trio.current_time()`` in the client task). The client task does the waiting itself
(``trio.sleep``), so a throttled address slows down only its own connections, never
anybody else's.

* :class:`ClientFilter` is ``[proxy] allowed_client_cidrs``: checked in the accept path,
  before any authentication work.
* :class:`LoginThrottle` counts failed logins per client address. After
  ``free_attempts`` failures within ``window`` seconds, every further authentication
  answer to that address (success or failure alike, so the delay leaks nothing) waits
  ``min(base_delay * 2**(k-1), max_delay)`` seconds, k = failures beyond the free ones.
  Memory is bounded: at most ``max_entries`` addresses are remembered, the least
  recently failing one is forgotten first (LRU). A success does not reset the count (a
  valid account must not be a way to reset the throttle for guessing another); the count
  expires ``window`` seconds after the last failure. IPv6 clients are counted per /64,
  the block one host usually owns.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable

    from trioproxy.config import IPNetwork

__all__ = ["ClientFilter", "LoginThrottle", "peer_host", "throttle_key"]

DEFAULT_MAX_ENTRIES: Final = 10_000

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_host(peer: str) -> str:
    """The host part of a ``"host:port"`` peer name (IPv6 hosts have colons too)."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer
    return host.removeprefix("[").removesuffix("]")


def _address(host: str) -> _IPAddress | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientFilter:
    """``allowed_client_cidrs``: None allows everybody."""

    def __init__(self, networks: Iterable[IPNetwork] | None) -> None:
        self.networks: tuple[IPNetwork, ...] | None = None if networks is None else tuple(networks)

    def allows(self, host: str) -> bool:
        """Is a client at ``host`` (an IP address as text) allowed? Unparsable: no."""
        if self.networks is None:
            return True
        address = _address(host)
        if address is None:
            return False
        return any(address in network for network in self.networks)


def throttle_key(host: str) -> str:
    """What failures are counted under: the IPv4 address, or the IPv6 /64."""
    address = _address(host)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address) if address is not None else host


@attrs.define
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Failed logins per client address, with exponential back-off. Sync and O(1)."""

    def __init__(
        self,
        *,
        free_attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 15.0,
        window: float = 600.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.free_attempts = free_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.max_entries = max_entries
        # Oldest failure first: popitem(last=False) forgets the least recent address.
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failures(self, host: str, now: float) -> int:
        """Failures counted against ``host`` that have not expired."""
        key = throttle_key(host)
        entry = self._failures.get(key)
        if entry is None:
            return 0
        if now - entry.last > self.window:
            del self._failures[key]
            return 0
        return entry.count

    def delay_for(self, host: str, now: float) -> float:
        """Seconds to wait before the next authentication answer to ``host``."""
        if self.base_delay <= 0:
            return 0.0
        extra = self.failures(host, now) - self.free_attempts - 1
        if extra < 0:
            return 0.0
        # Cap the exponent first: 2**k for a huge k would be a huge (or overflowing) float.
        return min(self.base_delay * 2.0 ** min(extra, 64), self.max_delay)

    def record_failure(self, host: str, now: float) -> None:
        key = throttle_key(host)
        entry = self._failures.pop(key, None)
        if entry is None or now - entry.last > self.window:
            entry = _Failures(count=0, last=now)
        entry.count += 1
        entry.last = now
        self._failures[key] = entry  # now the most recent
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)
