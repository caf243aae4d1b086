"""Faults between the proxy and PostgreSQL that a real server cannot be asked to produce
(issue 7): a connection dropped or reset mid-transaction, a server that stalls, a server
that sends garbage.

:class:`FaultyRelay` is a small thread-based TCP relay configured as the proxy's backend
(``[backend] host/port``); it forwards bytes to the real test PostgreSQL and can, per
server connection, ``drop()`` it (FIN both ways), ``reset()`` it (RST), ``stall()`` it
(stop forwarding in both directions, sockets left open) or ``inject()`` bytes towards the
proxy. Each relayed connection is identified by the port its upstream socket uses, which
PostgreSQL reports as ``pg_stat_activity.client_port``, so a test can find the one a
client is using from ``pg_backend_pid()``.

Rules: loopback only; the relay, its threads and sockets are closed by the fixture; every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import attrs
import psycopg
import pytest

from tests.integration.test_hostile_clients import good_client, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fix_pg import PostgresServer

TIMEOUT = 10.0


@attrs.define(eq=False)
class Pair:
    """One relayed connection: proxy side and server side sockets."""

    downstream: socket.socket  # the proxy's server connection, accepted here
    upstream: socket.socket  # ours, to PostgreSQL
    upstream_port: int
    stalled: threading.Event = attrs.field(factory=threading.Event)
    closed: threading.Event = attrs.field(factory=threading.Event)
    #: Set when the proxy closed its end (EOF or error on the downstream side).
    proxy_closed: threading.Event = attrs.field(factory=threading.Event)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def close(self, *, reset: bool = False) -> None:
        with self.lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for sock in (self.downstream, self.upstream):
                if reset:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class FaultyRelay:
    """A TCP relay to PostgreSQL with fault switches (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.host, self.port = self.listener.getsockname()[:2]
        self.pairs: list[Pair] = []
        #: New connections are accepted but stalled from the first byte.
        self.stall_new = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._spawn(self._accept_loop)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                downstream, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=TIMEOUT)
            except OSError:
                downstream.close()
                continue
            pair = Pair(downstream, upstream, upstream.getsockname()[1])
            if self.stall_new.is_set():
                pair.stalled.set()
            with self._lock:
                self.pairs.append(pair)
            self._spawn(self._pump, pair, downstream, upstream, True)
            self._spawn(self._pump, pair, upstream, downstream, False)

    def _pump(self, pair: Pair, source: socket.socket, dest: socket.socket, up: bool) -> None:
        """Forward source -> dest until either side closes.

        While the pair is stalled nothing is forwarded either way: the server's bytes stay
        unread (in PostgreSQL's socket), the proxy's are read and held back, so the relay
        still notices when the proxy closes its end.
        """
        held = bytearray()
        try:
            while not (self._stop.is_set() or pair.closed.is_set()):
                stalled = pair.stalled.is_set()
                if stalled and not up:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select([source], [], [], 0.05)
                if ready:
                    data = source.recv(65536)
                    if not data:
                        if up:
                            pair.proxy_closed.set()
                        break
                    held += data
                if held and not pair.stalled.is_set():
                    dest.sendall(held)
                    held.clear()
        except (OSError, ValueError):
            if up:
                pair.proxy_closed.set()
        finally:
            pair.close()

    # --- fault switches -----------------------------------------------------------

    def pair_for_port(self, port: int) -> Pair:
        with self._lock:
            matches = [p for p in self.pairs if p.upstream_port == port]
        assert len(matches) == 1, f"no relayed connection uses port {port}"
        return matches[0]

    def inject(self, pair: Pair, data: bytes) -> None:
        """Send ``data`` to the proxy as if the server had said it."""
        with pair.lock:
            pair.downstream.sendall(data)

    def live_pairs(self) -> list[Pair]:
        with self._lock:
            return [p for p in self.pairs if not p.closed.is_set()]

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for pair in list(self.pairs):
            pair.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)


@pytest.fixture
def relay(pg: PostgresServer) -> Iterator[FaultyRelay]:
    relay = FaultyRelay(pg.host, pg.port)
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture
def faulty_proxy(proxy_factory: Any, relay: FaultyRelay) -> Any:
    def start(**sections: Any) -> Any:
        backend = sections.pop("backend", {})
        return proxy_factory(
            backend={"host": relay.host, "port": relay.port, **backend}, **sections
        )

    return start


def server_pair(conn: psycopg.Connection[Any], pg: PostgresServer, relay: FaultyRelay) -> Pair:
    """The relayed connection the client ``conn`` is on right now (call inside a
    transaction in transaction mode, so the answer stays true)."""
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    port = pg.psql("-c", f"select client_port from pg_stat_activity where pid = {row[0]}")
    return relay.pair_for_port(int(port.strip()))


# ------------------------------------------------------------------ dropped / reset


@pytest.mark.parametrize("how", ["drop", "reset"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_server_connection_lost_mid_transaction(
    faulty_proxy: Any, relay: FaultyRelay, pg: PostgresServer, mode: str, how: str
) -> None:
    """Only the client whose server connection died gets an error (08006, FATAL: the
    proxy cannot continue a transaction on another connection); it reconnects and its next
    transaction works on a fresh server connection; the good client never notices."""
    proxy = faulty_proxy(pool={"pool_mode": mode, "max_connections": 3})
    with good_client(proxy) as good:
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as victim:
            victim.execute("select 'in a transaction'")  # psycopg opened it: BEGIN
            pair = server_pair(victim, pg, relay)
            since = good.rounds
            pair.close(reset=how == "reset")
            with pytest.raises(psycopg.OperationalError) as caught:
                victim.execute("select 'after the failure'")
            assert caught.value.sqlstate in ("08006", None), caught.value
            assert "server connection lost" in str(caught.value), str(caught.value)
            good.wait_progress(since)
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as again:
            assert again.execute("select 'fresh'").fetchone() == ("fresh",)
            assert server_pair(again, pg, relay) is not pair
            again.commit()


def test_server_connection_lost_between_autocommit_statements(
    faulty_proxy: Any, relay: FaultyRelay, pg: PostgresServer
) -> None:
    """Transaction mode, autocommit: a statement in flight when the server connection
    dies gets an error (08006) but the client connection stays open; its next statement
    runs on a fresh server connection."""
    proxy = faulty_proxy(pool={"pool_mode": "transaction", "max_connections": 3})
    with (
        good_client(proxy) as good,
        psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as victim,
    ):
        result: list[object] = []
        started = threading.Event()

        def run() -> None:
            started.set()
            try:
                result.append(victim.execute("select pg_sleep(3) /* slow_marker */").fetchone())
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.wait(5)
        marker = "slow_marker"
        wait_until(
            lambda: (
                pg.psql(
                    "-c",
                    f"select count(*) from pg_stat_activity where query like '%{marker}%' "
                    "and pid <> pg_backend_pid()",
                ).strip()
                == "1"
            ),
            10,
            "the slow query to start",
        )
        port = pg.psql(
            "-c",
            f"select client_port from pg_stat_activity where query like '%{marker}%' "
            "and pid <> pg_backend_pid()",
        )
        since = good.rounds
        relay.pair_for_port(int(port.strip())).close(reset=True)
        thread.join(10)
        assert not thread.is_alive()
        [error] = result
        assert isinstance(error, psycopg.OperationalError), error
        assert error.sqlstate == "08006", error
        assert not victim.closed
        assert victim.execute("select 'next statement'").fetchone() == ("next statement",)
        good.wait_progress(since)


# ------------------------------------------------------------------------- stall


def test_stalled_server_has_no_proxy_timeout(
    faulty_proxy: Any, relay: FaultyRelay, pg: PostgresServer
) -> None:
    """The server connection goes silent mid-query (no bytes, no close). Today the proxy
    has no server-side timeout: the client waits until *it* gives up (here: 3 s). When it
    goes away, the proxy closes that server connection (never returns it to the pool) and
    other clients are served throughout."""
    proxy = faulty_proxy(pool={"pool_mode": "transaction", "max_connections": 3})
    with good_client(proxy) as good:
        victim = psycopg.connect(proxy.dsn(), connect_timeout=10)
        try:
            pair = server_pair(victim, pg, relay)
            pair.stalled.set()
            since = good.rounds
            result: list[object] = []

            def run() -> None:
                try:
                    result.append(victim.execute("select 'never answered'").fetchone())
                except BaseException as exc:
                    result.append(exc)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            thread.join(3)
            assert thread.is_alive(), f"the stalled query returned: {result}"
            good.wait_progress(since)
        finally:
            # The client gives up: shut its socket down under psycopg.
            sock = socket.socket(fileno=os.dup(victim.pgconn.socket))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            thread.join(10)
            victim.close()
        assert not thread.is_alive()
        assert isinstance(result[0], psycopg.OperationalError), result
        # The proxy closes the stalled server connection as soon as the client is gone.
        wait_until(pair.proxy_closed.is_set, 10, "the proxy to close the stalled connection")
        good.wait_progress(good.rounds)


def test_stalled_server_at_login_hits_connect_timeout(
    faulty_proxy: Any, relay: FaultyRelay
) -> None:
    """A server that accepts TCP but never answers the login: ``[backend]
    connect_timeout`` bounds the wait and the client gets a clear error."""
    proxy = faulty_proxy(
        backend={"connect_timeout": 1},
        pool={"pool_mode": "transaction", "max_connections": 3, "connection_borrow_timeout": 3},
    )
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        conn.execute("select 1")  # one healthy server connection, borrowed below
    relay.stall_new.set()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as caught:
        # A different user -> a new pool -> a new server connection, stalled from byte 1.
        psycopg.connect(proxy.dsn(user="alice"), connect_timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed
    assert "timeout" in str(caught.value).lower() or "timed out" in str(caught.value), str(
        caught.value
    )


# ----------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x00\x00\x00\x02junk", id="length-below-4"),
        pytest.param(b"Z\x7f\xff\xff\xff", id="huge-length"),
        pytest.param(b"Z\x00\x00\x00\x05X", id="bad-ready-for-query"),
    ],
)
def test_server_sends_garbage(
    faulty_proxy: Any, relay: FaultyRelay, pg: PostgresServer, garbage: bytes
) -> None:
    """Bytes from the server that break the protocol: that client gets an error, its
    server connection is closed, others are fine."""
    proxy = faulty_proxy(
        proxy={"max_message_size": 1024 * 1024},
        pool={"pool_mode": "transaction", "max_connections": 3},
    )
    with good_client(proxy) as good:
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as victim:
            pair = server_pair(victim, pg, relay)  # inside psycopg's transaction
            since = good.rounds
            pair.stalled.set()  # keep the real server's bytes out of the way
            relay.inject(pair, garbage)
            with pytest.raises(psycopg.Error) as caught:
                victim.execute("select 'after garbage'")
            assert isinstance(caught.value, psycopg.OperationalError), repr(caught.value)
            print(f"{garbage!r}: {caught.value.sqlstate} {caught.value}")
            assert caught.value.sqlstate == "08006", str(caught.value)
            assert "protocol error from server" in str(caught.value), str(caught.value)
            good.wait_progress(since)
        wait_until(pair.proxy_closed.is_set, 10, "the proxy to close the broken connection")
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as again:
            assert again.execute("select 'fine'").fetchone() == ("fine",)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_backend_terminated_mid_transaction(
    proxy_factory: Any, pg: PostgresServer, mode: str
) -> None:
    """pg_terminate_backend on the server connection of a client inside a transaction:
    that client gets the error (the server's FATAL 57P01, or 08006 if the proxy saw the
    close first) and its next connection works; the good client never notices."""
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 3})
    with good_client(proxy) as good:
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as victim:
            row = victim.execute("select pg_backend_pid()").fetchone()  # in a transaction
            assert row is not None
            since = good.rounds
            pg.psql("-c", f"select pg_terminate_backend({row[0]})")
            with pytest.raises(psycopg.OperationalError) as caught:
                victim.execute("select 'after terminate'")
            assert caught.value.sqlstate in ("57P01", "08006", None), caught.value
            good.wait_progress(since)
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as again:
            assert again.execute("select 'fresh'").fetchone() == ("fresh",)
