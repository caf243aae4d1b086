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

With ``workers = N`` the cap is the instance's, not each worker's: a ``SharedLedger``
(trioproxy/_cluster/ledger.py) counts every worker's units. A pool that finds the
instance at its cap *clamps* itself: its size limit drops to the connections it has, so
its clients queue (FIFO) for those instead of each holding a reserved slot. On a short
tick every worker publishes how many clients its clamped pools hold in line and hands
room the ledger has to them; while clients wait elsewhere, a worker above its fair share
gives units back (an idle connection is closed on the tick, a busy one when it is
released). Units thus flow to where clients wait, the cross-process form of eviction.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trioproxy._cluster.ledger import SharedLedger

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
    # workers = N only:
    def clamped_waiters(self) -> int: ...
    def unclamp(self, room: int) -> int: ...


#: How often a worker looks at the shared ledger (units freed elsewhere, others waiting).
SHARED_TICK = 0.02


class ServerBudget:
    def __init__(self, limits: PoolLimits, shared: SharedLedger | None = None) -> None:
        self.limits = limits
        self.sized = limits.max_connections > 0
        self.cap, self.max_idle = derive_max_size(limits, 1) if self.sized else (1, 1)
        self.used = 0
        self.waiting = 0
        self.server_max: int | None = None
        self._members: list[BudgetMember] = []
        self._changed = trio.Event()
        #: The ledger shared with the other workers of this instance (None: one process).
        self.shared = shared
        #: (Workers.) Units being given back to other workers (connections closing).
        self.shedding = 0

    def join(self, member: BudgetMember) -> None:
        self._members.append(member)

    def leave(self, member: BudgetMember) -> None:
        if member in self._members:
            self._members.remove(member)

    def members(self) -> Iterator[BudgetMember]:
        return iter(list(self._members))

    async def acquire(self, requester: BudgetMember) -> bool:
        """Take one unit, evicting another pool's idle connection if need be.

        Returns True once a unit is taken. With workers, returns False at once when the
        instance is at its cap: the pool then clamps itself and queues its client (see
        the module docstring) rather than hold a reserved slot while it waits.

        An evicted connection gives its unit back only once the server has closed it
        (its backend process has left PostgreSQL's slot table), so the cap holds as
        PostgreSQL counts, not just as we do.
        """
        while True:
            if self.used < self.cap and self._take_shared():
                self.used += 1
                await trio.lowlevel.cancel_shielded_checkpoint()
                return True
            for member in self.members():
                if member is not requester and member.evict_one_idle():
                    break
            if self.shared is not None:
                return False
            self.waiting += 1
            try:
                await self._changed.wait()
            finally:
                self.waiting -= 1

    # --- workers = N ------------------------------------------------------------------

    def _instance_cap(self) -> int:
        shared = self.shared
        assert shared is not None
        # Before this worker has sized itself, another may already know the cap.
        return self.cap if self.sized else max(self.cap, shared.cap)

    def _take_shared(self) -> bool:
        shared = self.shared
        if shared is None:
            return True
        # Not beyond a fair share while clients of another worker wait for a unit.
        return not self._over_fair_share(extra=1) and shared.try_take(self._instance_cap())

    def _over_fair_share(self, extra: int = 0) -> bool:
        """Clients of another worker wait, and this worker (holding ``extra`` more units)
        would hold more than its fair share of the instance's cap."""
        shared = self.shared
        if shared is None or shared.wanting_elsewhere() == 0:
            return False
        fair = -(-self._instance_cap() // max(1, shared.active_workers()))
        return self.used - self.shedding + extra > fair

    def should_shed(self) -> bool:
        """Close a connection being released rather than reuse it (its unit goes to the
        worker whose clients wait). Whoever then closes one says so (``shed()``), so
        only the units above the fair share go."""
        return self._over_fair_share()

    def shed(self) -> None:
        self.shedding += 1

    def offer_room(self) -> None:
        """Hand units the instance has free to this worker's clamped pools (not beyond a
        fair share while clients wait elsewhere)."""
        shared = self.shared
        if shared is None:
            return
        room = self._instance_cap() - shared.total_used()
        if room <= 0 or self._over_fair_share(extra=1):
            return
        for member in self.members():
            if room <= 0:
                break
            room -= member.unclamp(room)

    async def share(self) -> None:
        """(Workers only; runs for the proxy's lifetime.) The tick of the module
        docstring."""
        shared = self.shared
        if shared is None:
            return
        while True:
            await trio.sleep(SHARED_TICK)
            waiting = sum(member.clamped_waiters() for member in self.members())
            shared.set_wanting(waiting)
            if waiting:
                self.offer_room()
            elif self.should_shed():
                for member in self.members():
                    if member.evict_one_idle():
                        self.shed()
                        break

    def poke(self) -> None:
        """A connection went idle somewhere: starving pools may now evict it."""
        if self.waiting:
            self._changed.set()
            self._changed = trio.Event()

    def release(self) -> None:
        self.used -= 1
        if self.shared is not None:
            self.shedding = max(0, self.shedding - 1)
            self.shared.give_back()
            self.offer_room()
        self._changed.set()
        self._changed = trio.Event()

    def learn(self, usable: int) -> None:
        """The server allows ``usable`` connections: size every pool from it."""
        self.server_max = usable
        self.cap, self.max_idle = derive_max_size(self.limits, max(1, usable))
        self.sized = True
        if self.shared is not None:
            self.shared.cap = self.cap
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
