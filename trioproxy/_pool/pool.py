"""The trio shell of the server-connection pool.

[shell] All bookkeeping lives in ``PoolCore`` (sync, so trio can never interrupt a change
half-way). This module only waits, opens, and closes:

* ``borrow()`` parks on an Event; the core hands a returned connection straight to the
  first waiter (FIFO). Whatever happens (timeout, cancellation, a failed open), the
  ``finally`` calls ``core.cancel(waiter)``, which is idempotent: no slot ever leaks.
* ``release()`` is sync. A clean connection goes back at once. A connection left inside a
  transaction at a message boundary is rolled back by the pool's *own* service nursery
  (bounded by a timeout), not by the client task; anything else is closed.
* A maintenance task closes idle connections past their idle timeout or lifetime.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import attrs
import trio

from trioproxy._pool.budget import PoolLimits, ServerBudget
from trioproxy._pool.core import Effects, Grant, Open, PoolCore, PoolStatistics, Wait
from trioproxy._pool.latency import LatencyHistogram
from trioproxy._protocol.codes import TxStatus
from trioproxy._server.backend import BackendTarget, ServerConnection, connect_server
from trioproxy._server.transport import TransportClosed
from trioproxy.config import EndpointRole
from trioproxy.errors import BackendError, BorrowTimeout, ProtocolError, TrioproxyError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trioproxy._pool.targets import TargetSet

logger = logging.getLogger("trioproxy.pool")

#: Reset of a connection a client left inside a transaction must finish within this.
RESET_TIMEOUT = 5.0
#: SQLSTATE classes for which retrying the connection cannot help.
_PERMANENT_ERROR_CLASSES = ("28", "3D", "42")


#: How recently a connection must have been given back to skip the liveness poll.
RECENTLY_USED = 0.001


class _InstanceFull(Exception):
    """(workers = N) No unit for a new connection: the instance is at its cap."""


@attrs.define(eq=False)
class Waiter:
    #: Set when the core assigns this waiter something: a trio.Event a task waits on,
    #: or (the data plane) a callback.
    event: trio.Event | Callback = attrs.field(factory=trio.Event)


class Callback:
    """A waiter's wake-up that calls a function instead of waking a task."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[[], None]) -> None:
        self._function = function

    def set(self) -> None:
        self._function()


class BackendPool:
    """Server connections for one (database, user) target."""

    def __init__(
        self,
        *,
        name: str,
        target: BackendTarget,
        limits: PoolLimits,
        init_query: str = "",
        budget: ServerBudget | None = None,
        targets: TargetSet | None = None,
        role: EndpointRole = EndpointRole.READ_WRITE,
        backend_login: Callable[[], tuple[str, str | None] | None] | None = None,
    ) -> None:
        self.name = name
        self.target = target
        #: Secrets rotate: when given, this returns the backend (user, password) in force
        #: *now*, and every new server connection uses it instead of ``target``'s. Idle
        #: and borrowed connections keep the login they were opened with.
        self.backend_login = backend_login
        self.limits = limits
        self.init_query = init_query
        self.budget = budget if budget is not None else ServerBudget(limits)
        #: Several servers: which one is the writer (shared by every pool of a proxy).
        self.targets = targets
        #: read-only pools connect to standbys only, spread over them in turn.
        self.role = role
        self.core: PoolCore[ServerConnection, Waiter] = PoolCore(
            max_size=self.budget.cap,
            max_idle=self.budget.max_idle,
            server_lifetime=limits.server_lifetime,
            server_idle_timeout=limits.server_idle_timeout,
        )
        self.budget.join(self)
        #: (workers = N) Limited to the connections it has: the instance is at its cap.
        self._clamped = False
        #: ParameterStatus values of the first server connection (server_version, ...).
        self.server_parameters: dict[str, str] | None = None
        self._nursery: trio.Nursery | None = None
        self._wake_maintenance = trio.Event()
        self.borrow_timeouts = 0
        #: How long borrows waited (successful ones), for the metrics endpoint.
        self.borrow_latency = LatencyHistogram()
        self.setup_failures = 0

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the pool's background work until cancelled; then close every connection."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._maintain)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.budget.leave(self)
            for conn in [*self.core.idle(), *self.core.borrowed()]:
                conn.close()

    def statistics(self) -> PoolStatistics:
        return self.core.statistics()

    # --- borrowing --------------------------------------------------------------------

    async def borrow(self, timeout: float) -> ServerConnection:  # noqa: ASYNC109 - the deadline also decides retry and which error
        """A clean server connection for the caller, or BorrowTimeout / BackendError."""
        conn = await self.borrow_wakeable(timeout)
        assert conn is not None  # nobody else sees the scope: it ends only at the deadline
        return conn

    async def borrow_wakeable(
        self,
        timeout: float,  # noqa: ASYNC109 - as borrow()
        expose: Callable[[trio.CancelScope | None], None] | None = None,
    ) -> ServerConnection | None:
        """``borrow()`` whose wait someone else may end early: ``expose`` is given the
        wait's cancel scope (then None when the wait is over); cancelling that scope
        before the deadline makes this return None, with nothing borrowed.

        One cancel scope serves both the deadline and the wake-up (a caller's own scope
        around ``borrow()`` would cost a second one per wait: on the hot path, that is
        measurable)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        started = trio.current_time()
        conn = await self._borrow(started + timeout, expose)
        if conn is not None:
            self.borrow_latency.observe(trio.current_time() - started)
        return conn

    def try_borrow(self) -> ServerConnection | None:
        """An idle server connection at once, or None (none idle, or clients queue first).

        Sync, so there is nothing to cancel and no cancel scope to pay for: the hot path of
        transaction pooling, where a connection is usually free. The same liveness check as
        ``borrow()``; on None the caller falls back to ``borrow()``."""
        while (conn := self.core.take_idle()) is not None:
            if self._usable(conn):
                self.borrow_latency.observe(0.0)
                return conn
        return None

    def _usable(self, conn: ServerConnection) -> bool:
        """The liveness check before a connection is handed out: an idle one the server
        closed (restart, pg_terminate_backend) is closed and forgotten here instead.

        A connection given back less than ``RECENTLY_USED`` ago skips the ``poll()``: its
        last answer was read to the end an instant ago, and a server that goes away in
        that instant is no different from one that goes away during the next query (which
        the relay handles). Under load that is nearly every hand-out: a syscall less per
        transaction. (PgBouncer's ``server_check_delay`` is the same idea, at 30 s.)"""
        if conn.alive and (
            trio.current_time() - conn.last_used < RECENTLY_USED or not conn.transport.peer_gone()
        ):
            return True
        logger.info(
            "pool %s: idle server connection %d was closed by the server; replaced",
            self.name,
            conn.id,
        )
        conn.close()
        self._apply(self.core.forget(conn))
        return False

    # --- queueing without a task (the data plane) ----------------------------------------

    def join_queue(self, on_assigned: Callable[[], None]) -> Waiter | None:
        """Queue for a connection like a borrowing task, but be told by a callback (sync,
        called from whichever task frees the connection: it must only take note).
        None when nothing was queued: the pool would open a connection for the caller,
        which must then borrow the usual way."""
        waiter = Waiter(event=Callback(on_assigned))
        result = self.core.request(waiter)
        if isinstance(result, Wait):
            return waiter
        if isinstance(result, Grant):  # not after a failed try_borrow(); kept exact anyway
            self._apply(self.core.checkin(result.conn, trio.current_time(), reusable=True))
        else:
            self._apply(self.core.open_failed())
        return None

    def collect(self, waiter: Waiter) -> ServerConnection | None:
        """What a queued waiter was assigned, once its callback ran: a live connection, or
        None (an Open slot or a connection that died meanwhile: handed on, and the caller
        borrows the usual way)."""
        result = self.core.take(waiter)
        if isinstance(result, Grant):
            if self._usable(result.conn):
                return result.conn
        elif isinstance(result, Open):
            self._apply(self.core.open_failed())
        return None

    def leave_queue(self, waiter: Waiter) -> None:
        """A queued waiter gives up (idempotent; an assignment it did not collect goes on
        to the next in line)."""
        self._apply(self.core.cancel(waiter))

    async def _borrow(
        self, deadline: float, expose: Callable[[trio.CancelScope | None], None] | None
    ) -> ServerConnection | None:
        backoff = 0.05
        last_error: BackendError | None = None
        while True:
            waiter = Waiter()
            try:
                with trio.move_on_at(deadline) as scope:
                    if expose is not None:
                        expose(scope)
                    result: Grant[ServerConnection] | Open | Wait | None = self.core.request(waiter)
                    waited = False
                    while isinstance(result, Wait) or result is None:
                        if waited:  # woken without an assignment (rare): wait again
                            waiter.event = trio.Event()
                        event = waiter.event
                        assert isinstance(event, trio.Event)  # (a task's waiter)
                        await event.wait()
                        waited = True
                        result = self.core.take(waiter)
                    if isinstance(result, Grant):
                        conn = result.conn
                        if not self._usable(conn):
                            continue
                        # Not cancellable: the connection is ours from take() on, and a
                        # Cancelled here would leave it borrowed with no owner. (After a
                        # wait, that wait was the checkpoint: no second yield.)
                        if not waited:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        return conn
                    assert isinstance(result, Open)
                    try:
                        return await self._open()
                    except _InstanceFull:
                        continue  # queued now, behind this pool's own connections
                    except BackendError as exc:
                        last_error = exc
                        self.setup_failures += 1
                        if exc.permanent or exc.sqlstate[:2] in _PERMANENT_ERROR_CLASSES:
                            raise
                        logger.warning(
                            "pool %s: server connection failed: %s", self.name, exc.message
                        )
                    # Back off before trying again, still within the deadline.
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            finally:
                if expose is not None:
                    expose(None)
                self._apply(self.core.cancel(waiter))
            if expose is not None and trio.current_time() < deadline:
                return None  # woken through the exposed scope
            # The deadline passed.
            if last_error is not None:
                raise last_error
            self.borrow_timeouts += 1
            raise BorrowTimeout("Timed-out waiting to acquire database connection.")

    async def _open(self) -> ServerConnection:
        """Fill the Open slot we hold: connect, or report the failure to the core."""
        try:
            if not await self.budget.acquire(self):
                # (workers = N) The instance is at its cap: queue for this pool's own
                # connections instead of holding the reserved slot (budget.py).
                self._clamp(1)
                raise _InstanceFull
            try:
                conn = await self._connect_writer()
            except BaseException:
                self.budget.release()
                raise
            conn.on_close = self.budget.release
            try:
                if not self.budget.sized:
                    await self._learn_size(conn)
                if self.init_query:
                    await conn.run(self.init_query)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            self._apply(self.core.open_failed())
            raise
        self.core.opened(conn, trio.current_time())
        if self.server_parameters is None:
            self.server_parameters = dict(conn.parameters)
        return conn

    async def _connect_writer(self) -> ServerConnection:
        """A new server connection to the writer: with several targets, the last known
        writer first, then the others; a standby (in recovery) is closed and skipped."""
        targets = self.targets
        base = self._current_target()
        if targets is None:
            return await connect_server(base, now=trio.current_time())
        read_only = self.role is EndpointRole.READ_ONLY
        last: BackendError | None = None
        candidates = targets.reader_candidates() if read_only else targets.candidates()
        for host, port in candidates:
            target = attrs.evolve(base, host=host, port=port)
            try:
                conn = await connect_server(target, now=trio.current_time())
            except BackendError as exc:
                if exc.permanent or exc.sqlstate[:2] in _PERMANENT_ERROR_CLASSES:
                    raise
                last = exc
                continue
            if targets.needs_writer_check or read_only:
                try:
                    in_recovery = await conn.run(
                        "SELECT pg_catalog.pg_is_in_recovery()", timeout=base.connect_timeout
                    )
                except BackendError as exc:
                    conn.close()
                    last = exc
                    continue
                standby = bool(in_recovery) and in_recovery[0] == "t"
                if read_only and not standby:
                    conn.close()
                    last = BackendError(
                        f"server at {host}:{port} is the writer, not a standby", sqlstate="57P03"
                    )
                    continue
                if read_only:
                    return conn
                if standby:
                    conn.close()
                    last = BackendError(
                        f"server at {host}:{port} is a standby (in recovery)",
                        sqlstate="57P03",
                    )
                    continue
            if targets.found_writer((host, port)):
                logger.warning("pool %s: the writer is now %s:%d", self.name, host, port)
            return conn
        assert last is not None
        raise last

    def _current_target(self) -> BackendTarget:
        """``target`` with the backend user and password in force now (see backend_login)."""
        login = self.backend_login() if self.backend_login is not None else None
        if login is None:
            return self.target
        user, password = login
        return attrs.evolve(self.target, user=user, password=password)

    async def _learn_size(self, conn: ServerConnection) -> None:
        values = await conn.run(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
        )
        self.budget.learn(int(values[0] or 1))

    # --- budget member ----------------------------------------------------------------

    def resize(self, max_size: int, max_idle: int) -> None:
        self._clamped = False
        self._apply(self.core.resize(max_size=max_size, max_idle=max_idle))

    # (workers = N) The pool's limit follows the units its worker can get (budget.py).

    def _clamp(self, drop: int) -> None:
        """Limit the pool to the connections it has, minus ``drop`` about to go."""
        stats = self.core.statistics()
        slots = stats.idle + stats.borrowed + stats.opening + stats.pending
        self._clamped = True
        self._apply(self.core.resize(max_size=max(0, slots - drop), max_idle=stats.max_idle))

    def clamped_waiters(self) -> int:
        return self.core.statistics().waiting if self._clamped else 0

    def unclamp(self, room: int) -> int:
        """Let the pool grow by up to ``room`` connections; how many it may open."""
        if not self._clamped:
            return 0
        stats = self.core.statistics()
        slots = stats.idle + stats.borrowed + stats.opening + stats.pending
        grow = max(0, min(room, stats.waiting, self.budget.cap - slots))
        # Back to the full limit once that is what the room allows (or nobody waits).
        self._clamped = slots + grow < self.budget.cap and stats.waiting > 0
        new_max = slots + grow if self._clamped else self.budget.cap
        self._apply(self.core.resize(max_size=new_max, max_idle=stats.max_idle))
        return grow

    def evict_one_idle(self) -> bool:
        """Close this pool's least recently used idle connection (for another pool)."""
        idle = list(self.core.idle())
        if not idle:
            return False
        conn = idle[-1]
        self._apply(self.core.forget(conn))
        if not self._spawn(_terminate, conn, False):
            conn.close()
        logger.info(
            "pool %s: idle server connection %d evicted for another pool", self.name, conn.id
        )
        return True

    # --- returning --------------------------------------------------------------------

    def release(
        self,
        conn: ServerConnection,
        *,
        clean: bool,
        at_boundary: bool = True,
        reset_session: bool = False,
    ) -> None:
        """Give a borrowed connection back. Sync: never blocks, never interrupted.

        ``clean``: transaction-wise clean and no session state: reusable at once.
        ``at_boundary``: nothing owed and no half message: the pool can reset it
        (ROLLBACK if a transaction is open, DISCARD ALL if ``reset_session``).
        Anything else is closed.
        """
        conn.last_used = trio.current_time()
        if clean and not reset_session and conn.alive and conn.tx_status is TxStatus.IDLE:
            if self.budget.shared is not None and self.budget.should_shed():
                # (workers = N) Clients wait in another worker: its unit goes there.
                self.budget.shed()
                self._clamp(1)
                self._apply(self.core.checkin(conn, conn.last_used, reusable=False))
                return
            self._apply(self.core.checkin(conn, conn.last_used, reusable=True))
            self.budget.poke()
            return
        if conn.alive and at_boundary and self._spawn(self._reset, conn, reset_session):
            return
        conn.close()
        self._apply(self.core.checkin(conn, conn.last_used, reusable=False))

    def _spawn(
        self,
        fn: Callable[[ServerConnection, bool], Awaitable[None]],
        conn: ServerConnection,
        flag: bool,
    ) -> bool:
        """Run cleanup I/O in the pool's own nursery; False if the pool is shutting down."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, conn, flag)
        except RuntimeError:  # nursery closed: the pool is stopping
            return False
        return True

    async def _reset(self, conn: ServerConnection, reset_session: bool) -> None:
        reusable = False
        with trio.move_on_after(RESET_TIMEOUT):
            try:
                if conn.tx_status is not TxStatus.IDLE:
                    await conn.run("ROLLBACK")
                if reset_session:
                    await conn.run("DISCARD ALL")
                    conn.extra_parameters.clear()
                    conn.statements.clear()
                reusable = conn.tx_status is TxStatus.IDLE
            except (TrioproxyError, TransportClosed, ProtocolError) as exc:
                logger.info(
                    "pool %s: reset of server connection %d failed: %s", self.name, conn.id, exc
                )
        if not reusable:
            conn.close()
        self._apply(self.core.checkin(conn, trio.current_time(), reusable=reusable))
        self.budget.poke()

    # --- effects & maintenance --------------------------------------------------------

    def _apply(self, effects: Effects[ServerConnection, Waiter]) -> None:
        for assignment in effects.assigned:
            assignment.waiter.event.set()
        for conn in effects.close:
            if not self._spawn(_terminate, conn, False):
                conn.close()
        self._wake_maintenance.set()

    async def _maintain(self) -> None:
        while True:
            deadline = self.core.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._wake_maintenance.wait()
            self._wake_maintenance = trio.Event()
            self._apply(self.core.expire(trio.current_time()))
            self._wake_maintenance = trio.Event()
            await trio.sleep(0.05)  # batch wake-ups under load


async def _terminate(conn: ServerConnection, _unused: bool) -> None:
    await conn.terminate()
