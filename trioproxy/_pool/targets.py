"""Several PostgreSQL servers for one proxy: which one is the writer now.

[core] With ``[backend] targets = ["db1:5432", "db2:5432"]`` new server connections go to
the writer. The last server found to be the writer (``pg_is_in_recovery()`` false) is tried
first; when it fails or turns out to be a standby, the others are tried in order. After a
failover (the old writer down, a standby promoted) the first new connection finds the new
writer and every pool follows, while client sockets stay open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

Address = tuple[str, int]


class TargetSet:
    def __init__(self, addresses: Sequence[Address]) -> None:
        if not addresses:
            raise ValueError("at least one target is needed")
        self._addresses = list(addresses)
        self._writer = 0
        self._next_reader = 0

    @property
    def needs_writer_check(self) -> bool:
        """With one target, whatever answers is used as is (no extra round trip)."""
        return len(self._addresses) > 1

    @property
    def writer(self) -> Address:
        return self._addresses[self._writer]

    def candidates(self) -> list[Address]:
        """Every target, the last known writer first."""
        return self._addresses[self._writer :] + self._addresses[: self._writer]

    def reader_candidates(self) -> list[Address]:
        """Every target, starting one further each call: read-only connections spread
        over the standbys in turn."""
        start = self._next_reader
        self._next_reader = (start + 1) % len(self._addresses)
        return self._addresses[start:] + self._addresses[:start]

    def found_writer(self, address: Address) -> bool:
        """Record the writer; True when it changed (a failover happened)."""
        index = self._addresses.index(address)
        changed = index != self._writer
        self._writer = index
        return changed
