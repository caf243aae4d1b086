"""The trio shell of the pool (``BackendPool``) against a fake connector, in virtual time.

``trioproxy._pool.pool.connect_server`` is replaced by :class:`FakeServer.connect`, which
hands out real ``ServerConnection`` objects over a :class:`FakeTransport`. The fake
transport answers the pool's own statements (``ROLLBACK``, ``DISCARD ALL``, the
``max_connections`` probe) the way PostgreSQL would, can be told to never answer one, and
remembers whether an answer is still unread (a connection that must never be reused).

A :class:`Ledger` records who holds which connection, so a connection handed to two
borrowers at once, or handed out dirty or dead, fails the test at the moment it happens.
Every test ends with :func:`assert_quiescent`: nothing borrowed, opening, pending or
waiting, no more slots than ``max_size``, and every connection ever opened is either idle
(alive and clean) or closed.
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy._pool import pool as pool_module
from trioproxy._pool.budget import PoolLimits
from trioproxy._pool.pool import RECENTLY_USED, RESET_TIMEOUT, BackendPool
from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy._protocol.messages import CommandComplete, ErrorResponse, ReadyForQuery, frame
from trioproxy._server.backend import BackendTarget, ServerConnection
from trioproxy._server.transport import TransportClosed
from trioproxy.errors import BackendError, BorrowTimeout

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

#: Virtual duration of one fake network step (connect phase, one answer).
STEP = 0.001
#: Connecting takes this many steps (TCP, TLS, login: three cancel points).
CONNECT_STEPS = 3

TARGET = BackendTarget(host="fake", port=5432, database="app", user="app", password="pw")


# --------------------------------------------------------------------------- the fake


def _data_row(value: str) -> bytes:
    raw = value.encode()
    return frame(Backend.DATA_ROW, struct.pack("!hi", 1, len(raw)) + raw)


def _done(tag: str, status: TxStatus) -> bytes:
    return CommandComplete(tag).encode() + ReadyForQuery(status).encode()


class FakeTransport:
    """Enough of ``Transport`` for ``ServerConnection``: scripted answers to simple queries."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.broken = False
        self.closed = False
        self.is_tls = False
        self.queries: list[str] = []
        self.terminated = False
        self._inbox = bytearray()
        self._awaiting = False  # a query went out and its answer was not read in full
        self._hanging = False
        self._status = TxStatus.IDLE

    @property
    def dirty(self) -> bool:
        """An answer is owed or unread: reusing this connection would desynchronise it."""
        return self._awaiting or bool(self._inbox)

    def close(self) -> None:
        self.closed = True

    def peer_gone(self) -> bool:
        # Like the real transport: an idle server that closed or spoke up is gone.
        return self.broken or self.closed or self.server.kill_idle

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Like the real transport, a send that fits the kernel buffer has no checkpoint.
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        data = bytes(data)
        while data:
            type_ = data[0]
            (length,) = struct.unpack_from("!i", data, 1)
            body, data = data[5 : 1 + length], data[1 + length :]
            if type_ == Frontend.TERMINATE:
                self.terminated = True
            elif type_ == Frontend.QUERY:
                self._query(body[:-1].decode())
            else:  # pragma: no cover - the pool only sends these two
                raise AssertionError(f"unexpected message {chr(type_)!r}")

    def _query(self, sql: str) -> None:
        self.queries.append(sql)
        self._awaiting = True
        if sql in self.server.hang_sql:
            self._hanging = True
            return
        upper = sql.upper()
        if sql in self.server.fail_sql:
            sqlstate = self.server.fail_sql[sql]
            error = ErrorResponse.build(sqlstate, f"scripted failure of {sql}").encode()
            answer = error + ReadyForQuery(self._status).encode()
        elif "MAX_CONNECTIONS" in upper:
            answer = _data_row(self.server.max_connections_answer) + _done("SELECT 1", self._status)
        elif upper == "BEGIN":
            self._status = TxStatus.IN_TRANSACTION
            answer = _done("BEGIN", self._status)
        elif upper in ("COMMIT", "ROLLBACK"):
            self._status = TxStatus.IDLE
            answer = _done(upper, self._status)
        elif upper == "DISCARD ALL":
            answer = _done("DISCARD ALL", self._status)
        else:
            answer = _data_row("1") + _done("SELECT 1", self._status)
        self._inbox += answer

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        await trio.sleep(STEP)
        if self.terminated:
            return b""  # the server closes its end after Terminate
        if self._hanging or not self._awaiting:
            await trio.sleep_forever()
        data = bytes(self._inbox)
        self._inbox.clear()
        self._awaiting = False
        return data


class FakeServer:
    """The connector: counts calls, fails on request, remembers every connection."""

    def __init__(self) -> None:
        self.conns: list[ServerConnection] = []
        self.connect_calls = 0
        self.fail_first = 0
        self.always_fail: BackendError | None = None
        self.hang_sql: set[str] = set()
        #: statement -> SQLSTATE of the error the server answers it with
        self.fail_sql: dict[str, str] = {}
        self.max_connections_answer = "17"
        #: Every idle connection looks closed by the server (a restart).
        self.kill_idle = False

    async def connect(
        self, target: BackendTarget, *, now: float, parameters: Mapping[str, str] = {}
    ) -> ServerConnection:
        assert target is TARGET
        self.connect_calls += 1
        for _ in range(CONNECT_STEPS):
            await trio.sleep(STEP)
        if self.connect_calls <= self.fail_first:
            raise BackendError("could not connect to server at fake:5432: connection refused")
        if self.always_fail is not None:
            raise self.always_fail
        conn = ServerConnection(
            transport=FakeTransport(self),  # type: ignore[arg-type]
            key=None,
            parameters={"server_version": "16.0", "client_encoding": "UTF8"},
            created_at=now,
            last_used=now,
        )
        self.conns.append(conn)
        return conn


def transport_of(conn: ServerConnection) -> FakeTransport:
    transport = conn.transport
    assert isinstance(transport, FakeTransport)
    return transport


def tx_status(conn: ServerConnection) -> TxStatus:
    """Read afresh (keeps mypy from narrowing across awaits)."""
    return conn.tx_status


class Ledger:
    """Who holds which connection; fails at once on a double hand-out or a bad one."""

    def __init__(self) -> None:
        self.owner: dict[ServerConnection, str] = {}
        self.handouts = 0

    def take(self, conn: ServerConnection, who: str) -> None:
        assert conn not in self.owner, (
            f"connection {conn.id} handed to {who} while {self.owner[conn]} holds it"
        )
        assert conn.alive, f"{who} was handed dead connection {conn.id}"
        assert not transport_of(conn).dirty, f"{who} was handed desynchronised connection"
        assert conn.tx_status is TxStatus.IDLE, f"{who} was handed a connection in a transaction"
        self.owner[conn] = who
        self.handouts += 1

    def give(self, conn: ServerConnection) -> None:
        del self.owner[conn]


# --------------------------------------------------------------------------- helpers


def make_limits(max_connections: int = 2, **overrides: float) -> PoolLimits:
    values: dict[str, float] = {
        "max_connections": max_connections,
        "max_connections_percent": 100,
        "max_idle_connections_percent": 100,
        "server_lifetime": 0,
        "server_idle_timeout": 0,
        **overrides,
    }
    return PoolLimits(**values)  # type: ignore[arg-type]


def make_pool(max_connections: int = 2, **kwargs: object) -> BackendPool:
    return BackendPool(name="app/app", target=TARGET, limits=make_limits(max_connections), **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(pool: BackendPool) -> AsyncIterator[BackendPool]:
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        yield pool
        nursery.cancel_scope.cancel()


def assert_quiescent(pool: BackendPool, server: FakeServer) -> None:
    stats = pool.statistics()
    assert (stats.borrowed, stats.opening, stats.pending, stats.waiting) == (0, 0, 0, 0), stats
    assert stats.slots <= stats.max_size, stats
    idle = list(pool.core.idle())
    assert len(set(idle)) == len(idle)
    assert set(idle) <= set(server.conns), "the pool holds a connection nobody opened"
    for conn in server.conns:
        if conn in idle:
            assert conn.alive, f"idle connection {conn.id} is dead"
            assert not transport_of(conn).dirty, f"idle connection {conn.id} owes an answer"
            assert conn.tx_status is TxStatus.IDLE
        else:
            assert transport_of(conn).closed, f"connection {conn.id} is neither idle nor closed"
    assert stats.total_opened - stats.total_closed == stats.idle
    # Every closed connection gave its unit of the proxy-wide budget back.
    assert pool.budget.used == stats.idle, (pool.budget.used, stats)


async def use(
    pool: BackendPool,
    ledger: Ledger,
    who: str,
    *,
    hold: float = STEP,
    transaction: bool = True,
    borrow_timeout: float = 60,
) -> None:
    """Borrow, run a little transaction, give back honestly (like a client session).

    Wherever a cancellation lands, the release says what state the connection is in: in
    the middle of a statement (not at a boundary), inside a transaction, or clean.
    """
    conn = await pool.borrow(borrow_timeout)
    ledger.take(conn, who)
    at_boundary = True
    try:
        await trio.sleep(hold)
        if transaction:
            for sql in ("BEGIN", "select 1", "COMMIT"):
                at_boundary = False
                await conn.run(sql)
                at_boundary = True
                await trio.sleep(STEP)  # the client thinks, inside its transaction
    finally:
        ledger.give(conn)
        pool.release(
            conn,
            clean=at_boundary and conn.tx_status is TxStatus.IDLE,
            at_boundary=at_boundary,
        )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()
    monkeypatch.setattr(pool_module, "connect_server", server.connect)
    return server


# --------------------------------------------------------------------------- borrowing


async def test_borrow_release_round_trip(fake: FakeServer, autojump_clock: object) -> None:
    pool = make_pool(2)
    async with running(pool):
        conn = await pool.borrow(5)
        assert fake.connect_calls == 1
        assert pool.statistics().borrowed == 1
        assert pool.server_parameters == {"server_version": "16.0", "client_encoding": "UTF8"}
        pool.release(conn, clean=True)
        assert pool.statistics().idle == 1
        again = await pool.borrow(5)
        assert again is conn, "an idle connection is reused, not reopened"
        assert fake.connect_calls == 1
        pool.release(again, clean=True)
        assert_quiescent(pool, fake)


async def test_borrow_checkpoints_even_on_the_fast_path(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        pool.release(await pool.borrow(5), clean=True)
        with trio.testing.assert_checkpoints():
            conn = await pool.borrow(5)
        pool.release(conn, clean=True)
        assert_quiescent(pool, fake)


async def test_waiters_are_served_fifo(fake: FakeServer, autojump_clock: object) -> None:
    pool = make_pool(1)
    ledger = Ledger()
    served: list[int] = []

    async def waiter(i: int) -> None:
        await trio.sleep(i * 0.01)  # queue up in order 0, 1, 2, ...
        conn = await pool.borrow(60)
        ledger.take(conn, f"waiter {i}")
        served.append(i)
        await trio.sleep(0.5)
        ledger.give(conn)
        pool.release(conn, clean=True)

    async with running(pool):
        held = await pool.borrow(5)
        async with trio.open_nursery() as nursery:
            for i in reversed(range(5)):  # start order must not matter, request order does
                nursery.start_soon(waiter, i)
            await trio.sleep(1)
            assert pool.statistics().waiting == 5
            pool.release(held, clean=True)
        assert served == [0, 1, 2, 3, 4]
        assert fake.connect_calls == 1, "the one connection is handed from waiter to waiter"
        assert_quiescent(pool, fake)


async def test_borrow_timeout_leaks_no_slot(fake: FakeServer, autojump_clock: object) -> None:
    pool = make_pool(1)
    async with running(pool):
        held = await pool.borrow(5)
        started = trio.current_time()
        with pytest.raises(BorrowTimeout) as caught:
            await pool.borrow(2.5)
        assert trio.current_time() - started == pytest.approx(2.5)
        assert caught.value.sqlstate == "53300"
        assert pool.borrow_timeouts == 1
        stats = pool.statistics()
        assert (stats.borrowed, stats.waiting, stats.pending, stats.opening) == (1, 0, 0, 0)
        pool.release(held, clean=True)
        assert_quiescent(pool, fake)
        # The slot still works, and the timed-out waiter did not steal the connection.
        assert await pool.borrow(5) is held
        pool.release(held, clean=True)
        assert_quiescent(pool, fake)


async def test_borrow_skips_and_closes_a_dead_idle_connection(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        pool.release(conn, clean=True)
        transport_of(conn).broken = True  # e.g. a read error noticed while idle
        fresh = await pool.borrow(5)
        assert fresh is not conn
        assert fake.connect_calls == 2
        pool.release(fresh, clean=True)
        await trio.sleep(1)
        # A broken transport still owns its socket: the pool must close it when it drops it.
        assert transport_of(conn).closed, "a dead connection was dropped without close()"
        assert_quiescent(pool, fake)


async def test_try_borrow_takes_an_idle_connection_or_none(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        assert pool.try_borrow() is None  # nothing idle: it never opens one
        assert fake.connect_calls == 0
        conn = await pool.borrow(5)
        assert pool.try_borrow() is None  # the only one is borrowed
        pool.release(conn, clean=True)
        assert pool.try_borrow() is conn
        pool.release(conn, clean=True)
        transport_of(conn).broken = True  # died while idle: dropped, closed, not handed out
        assert pool.try_borrow() is None
        await trio.sleep(1)
        assert transport_of(conn).closed
        assert_quiescent(pool, fake)


async def test_try_borrow_never_overtakes_waiters(fake: FakeServer, autojump_clock: object) -> None:
    pool = make_pool(1)
    async with running(pool):
        held = await pool.borrow(5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.borrow, 5)
            await trio.sleep(0.1)
            assert pool.statistics().waiting == 1
            pool.release(held, clean=True)  # goes to the waiter, not to the idle stack
            assert pool.try_borrow() is None
        assert pool.statistics().borrowed == 1
        pool.release(held, clean=True)
        assert_quiescent(pool, fake)


async def test_borrow_wakeable_is_woken_through_its_scope(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    scopes: list[trio.CancelScope | None] = []
    async with running(pool):
        held = await pool.borrow(5)
        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def wait() -> None:
                results.append(await pool.borrow_wakeable(60, scopes.append))

            nursery.start_soon(wait)
            await trio.sleep(1)
            scope = scopes[-1]
            assert scope is not None
            scope.cancel()
        assert results == [None]
        assert scopes[-1] is None, "the scope was not withdrawn when the wait ended"
        assert pool.borrow_timeouts == 0
        stats = pool.statistics()
        assert (stats.borrowed, stats.waiting, stats.pending) == (1, 0, 0)
        pool.release(held, clean=True)
        # Not woken: the same call times out as borrow() does.
        held = await pool.borrow(5)
        with pytest.raises(BorrowTimeout):
            await pool.borrow_wakeable(2.5, scopes.append)
        assert pool.borrow_timeouts == 1
        pool.release(held, clean=True)
        assert await pool.borrow_wakeable(5, scopes.append) is held
        pool.release(held, clean=True)
        assert_quiescent(pool, fake)


# --------------------------------------------------------------------------- cancellation

SWEEP_POINTS = 60
SWEEP_TICK = STEP / 2


async def _sweep_scenario(
    pool: BackendPool, ledger: Ledger, cancel_after: list[float | None]
) -> None:
    """Borrowers (one per entry) compete for the pool; entry ``i`` is cancelled after
    ``cancel_after[i]`` seconds (never if None). Competitors stagger and vary their use."""

    async def borrower(i: int, delay: float | None) -> None:
        await trio.sleep((i % 3) * SWEEP_TICK)
        deadline = trio.current_time() + delay if delay is not None else float("inf")
        with trio.move_on_at(deadline):
            for round_ in range(2):
                await use(
                    pool,
                    ledger,
                    f"borrower {i}.{round_}",
                    hold=(i % 2 + 1) * STEP,
                    transaction=(i + round_) % 3 != 2,
                )

    async with trio.open_nursery() as nursery:
        for i, delay in enumerate(cancel_after):
            nursery.start_soon(borrower, i, delay)


@pytest.mark.parametrize("k", range(SWEEP_POINTS))
async def test_cancellation_sweep(k: int, fake: FakeServer, autojump_clock: object) -> None:
    """Cancel one borrower at its k-th tick (waiting, opening, holding, mid-statement,
    inside a transaction...) while four others compete for two slots."""
    pool = make_pool(2)
    ledger = Ledger()
    async with running(pool):
        await _sweep_scenario(pool, ledger, [k * SWEEP_TICK, None, None, None, None])
        assert not ledger.owner
        await trio.sleep(RESET_TIMEOUT + 1)  # background ROLLBACKs finish
        assert_quiescent(pool, fake)
        # Everyone who was not cancelled got through; the pool still works.
        assert ledger.handouts >= 8
        await use(pool, ledger, "after")
        await use(pool, ledger, "after again")
        assert_quiescent(pool, fake)


@pytest.mark.parametrize("k", range(0, SWEEP_POINTS, 3))
async def test_cancellation_sweep_with_failing_connects(
    k: int, fake: FakeServer, autojump_clock: object
) -> None:
    """The same with the first connection attempts failing (retry/backoff in flight)."""
    fake.fail_first = 2
    pool = make_pool(2)
    ledger = Ledger()
    async with running(pool):
        await _sweep_scenario(pool, ledger, [None, k * SWEEP_TICK, None])
        await trio.sleep(RESET_TIMEOUT + 1)
        assert_quiescent(pool, fake)
        await use(pool, ledger, "after")
        assert_quiescent(pool, fake)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    cancel_after=st.lists(
        st.one_of(st.none(), st.integers(0, 80).map(lambda n: n * SWEEP_TICK)),
        min_size=2,
        max_size=6,
    ),
    max_size=st.integers(1, 3),
    fail_first=st.integers(0, 2),
    hang_rollback=st.booleans(),
)
def test_cancellation_property(
    cancel_after: list[float | None], max_size: int, fail_first: int, hang_rollback: bool
) -> None:
    """Random cancel points for several borrowers: the pool invariants always hold."""
    server = FakeServer()
    server.fail_first = fail_first
    if hang_rollback:
        server.hang_sql.add("ROLLBACK")

    async def main() -> None:
        pool = make_pool(max_size)
        ledger = Ledger()
        async with running(pool):
            await _sweep_scenario(pool, ledger, cancel_after)
            assert not ledger.owner
            await trio.sleep(RESET_TIMEOUT + 1)
            assert_quiescent(pool, server)
            server.hang_sql.clear()
            await use(pool, ledger, "after")
            assert_quiescent(pool, server)

    with mock.patch.object(pool_module, "connect_server", server.connect):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# --------------------------------------------------------------------------- connect failures


async def test_connect_failures_are_retried_with_backoff(
    fake: FakeServer, autojump_clock: object
) -> None:
    fake.fail_first = 3
    pool = make_pool(2)
    async with running(pool):
        started = trio.current_time()
        conn = await pool.borrow(10)
        elapsed = trio.current_time() - started
        assert fake.connect_calls == 4
        assert pool.setup_failures == 3
        connecting = 4 * CONNECT_STEPS * STEP
        backoff = 0.05 + 0.1 + 0.2
        assert elapsed == pytest.approx(connecting + backoff)
        pool.release(conn, clean=True)
        assert_quiescent(pool, fake)


async def test_permanent_connect_error_is_raised_at_once(
    fake: FakeServer, autojump_clock: object
) -> None:
    fake.always_fail = BackendError(
        'password authentication failed for user "app"', sqlstate="28P01"
    )
    pool = make_pool(2)
    async with running(pool):
        started = trio.current_time()
        with pytest.raises(BackendError) as caught:
            await pool.borrow(10)
        assert caught.value.sqlstate == "28P01"
        assert fake.connect_calls == 1
        assert trio.current_time() - started == pytest.approx(CONNECT_STEPS * STEP)
        assert_quiescent(pool, fake)
        assert pool.statistics().slots == 0


@pytest.mark.parametrize("borrowers", [1, 3])
async def test_backend_down_longer_than_the_timeout_raises_the_backend_error(
    borrowers: int, fake: FakeServer, autojump_clock: object
) -> None:
    fake.always_fail = BackendError("could not connect to server at fake:5432: connection refused")
    pool = make_pool(1)
    errors: list[BaseException] = []

    async def borrower() -> None:
        try:
            await pool.borrow(1.0)
        except (BackendError, BorrowTimeout) as exc:
            errors.append(exc)

    async with running(pool):
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(borrowers):
                nursery.start_soon(borrower)
        assert trio.current_time() - started == pytest.approx(1.0, abs=0.01)
        assert len(errors) == borrowers
        for exc in errors:
            assert type(exc) is BackendError, f"got {type(exc).__name__}: {exc}"
            assert exc.sqlstate == "08006"
            assert "connection refused" in exc.message
        assert fake.connect_calls > 3
        assert pool.borrow_timeouts == 0
        assert_quiescent(pool, fake)


# --------------------------------------------------------------------------- release & reset


async def test_release_in_transaction_rolls_back_in_the_background(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
        assert conn.tx_status is TxStatus.IN_TRANSACTION
        pool.release(conn, clean=False, at_boundary=True)  # sync: returns at once
        assert not transport_of(conn).closed
        await trio.sleep(1)
        assert transport_of(conn).queries == ["BEGIN", "ROLLBACK"]
        assert tx_status(conn) is TxStatus.IDLE
        assert pool.statistics().idle == 1
        assert await pool.borrow(5) is conn
        pool.release(conn, clean=True)
        assert_quiescent(pool, fake)


async def test_release_hands_the_rolled_back_connection_to_a_waiter(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    ledger = Ledger()
    async with running(pool):
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use, pool, ledger, "waiter")
            await trio.sleep(0.1)
            assert pool.statistics().waiting == 1
            pool.release(conn, clean=False, at_boundary=True)
        assert fake.connect_calls == 1
        assert transport_of(conn).queries[:2] == ["BEGIN", "ROLLBACK"]
        assert_quiescent(pool, fake)


async def test_hanging_rollback_is_abandoned_after_reset_timeout(
    fake: FakeServer, autojump_clock: object
) -> None:
    fake.hang_sql.add("ROLLBACK")
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
        pool.release(conn, clean=False, at_boundary=True)
        started = trio.current_time()
        fresh = await pool.borrow(60)  # waits for the slot the stuck reset holds
        assert trio.current_time() - started == pytest.approx(
            RESET_TIMEOUT + CONNECT_STEPS * STEP, abs=0.01
        )
        assert fresh is not conn
        assert transport_of(conn).closed
        assert fake.connect_calls == 2
        pool.release(fresh, clean=True)
        assert_quiescent(pool, fake)


async def test_failed_rollback_closes_the_connection(
    fake: FakeServer, autojump_clock: object
) -> None:
    fake.fail_sql["ROLLBACK"] = "XX000"
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
        pool.release(conn, clean=False, at_boundary=True)
        await trio.sleep(1)
        assert transport_of(conn).closed
        assert pool.statistics().slots == 0
        assert_quiescent(pool, fake)


async def test_release_not_at_boundary_closes_at_once(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        with trio.move_on_after(STEP / 2):
            await conn.run("select 1")  # cancelled with the answer unread
        assert transport_of(conn).dirty
        pool.release(conn, clean=False, at_boundary=False)
        assert transport_of(conn).closed, "closed synchronously, inside release()"
        assert pool.statistics().slots == 0
        fresh = await pool.borrow(5)
        assert fresh is not conn
        pool.release(fresh, clean=True)
        assert_quiescent(pool, fake)


async def test_release_with_reset_session_sends_discard_all(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        conn.extra_parameters["search_path"] = "private"
        pool.release(conn, clean=True, reset_session=True)
        await trio.sleep(1)
        assert transport_of(conn).queries == ["DISCARD ALL"]
        assert conn.extra_parameters == {}
        assert pool.statistics().idle == 1
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
        pool.release(conn, clean=False, reset_session=True)
        await trio.sleep(1)
        assert transport_of(conn).queries[-2:] == ["ROLLBACK", "DISCARD ALL"]
        assert pool.statistics().idle == 1
        assert_quiescent(pool, fake)


async def test_release_after_the_pool_stopped_closes(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(1)
    async with running(pool):
        conn = await pool.borrow(5)
        await conn.run("BEGIN")
    # pool.run() has ended (its finally closed everything); a late release must not hang.
    pool.release(conn, clean=False, at_boundary=True)
    assert transport_of(conn).closed
    assert pool.statistics().borrowed == 0


# --------------------------------------------------------------------------- percent sizing


async def test_percent_sizing_from_the_first_connection(
    fake: FakeServer, autojump_clock: object
) -> None:
    limits = make_limits(0, max_connections_percent=50, max_idle_connections_percent=50)
    pool = BackendPool(name="app/app", target=TARGET, limits=limits)
    assert pool.statistics().max_size == 1, "one probe connection until the size is known"
    ledger = Ledger()
    async with running(pool):
        conns = []
        async with trio.open_nursery() as nursery:

            async def borrow_one(i: int) -> None:
                conn = await pool.borrow(5)
                ledger.take(conn, f"borrower {i}")
                conns.append(conn)

            for i in range(8):
                nursery.start_soon(borrow_one, i)
        assert pool.budget.server_max == 17
        stats = pool.statistics()
        assert (stats.max_size, stats.max_idle) == (8, 8)  # floor(17 * 50%) = 8
        assert len(conns) == 8
        probes = [c for c in conns if transport_of(c).queries]
        assert len(probes) == 1, "only the first connection asks for max_connections"
        assert "max_connections" in transport_of(probes[0]).queries[0]
        with pytest.raises(BorrowTimeout):
            await pool.borrow(1)
        for conn in conns:
            ledger.give(conn)
            pool.release(conn, clean=True)
        assert_quiescent(pool, fake)


async def test_percent_sizing_probe_failure_is_retried(
    fake: FakeServer, autojump_clock: object
) -> None:
    probe = (
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int"
    )
    fake.fail_sql[probe] = "XX000"
    limits = make_limits(0, max_connections_percent=50, max_idle_connections_percent=50)
    pool = BackendPool(name="app/app", target=TARGET, limits=limits)
    async with running(pool):
        with pytest.raises(BackendError):
            await pool.borrow(1)
        assert pool.statistics().max_size == 1
        assert all(transport_of(c).closed for c in fake.conns)
        fake.fail_sql.clear()
        conn = await pool.borrow(5)
        assert pool.statistics().max_size == 8
        pool.release(conn, clean=True)
        assert_quiescent(pool, fake)


# --------------------------------------------------------------------------- expiry & init


async def test_idle_connections_beyond_max_idle_expire(
    fake: FakeServer, autojump_clock: object
) -> None:
    limits = make_limits(4, max_idle_connections_percent=50, server_idle_timeout=10)
    pool = BackendPool(name="app/app", target=TARGET, limits=limits)
    async with running(pool):
        conns = [await pool.borrow(5) for _ in range(4)]
        for conn in conns:
            pool.release(conn, clean=True)
            await trio.sleep(0.1)
        assert pool.statistics().idle == 4
        await trio.sleep(9)
        assert pool.statistics().idle == 4, "idle connections are kept server_idle_timeout"
        await trio.sleep(2)
        assert pool.statistics().idle == 2, "down to max_idle (50% of 4)"
        await trio.sleep(3)  # the polite Terminate finishes
        closed = [transport_of(c).closed for c in conns]
        assert closed == [True, True, False, False], "the least recently used go first"
        assert all(transport_of(c).terminated for c in conns[:2])
        assert_quiescent(pool, fake)


async def test_server_lifetime(fake: FakeServer, autojump_clock: object) -> None:
    pool = BackendPool(name="app/app", target=TARGET, limits=make_limits(1, server_lifetime=30))
    async with running(pool):
        idle_one = await pool.borrow(5)
        pool.release(idle_one, clean=True)
        await trio.sleep(33)
        assert transport_of(idle_one).closed, "an idle connection past its lifetime is closed"
        held = await pool.borrow(5)
        assert held is not idle_one
        await trio.sleep(31)
        pool.release(held, clean=True)
        await trio.sleep(3)
        assert transport_of(held).closed, "a connection past its lifetime is closed at checkin"
        assert pool.statistics().slots == 0
        assert_quiescent(pool, fake)


async def test_init_query_runs_once_per_new_connection(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(2, init_query="SET statement_timeout = '5s'")
    async with running(pool):
        a = await pool.borrow(5)
        b = await pool.borrow(5)
        pool.release(a, clean=True)
        pool.release(b, clean=True)
        again = await pool.borrow(5)
        pool.release(again, clean=True)
        assert [transport_of(c).queries for c in fake.conns] == [
            ["SET statement_timeout = '5s'"],
            ["SET statement_timeout = '5s'"],
        ]
        assert_quiescent(pool, fake)


async def test_init_query_error_is_permanent_when_the_sql_is_wrong(
    fake: FakeServer, autojump_clock: object
) -> None:
    fake.fail_sql["SET no_such = 1"] = "42704"
    pool = make_pool(2, init_query="SET no_such = 1")
    async with running(pool):
        with pytest.raises(BackendError) as caught:
            await pool.borrow(10)
        assert caught.value.sqlstate == "42704"
        assert fake.connect_calls == 1, "not retried: the same SQL fails every time"
        assert transport_of(fake.conns[0]).closed
        assert_quiescent(pool, fake)


async def test_idle_connections_the_server_closed_are_replaced_before_handoff(
    fake: FakeServer, autojump_clock: object
) -> None:
    pool = make_pool(2)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        first = await pool.borrow(5)
        pool.release(first, clean=True)
        fake.kill_idle = True  # e.g. PostgreSQL restarted while the connection sat idle
        await trio.sleep(1)  # (idle: longer than RECENTLY_USED)
        second = await pool.borrow(5)
        fake.kill_idle = False
        assert second is not first
        assert first.transport.closed
        pool.release(second, clean=True)
        nursery.cancel_scope.cancel()


async def test_a_connection_given_back_an_instant_ago_skips_the_liveness_poll(
    fake: FakeServer, autojump_clock: object
) -> None:
    """Handed out again within RECENTLY_USED of its release: no poll() (its last answer
    was just read to the end); after that, the poll again."""
    pool = make_pool(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        first = await pool.borrow(5)
        pool.release(first, clean=True)
        fake.kill_idle = True  # what the poll would see; not asked
        assert pool.try_borrow() is first
        pool.release(first, clean=True)
        await trio.sleep(RECENTLY_USED)
        assert pool.try_borrow() is None  # asked now: closed and forgotten
        assert first.transport.closed
        fake.kill_idle = False
        nursery.cancel_scope.cancel()
