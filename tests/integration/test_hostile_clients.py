"""Hostile and broken clients, each while a well-behaved client works (issue 7).

Every test here follows the same shape: a :class:`GoodClient` (psycopg in a thread, a loop
of ``select %s`` with values of its own, every answer checked) runs through the proxy while
a raw-socket client misbehaves. The misbehaving client must get a clear error or a clean
close within a bounded time; the proxy must stay up; the good client must see no error, no
answer that is not its own, and must keep making progress meanwhile.

Rules: loopback only, every socket closed by the test (``contextlib.ExitStack``), every
wait bounded (socket timeouts, deadlines, ``join(timeout)``). Cases already covered by
``test_bad_input.py`` (garbage startup bytes, oversized messages, SSLRequest then
plaintext, SSLRequest inside TLS, unknown cancel key, login timeout) are not repeated.
"""

from __future__ import annotations

import contextlib
import random
import resource
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.integration.test_bad_input import (
    SSL_REQUEST_CODE,
    RawClient,
    _assert_error_or_close,
    error_fields,
    message,
    raw_client,
    raw_login,
    request_packet,
    simple_query,
    startup_packet,
)
from trioproxy._server.limits import raise_fd_limit

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fix_pg import PostgresServer
    from tests.fix_proxy import RunningProxy

# --------------------------------------------------------------------- the good client


class GoodClient:
    """A well-behaved psycopg client in a thread; every answer must be its own.

    Each round sends ``select %s::text, %s::int`` with a value unique to this client and
    round (and every fifth round does it inside an explicit transaction), and checks the
    row that comes back is exactly what it sent.
    """

    def __init__(self, dsn: str, name: str = "good") -> None:
        self.dsn = dsn
        self.token = f"{name}-{uuid.uuid4().hex}"
        self.rounds = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.token, daemon=True)

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, connect_timeout=10, autocommit=True) as conn:
                i = 0
                while not self._stop.is_set():
                    value = f"{self.token}-{i}"
                    if i % 5 == 4:
                        with conn.transaction():
                            row = conn.execute("select %s::text, %s::int", (value, i)).fetchone()
                    else:
                        row = conn.execute("select %s::text, %s::int", (value, i)).fetchone()
                    if row != (value, i):
                        raise AssertionError(f"sent {(value, i)!r}, got {row!r}")
                    i += 1
                    self.rounds = i
                    time.sleep(0.002)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> None:
        self._thread.start()
        self.wait_progress(0)

    def wait_progress(self, since: int, at_least: int = 3, timeout: float = 20) -> None:
        """Wait (bounded) until ``at_least`` more rounds succeeded than ``since``."""
        deadline = time.monotonic() + timeout
        while self.rounds < since + at_least:
            assert not self.errors, f"the good client failed: {self.errors[0]!r}"
            assert self._thread.is_alive(), "the good client stopped"
            assert time.monotonic() < deadline, (
                f"the good client made no progress ({self.rounds - since} rounds in {timeout} s)"
            )
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the good client hangs"
        assert not self.errors, f"the good client failed: {self.errors[0]!r}"


@contextlib.contextmanager
def good_client(proxy: RunningProxy, name: str = "good") -> Iterator[GoodClient]:
    """Run a GoodClient for the duration; on exit it must still be progressing, error-free."""
    client = GoodClient(proxy.dsn(), name)
    client.start()
    try:
        yield client
        client.wait_progress(client.rounds)
    finally:
        client.stop()


def read_error(client: RawClient) -> dict[str, str]:
    """Skip to the next ErrorResponse and return its fields (bounded by the socket timeout)."""
    while True:
        type_, body = client.read_message()
        if type_ == b"E":
            return error_fields(body)


def rss_bytes() -> int:
    """Resident set size of this process (the in-process proxy included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def backend_rows(pg: PostgresServer, where: str) -> list[str]:
    out = pg.psql(
        "-c",
        "select pid || ' ' || state || ' ' || coalesce(wait_event, '-') from pg_stat_activity "
        f"where backend_type = 'client backend' and pid <> pg_backend_pid() and ({where})",
    )
    return out.split("\n")[:-1] if out else []


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------- malformed messages


def _bind_claiming_params() -> bytes:
    # Parse an unnamed two-parameter statement, then a Bind: portal "", statement "",
    # 0 format codes, "2 parameters" - and no bytes for them.
    parse = message(b"P", b"\0select $1::int, $2::int\0" + struct.pack("!h", 0))
    return parse + message(b"B", b"\0\0" + struct.pack("!h", 0) + struct.pack("!h", 2))


POST_LOGIN_FATAL = [
    pytest.param(message(b"y", b"whatever"), id="unknown-type-y"),
    pytest.param(b"Q" + struct.pack("!i", -5), id="negative-length"),
    pytest.param(b"Q" + struct.pack("!i", 2), id="length-below-4"),
    pytest.param(b"S" + struct.pack("!i", 0x7FFFFFFF), id="length-2GB"),
]


@pytest.mark.parametrize("bad", POST_LOGIN_FATAL)
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_bad_framing_after_login(proxy_factory: Any, mode: str, bad: bytes) -> None:
    """Unknown types and impossible lengths after login: the proxy (or the server behind
    it) ends that client with a FATAL error or a close; the good client never notices."""
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 2})
    with good_client(proxy) as good, raw_client(proxy) as client:
        raw_login(client)
        assert simple_query(client, "select 1")[-1] == (b"Z", b"I")
        since = good.rounds
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(bad)
        data = client.read_until_closed()
        _assert_error_or_close(data)
        assert time.monotonic() - started < 5
        if data:
            (length,) = struct.unpack("!i", data[1:5])
            assert error_fields(data[5 : 1 + length])["C"] in ("08P01", "54000")
        good.wait_progress(since)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_bind_too_short_for_its_parameters(proxy_factory: Any, mode: str) -> None:
    """A Bind claiming two parameters with no bytes for them.

    The proxy does not parse Bind; PostgreSQL does and answers ERROR 08P01 "insufficient
    data left in message" (an ERROR, not FATAL: the extended-query error path skips to
    Sync). The same client connection then goes on working, and nothing leaks.
    """
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 2})
    with good_client(proxy) as good, raw_client(proxy) as client:
        raw_login(client)
        since = good.rounds
        client.send(_bind_claiming_params() + message(b"S", b""))
        fields = read_error(client)
        assert fields["C"] == "08P01", fields
        assert fields["S"] == "ERROR", fields
        assert "insufficient data" in fields["M"], fields
        assert client.read_message() == (b"Z", b"I")
        answer = simple_query(client, "select 'still here'")
        assert [t for t, _ in answer] == [b"T", b"D", b"C", b"Z"]
        assert answer[1][1].endswith(b"still here")
        good.wait_progress(since)


_NAMED_PARSE = message(b"P", b"s1\0select 1\0" + struct.pack("!h", 0))


def _too_short_cases() -> list[Any]:
    cases = {
        # decoded by the proxy only to look for session state: unparsable -> pinned, forwarded
        "parse-empty": (message(b"P", b""), False),
        "close-empty": (message(b"C", b""), False),
        "query-unterminated": (message(b"Q", b"select 1"), False),
        # named Parse / Bind: in transaction mode they go through the statement mapper
        "parse-unterminated": (message(b"P", b"name-without-nul"), True),
        "parse-negative-count": (message(b"P", b"s2\0select 1\0" + struct.pack("!h", -1)), True),
        "parse-count-too-big": (message(b"P", b"s3\0select 1\0" + struct.pack("!h", 9)), True),
        "parse-bad-utf8": (message(b"P", b"\xff\xfe\0select 1\0\0\0"), True),
        "bind-unterminated-after-named-parse": (_NAMED_PARSE + message(b"B", b"no-nul"), True),
    }
    params = []
    for mode in ("session", "transaction"):
        for name, (data, mapped) in cases.items():
            del mapped  # both paths must refuse it the same way (08P01), mapper or not
            params.append(pytest.param(mode, data, id=f"{mode}-{name}"))
    return params


@pytest.mark.parametrize(("mode", "bad"), _too_short_cases())
def test_inspected_message_too_short(proxy_factory: Any, mode: str, bad: bytes) -> None:
    """Parse / Close / Query / Bind bodies the proxy itself decodes, cut short or invalid.

    What happens: the proxy cannot decode them, pins the session ("unparsable statement")
    and forwards them; PostgreSQL answers with an error (ERROR or FATAL 08P01). Either way
    that client gets a protocol-violation error, never a hang, and the proxy does not
    crash.
    """
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 2})
    with good_client(proxy) as good, raw_client(proxy) as client:
        raw_login(client)
        since = good.rounds
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(bad + message(b"S", b""))
        fields = read_error(client)
        # 08P01 protocol violation; 22021 (invalid UTF-8) from PostgreSQL for the bad name
        assert fields["C"] in ("08P01", "22021"), fields
        if fields["S"] == "FATAL":
            assert client.read_until_closed() == b""
        else:
            assert client.read_message() == (b"Z", b"I")
            assert simple_query(client, "select 1")[-1] == (b"Z", b"I")
        good.wait_progress(since)


# --------------------------------------------------------------------- slow logins


def test_slowloris_startup_is_cut_by_login_timeout(proxy_factory: Any) -> None:
    """A startup packet trickled one byte at a time never finishes: client_login_timeout
    bounds the whole login, however busy the client looks."""
    proxy = proxy_factory(proxy={"client_login_timeout": 1.5}, pool={"pool_mode": "transaction"})
    packet = startup_packet({"user": "app", "database": "app", "application_name": "x" * 200})
    with good_client(proxy) as good, raw_client(proxy) as client:
        since = good.rounds
        started = time.monotonic()
        closed = False
        for byte in packet[:-1]:
            try:
                client.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 4:
                break
        data = client.read_until_closed()
        elapsed = time.monotonic() - started
        assert closed or data, "the proxy never answered the trickling client"
        assert elapsed < 5, f"closed after {elapsed:.1f} s (client_login_timeout 1.5 s)"
        _assert_error_or_close(data)
        if data:
            (length,) = struct.unpack("!i", data[1:5])
            assert error_fields(data[5 : 1 + length])["C"] == "08P01"
        good.wait_progress(since)


def test_thousands_of_half_open_connections(proxy_factory: Any) -> None:
    """2,000 connections that send nothing or half a startup packet, while the good client
    works; client_login_timeout closes every one of them and the proxy forgets them."""
    count = 2000
    soft, _hard = raise_fd_limit()
    if soft != -1 and soft < 3 * count + 500:
        pytest.skip(f"open-file limit {soft} too low for {count} connections on both ends")
    proxy = proxy_factory(
        proxy={"client_login_timeout": 3, "debug_logging": False},
        pool={"pool_mode": "transaction"},
    )
    half = startup_packet({"user": "app", "database": "app"})[:7]
    with contextlib.ExitStack() as stack, good_client(proxy) as good:
        selector = stack.enter_context(selectors.DefaultSelector())
        socks: list[socket.socket] = []
        baseline = len(proxy.proxy.clients)  # the good client
        started = time.monotonic()
        for i in range(count):
            sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
            stack.callback(sock.close)
            if i % 2:
                sock.sendall(half)
            sock.setblocking(False)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        opened = time.monotonic() - started
        since = good.rounds
        good.wait_progress(since)  # served while 2,000 sockets sit there
        wait_until(
            lambda: len(proxy.proxy.clients) >= baseline + count,
            10,
            "the proxy to accept every socket",
        )
        # Every socket is closed by the proxy (EOF or reset, maybe after a FATAL error).
        open_socks = set(socks)
        deadline = time.monotonic() + 3 + 15
        while open_socks:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(open_socks)} of {count} still open after the timeout"
            for key, _ in selector.select(timeout=min(remaining, 1)):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    data = ready.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(ready)
                    open_socks.discard(ready)
                else:
                    assert data[:1] == b"E", data[:32]
        closed_after = time.monotonic() - started
        wait_until(lambda: len(proxy.proxy.clients) == baseline, 10, "the proxy to forget them")
        good.wait_progress(good.rounds)
    print(
        f"{count} half-open connections: opened in {opened:.2f} s, all closed {closed_after:.2f} s"
    )


# ------------------------------------------------------------- TLS without the dance


def _client_hello(alpn: list[str] | None) -> bytes:
    """A real TLS ClientHello, from an ssl.SSLObject over memory BIOs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a handshake record
    return hello


@pytest.mark.parametrize("alpn", [None, ["postgresql"]], ids=["plain", "alpn-postgresql"])
def test_tls_client_hello_without_ssl_request(proxy: RunningProxy, alpn: list[str] | None) -> None:
    """PostgreSQL 17's direct TLS (ClientHello first, ALPN "postgresql") is not supported:
    the proxy reads the record header as a startup length and refuses it at once, with a
    plaintext FATAL error or a close; it never hangs waiting for 369 MB."""
    hello = _client_hello(alpn)
    with good_client(proxy) as good, raw_client(proxy) as client:
        since = good.rounds
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(hello)
        data = client.read_until_closed()
        assert time.monotonic() - started < 3
        _assert_error_or_close(data)
        if data:
            (length,) = struct.unpack("!i", data[1:5])
            assert "startup packet" in error_fields(data[5 : 1 + length])["M"]
        good.wait_progress(since)


def test_second_ssl_request_after_n_is_refused(proxy_factory: Any) -> None:
    """Without TLS the proxy answers N; a second SSLRequest on the same connection is a
    protocol violation (PostgreSQL refuses it: it handles SSLRequest once per connection)."""
    proxy = proxy_factory(pool={"pool_mode": "session"})
    # The fixture always configures TLS; the live proxy reads tls_context per connection,
    # so clearing it makes this proxy answer N to SSLRequest as one without TLS would.
    proxy.proxy.tls_context = None
    with raw_client(proxy) as client:
        client.send(request_packet(SSL_REQUEST_CODE))
        assert client.recv_exact(1) == b"N"
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(request_packet(SSL_REQUEST_CODE))
        client.sock.settimeout(2)
        data = client.read_until_closed()  # TimeoutError: the proxy waits for more
        _assert_error_or_close(data)


# ------------------------------------------------------------ guessed cancel keys


def _send_cancel(host: str, port: int, process_id: int, secret: int) -> float:
    """One CancelRequest; returns how long the proxy took to close the connection."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack("!iiII", 16, 80877102, process_id, secret))
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    return time.monotonic() - started


def test_guessed_cancel_keys_never_cancel_someone_else(proxy_factory: Any) -> None:
    """Thousands of CancelRequests with guessed keys (random process ids, and the victim's
    real process id with random secrets) while the victim runs a long query: the query is
    never cancelled. Also measures how fast a single address may guess (no rate limit)."""
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 3})
    result: list[object] = []

    with good_client(proxy) as good, psycopg.connect(proxy.dsn(), connect_timeout=10) as victim:
        process_id = victim.info.backend_pid  # the proxy's key for this client

        def long_query() -> None:
            try:
                result.append(victim.execute("select pg_sleep(4), %s::text", ("mine",)).fetchone())
            except BaseException as exc:
                result.append(exc)

        thread = threading.Thread(target=long_query, daemon=True)
        thread.start()
        since = good.rounds
        rng = random.Random(7)
        timings = []
        started = time.monotonic()
        for i in range(1500):
            pid = process_id if i % 2 else rng.getrandbits(31)
            timings.append(_send_cancel(proxy.host, proxy.port, pid, rng.getrandbits(32)))
            if time.monotonic() - started > 3.5:
                break
        elapsed = time.monotonic() - started
        thread.join(15)
        assert not thread.is_alive()
        assert result == [("", "mine")], result
        good.wait_progress(since)
    rate = len(timings) / elapsed
    print(
        f"{len(timings)} guessed CancelRequests from one address in {elapsed:.2f} s "
        f"({rate:.0f}/s, slowest {max(timings) * 1000:.1f} ms): no rate limiting"
    )


def test_guessed_cancel_keys_are_rate_limited(proxy: RunningProxy) -> None:
    """500 wrong-key CancelRequests from one address should be slowed down (at least 1 s in
    all, e.g. with the LoginThrottle back-off); today they take milliseconds."""
    rng = random.Random(11)
    started = time.monotonic()
    for _ in range(500):
        _send_cancel(proxy.host, proxy.port, rng.getrandbits(31), rng.getrandbits(32))
        if time.monotonic() - started > 1:
            break
    assert time.monotonic() - started >= 1


# ------------------------------------------------------------------ backpressure

BIG_RESULT = "select repeat('x', 1000) from generate_series(1, 200000) /* {marker} */"


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_that_never_reads_keeps_memory_bounded(
    proxy_factory: Any, pg: PostgresServer, mode: str
) -> None:
    """A 200 MB result nobody reads: the proxy stops reading from the server once the
    client's socket is full (the server waits in ClientWrite), so its memory for that
    client stays bounded; when the client goes away the server connection is closed."""
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 2})
    marker = f"m{uuid.uuid4().hex[:12]}"
    where = f"query like '%{marker}%' and query not like '%pg_stat_activity%'"
    with good_client(proxy) as good:
        with raw_client(proxy) as client:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            raw_login(client)
            before = rss_bytes()
            client.send(message(b"Q", BIG_RESULT.format(marker=marker).encode() + b"\0"))
            wait_until(
                lambda: any(r.endswith(" active ClientWrite") for r in backend_rows(pg, where)),
                15,
                "the server to block writing the result",
            )
            since = good.rounds
            time.sleep(2)  # the proxy would have buffered everything by now, if it did
            growth = rss_bytes() - before
            assert growth < 50 * 1024 * 1024, f"RSS grew {growth / 1e6:.0f} MB"
            good.wait_progress(since)
            [row] = backend_rows(pg, where)
            assert row.endswith(" active ClientWrite"), row
        # The client is gone: the half-sent result cannot be finished, the server
        # connection is closed (its backend exits), not given back dirty.
        wait_until(lambda: not backend_rows(pg, where), 15, "the abandoned backend to exit")
    print(f"RSS growth with a 200 MB unread result: {growth / 1e6:.1f} MB")


def test_client_that_never_reads_in_a_transaction_is_cut_off(
    proxy_factory: Any, pg: PostgresServer
) -> None:
    proxy = proxy_factory(
        proxy={"idle_in_transaction_timeout": 1},
        pool={"pool_mode": "transaction", "max_connections": 2},
    )
    marker = f"m{uuid.uuid4().hex[:12]}"
    where = f"query like '%{marker}%' and query not like '%pg_stat_activity%'"
    with raw_client(proxy) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw_login(client)
        assert simple_query(client, "begin")[-1] == (b"Z", b"T")
        client.send(message(b"Q", BIG_RESULT.format(marker=marker).encode() + b"\0"))
        wait_until(lambda: bool(backend_rows(pg, where)), 15, "the query to start")
        # Well past idle_in_transaction_timeout, the client still connected and silent.
        wait_until(lambda: not backend_rows(pg, where), 6, "the server connection to go")


# ----------------------------------------------------- disconnect mid-COPY / mid-tx


def _copy_in_then_vanish(proxy: RunningProxy, table: str, *, in_transaction: bool) -> None:
    with raw_client(proxy) as client:
        raw_login(client)
        if in_transaction:
            assert simple_query(client, "begin")[-1] == (b"Z", b"T")
            insert = f"insert into {table} values (-1, 'before copy')"
            assert simple_query(client, insert)[-1] == (b"Z", b"T")
        client.send(message(b"Q", f"copy {table} from stdin".encode() + b"\0"))
        type_, _body = client.read_message()
        assert type_ == b"G", type_  # CopyInResponse
        rows = b"".join(f"{i}\tpartial row {i}\n".encode() for i in range(1000))
        client.send(message(b"d", rows))
        client.send(message(b"d", b"1000\tpartial"))  # half a row, no CopyDone
        time.sleep(0.3)
    # closed here: no CopyDone, no CopyFail, no Terminate


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_disconnect_mid_copy_never_leaves_a_dirty_connection(
    proxy_factory: Any, pg: PostgresServer, mode: str, in_transaction: bool
) -> None:
    """Pool of one: a client vanishes in the middle of COPY FROM STDIN (optionally inside
    a transaction that already inserted a row). The next client (and the good client,
    sharing the same single server connection) sees an idle transaction state and none of
    the rows."""
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 1})
    table = f"t_{uuid.uuid4().hex[:12]}"
    pg.psql(
        "-c",
        f"create table {table} (id int, v text); grant all on {table} to app",
        dbname="app",
    )
    try:
        with good_client(proxy) if mode == "transaction" else contextlib.nullcontext() as good:
            since = good.rounds if good is not None else 0
            _copy_in_then_vanish(proxy, table, in_transaction=in_transaction)
            with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as conn:
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                row = conn.execute(
                    "select count(*), now() = statement_timestamp() from " + table
                ).fetchone()
                assert row == (0, True), f"rows or transaction left behind: {row}"
                conn.execute(f"insert into {table} values (1, 'next client')")
                row = conn.execute(f"select count(*) from {table}").fetchone()
                assert row == (1,)
            if good is not None:
                good.wait_progress(since)
        assert pg.psql("-c", f"select count(*) from {table}", dbname="app").strip() == "1"
    finally:
        pg.psql("-c", f"drop table if exists {table}", dbname="app")


# ------------------------------------------------------------------ the fd limit

FD_LIMIT_CONFIG = """
[proxy]
listen = "127.0.0.1:{port}"
client_login_timeout = 2

[backend]
host = "{pg.host}"
port = {pg.port}

[pool]
pool_mode = "transaction"
max_connections = 2

[users.app]
password = "app-secret"
"""


def test_fd_exhaustion_does_not_crash_the_listener(tmp_path: Any, pg: PostgresServer) -> None:
    """The proxy as a process with RLIMIT_NOFILE 64 (soft and hard, so raising it cannot
    help) and 150 silent connections: accept() fails with EMFILE, the listener pauses and
    goes on (the extra connections wait in the kernel's backlog), client_login_timeout
    frees the descriptors, and afterwards a real client is served by the same process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "proxy.toml"
    config.write_text(FD_LIMIT_CONFIG.format(port=port, pg=pg))

    def limit_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "--config", str(config)],
        cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_fds,
    )
    dsn = f"host=127.0.0.1 port={port} dbname=app user=app password=app-secret sslmode=disable"
    try:

        def serves() -> bool:
            assert proc.poll() is None, proc.communicate(timeout=10)[1]
            try:
                with psycopg.connect(dsn, connect_timeout=2) as conn:
                    return conn.execute("select 'served'").fetchone() == ("served",)
            except psycopg.OperationalError:
                return False

        wait_until(serves, 20, "the proxy process to serve")
        with contextlib.ExitStack() as stack:
            for _ in range(150):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                stack.callback(sock.close)
            time.sleep(1)
            assert proc.poll() is None, "the proxy died at the fd limit"
        wait_until(serves, 30, "the proxy to serve again after the flood")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert "accept failed" in err, err[-2000:]
        assert "Too many open files" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
