"""Real clients through the proxy, over TLS (sslmode=verify-full): psql, psycopg 3, asyncpg,
pgbench; in session mode and, where it makes sense, in transaction mode too."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.fix_pg import APP_USER, PostgresServer
from tests.fix_proxy import RunningProxy, build_config
from trioproxy.testing.thread import ProxyThread

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from trioproxy.testing.certs import TLSFiles

MODES = ["session", "transaction"]
SUBPROCESS_TIMEOUT = 60


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_proxy(proxy_factory: Any, mode: str) -> RunningProxy:
    """A proxy in session mode, then in transaction mode (parametrized)."""
    return proxy_factory(pool={"pool_mode": mode})  # type: ignore[no-any-return]


@pytest.fixture
def table(pg: PostgresServer) -> Iterator[str]:
    """A unique table name in database app (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    pg.psql("-c", f"drop table if exists {name}", dbname="app")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def run_psql(
    proxy: RunningProxy,
    *args: str,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    user: str = APP_USER,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """psql through the proxy (no psqlrc, never prompts, unaligned tuples only)."""
    return subprocess.run(
        ["psql", "-X", "-w", "-q", "-A", "-t", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=_clean_env(PGCONNECT_TIMEOUT="10", **proxy.env(user=user)),
        cwd=cwd,
        check=False,
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc.stdout


# --------------------------------------------------------------------------------- psql


def test_psql_simple_query(any_proxy: RunningProxy) -> None:
    out = _ok(run_psql(any_proxy, "-c", "select 40 + 2, current_user"))
    assert out.strip() == "42|app"
    out = _ok(run_psql(any_proxy, "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()"))
    # The proxy -> PostgreSQL leg is plaintext in the tests; the client leg is TLS (verify-full
    # succeeded, or psql would have failed to connect).
    assert out.strip() == "f"


def test_psql_multi_statement(any_proxy: RunningProxy) -> None:
    # One Query message holding two statements (-c): psql 15 prints both results.
    out = _ok(run_psql(any_proxy, "-c", "select 1; select 2;"))
    assert out.split() == ["1", "2"]
    # Two Query messages (script on stdin).
    out = _ok(
        run_psql(any_proxy, "-v", "ON_ERROR_STOP=1", "-f", "-", input="select 1; select 2;\n")
    )
    assert out.split() == ["1", "2"]


def test_psql_copy_in_and_out(any_proxy: RunningProxy, table: str, tmp_path: Path) -> None:
    rows = [f"{i}\tname {i}\t{'x' * (i % 50)}" for i in range(1, 5001)]
    source = tmp_path / "in.tsv"
    source.write_text("\n".join(rows) + "\n")
    target = tmp_path / "out.tsv"
    script = (
        f"create table {table} (id int primary key, name text, pad text);\n"
        f"\\copy {table} from '{source}'\n"
        f"\\copy (select * from {table} order by id) to '{target}'\n"
        f"select count(*) from {table};\n"
    )
    out = _ok(run_psql(any_proxy, "-v", "ON_ERROR_STOP=1", "-f", "-", input=script))
    assert out.strip() == "5000"
    assert target.read_text() == source.read_text()


def test_psql_error_then_rollback(any_proxy: RunningProxy) -> None:
    script = "begin;\nselect 1/0;\nselect 'ignored';\nrollback;\nselect 'after';\n"
    proc = run_psql(any_proxy, "-f", "-", input=script)
    # Without ON_ERROR_STOP psql goes on after errors and exits 0.
    assert proc.returncode == 0, proc.stderr
    assert "division by zero" in proc.stderr
    assert "current transaction is aborted" in proc.stderr
    assert proc.stdout.split() == ["after"]


def test_psql_on_error_stop(any_proxy: RunningProxy) -> None:
    proc = run_psql(
        any_proxy, "-v", "ON_ERROR_STOP=1", "-f", "-", input="select 1/0;\nselect 'unreached';\n"
    )
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "division by zero" in proc.stderr
    assert "unreached" not in proc.stdout
    # The proxy still serves.
    assert _ok(run_psql(any_proxy, "-c", "select 'still here'")).strip() == "still here"


# ----------------------------------------------------------------------------- psycopg


def test_psycopg_parameters(any_proxy: RunningProxy) -> None:
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        assert conn.info.pgconn.ssl_in_use
        row = conn.execute(
            "select %s::int + %s, %s::text || '!', %s::numeric * 2, %s::int is null, %s::jsonb",
            (40, 2, "héllo 'quoted' \\ ;", "1.25", None, Jsonb({"a": [1, 2]})),
        ).fetchone()
        assert row == (42, "héllo 'quoted' \\ ;!", pytest.approx(2.5), True, {"a": [1, 2]})


@pytest.mark.parametrize(
    "cursor_factory", [psycopg.Cursor, psycopg.ClientCursor], ids=["server", "client"]
)
def test_psycopg_binding(
    any_proxy: RunningProxy, cursor_factory: type[psycopg.Cursor[Any]]
) -> None:
    """Server-side binding (extended protocol, unnamed statement) and client-side binding
    (simple protocol)."""
    dsn = any_proxy.dsn()
    with psycopg.connect(dsn, cursor_factory=cursor_factory, connect_timeout=10) as conn:
        cur = conn.cursor()
        assert isinstance(cur, cursor_factory)
        for i in range(20):
            cur.execute("select %s::int * 2, %s::text", (i, f"v{i}"))
            assert cur.fetchone() == (i * 2, f"v{i}")
        # An error in the middle, then go on (transaction rolled back by psycopg).
        with pytest.raises(psycopg.errors.DivisionByZero):
            cur.execute("select 1 / %s::int", (0,))
        conn.rollback()
        cur.execute("select %s::int", (7,))
        assert cur.fetchone() == (7,)
        conn.commit()


def test_psycopg_prepared_statements_session_mode(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        for i in range(5):
            assert conn.execute("select %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)
        # It really is a named prepared statement on the (single) server connection.
        names = [r[0] for r in conn.execute("select name from pg_prepared_statements").fetchall()]
        assert any(name.startswith("_pg3_") for name in names), names
        for i in range(5):
            assert conn.execute("select %s::int + 1", (i,), prepare=True).fetchone() == (i + 1,)


def test_psycopg_copy(any_proxy: RunningProxy, table: str) -> None:
    rows = [(i, f"row {i}", bytes([i % 256]) * (i % 17)) for i in range(10_000)]
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        conn.execute(f"create table {table} (id int, name text, data bytea)")
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} (id, name, data) from stdin") as copy:
                for row in rows:
                    copy.write_row(row)
            conn.commit()
            out: list[tuple[Any, ...]] = []
            query = f"copy (select id, name, data from {table} order by id) to stdout"
            with cur.copy(query) as copy:
                copy.set_types(["int4", "text", "bytea"])
                out.extend(copy.rows())
        conn.commit()
        assert out == rows
        # Binary COPY too.
        with conn.cursor() as cur:
            with cur.copy(f"copy {table} (id, name, data) from stdin (format binary)") as copy:
                copy.set_types(["int4", "text", "bytea"])
                copy.write_row((-1, "binary", b"\x00\xff"))
            conn.commit()
            assert cur.execute(f"select name, data from {table} where id = -1").fetchone() == (
                "binary",
                b"\x00\xff",
            )
    # A COPY that fails half-way leaves the connection usable.
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation), conn.cursor() as cur:  # noqa: SIM117
            with cur.copy(f"copy {table} (id) from stdin") as copy:
                copy.write(b"1\nnot-a-number\n")
        conn.rollback()
        assert conn.execute(f"select count(*) from {table}").fetchone() == (10_001,)


def test_psycopg_listen_notify_session_mode(proxy: RunningProxy) -> None:
    channel = f"ch_{uuid.uuid4().hex[:8]}"
    with (
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as notifier,
    ):
        listener.execute(f"listen {channel}")
        notifier.execute("select pg_notify(%s, %s)", (channel, "hello"))
        notifier.execute(f"notify {channel}, 'second'")
        received = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in received] == [
            (channel, "hello"),
            (channel, "second"),
        ]
        assert received[0].pid != listener.info.backend_pid  # the notifier's backend


def test_psycopg_large_result(any_proxy: RunningProxy) -> None:
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        rows = conn.execute(
            "select g, repeat('x', 20) from generate_series(1, 100000) g"
        ).fetchall()
        assert len(rows) == 100_000
        assert sum(r[0] for r in rows) == 100_000 * 100_001 // 2
        assert rows[-1] == (100_000, "x" * 20)
        # Still in step afterwards.
        assert conn.execute("select 'next'").fetchone() == ("next",)


def test_psycopg_large_bytea_parameter(any_proxy: RunningProxy) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    with psycopg.connect(any_proxy.dsn(), connect_timeout=10) as conn:
        # Binary parameter, text result (20 MB of hex) ...
        back = conn.execute("select %b::bytea", (payload,)).fetchone()
        assert back is not None
        assert back[0] == payload
        # ... and binary result.
        cur = conn.cursor(binary=True)
        cur.execute("select %b::bytea, length(%b::bytea)", (payload, payload))
        row = cur.fetchone()
        assert row is not None
        assert row[0] == payload
        assert row[1] == len(payload)
        assert conn.execute("select md5(%b)", (payload,)).fetchone() is not None


def test_psycopg_alice_uses_backend_credentials(any_proxy: RunningProxy) -> None:
    with psycopg.connect(any_proxy.dsn(user="alice"), connect_timeout=10) as conn:
        assert conn.execute("select current_user, session_user").fetchone() == ("app", "app")
    # alice's client password is hers, not the backend's.
    expected = 'password authentication failed for user "alice"'
    with pytest.raises(psycopg.OperationalError, match=expected):
        psycopg.connect(any_proxy.dsn(user="alice", password="app-secret"), connect_timeout=10)


def test_psycopg_pipeline(any_proxy: RunningProxy, table: str) -> None:
    """libpq pipeline mode: many Syncs in flight at once."""
    with psycopg.connect(any_proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"create table {table} (id int primary key)")
        with conn.pipeline():
            cursors = [
                conn.execute(f"insert into {table} values (%s) returning id", (i,))
                for i in range(200)
            ]
        assert [c.fetchone() for c in cursors] == [(i,) for i in range(200)]

        # An error in the middle of a pipeline: later statements are skipped, then it recovers.
        def failing_pipeline() -> None:
            with conn.pipeline():
                conn.execute(f"insert into {table} values (1000)")
                conn.execute(f"insert into {table} values (0)")
                conn.execute(f"insert into {table} values (1001)")

        with pytest.raises(psycopg.errors.UniqueViolation):
            failing_pipeline()
        # Without a Sync in between, the statements of a pipeline form one implicit
        # transaction: the insert of 1000 is rolled back too (as on PostgreSQL directly).
        assert conn.execute(f"select count(*) from {table}").fetchone() == (200,)


def test_psycopg_cancel(any_proxy: RunningProxy) -> None:
    """A CancelRequest sent to the proxy reaches the server connection running the query.

    ``cancel_safe()`` is libpq 17+'s PQcancelCreate: it opens the cancel connection with the
    same sslmode (SSLRequest, TLS, then the CancelRequest) and waits for the proxy to close
    it. (The legacy ``cancel()`` calls PQcancel without releasing the GIL, which would
    deadlock against this in-process proxy: see test_psql_cancel for PQcancel.)
    """
    errors: list[BaseException] = []
    with psycopg.connect(any_proxy.dsn(), autocommit=True, connect_timeout=10) as conn:

        def cancel() -> None:
            try:
                conn.cancel_safe(timeout=10)
            except BaseException as exc:
                errors.append(exc)

        timer = threading.Timer(1.0, cancel)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("select pg_sleep(20)")
        finally:
            timer.cancel()
            timer.join(15)
        assert time.monotonic() - started < 10
        assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)
    assert errors == [], f"cancel_safe() reported: {errors[0]!r}"


def test_psql_cancel(any_proxy: RunningProxy) -> None:
    """psql's SIGINT handler sends a CancelRequest with PQcancel (a plaintext connection)."""
    proc = subprocess.Popen(
        ["psql", "-X", "-w", "-q", "-A", "-t", "-c", "select pg_sleep(20)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(PGCONNECT_TIMEOUT="10", **any_proxy.env()),
    )
    try:
        time.sleep(1.5)  # connected and waiting for the result
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert time.monotonic() - started < 10
    assert "canceling statement due to user request" in err, err
    assert proc.returncode == 1, (proc.returncode, err)
    assert _ok(run_psql(any_proxy, "-c", "select 'after cancel'")).strip() == "after cancel"


def test_session_parameters_do_not_leak_between_clients(proxy_factory: Any, mode: str) -> None:
    """With one server connection shared in transaction mode, each client keeps its own
    reported parameters (TimeZone, application_name, DateStyle) and sees nobody else's."""
    # Transaction mode: both clients share one server connection. Session mode: one each.
    proxy = proxy_factory(
        pool={"pool_mode": mode, "max_connections": 1 if mode == "transaction" else 2}
    )
    with (
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as a,
        psycopg.connect(
            proxy.dsn(application_name="client-b", options="-c timezone=Asia/Tokyo"),
            autocommit=True,
            connect_timeout=10,
        ) as b,
    ):
        a.execute("set timezone to 'America/New_York'")
        a.execute("set application_name to 'client-a'")
        a.execute("set datestyle to 'German'")
        for _ in range(3):
            assert a.execute("show timezone").fetchone() == ("America/New_York",)
            assert b.execute("show timezone").fetchone() == ("Asia/Tokyo",)
            assert a.execute("show application_name").fetchone() == ("client-a",)
            assert b.execute("show application_name").fetchone() == ("client-b",)
            assert a.execute("show datestyle").fetchone() == ("German, DMY",)
            assert b.execute("show datestyle").fetchone() == ("ISO, MDY",)
        assert a.info.parameter_status("TimeZone") == "America/New_York"
        assert b.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_startup_options_apply(any_proxy: RunningProxy) -> None:
    """``options=-c name=value`` (untracked settings) hold for the whole client session,
    in every transaction, whatever server connection serves it, exactly as they would on
    PostgreSQL directly."""
    options = "-c statement_timeout=4321 -c search_path=pg_catalog,public"
    probe = "select current_setting('statement_timeout'), current_setting('search_path'), "
    probe += "current_schemas(false)::text"
    with psycopg.connect(any_proxy.pg.dsn(), options=options, connect_timeout=10) as direct:
        expected = direct.execute(probe).fetchone()
    assert expected == ("4321ms", "pg_catalog,public", "{pg_catalog,public}")
    with (
        psycopg.connect(
            any_proxy.dsn(options=options), autocommit=True, connect_timeout=10
        ) as conn,
        psycopg.connect(any_proxy.dsn(), autocommit=True, connect_timeout=10) as plain,
    ):
        for _ in range(3):
            assert conn.execute(probe).fetchone() == expected
            assert plain.execute(probe).fetchone() == ("0", '"$user", public', "{public}")


def test_proxy_stops_cleanly_with_linked_clients(proxy_factory: Any, mode: str) -> None:
    """Stopping the proxy while clients hold server connections (inside a transaction) ends
    every task without an error and closes every socket."""
    proxy = proxy_factory(pool={"pool_mode": mode})
    conns = [psycopg.connect(proxy.dsn(), connect_timeout=10) for _ in range(8)]
    try:
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)  # a transaction is open
        proxy.thread.stop(timeout=30)  # raises if the proxy's trio.run ended with an error
    finally:
        for conn in conns:
            conn.close()


# ------------------------------------------------------------------------------ asyncpg


def _asyncpg_ssl(proxy: RunningProxy) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(proxy.tls.ca_cert))
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    return context


async def _asyncpg_connect(proxy: RunningProxy, **kwargs: Any) -> Any:
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=kwargs.pop("user", APP_USER),
        password=kwargs.pop("password", "app-secret"),
        database="app",
        ssl=_asyncpg_ssl(proxy),
        timeout=10,
        **kwargs,
    )


def _run_async(coro: Any) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout=60)

    return asyncio.run(bounded())


def test_asyncpg_fetch(any_proxy: RunningProxy) -> None:
    async def main() -> None:
        conn = await _asyncpg_connect(any_proxy)
        try:
            assert await conn.fetchval("select 1 + $1::int", 41) == 42
            rows = await conn.fetch(
                "select g, g::text as t from generate_series(1, $1::int) g", 1000
            )
            assert len(rows) == 1000
            assert rows[999]["t"] == "1000"
            row = await conn.fetchrow("select $1::text as a, $2::bytea as b", "x", b"\x00\x01")
            assert (row["a"], row["b"]) == ("x", b"\x00\x01")
            # A prepared statement used many times.
            stmt = await conn.prepare("select $1::int * 3")
            assert [await stmt.fetchval(i) for i in range(10)] == [i * 3 for i in range(10)]
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                await conn.fetchval("select 1 / $1::int", 0)
            assert await conn.fetchval("select 'after error'") == "after error"
            # A timeout makes asyncpg send a CancelRequest (its own connection) and wait for
            # the query to end; the connection stays usable.
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("select pg_sleep(20)", timeout=1)
            assert time.monotonic() - started < 10
            assert await conn.fetchval("select 'after cancel'") == "after cancel"
        finally:
            await conn.close()

    _run_async(main())


def test_asyncpg_executemany_transaction_copy(any_proxy: RunningProxy, table: str) -> None:
    async def main() -> None:
        conn = await _asyncpg_connect(any_proxy)
        other = await _asyncpg_connect(any_proxy, user="alice", password="alice-proxy-pw")
        try:
            await conn.execute(f"create table {table} (id int primary key, name text)")
            await conn.executemany(
                f"insert into {table} values ($1, $2)", [(i, f"n{i}") for i in range(100)]
            )
            assert await other.fetchval(f"select count(*) from {table}") == 100

            async with conn.transaction():
                await conn.execute(f"insert into {table} values (1000, 'committed')")
            assert await other.fetchval(f"select name from {table} where id = 1000") == "committed"

            class Boom(Exception):
                pass

            count_1001 = f"select count(*) from {table} where id = 1001"

            async def insert_then_fail() -> None:
                async with conn.transaction():
                    await conn.execute(f"insert into {table} values (1001, 'rolled back')")
                    assert await conn.fetchval(count_1001) == 1
                    # Not visible to another session before commit.
                    assert await other.fetchval(count_1001) == 0
                    raise Boom

            with pytest.raises(Boom):
                await insert_then_fail()
            assert await conn.fetchval(count_1001) == 0
            assert await other.fetchval(count_1001) == 0

            records = [(2000 + i, f"copied {i}") for i in range(5000)]
            result = await conn.copy_records_to_table(
                table, records=records, columns=["id", "name"]
            )
            assert result == "COPY 5000"
            assert await other.fetchval(f"select count(*) from {table}") == 100 + 1 + 5000
            last = await other.fetchval(f"select name from {table} where id = 6999")
            assert last == "copied 4999"
        finally:
            await conn.close()
            await other.close()

    _run_async(main())


# ------------------------------------------------------------------------------ pgbench

BENCH_DB = "trioproxy_bench"


def _pgbench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pgbench", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=_clean_env(PGCONNECT_TIMEOUT="10", **env),
        check=False,
    )


def _fresh_database(pg: PostgresServer, name: str) -> None:
    pg.psql("-c", f"drop database if exists {name} with (force)")
    pg.psql("-c", f"create database {name} owner {APP_USER}")


@pytest.fixture(scope="module")
def bench_db(pg: PostgresServer) -> Iterator[str]:
    """Database ``trioproxy_bench`` initialised with ``pgbench -i -s 1`` (directly, once)."""
    _fresh_database(pg, BENCH_DB)
    env = {
        "PGHOST": pg.host,
        "PGPORT": str(pg.port),
        "PGUSER": APP_USER,
        "PGPASSWORD": "app-secret",
        "PGDATABASE": BENCH_DB,
    }
    _ok(_pgbench(env, "-i", "-s", "1", "-q"))
    yield BENCH_DB
    pg.psql("-c", f"drop database if exists {BENCH_DB} with (force)")


@pytest.fixture
def bench_proxy(pg: PostgresServer, tls_files: TLSFiles, mode: str) -> Iterator[RunningProxy]:
    # Our own proxy, as the brief asks (proxy_factory works too; this one is explicit).
    thread = ProxyThread(build_config(pg, tls_files, pool={"pool_mode": mode}))
    thread.start()
    try:
        yield RunningProxy(thread, pg, tls_files)
    finally:
        thread.stop()


_PROCESSED = re.compile(r"number of transactions actually processed: (\d+)/(\d+)")
_FAILED = re.compile(r"number of failed transactions: (\d+)")


@pytest.mark.parametrize("protocol", ["simple", "extended", "prepared"])
def test_pgbench(bench_db: str, bench_proxy: RunningProxy, protocol: str) -> None:
    env = {**bench_proxy.env(), "PGDATABASE": bench_db}
    started = time.monotonic()
    out = _ok(_pgbench(env, "-M", protocol, "-c", "4", "-j", "2", "-t", "50", "-n"))
    elapsed = time.monotonic() - started
    processed = _PROCESSED.search(out)
    failed = _FAILED.search(out)
    assert processed is not None, out
    assert failed is not None, out
    assert (processed.group(1), processed.group(2)) == ("200", "200"), out
    assert failed.group(1) == "0", out
    assert elapsed < SUBPROCESS_TIMEOUT


def test_pgbench_init_through_proxy(pg: PostgresServer, proxy_factory: Any, mode: str) -> None:
    """``pgbench -i`` itself (DDL, client-side COPY of 100k rows, VACUUM) through the proxy."""
    name = f"{BENCH_DB}_init"
    _fresh_database(pg, name)
    try:
        proxy = proxy_factory(pool={"pool_mode": mode})
        env = {**proxy.env(), "PGDATABASE": name}
        _ok(_pgbench(env, "-i", "-s", "1", "-q"))
        count = pg.psql("-c", "select count(*) from pgbench_accounts", dbname=name)
        assert count.strip() == "100000"
        out = _ok(_pgbench(env, "-c", "2", "-j", "2", "-t", "20", "-n"))
        assert "number of failed transactions: 0" in out, out
    finally:
        pg.psql("-c", f"drop database if exists {name} with (force)")
