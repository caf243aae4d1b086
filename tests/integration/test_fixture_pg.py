"""The PostgreSQL fixtures themselves work: roles, auth methods, extra servers."""

from __future__ import annotations

import psycopg
import pytest

from tests.fix_pg import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    CLEAR_PASSWORD,
    CLEAR_USER,
    MD5_PASSWORD,
    MD5_USER,
    PostgresFactory,
    PostgresServer,
)


def test_app_user_connects(pg: PostgresServer) -> None:
    with psycopg.connect(
        host=pg.host, port=pg.port, dbname=APP_DB, user=APP_USER, password=APP_PASSWORD
    ) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        row = conn.execute("select current_user, current_database()").fetchone()
        assert row == (APP_USER, APP_DB)


def test_dsn_url(pg: PostgresServer) -> None:
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)
    with psycopg.connect(pg.dsn(dbname="postgres", user=pg.superuser)) as conn:
        assert conn.execute(
            "select rolsuper from pg_roles where rolname = current_user"
        ).fetchone() == (True,)


@pytest.mark.parametrize(
    ("user", "password", "stored_prefix"),
    [
        (MD5_USER, MD5_PASSWORD, "md5"),
        (CLEAR_USER, CLEAR_PASSWORD, "SCRAM-SHA-256$"),
        (APP_USER, APP_PASSWORD, "SCRAM-SHA-256$"),
    ],
)
def test_roles_log_in(pg: PostgresServer, user: str, password: str, stored_prefix: str) -> None:
    with psycopg.connect(pg.dsn(user=user, password=password)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    stored = pg.psql("-c", f"select rolpassword from pg_authid where rolname = '{user}'")
    assert stored.startswith(stored_prefix)


def test_wrong_password_rejected(pg: PostgresServer) -> None:
    for user in (APP_USER, MD5_USER, CLEAR_USER):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.dsn(user=user, password="wrong"))


def test_hba_methods(pg: PostgresServer) -> None:
    if not pg.managed:
        pytest.skip("pg_hba.conf of an external server is not ours")
    rules = pg.psql(
        "-c", "select user_name[1], auth_method from pg_hba_file_rules where type='host'"
    )
    methods = dict(line.split("|") for line in rules.splitlines() if not line.startswith("{all}"))
    assert methods[MD5_USER] == "md5"
    assert methods[CLEAR_USER] == "password"


def test_psql_helper(pg: PostgresServer) -> None:
    assert pg.psql("-c", "select 40 + 2") == "42\n"
    assert pg.psql("-c", "select current_user", user=APP_USER, dbname=APP_DB) == f"{APP_USER}\n"


def test_factory_custom_conf(pg: PostgresServer, pg_factory: PostgresFactory) -> None:
    other = pg_factory(max_connections=20)
    assert other.port != pg.port
    assert other.psql("-c", "show max_connections").strip() == "20"
    with psycopg.connect(other.dsn()) as conn:
        assert conn.execute("show max_connections").fetchone() == ("20",)
    assert pg.psql("-c", "show max_connections").strip() != "20"


def test_factory_restart(pg_factory: PostgresFactory) -> None:
    server = pg_factory({"application_name": "fixture-test"}, idle_session_timeout="1min")
    assert server.psql("-c", "show idle_session_timeout").strip() == "1min"
    server.stop()
    assert not server.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(), connect_timeout=5)
    server.start()
    assert server.is_running()
    with psycopg.connect(server.dsn()) as conn:
        assert conn.execute("show application_name").fetchone() == ("fixture-test",)
