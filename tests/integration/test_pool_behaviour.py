"""Borrow timeout, idle timeouts, cancel routing, dirty connections, parameters."""

from __future__ import annotations

import socket
import struct
import threading
import time

import psycopg
import pytest
from psycopg import errors

TRANSACTION_ONE = {"pool_mode": "transaction", "max_connections": 1}


def test_borrow_timeout_answers_and_connection_stays_usable(proxy_factory) -> None:
    proxy = proxy_factory(pool={**TRANSACTION_ONE, "connection_borrow_timeout": 0.5})
    with psycopg.connect(proxy.dsn()) as holder, psycopg.connect(proxy.dsn()) as waiter:
        holder.execute("begin")
        holder.execute("select 1")  # the only server connection is now held
        started = time.monotonic()
        with pytest.raises(errors.TooManyConnections) as caught:
            waiter.execute("select 1")
        assert time.monotonic() - started < 5
        assert str(caught.value).startswith("Timed-out waiting to acquire database connection.")
        detail = caught.value.diag.message_detail or ""
        assert "1 server connections" in detail
        assert "1 in use" in detail
        # Extended protocol (parameters): the proxy skips to Sync and answers once.
        with pytest.raises(errors.TooManyConnections):
            waiter.execute("select %s::int", (5,))
        waiter.rollback()
        holder.execute("commit")
        assert waiter.execute("select %s::int", (7,)).fetchone() == (7,)
        assert waiter.execute("select 8").fetchone() == (8,)


def test_idle_client_timeout_closes_with_reason(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"idle_client_timeout": 0.5})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        time.sleep(1.5)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 1")
        assert "idle_client_timeout" in str(caught.value)
    # The proxy still serves others.
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_idle_in_transaction_timeout(proxy_factory, pg) -> None:
    proxy = proxy_factory(proxy={"idle_in_transaction_timeout": 0.5}, pool=TRANSACTION_ONE)
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("select 1")  # psycopg opened a transaction: held, then idle
        time.sleep(1.5)
        with pytest.raises(errors.IdleInTransactionSessionTimeout) as caught:
            conn.execute("select 1")
        assert caught.value.sqlstate == "25P03"
    with psycopg.connect(proxy.dsn()) as conn:  # the pool's only connection came back
        assert conn.execute("select 2").fetchone() == (2,)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_reaches_the_right_query(proxy_factory, mode: str) -> None:
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 4})
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        psycopg.connect(proxy.dsn(), autocommit=True) as bystander,
    ):
        bystander_result: list[object] = []

        def bystander_query() -> None:
            bystander_result.append(bystander.execute("select pg_sleep(1.5), 'ok'").fetchone())

        other = threading.Thread(target=bystander_query)
        other.start()
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            conn.execute("select pg_sleep(20)")
        assert time.monotonic() - started < 10
        other.join(10)
        assert bystander_result == [("", "ok")]  # not cancelled by someone else's key
        assert conn.execute("select 1").fetchone() == (1,)


def test_cancel_with_a_wrong_key_does_nothing(proxy_factory) -> None:
    proxy = proxy_factory(pool=TRANSACTION_ONE)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        pid = conn.info.backend_pid
        done: list[object] = []
        runner = threading.Thread(
            target=lambda: done.append(conn.execute("select pg_sleep(1), 'done'").fetchone())
        )
        runner.start()
        time.sleep(0.3)
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
            sock.sendall(struct.pack("!iiiI", 16, 80877102, pid, 12345))
            assert sock.recv(1) == b""  # closed without an answer
        runner.join(10)
        assert done == [("", "done")]


def test_client_gone_mid_transaction_does_not_leak_state(proxy_factory) -> None:
    proxy = proxy_factory(pool=TRANSACTION_ONE)
    with psycopg.connect(proxy.dsn(), autocommit=True) as setup:
        setup.execute("drop table if exists leak_check")
        setup.execute("create table leak_check (v int)")
    conn = psycopg.connect(proxy.dsn())
    conn.execute("insert into leak_check values (1)")  # inside a transaction, no commit
    conn.pgconn.finish()  # vanish without a word
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert other.execute("select count(*) from leak_check").fetchone() == (0,)
        assert other.execute("select now() = statement_timestamp()").fetchone() == (True,)


def test_client_gone_mid_result_gives_next_client_a_clean_connection(proxy_factory) -> None:
    proxy = proxy_factory(pool=TRANSACTION_ONE)
    sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
    conn = psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True)
    with conn.cursor(name=None) as cur:
        conn.pgconn.send_query(b"select repeat('x', 1000) from generate_series(1, 200000)")
        time.sleep(0.2)
        del cur
    conn.pgconn.finish()
    sock.close()
    with psycopg.connect(proxy.dsn(), autocommit=True) as other:
        assert other.execute("select 42").fetchone() == (42,)


def test_parameters_follow_each_client_across_server_connections(proxy_factory) -> None:
    proxy = proxy_factory(pool=TRANSACTION_ONE)
    a = psycopg.connect(
        proxy.dsn(application_name="client-a", options="-c TimeZone=UTC"), autocommit=True
    )
    b = psycopg.connect(
        proxy.dsn(application_name="client-b", options="-c TimeZone=Asia/Tokyo"), autocommit=True
    )
    try:
        for _ in range(3):
            assert a.execute("show application_name").fetchone() == ("client-a",)
            assert b.execute("show application_name").fetchone() == ("client-b",)
            assert a.execute("show timezone").fetchone() == ("UTC",)
            assert b.execute("show timezone").fetchone() == ("Asia/Tokyo",)
        b.execute("set application_name = 'renamed-b'")
        assert a.execute("show application_name").fetchone() == ("client-a",)
        assert b.execute("show application_name").fetchone() == ("renamed-b",)
        assert a.info.parameter_status("application_name") == "client-a"
        assert b.info.parameter_status("application_name") == "renamed-b"
        assert a.info.parameter_status("server_version")
    finally:
        a.close()
        b.close()


def test_max_client_connections(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"max_client_connections": 2})
    with psycopg.connect(proxy.dsn()), psycopg.connect(proxy.dsn()):
        with pytest.raises(psycopg.OperationalError) as caught:
            psycopg.connect(proxy.dsn())
        assert "too many clients" in str(caught.value)
    # Once the proxy has seen them leave (their tasks end just after their Terminate,
    # in the proxy's thread), a new client gets in.
    deadline = time.monotonic() + 10
    while proxy.proxy.open_clients > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _server_connections(pg) -> int:
    out = pg.psql(
        "-At",
        "-c",
        "select count(*) from pg_stat_activity where datname = 'app' "
        "and backend_type = 'client backend' and pid <> pg_backend_pid()",
    )
    return int(out.strip())


def test_global_cap_across_pools_evicts_idle_connections(proxy_factory, pg) -> None:
    """Two pools (users app and alice) share a budget of 2 server connections."""
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 2})
    app_clients = [
        psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None) for _ in range(2)
    ]
    alice = psycopg.connect(proxy.dsn(user="alice"), autocommit=True, prepare_threshold=None)
    try:
        # Both of app's clients inside transactions: app's pool holds the whole budget.
        for conn in app_clients:
            conn.execute("begin")
            conn.execute("select 1")
        assert _server_connections(pg) == 2
        for conn in app_clients:
            conn.execute("commit")  # now idle in app's pool
        # alice's pool has no connection: it must evict one of app's idle ones.
        assert alice.execute("select current_user").fetchone() == ("app",)
        assert _server_connections(pg) <= 2
        results: list[object] = []

        def work(conn: psycopg.Connection, tag: str) -> None:
            for i in range(20):
                results.append(conn.execute("select %s::text", (f"{tag}{i}",)).fetchone())

        threads = [
            threading.Thread(target=work, args=(c, t))
            for c, t in ((app_clients[0], "a"), (app_clients[1], "b"), (alice, "c"))
        ]
        for t in threads:
            t.start()
        peak = 0
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, _server_connections(pg))
            time.sleep(0.02)
        for t in threads:
            t.join()
        assert len(results) == 60
        assert peak <= 2
    finally:
        for conn in [*app_clients, alice]:
            conn.close()


def test_pool_mode_per_user(proxy_factory) -> None:
    from tests.fix_proxy import PROXY_USERS

    users = {**PROXY_USERS, "alice": {**PROXY_USERS["alice"], "pool_mode": "session"}}
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 4}, users=users)
    with psycopg.connect(proxy.dsn(user="alice"), autocommit=True) as alice:
        pid = alice.execute("select pg_backend_pid()").fetchone()
        alice.execute("set search_path = pg_catalog")  # session mode: no pin, no replay
        for _ in range(3):
            assert alice.execute("select pg_backend_pid()").fetchone() == pid
        assert proxy.proxy.pinned_count() == 0
        with psycopg.connect(proxy.dsn(), autocommit=True) as app:
            assert app.execute("select pg_backend_pid()").fetchone() != pid


def test_a_login_that_asks_only_for_an_application_name_needs_no_server(proxy_factory) -> None:
    """The server takes a printable ASCII application_name as sent: a client asking for
    one logs in while the only server connection is held, and has it on its first
    query; a name the server would change still goes to the server at login."""
    proxy = proxy_factory(pool={**TRANSACTION_ONE, "connection_borrow_timeout": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True) as holder:
        holder.execute("begin")
        holder.execute("select 1")  # the only server connection is now held
        started = time.monotonic()
        with psycopg.connect(proxy.dsn(application_name="checkout-lambda")) as client:
            assert time.monotonic() - started < 0.9  # no wait for the held connection
            assert client.info.parameter_status("application_name") == "checkout-lambda"
            with pytest.raises(errors.TooManyConnections):
                client.execute("select 1")  # its first query does wait
            client.rollback()
            holder.execute("commit")
            assert client.execute("show application_name").fetchone() == ("checkout-lambda",)
        holder.execute("begin")
        holder.execute("select 1")
        with pytest.raises(psycopg.OperationalError, match="Timed-out"):
            psycopg.connect(proxy.dsn(application_name="tab\there"))
        holder.execute("commit")
        with psycopg.connect(proxy.dsn(application_name="x" * 70), autocommit=True) as client:
            (shown,) = client.execute("show application_name").fetchone() or ("",)
            assert shown == "x" * 63  # the server's own truncation, learned at login
            assert client.info.parameter_status("application_name") == "x" * 63
