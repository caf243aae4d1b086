"""Database failures the proxy hides from clients (issue: resilience)."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.slow


def test_terminated_idle_server_connections_are_replaced_silently(proxy_factory, pg) -> None:
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 3})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        before = conn.execute("select pg_backend_pid()").fetchone()
        # An operator (or a failover script) kills every backend of the app database.
        pg.psql(
            "-c",
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where datname = 'app' and pid <> pg_backend_pid()",
        )
        after = conn.execute("select pg_backend_pid()").fetchone()  # no error
        assert after != before
        assert conn.execute("select 1").fetchone() == (1,)


def test_client_idle_across_a_postgresql_restart_sees_no_error(pg_factory, proxy_factory) -> None:
    server = pg_factory()
    proxy = proxy_factory(server, pool={"pool_mode": "transaction", "max_connections": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        server.restart()
        assert conn.execute("select 2").fetchone() == (2,)


def test_postgresql_down_then_back_clients_wait_and_resume(pg_factory, proxy_factory) -> None:
    server = pg_factory()
    proxy = proxy_factory(
        server,
        pool={"pool_mode": "transaction", "max_connections": 2, "connection_borrow_timeout": 1},
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")
        server.stop()
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("select 1")
        assert caught.value.sqlstate in ("08006", "57P03", "08001", None)
        server.start()
        assert conn.execute("select 3").fetchone() == (3,)  # same client connection
