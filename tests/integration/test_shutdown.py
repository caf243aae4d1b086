"""Graceful shutdown: SIGTERM (the CLI) and ``Proxy.drain()`` (embedders).

Rules: the proxy runs as a real ``python -m trioproxy`` subprocess for the signal test and
in a thread (``ProxyThread``) otherwise; every client thread is bounded by deadlines and
joined; every table a test creates has a unique name.

What is checked: no transaction a client saw COMMIT succeed for is lost; no client saw a
half-answered statement (each statement either returned its own complete result or the
connection ended with FATAL 57P01 / a connection error between statements); idle clients
are told at once; the exit status is 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import psycopg
import pytest
from psycopg import errors

from tests.fix_pg import APP_PASSWORD, APP_USER, PostgresServer, _free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]


@attrs.define
class Worker:
    """One client doing numbered INSERT transactions until its connection ends."""

    dsn: str
    table: str
    client: int
    committed: list[int] = attrs.field(factory=list)
    error: BaseException | None = None
    bad: list[str] = attrs.field(factory=list)

    def run(self, stop_at: float) -> None:
        try:
            # No server-side prepared statements: they pin a session to its server
            # connection, and pinned sessions are only cut at shutdown_timeout.
            conn = psycopg.connect(self.dsn, connect_timeout=10, prepare_threshold=None)
        except psycopg.OperationalError as exc:
            self.error = exc
            return
        try:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                with conn.transaction():
                    row = conn.execute(
                        f"insert into {self.table} (client, n) values (%s, %s) returning n",
                        (self.client, n),
                    ).fetchone()
                    if row != (n,):
                        self.bad.append(f"insert {n} answered {row!r}")
                    count = conn.execute("select count(*) from generate_series(1, 50)").fetchone()
                    if count != (50,):
                        self.bad.append(f"select answered {count!r}")
                self.committed.append(n)  # COMMIT succeeded
        except psycopg.Error as exc:
            self.error = exc
        finally:
            conn.close()


def _acceptable_end(exc: BaseException | None) -> bool:
    """A clean end: FATAL 57P01 from the proxy, or the connection closed."""
    if exc is None:
        return True
    if isinstance(exc, errors.AdminShutdown):
        return "trioproxy shutdown" in str(exc)
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate in (None, "08006", "57P01")


def _create_table(pg: PostgresServer) -> str:
    table = f"shutdown_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"create table {table} (client int, n int, primary key (client, n))")
    return table


def _rows(pg: PostgresServer, table: str) -> set[tuple[int, int]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        rows = conn.execute(f"select client, n from {table}").fetchall()
        conn.execute(f"drop table {table}")
    return {(int(c), int(n)) for c, n in rows}


# --- the CLI under load ----------------------------------------------------------------


def _write_config(tmp_path: Path, pg: PostgresServer, port: int) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{port}"
shutdown_timeout = 15

[backend]
host = "{pg.host}"
port = {pg.port}

[pool]
pool_mode = "transaction"
max_connections = 4

[users.{APP_USER}]
password_env = "TRIOPROXY_TEST_APP_PASSWORD"
"""
    )
    return path


@pytest.fixture
def cli_proxy(tmp_path: Path, pg: PostgresServer) -> Iterator[tuple[subprocess.Popen[str], int]]:
    env = {**os.environ, "TRIOPROXY_TEST_APP_PASSWORD": APP_PASSWORD}
    proc: subprocess.Popen[str] | None = None
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "trioproxy", "--config", str(_write_config(tmp_path, pg, port))],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    assert proc is not None
    assert proc.poll() is None, "trioproxy did not start"
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_sigterm_under_load_loses_no_committed_transaction(
    cli_proxy: tuple[subprocess.Popen[str], int], pg: PostgresServer
) -> None:
    proc, port = cli_proxy
    table = _create_table(pg)
    dsn = (
        f"host=127.0.0.1 port={port} dbname=app user={APP_USER} password={APP_PASSWORD}"
        " sslmode=disable"
    )
    workers = [Worker(dsn, table, client) for client in range(8)]
    stop_at = time.monotonic() + 30  # bounded even if the proxy never stops
    threads = [threading.Thread(target=w.run, args=(stop_at,)) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while sum(len(w.committed) for w in workers) < 80 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"trioproxy did not stop within 30 s of SIGTERM:\n{err}")
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "received SIGTERM, shutting down" in err
    assert "all clients finished" in err, err

    rows = _rows(pg, table)
    committed = {(w.client, n) for w in workers for n in w.committed}
    assert len(committed) >= 80
    assert committed <= rows, f"lost: {sorted(committed - rows)[:10]}"
    for w in workers:
        assert not w.bad, w.bad
        assert w.error is not None, "a client went on after the proxy stopped"
        assert _acceptable_end(w.error), repr(w.error)
    # Every client that was between transactions when SIGTERM came got the FATAL.
    assert any(isinstance(w.error, errors.AdminShutdown) for w in workers)


# --- embedded: Proxy.drain() -----------------------------------------------------------


def test_idle_client_gets_fatal_57p01_and_new_ones_are_refused(proxy_factory) -> None:
    proxy = proxy_factory(pool={"pool_mode": "transaction"})
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        assert conn.execute("select 1").fetchone() == (1,)
        started = time.monotonic()
        proxy.thread.drain(timeout=10)
        assert time.monotonic() - started < 5  # nobody busy: no need to wait
        with pytest.raises(errors.AdminShutdown) as caught:
            conn.execute("select 1")
        assert caught.value.sqlstate == "57P01"
        assert "trioproxy shutdown" in str(caught.value)
    finally:
        conn.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(), connect_timeout=3)


def test_drain_lets_the_open_transaction_finish(proxy_factory, pg) -> None:
    proxy = proxy_factory(pool={"pool_mode": "transaction"})
    table = _create_table(pg)
    conn = psycopg.connect(proxy.dsn())
    try:
        conn.execute(f"insert into {table} values (1, 1)")  # a transaction is open
        drainer = threading.Thread(target=proxy.thread.drain, kwargs={"timeout": 20})
        drainer.start()
        time.sleep(0.3)
        assert drainer.is_alive()  # waiting for our transaction
        conn.execute(f"insert into {table} values (1, 2)")  # still served
        conn.commit()
        drainer.join(timeout=10)
        assert not drainer.is_alive()
        with pytest.raises(errors.AdminShutdown):
            conn.execute("select 1")
    finally:
        conn.close()
    assert _rows(pg, table) == {(1, 1), (1, 2)}


def test_drain_timeout_cuts_what_is_left(proxy_factory, pg) -> None:
    proxy = proxy_factory(pool={"pool_mode": "transaction"})
    table = _create_table(pg)
    conn = psycopg.connect(proxy.dsn())
    try:
        conn.execute(f"insert into {table} values (2, 1)")  # never committed
        started = time.monotonic()
        proxy.thread.drain(timeout=0.5)
        assert time.monotonic() - started < 5
        with pytest.raises(psycopg.OperationalError):
            conn.execute("commit")
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server rolls back once its backend notices
        with psycopg.connect(pg.dsn(), autocommit=True) as check:
            busy = check.execute(
                "select count(*) from pg_stat_activity where state like 'idle in transaction%%'"
                " and datname = 'app'"
            ).fetchone()
        if busy == (0,):
            break
        time.sleep(0.05)
    rows = _rows(pg, table)
    assert rows == set()


def test_second_sigterm_stops_at_once(
    cli_proxy: tuple[subprocess.Popen[str], int], pg: PostgresServer
) -> None:
    proc, port = cli_proxy
    dsn = (
        f"host=127.0.0.1 port={port} dbname=app user={APP_USER} password={APP_PASSWORD}"
        " sslmode=disable"
    )
    conn = psycopg.connect(dsn)
    try:
        conn.execute("select 1")  # a transaction stays open: the drain would wait 15 s
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # draining, waiting for our transaction
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0, err
        assert "received SIGTERM again, stopping now" in err, err
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 2")
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["pinned", "session"])
def test_drain_does_not_wait_for_idle_pinned_or_session_clients(proxy_factory, mode) -> None:
    proxy = proxy_factory(pool={"pool_mode": "transaction" if mode == "pinned" else "session"})
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    try:
        conn.execute("listen drain_test")  # pins in transaction mode
        assert conn.execute("select 1").fetchone() == (1,)
        started = time.monotonic()
        proxy.thread.drain(timeout=20)
        assert time.monotonic() - started < 5  # released at once, not after the timeout
        with pytest.raises(errors.AdminShutdown):
            conn.execute("select 1")
    finally:
        conn.close()
