"""Session state without surprises: two clients share ONE server connection.

Each client must see exactly its own session on every statement: SETs are replayed (no
pin), pinning state keeps its owner on the connection until the state is gone, and the
other client never sees any of it.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import errors

ONE = {"pool_mode": "transaction", "max_connections": 1}


@pytest.fixture
def pair(proxy_factory):
    proxy = proxy_factory(pool={**ONE, "connection_borrow_timeout": 2})
    a = psycopg.connect(proxy.dsn(application_name="A"), autocommit=True, prepare_threshold=None)
    b = psycopg.connect(proxy.dsn(application_name="B"), autocommit=True, prepare_threshold=None)
    yield proxy, a, b
    a.close()
    b.close()


def pinned_soon(proxy, expected: int, timeout: float = 2.0) -> bool:
    """The proxy settles pins just after the client has its answer: poll briefly."""
    deadline = time.monotonic() + timeout
    while proxy.proxy.pinned_count() != expected:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def one(conn: psycopg.Connection, sql: str) -> object:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_set_search_path_and_statement_timeout_are_replayed(pair) -> None:
    proxy, a, b = pair
    a.execute("create schema if not exists iso_a")
    a.execute("set search_path = iso_a, public")
    a.execute("set statement_timeout = '4321ms'")
    b_path = one(b, "show search_path")
    assert b_path == '"$user", public'
    for _ in range(3):  # interleave: the single connection goes back and forth
        assert one(a, "show search_path") == "iso_a, public"
        assert one(a, "show statement_timeout") == "4321ms"
        assert one(b, "show search_path") == '"$user", public'
        assert one(b, "show statement_timeout") == "0"
    assert one(a, "show application_name") == "A"
    assert one(b, "show application_name") == "B"
    assert pinned_soon(proxy, 0)  # replayed, not pinned
    a.execute("reset search_path")
    assert one(a, "show search_path") == '"$user", public'


def test_set_inside_a_rolled_back_transaction_is_not_replayed(pair) -> None:
    _proxy, a, b = pair
    a.execute("begin")
    a.execute("set work_mem = '7MB'")
    a.execute("rollback")
    assert one(a, "show work_mem") == one(b, "show work_mem") == "4MB"


def test_temp_table_pins_its_owner_and_never_reaches_the_other(pair) -> None:
    proxy, a, b = pair
    a.execute("create temp table mine (v int)")
    a.execute("insert into mine values (1)")
    assert pinned_soon(proxy, 1)
    # The only server connection is pinned to A: B waits and times out, clearly.
    with pytest.raises(errors.TooManyConnections):
        b.execute("select 1")
    assert one(a, "select count(*) from mine") == 1
    a.execute("discard temp")  # the state is gone: A unpins at the boundary
    assert one(a, "select 1") == 1
    assert pinned_soon(proxy, 0)
    assert one(b, "select count(*) from pg_tables where tablename = 'mine'") == 0


def test_sql_prepare_and_listen_pin_until_released(pair) -> None:
    proxy, a, b = pair
    a.execute("prepare q(int) as select $1 * 2")
    a.execute("listen iso_channel")
    assert one(a, "execute q(21)") == 42
    assert pinned_soon(proxy, 1)
    a.execute("deallocate q")
    assert pinned_soon(proxy, 1)  # still listening
    a.execute("unlisten *")
    assert pinned_soon(proxy, 0)
    with pytest.raises(errors.InvalidSqlStatementName):
        b.execute("execute q(1)")


def test_listen_gets_notifications_only_for_its_owner(pair) -> None:
    proxy, a, b = pair
    a.execute("listen iso_news")
    got: list[str] = []

    def wait_for_notify() -> None:
        for notify in a.notifies(timeout=5, stop_after=1):
            got.append(notify.payload)

    waiter = threading.Thread(target=wait_for_notify)
    waiter.start()
    time.sleep(0.2)
    with psycopg.connect(proxy.pg.dsn(), autocommit=True) as direct:
        direct.execute("notify iso_news, 'hello A'")
    waiter.join(10)
    assert got == ["hello A"]
    a.execute("unlisten iso_news")
    assert one(b, "select 1") == 1


def test_advisory_lock_pins_until_unlock_all(pair) -> None:
    proxy, a, b = pair
    a.execute("select pg_advisory_lock(4242)")
    assert pinned_soon(proxy, 1)
    a.execute("select pg_advisory_unlock_all()")
    assert pinned_soon(proxy, 0)
    assert one(b, "select pg_try_advisory_lock(4242)") is True
    b.execute("select pg_advisory_unlock_all()")


def test_pin_is_logged_counted_and_optionally_noticed(proxy_factory, caplog) -> None:
    proxy = proxy_factory(pool=ONE, proxy={"notify_on_pin": True})
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(application_name="pinny"), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("create temp table t_pin as select 'top-secret-literal' as s")
        conn.execute("select 1")
        assert any("pinned to its server connection (temporary object)" in n for n in notices)
        assert pinned_soon(proxy, 1)
    lines = [r.getMessage() for r in caplog.records if "pinned to its server" in r.getMessage()]
    assert len(lines) == 1
    assert "temporary object" in lines[0]
    assert "pinny" in lines[0]
    assert "create temp table t_pin as select ? as s" in lines[0]
    assert "top-secret-literal" not in lines[0]
    assert proxy.proxy.stats.pins == {"temporary object": 1}


def test_set_config_session_level_is_replayed(pair) -> None:
    proxy, a, b = pair
    a.execute("select set_config('myapp.tenant', 'acme', false)")
    for _ in range(2):
        assert one(a, "select current_setting('myapp.tenant', true)") == "acme"
        assert one(b, "select current_setting('myapp.tenant', true)") in (None, "")
    assert pinned_soon(proxy, 0)


def test_pinned_client_leaving_inside_a_transaction_leaves_nothing_behind(pair) -> None:
    _proxy, a, b = pair
    a.execute("create temp table left_behind (v int)")
    a.execute("begin")
    a.execute("insert into left_behind values (1)")
    a.close()  # gone inside a transaction, while pinned
    assert one(b, "select count(*) from pg_class where relname = 'left_behind'") == 0


def test_named_statements_after_begin_are_virtualised_not_pinned(proxy_factory) -> None:
    proxy = proxy_factory(pool={**ONE})
    with psycopg.connect(proxy.dsn(), prepare_threshold=0) as conn:  # autocommit off
        for i in range(5):
            assert conn.execute("select %s::int + 1", (i,)).fetchone() == (i + 1,)
            conn.commit()
        assert pinned_soon(proxy, 0)
        with psycopg.connect(proxy.dsn(), autocommit=True) as other:
            assert one(other, "select 7") == 7


def test_deallocate_all_then_prepare_again(proxy_factory) -> None:
    proxy = proxy_factory(pool={**ONE})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        conn.execute("listen keep_me_pinned")
        assert conn.execute("select %s::int * 5", (2,)).fetchone() == (10,)
        conn.execute("deallocate all")
        conn.prepared_max = 0  # psycopg forgets its own cache
        conn.prepared_max = 100
        assert conn.execute("select %s::int * 5", (3,)).fetchone() == (15,)
    del proxy
