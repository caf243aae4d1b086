"""Failover: the writer dies, a streaming standby is promoted, the proxy follows.

A real primary and a real standby (pg_basebackup -R). Clients through the proxy keep their
sockets open across the failover: statements in flight at the moment of failure get an
error, later ones wait for the new writer (within connection_borrow_timeout) and succeed.
The same workload connecting directly (libpq multi-host, target_session_attrs=read-write)
is measured beside it, and both error windows are printed.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.fix_pg import APP_DB, APP_PASSWORD, APP_USER, REPLICATION_HBA, create_standby
from tests.integration.test_operations import admin, metrics_url, rows, scrape, value

pytestmark = pytest.mark.slow


class Worker(threading.Thread):
    """Autocommit inserts in a loop; records (time, ok) for every attempt."""

    def __init__(self, connect, tag: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.connect, self.tag, self.stop = connect, tag, stop
        self.results: list[tuple[float, bool]] = []
        self.reconnects = 0

    def run(self) -> None:
        conn = None
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if conn is None or conn.closed:
                    if conn is not None:
                        self.reconnects += 1
                    conn = self.connect()
                conn.execute("insert into failover_log values (%s, %s)", (self.tag, i))
                self.results.append((time.monotonic(), True))
            except psycopg.Error:
                self.results.append((time.monotonic(), False))
                if conn is not None and conn.broken:
                    conn.close()
                time.sleep(0.05)
            time.sleep(0.01)
        if conn is not None:
            conn.close()


def _window(workers: list[Worker]) -> tuple[float, int]:
    """(seconds from the first error to the last one, number of errors)."""
    errors = [t for w in workers for t, ok in w.results if not ok]
    return (max(errors) - min(errors), len(errors)) if errors else (0.0, 0)


def test_failover_to_a_promoted_standby_keeps_client_sockets(pg_factory, proxy_factory):
    primary = pg_factory(hba_lines=[REPLICATION_HBA])
    primary.psql("-c", "create table failover_log (tag text, n int)", dbname=APP_DB)
    primary.psql("-c", f"grant insert, select on failover_log to {APP_USER}", dbname=APP_DB)
    standby = create_standby(primary)
    proxy = proxy_factory(
        primary,
        backend={"targets": [f"127.0.0.1:{primary.port}", f"127.0.0.1:{standby.port}"]},
        pool={"pool_mode": "transaction", "max_connections": 4, "connection_borrow_timeout": 30},
    )
    direct_dsn = (
        f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} dbname={APP_DB} "
        f"user={APP_USER} password={APP_PASSWORD} target_session_attrs=read-write "
        "connect_timeout=2"
    )
    stop = threading.Event()
    through_proxy = [
        Worker(lambda: psycopg.connect(proxy.dsn(), autocommit=True), f"p{i}", stop)
        for i in range(4)
    ]
    direct = [
        Worker(lambda: psycopg.connect(direct_dsn, autocommit=True), f"d{i}", stop)
        for i in range(4)
    ]
    for worker in through_proxy + direct:
        worker.start()
    try:
        time.sleep(1.5)
        assert all(any(ok for _, ok in w.results) for w in through_proxy + direct)
        failed_at = time.monotonic()
        primary.stop("immediate")  # the writer dies
        time.sleep(1.0)
        standby._pg_ctl("promote", "-w")  # the standby becomes the writer
        promoted_at = time.monotonic()
        deadline = promoted_at + 30
        while time.monotonic() < deadline:  # until every client succeeds again
            if all(
                any(ok and t > promoted_at for t, ok in w.results) for w in through_proxy + direct
            ):
                break
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in through_proxy + direct:
            worker.join(15)
    proxy_window, proxy_errors = _window(through_proxy)
    direct_window, direct_errors = _window(direct)
    print(
        f"\nfailover: writer down at 0 s, standby promoted at {promoted_at - failed_at:.1f} s; "
        f"through trioproxy: {proxy_errors} errors over {proxy_window:.2f} s, "
        f"{sum(w.reconnects for w in through_proxy)} reconnects; "
        f"direct (libpq multi-host): {direct_errors} errors over {direct_window:.2f} s, "
        f"{sum(w.reconnects for w in direct)} reconnects"
    )
    for worker in through_proxy:
        assert any(ok and t > promoted_at for t, ok in worker.results), worker.tag
        assert worker.reconnects == 0  # the client socket stayed open throughout
    # at most the statements in flight when the writer died fail through the proxy
    assert proxy_errors <= len(through_proxy) * 2
    assert proxy.proxy.targets.writer == ("127.0.0.1", standby.port)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_read_only_endpoint_spreads_clients_over_standbys(pg_factory, proxy_factory) -> None:
    primary = pg_factory(hba_lines=[REPLICATION_HBA])
    standbys = [create_standby(primary), create_standby(primary)]
    reader_port = _free_port()
    proxy = proxy_factory(
        primary,
        backend={
            "targets": [f"127.0.0.1:{s.port}" for s in (primary, *standbys)],
        },
        pool={"pool_mode": "transaction", "max_connections": 6},
        endpoints=[{"listen": f"127.0.0.1:{reader_port}", "role": "read-only"}],
        proxy={"admin_users": [APP_USER], "metrics_listen": "127.0.0.1:0"},
    )
    roles = {a.port: a.role.value for a in proxy.thread.addresses}
    assert roles[reader_port] == "read-only"
    reader_dsn = proxy.dsn().replace(f"port='{proxy.port}'", f"port='{reader_port}'")
    with psycopg.connect(proxy.dsn(), autocommit=True) as writer:
        assert writer.execute("select pg_is_in_recovery()").fetchone() == (False,)
    readers = [psycopg.connect(reader_dsn) for _ in range(4)]
    try:
        ports = set()
        for conn in readers:  # each holds its server connection inside a transaction
            assert conn.execute("select pg_is_in_recovery()").fetchone() == (True,)
            ports.add(conn.execute("select current_setting('port')::int").fetchone()[0])
        assert ports == {s.port for s in standbys}  # spread over both standbys
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            readers[0].execute("create table nope (x int)")
        readers[0].rollback()
        # The standbys' pool shows in the admin console and the metrics, apart from the
        # writer's (its 4 clients hold their connections inside transactions).
        with admin(proxy) as console:
            pools = {row["database"]: row for row in rows(console, "SHOW POOLS")}
            servers = rows(console, "SHOW SERVERS")
        assert pools[f"{APP_DB} (read-only)"]["sv_active"] == 3
        assert pools[f"{APP_DB} (read-only)"]["cl_active"] == 4
        assert {row["port"] for row in servers if row["database"] == f"{APP_DB} (read-only)"} <= {
            s.port for s in standbys
        }
        samples = scrape(metrics_url(proxy))
        labels = {"database": APP_DB, "user": APP_USER}
        assert (
            value(samples, "trioproxy_database_connections_borrowed", **labels, role="read-only")
            == 3
        )
        assert value(samples, "trioproxy_database_connections", **labels, role="read-write") >= 1
    finally:
        for conn in readers:
            conn.close()
