"""The batched data plane (trioproxy/_server/dataplane.py) with real clients and PostgreSQL.

Each test checks that the data plane really carried the transactions (its counter), so
none of them passes on the per-client path alone; and what it hands back to the client
task: big answers (partial sends), a client leaving mid-query, timeouts, shutdown.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.slow

TRANSACTION = {"pool_mode": "transaction", "max_connections": 4}


def _served(proxy) -> int:
    return proxy.proxy.dataplane.transactions  # type: ignore[no-any-return]


def _borrowed_soon(proxy, timeout: float = 10) -> int:
    """Server connections still borrowed, once they are all back or ``timeout`` passed
    (the proxy runs in another thread: it gives the last one back just after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        borrowed = proxy.proxy.pool_list()[0][3].statistics().borrowed
        if borrowed == 0 or time.monotonic() > deadline:
            return borrowed  # type: ignore[no-any-return]
        time.sleep(0.05)


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_many_clients_get_their_own_answers(proxy_factory, sslmode: str) -> None:
    """40 clients on 4 server connections, simple and extended protocol: every answer is
    the asking client's own, and the data plane carried nearly all of them."""
    proxy = proxy_factory(pool=TRANSACTION)

    async def one_client(n: int) -> int:
        conn = await psycopg.AsyncConnection.connect(
            proxy.dsn(sslmode=sslmode), autocommit=True, prepare_threshold=None
        )
        async with conn:
            for i in range(25):
                cur = await conn.execute("select %s::int", (n * 1000 + i,))
                assert await cur.fetchone() == (n * 1000 + i,)
                cur = await conn.execute(f"select 'client {n} query {i}'")  # simple protocol
                assert await cur.fetchone() == (f"client {n} query {i}",)
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(one_client(n) for n in range(40)))

    before = _served(proxy)
    assert asyncio.run(asyncio.wait_for(main(), 120)) == list(range(40))
    # 2,000 statements; a few go through the client tasks (the first one of each
    # client, before it parks; any that found no idle server connection).
    assert _served(proxy) - before > 1000


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_big_answer_to_a_slow_reader_is_handed_back_whole(proxy_factory, sslmode: str) -> None:
    """An answer far bigger than the socket buffers, to a client that reads it only after
    a pause: the kernel takes part, the client task sends the rest with backpressure, and
    the link goes on; nothing lost or reordered."""
    proxy = proxy_factory(pool=TRANSACTION)
    with psycopg.connect(proxy.dsn(sslmode=sslmode), autocommit=True) as conn:
        conn.execute("select 1")
        before = proxy.proxy.dataplane.handbacks
        pgconn = conn.pgconn
        pgconn.send_query(b"select i, repeat(md5(i::text), 20) from generate_series(1, 20000) i")
        time.sleep(1.0)  # not reading: the proxy's sends to us fill our socket
        assert proxy.proxy.dataplane.handbacks > before  # the partial send went back
        deadline = time.monotonic() + 30
        while pgconn.is_busy() and time.monotonic() < deadline:
            # (libpq's blocking get_result() would hold the GIL from the proxy's thread)
            select.select([pgconn.socket], [], [], 1.0)
            pgconn.consume_input()
        result = pgconn.get_result()
        assert result is not None
        assert result.status == psycopg.pq.ExecStatus.TUPLES_OK
        assert result.ntuples == 20000
        assert result.get_value(0, 0) == b"1"
        assert result.get_value(19999, 0) == b"20000"
        assert all(len(result.get_value(n, 1) or b"") == 640 for n in range(0, 20000, 997))
        assert pgconn.get_result() is None
        for i in range(5):  # the client parks again and is served again
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    assert _borrowed_soon(proxy) == 0


def test_client_leaving_mid_query_frees_its_server_connection(proxy_factory) -> None:
    """A client closes its socket while its query runs in the data plane: the link is
    handed back, the server connection is not given to anyone with an answer still on
    it, and the other clients carry on."""
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 2})
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as warm:
        warm.execute("select 1")
    leaver = psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True)
    leaver.execute("select 1")
    sock = socket.socket(fileno=leaver.pgconn.socket)
    try:
        leaver.pgconn.send_query(b"select pg_sleep(1.0), 'late'")
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_RDWR)  # leave, without a Terminate
    finally:
        sock.detach()
        leaver.close()
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as other:
        for i in range(20):
            # Never the leaver's late answer: each result is this query's own.
            assert other.execute("select %s::int, 'mine'", (i,)).fetchone() == (i, "mine")
    assert _borrowed_soon(proxy) == 0


def test_idle_client_timeout_counts_from_the_last_request(proxy_factory) -> None:
    """A client served by the data plane for longer than idle_client_timeout is busy, not
    idle: it is closed only after that long without a request."""
    proxy = proxy_factory(proxy={"idle_client_timeout": 0.8}, pool=TRANSACTION)
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        before = _served(proxy)
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # 2.5x the timeout, busy all along
            assert conn.execute("select 1").fetchone() == (1,)
            time.sleep(0.2)
        assert _served(proxy) - before >= 5
        time.sleep(1.6)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 1")
        assert "idle_client_timeout" in str(caught.value)


def test_drain_lets_a_query_in_the_data_plane_finish(proxy_factory) -> None:
    """Shutdown begins while a query runs in the data plane: its answer arrives, then the
    client is told 57P01 at the boundary."""
    proxy = proxy_factory(pool=TRANSACTION, proxy={"shutdown_timeout": 10})
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        conn.execute("select 1")
        time.sleep(0.1)  # (the counter moves just after the answer went out)
        before = _served(proxy)
        result: list[object] = []

        def query() -> None:
            result.append(conn.execute("select pg_sleep(0.8), 'answered'").fetchone())

        worker = threading.Thread(target=query)
        worker.start()
        time.sleep(0.3)
        assert proxy.proxy.dataplane.parked == 1
        drainer = threading.Thread(target=proxy.thread.drain)
        drainer.start()
        worker.join(10)
        assert result == [("", "answered")]
        drainer.join(15)
        assert _served(proxy) == before  # handed back mid-request, finished by its task
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")


@pytest.mark.parametrize("idle_in_transaction_timeout", [0, 30])
def test_transaction_blocks_and_errors_through_the_data_plane(
    proxy_factory, idle_in_transaction_timeout: float
) -> None:
    """A transaction block stays linked in the data plane (or, when
    idle_in_transaction_timeout needs its clock, goes to the client task); errors in
    autocommit and in extended batches keep the protocol in step."""
    proxy = proxy_factory(
        pool=TRANSACTION, proxy={"idle_in_transaction_timeout": idle_in_transaction_timeout}
    )
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        conn.execute("select 1")
        time.sleep(0.1)
        before, handbacks = _served(proxy), proxy.proxy.dataplane.handbacks
        for i in range(10):
            with pytest.raises(errors.DivisionByZero):
                conn.execute("select 1 / %s::int", (0,))
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
            with conn.transaction():
                assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
                assert conn.execute("select txid_current() > 0").fetchone() == (True,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        time.sleep(0.1)
        if idle_in_transaction_timeout:
            # No block ended in the data plane: each went to the client task's pumps
            # (handed back at BEGIN; or the task, busy from the block before, read the
            # next statements itself: a race with this client, which answers at once).
            assert proxy.proxy.dataplane.handbacks - handbacks >= 1
            assert _served(proxy) - before <= 20
        else:  # 10 x (error, select, block): all ended in the data plane
            assert _served(proxy) - before >= 30
            assert proxy.proxy.dataplane.handbacks == handbacks


def test_data_plane_off_serves_through_the_client_tasks(proxy_factory) -> None:
    proxy = proxy_factory(pool=TRANSACTION, proxy={"data_plane": False})
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        for i in range(20):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    assert _served(proxy) == 0


def test_borrow_timeout_counts_from_the_queue_in_the_data_plane(proxy_factory) -> None:
    """A request queued by the data plane for a server connection gets the borrow-timeout
    error after connection_borrow_timeout, counted from when it was queued (not twice),
    and a connection freed meanwhile goes to the queued request."""
    proxy = proxy_factory(
        pool={"pool_mode": "transaction", "max_connections": 1, "connection_borrow_timeout": 1.0}
    )
    with (
        psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as holder,
        psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as waiter,
    ):
        waiter.execute("select 1")  # logged in and parked
        holder.execute("begin")
        holder.execute("select 1")  # holds the only server connection
        started = time.monotonic()
        with pytest.raises(errors.TooManyConnections):
            waiter.execute("select 2")
        waited = time.monotonic() - started
        assert 0.9 < waited < 1.8, waited
        # Freed while queued: the queued request gets it.
        result: list[object] = []
        thread = threading.Thread(
            target=lambda: result.append(waiter.execute("select 3").fetchone())
        )
        thread.start()
        time.sleep(0.3)
        before = _served(proxy)
        holder.execute("commit")
        thread.join(5)
        assert result == [(3,)]
        time.sleep(0.1)
        # Both ended in the data plane: the holder's transaction block and "select 3".
        assert _served(proxy) == before + 2


@pytest.mark.parametrize(
    ("where", "sql"),
    [
        ("may_link_now", "select 'boom'; select 1"),  # the general path, at the request
        ("express_answer", "select 'boom'"),  # an express link, at the answer
    ],
)
def test_a_bug_met_in_the_data_plane_ends_only_that_client(
    proxy_factory, monkeypatch, where: str, sql: str
) -> None:
    """An exception while the data plane serves one client (injected here) reaches that
    client's task, which answers it with an ErrorResponse and closes; the data plane
    and every other client carry on."""
    from trioproxy._server import dataplane
    from trioproxy._server.client import ClientSession

    owner = ClientSession if where == "may_link_now" else dataplane
    original = getattr(owner, where)

    def injected(*args):  # type: ignore[no-untyped-def]
        if b"boom" in repr(args).encode():
            raise RuntimeError("injected failure")
        return original(*args)

    monkeypatch.setattr(owner, where, injected)
    proxy = proxy_factory(pool=TRANSACTION)
    with (
        psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as victim,
        psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as bystander,
    ):
        victim.execute("select 1")
        bystander.execute("select 1")
        with pytest.raises(psycopg.Error) as caught:
            victim.execute(sql)
        assert caught.value.sqlstate == "XX000"
        assert victim.closed or victim.broken
        time.sleep(0.1)
        before = _served(proxy)
        for i in range(10):
            assert bystander.execute("select %s::int", (i,)).fetchone() == (i,)
        time.sleep(0.1)
        assert _served(proxy) - before >= 10  # (psycopg may add a statement of its own)


def _express(proxy) -> int:
    return proxy.proxy.dataplane.express  # type: ignore[no-any-return]


def _simple(conn: psycopg.Connection, sql: str) -> list[psycopg.pq.PGresult]:
    """Send ``sql`` as one simple-protocol Query; the results, in order."""
    conn.pgconn.send_query(sql.encode())
    return _results(conn)


def _results(conn: psycopg.Connection) -> list[psycopg.pq.PGresult]:
    """The results of what was sent, waited for in select() (libpq's own blocking wait
    would hold the GIL, and the proxy runs in a thread of this process)."""
    pgconn = conn.pgconn
    results = []
    deadline = time.monotonic() + 30
    while True:
        while pgconn.is_busy():
            assert time.monotonic() < deadline, "no answer"
            select.select([pgconn.socket], [], [], 1)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return results
        results.append(result)


@pytest.mark.parametrize("sslmode", ["disable", "require"])
def test_express_selects_from_many_clients(proxy_factory, sslmode: str) -> None:
    """One autocommit SELECT per simple Query, from 20 clients on 4 server connections:
    served express (no Relay), each answer the asking client's own; an error answer is
    express too, and the client goes on."""
    proxy = proxy_factory(pool=TRANSACTION)
    conns = [psycopg.connect(proxy.dsn(sslmode=sslmode), autocommit=True) for _ in range(20)]
    try:
        for conn in conns:
            _simple(conn, "select 1")
        time.sleep(0.1)
        before = _express(proxy)
        for i in range(10):
            for n, conn in enumerate(conns):  # all sent before any is read: they queue
                conn.pgconn.send_query(f"select {n}, 'client {n} query {i}'".encode())
            for n, conn in enumerate(conns):
                results = _results(conn)
                assert [r.get_value(0, 1) for r in results] == [f"client {n} query {i}".encode()]
        (error,) = _simple(conns[0], "select 1 / 0")
        assert error.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"22012"
        assert _simple(conns[0], "select 'after'")[0].get_value(0, 0) == b"after"
        time.sleep(0.1)
        # Of the 202, nearly all (a few meet their client task awake).
        assert _express(proxy) - before >= 150
        # The 4 server sockets stayed in the data plane's epoll from link to link.
        assert 1 <= len(proxy.proxy.dataplane._watched) <= 4
    finally:
        for conn in conns:
            conn.close()
    assert _borrowed_soon(proxy) == 0


def test_what_is_not_express_takes_the_general_path(proxy_factory) -> None:
    """Not express, and still right: a big answer (many reads), two statements, a SELECT
    that changes a parameter, a transaction begun in one Query."""
    proxy = proxy_factory(pool=TRANSACTION)
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        _simple(conn, "select 1")
        time.sleep(0.1)
        before, served = _express(proxy), _served(proxy)
        (big,) = _simple(conn, "select i, repeat('x', 100) from generate_series(1, 5000) i")
        assert big.ntuples == 5000
        assert big.get_value(4999, 0) == b"5000"
        first, second = _simple(conn, "select 1; select 2")
        assert (first.get_value(0, 0), second.get_value(0, 0)) == (b"1", b"2")
        _simple(conn, "select set_config('application_name', 'express test', false)")
        (name,) = _simple(conn, "select current_setting('application_name')")
        assert name.get_value(0, 0) == b"express test"
        _simple(conn, "select 1; begin")
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        (in_tx,) = _simple(conn, "select txid_current_if_assigned() is null")
        _simple(conn, "commit")
        assert in_tx.get_value(0, 0) == b"t"
        time.sleep(0.1)
        # The big answer came in several reads: handed over to a Relay mid-answer.
        assert _served(proxy) > served
        # Only the plain one-statement SELECTs in there were express.
        assert _express(proxy) - before <= 2


def test_express_link_of_a_cancelled_client_task_is_finished_by_it(proxy_factory) -> None:
    """Shutdown begins while an express SELECT runs: the client task takes the link over
    (as a Relay that knows an answer is owed), the answer arrives, and the server
    connection is not reused with anything left on it."""
    proxy = proxy_factory(pool=TRANSACTION, proxy={"shutdown_timeout": 10})
    with psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True) as conn:
        _simple(conn, "select 1")
        time.sleep(0.1)
        express = _express(proxy)
        result: list[object] = []
        worker = threading.Thread(
            target=lambda: result.extend(_simple(conn, "select pg_sleep(0.8), 'answered'"))
        )
        worker.start()
        time.sleep(0.3)
        drainer = threading.Thread(target=proxy.thread.drain)
        drainer.start()
        worker.join(10)
        assert [r.get_value(0, 1) for r in result] == [b"answered"]
        drainer.join(15)
        assert _express(proxy) == express  # handed over mid-request, not counted express


def test_express_extended_batches(proxy_factory) -> None:
    """A query with parameters (the unnamed Parse/Bind/Describe/Execute/Sync batch of
    libpq) is express too, and so is a run of a named prepared SELECT once the server
    connection holds it; named statements that may change the session are not."""
    proxy = proxy_factory(pool=TRANSACTION)
    with psycopg.connect(
        proxy.dsn(sslmode="disable"), autocommit=True, prepare_threshold=None
    ) as conn:
        conn.execute("select 1")
        time.sleep(0.1)
        before = _express(proxy)
        for i in range(30):
            assert conn.execute("select %s::int, %s::text", (i, f"n{i}")).fetchone() == (
                i,
                f"n{i}",
            )
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 1 / %s::int", (0,))
        time.sleep(0.1)
        assert _express(proxy) - before >= 25
        conn.prepare_threshold = 0  # named statements from now on
        prepared_before = _express(proxy)
        for i in range(30):
            assert conn.execute("select %s::int * 2", (i,)).fetchone() == (i * 2,)
        with pytest.raises(errors.DivisionByZero):
            conn.execute("select 2 / %s::int", (0,))  # an error in an express run
        assert conn.execute("select 2 / %s::int", (1,)).fetchone() == (2,)
        time.sleep(0.1)
        # Each server connection gets the statement on its first run (general path).
        assert _express(proxy) - prepared_before >= 20
        conn.execute("create table if not exists express_t (a int)")
        writes = _express(proxy)
        for i in range(5):
            assert conn.execute("insert into express_t values (%s) returning a", (i,)).fetchone()
        time.sleep(0.1)
        assert _express(proxy) == writes
        conn.execute("select set_config('application_name', %s, false)", ("a",))
        assert conn.execute("show application_name").fetchone() == ("a",)  # pinned
