"""The proxy-wide cap on server connections, shared by every pool.

[shell] Each (database, user) pool has its own ``PoolCore``; the *total* across pools is
capped here, as RDS Proxy caps a target group and PgBouncer ``max_db_connections`` does.
A pool must hold a budget unit for every server connection it opens; the unit comes
back when the connection closes (``ServerConnection.on_close``, called exactly once).
When the budget is spent, a pool that needs a connection evicts an *idle* connection of
another pool (least recently used first) rather than wait for traffic elsewhere to end.

Sizing follows RDS Proxy: an absolute ``max_connections``, or ``max_connections_percent``
of what the server allows (``max_connections - superuser_reserved_connections``), which
the first connection reads. Until then the budget is 1: only one probe connection.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

logger = logging.getLogger("trioproxy.pool")


@attrs.frozen(kw_only=True)
class PoolLimits:
    """How many server connections; ``max_connections == 0`` means derive from percent."""

    max_connections: int
    max_connections_percent: int
    max_idle_connections_percent: int
    server_lifetime: float
    server_idle_timeout: float


def derive_max_size(limits: PoolLimits, server_max: int) -> tuple[int, int]:
    """(max_size, max_idle) from the server's usable connection count (RDS Proxy rule)."""
    if limits.max_connections > 0:
        base = size = limits.max_connections
    else:
        base = server_max
        size = max(1, math.floor(server_max * limits.max_connections_percent / 100))
    idle = math.floor(base * limits.max_idle_connections_percent / 100)
    return size, min(idle, size)


class BudgetMember(Protocol):
    """What the budget needs of a pool."""

    def evict_one_idle(self) -> bool: ...
    def resize(self, max_size: int, max_idle: int) -> None: ...


class ServerBudget:
    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.sized = limits.max_connections > 0
        self.cap, self.max_idle = derive_max_size(limits, 1) if self.sized else (1, 1)
        self.used = 0
        self.waiting = 0
        self.server_max: int | None = None
        self._members: list[BudgetMember] = []
        self._changed = trio.Event()

    def join(self, member: BudgetMember) -> None:
        self._members.append(member)

    def leave(self, member: BudgetMember) -> None:
        if member in self._members:
            self._members.remove(member)

    def members(self) -> Iterator[BudgetMember]:
        return iter(list(self._members))

    async def acquire(self, requester: BudgetMember) -> None:
        """Take one unit, evicting another pool's idle connection if need be.

        An evicted connection gives its unit back only once the server has closed it
        (its backend process has left PostgreSQL's slot table), so the cap holds as
        PostgreSQL counts, not just as we do.
        """
        while True:
            if self.used < self.cap:
                self.used += 1
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            for member in self.members():
                if member is not requester and member.evict_one_idle():
                    break
            self.waiting += 1
            try:
                await self._changed.wait()
            finally:
                self.waiting -= 1

    def poke(self) -> None:
        """A connection went idle somewhere: starving pools may now evict it."""
        if self.waiting:
            self._changed.set()
            self._changed = trio.Event()

    def release(self) -> None:
        self.used -= 1
        self._changed.set()
        self._changed = trio.Event()

    def learn(self, usable: int) -> None:
        """The server allows ``usable`` connections: size every pool from it."""
        self.server_max = usable
        self.cap, self.max_idle = derive_max_size(self.limits, max(1, usable))
        self.sized = True
        logger.info(
            "server allows %d connections; proxy cap %d, idle per pool %d",
            usable,
            self.cap,
            self.max_idle,
        )
        for member in self.members():
            member.resize(self.cap, self.max_idle)
        self._changed.set()
        self._changed = trio.Event()
