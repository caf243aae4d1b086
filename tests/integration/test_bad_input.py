"""Misbehaving clients get the documented outcome, and the proxy keeps serving well-behaved
clients afterwards (every test ends by running a query through the same proxy)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import random
import socket
import ssl
import struct
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fix_pg import PostgresServer
    from tests.fix_proxy import RunningProxy

TIMEOUT = 5.0  # every raw socket operation
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
PROTOCOL_3_0 = 3 << 16


# ------------------------------------------------------------------------- raw helpers


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!i", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def request_packet(code: int) -> bytes:
    return struct.pack("!ii", 8, code)


def message(type_: bytes, body: bytes) -> bytes:
    return type_ + struct.pack("!i", len(body) + 4) + body


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse / NoticeResponse body (code letter -> value)."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class RawClient:
    """A blocking socket with a receive buffer; every wait is bounded by TIMEOUT."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("proxy closed the connection")
        self.buf += chunk

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_message(self) -> tuple[bytes, bytes]:
        header = self.recv_exact(5)
        (length,) = struct.unpack("!i", header[1:])
        assert 4 <= length < 1 << 30, f"bad message length {length} (type {header[:1]!r})"
        return header[:1], self.recv_exact(length - 4)

    def read_until_closed(self) -> bytes:
        """Everything the proxy sends until it closes (a reset counts as closed).

        ``socket.timeout`` (the proxy neither answers nor closes) propagates: a hang.
        """
        deadline = time.monotonic() + TIMEOUT
        data = bytes(self.buf)
        self.buf.clear()
        while True:
            assert time.monotonic() < deadline, f"proxy kept the connection open; got {data!r}"
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


@contextlib.contextmanager
def raw_client(proxy: RunningProxy) -> Iterator[RawClient]:
    client = RawClient(proxy.host, proxy.port)
    try:
        yield client
    finally:
        client.close()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def read_auth(client: RawClient) -> tuple[int, bytes]:
    """Next Authentication message: (code, rest). An ErrorResponse fails the test."""
    type_, body = client.read_message()
    assert type_ == b"R", (type_, error_fields(body) if type_ == b"E" else body)
    (code,) = struct.unpack_from("!i", body)
    return code, body[4:]


def scram_exchange(client: RawClient, password: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Run SCRAM-SHA-256 after the AuthenticationSASL request was read.

    Returns (server-first message, the messages after it up to and including the final
    AuthenticationSASLFinal or ErrorResponse).
    """
    nonce = base64.b64encode(os.urandom(18)).decode()
    client_first_bare = f"n=,r={nonce}"
    data = ("n,," + client_first_bare).encode()
    client.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(data)) + data))
    code, server_first = read_auth(client)
    assert code == 11, code  # AuthenticationSASLContinue
    attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
    assert attrs["r"].startswith(nonce)
    salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first.decode()},{without_proof}".encode()
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    client.send(message(b"p", f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))
    type_, body = client.read_message()
    if type_ == b"R":
        (code,) = struct.unpack_from("!i", body)
        assert code == 12, code  # AuthenticationSASLFinal
        server_key = _hmac(salted, b"Server Key")
        expected = base64.b64encode(_hmac(server_key, auth_message)).decode()
        assert body[4:].decode() == f"v={expected}", "server signature does not verify"
    return server_first, [(type_, body)]


def raw_login(
    client: RawClient,
    user: str = "app",
    password: str = "app-secret",  # noqa: S107 - the test role's password
    database: str = "app",
    version: int = PROTOCOL_3_0,
    extra: dict[str, str] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Plaintext startup + SCRAM; every message received, up to ReadyForQuery."""
    client.send(startup_packet({"user": user, "database": database, **(extra or {})}, version))
    received: list[tuple[bytes, bytes]] = []
    while True:
        type_, body = client.read_message()
        received.append((type_, body))
        if type_ == b"R":
            break
        assert type_ in (b"v", b"N"), (type_, error_fields(body) if type_ == b"E" else body)
    (code,) = struct.unpack_from("!i", received[-1][1])
    assert code == 10, code  # AuthenticationSASL
    assert b"SCRAM-SHA-256\0" in received[-1][1]
    _first, messages = scram_exchange(client, password)
    received += messages
    assert messages[-1][0] == b"R", error_fields(messages[-1][1])
    while True:
        type_, body = client.read_message()
        received.append((type_, body))
        assert type_ != b"E", error_fields(body)
        if type_ == b"Z":
            return received


def simple_query(client: RawClient, sql: str) -> list[tuple[bytes, bytes]]:
    client.send(message(b"Q", sql.encode() + b"\0"))
    received = []
    while True:
        type_, body = client.read_message()
        received.append((type_, body))
        if type_ == b"Z":
            return received


def assert_serving(proxy: RunningProxy) -> None:
    """A well-behaved client (psycopg, TLS) still gets served."""
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 'served'").fetchone() == ("served",)


def _asyncpg_error(proxy: RunningProxy, *, ssl_context: Any, **kwargs: Any) -> BaseException:
    async def attempt() -> BaseException:
        try:
            conn = await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                ssl=ssl_context,
                timeout=10,
                **{"database": "app", **kwargs},
            )
        except Exception as exc:
            # asyncpg closes its TLS transport with a close_notify and finishes when the proxy
            # closes its end (it must, after a FATAL error): let that happen before
            # asyncio.run closes the loop, or the socket is reported unclosed.
            await asyncio.sleep(0.3)
            return exc
        await conn.close()
        raise AssertionError("asyncpg connected")

    return asyncio.run(asyncio.wait_for(attempt(), timeout=30))


def _ca_context(proxy: RunningProxy) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.tls.ca_cert))


# ------------------------------------------------------------------- authentication


def _connect_error(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10)
    return info.value


def test_wrong_password(proxy: RunningProxy) -> None:
    exc = _connect_error(proxy.dsn(password="wrong-password"))
    assert 'password authentication failed for user "app"' in str(exc)
    if exc.sqlstate is not None:
        assert exc.sqlstate == "28P01"
    # asyncpg exposes the SQLSTATE of a failed connection.
    err = _asyncpg_error(proxy, ssl_context=_ca_context(proxy), user="app", password="nope")
    assert isinstance(err, asyncpg.exceptions.InvalidPasswordError), repr(err)
    assert err.sqlstate == "28P01"
    assert str(err) == 'password authentication failed for user "app"'
    assert_serving(proxy)


def test_unknown_user_looks_like_a_wrong_password(proxy: RunningProxy) -> None:
    wrong = _connect_error(proxy.dsn(password="wrong-password"))
    unknown = _connect_error(proxy.dsn(user="mallory", password="wrong-password"))
    assert 'password authentication failed for user "mallory"' in str(unknown)
    assert str(unknown) == str(wrong).replace('"app"', '"mallory"')
    assert unknown.sqlstate == wrong.sqlstate
    err = _asyncpg_error(proxy, ssl_context=_ca_context(proxy), user="mallory", password="x")
    assert isinstance(err, asyncpg.exceptions.InvalidPasswordError), repr(err)
    assert err.sqlstate == "28P01"
    assert str(err) == 'password authentication failed for user "mallory"'
    assert_serving(proxy)


def test_unknown_user_scram_exchange_is_indistinguishable(proxy: RunningProxy) -> None:
    """The proxy runs the full SCRAM exchange for unknown users, with a stable salt and the
    same iteration count as real users, and fails at the proof like a wrong password."""

    def attempt(user: str, password: str) -> tuple[dict[str, str], list[tuple[bytes, bytes]]]:
        with raw_client(proxy) as client:
            client.send(startup_packet({"user": user, "database": "app"}))
            code, mechanisms = read_auth(client)
            assert code == 10
            assert b"SCRAM-SHA-256\0" in mechanisms
            server_first, final = scram_exchange(client, password)
            attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
            return attrs, final

    real_1, real_final = attempt("app", "wrong")
    real_2, _ = attempt("app", "wrong again")
    mock_1, mock_final = attempt("mallory", "wrong")
    mock_2, _ = attempt("mallory", "other")
    assert real_1["s"] == real_2["s"]
    assert mock_1["s"] == mock_2["s"], "an unknown user's salt must not change between attempts"
    assert mock_1["i"] == real_1["i"]
    assert len(base64.b64decode(mock_1["s"])) == len(base64.b64decode(real_1["s"]))
    for final, user in ((real_final, "app"), (mock_final, "mallory")):
        assert [t for t, _ in final] == [b"E"]
        fields = error_fields(final[0][1])
        assert fields["C"] == "28P01"
        assert fields["S"] == "FATAL"
        assert fields["M"] == f'password authentication failed for user "{user}"'
    assert_serving(proxy)


def test_plaintext_client_refused_when_tls_required(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"require_tls": True}, pool={"pool_mode": "session"})
    exc = _connect_error(proxy.dsn(sslmode="disable"))
    assert "TLS" in str(exc), str(exc)
    if exc.sqlstate is not None:
        assert exc.sqlstate == "28000"
    err = _asyncpg_error(proxy, ssl_context=False, user="app", password="app-secret")
    assert isinstance(err, asyncpg.exceptions.InvalidAuthorizationSpecificationError), repr(err)
    assert err.sqlstate == "28000"
    assert "TLS" in str(err)
    # Raw: refused right after the startup packet, before any authentication request.
    with raw_client(proxy) as client:
        client.send(startup_packet({"user": "app", "database": "app"}))
        type_, body = client.read_message()
        assert type_ == b"E"
        fields = error_fields(body)
        assert fields["C"] == "28000"
        assert fields["S"] == "FATAL"
        assert client.read_until_closed() == b""
    # sslmode=prefer/require/verify-full clients are served.
    with psycopg.connect(proxy.dsn(sslmode="require"), connect_timeout=10) as conn:
        assert conn.info.pgconn.ssl_in_use
    assert_serving(proxy)


def test_unknown_database(proxy: RunningProxy) -> None:
    exc = _connect_error(proxy.dsn(dbname="no_such_db"))
    assert 'database "no_such_db" does not exist' in str(exc), str(exc)
    err = _asyncpg_error(
        proxy,
        ssl_context=_ca_context(proxy),
        user="app",
        password="app-secret",
        database="no_such_db",
    )
    assert isinstance(err, asyncpg.exceptions.InvalidCatalogNameError), repr(err)
    assert err.sqlstate == "3D000"
    assert_serving(proxy)


def test_bad_startup_option(proxy: RunningProxy) -> None:
    exc = _connect_error(proxy.dsn(options="-c no_such_setting=1"))
    assert 'unrecognized configuration parameter "no_such_setting"' in str(exc), str(exc)
    exc = _connect_error(proxy.dsn(options="-c statement_timeout=banana"))
    assert "statement_timeout" in str(exc), str(exc)
    assert_serving(proxy)


def test_replication_connection_refused(proxy: RunningProxy) -> None:
    exc = _connect_error(proxy.dsn(replication="database"))
    assert "replication" in str(exc), str(exc)
    assert_serving(proxy)


def test_too_many_clients(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"max_client_connections": 2}, pool={"pool_mode": "session"})
    with (
        psycopg.connect(proxy.dsn(), connect_timeout=10) as first,
        psycopg.connect(proxy.dsn(), connect_timeout=10) as second,
    ):
        exc = _connect_error(proxy.dsn())
        assert "too many clients" in str(exc), str(exc)
        err = _asyncpg_error(proxy, ssl_context=_ca_context(proxy), user="app", password="x")
        assert isinstance(err, asyncpg.exceptions.TooManyConnectionsError), repr(err)
        assert err.sqlstate == "53300"
        assert first.execute("select 1").fetchone() == (1,)
        assert second.execute("select 2").fetchone() == (2,)
    # Slots are given back when clients leave.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert_serving(proxy)
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "client slots were not given back"
            time.sleep(0.1)


def test_login_timeout(proxy_factory: Any) -> None:
    """A client that says nothing (or stops half-way through SCRAM) is dropped after
    client_login_timeout."""
    proxy = proxy_factory(proxy={"client_login_timeout": 1}, pool={"pool_mode": "session"})
    with raw_client(proxy) as silent, raw_client(proxy) as halfway:
        halfway.send(startup_packet({"user": "app", "database": "app"}))
        assert read_auth(halfway)[0] == 10
        started = time.monotonic()
        for client in (silent, halfway):
            data = client.read_until_closed()
            _assert_error_or_close(data)
        assert time.monotonic() - started < 4
        assert data[:1] == b"E"
        (length,) = struct.unpack("!i", data[1:5])
        assert error_fields(data[5 : 1 + length])["C"] == "08P01"
    assert_serving(proxy)


def test_message_too_large(proxy_factory: Any) -> None:
    """Messages over max_message_size end the connection with an error, in either direction."""
    proxy = proxy_factory(proxy={"max_message_size": 1024 * 1024}, pool={"pool_mode": "session"})
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select %s::text", ("x" * 500_000,)).fetchone() == ("x" * 500_000,)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select length(%s::text)", ("x" * 2_000_000,))
        assert info.value.sqlstate == "08P01", str(info.value)
        assert "over the limit of 1048576" in str(info.value)
        assert conn.closed
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select repeat('x', 2000000)")
        assert "over the limit of 1048576" in str(info.value)
        assert conn.closed
    assert_serving(proxy)


def test_cancel_request_with_unknown_key(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        client.send(struct.pack("!iiii", 16, 80877102, 12345, 67890))
        assert client.read_until_closed() == b""
    assert_serving(proxy)


def test_wrong_message_during_authentication(proxy: RunningProxy) -> None:
    cases = [
        message(b"Q", b"select 1\0"),  # a query instead of SASLInitialResponse
        message(b"p", b"PLAIN\0" + struct.pack("!i", 3) + b"abc"),  # unknown mechanism
        message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 5) + b"n,,x="),  # bad client-first
        message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 100) + b"short"),  # bad length
    ]
    for case in cases:
        with raw_client(proxy) as client:
            client.send(startup_packet({"user": "app", "database": "app"}))
            assert read_auth(client)[0] == 10
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                client.send(case)
            data = client.read_until_closed()
            assert data[:1] == b"E", (case, data[:64])
            _assert_error_or_close(data)
    assert_serving(proxy)


def test_ssl_request_inside_tls(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        client.send(request_packet(SSL_REQUEST_CODE))
        assert client.recv_exact(1) == b"S"
        context = _ca_context(proxy)
        with context.wrap_socket(client.sock, server_hostname="localhost") as tls:
            tls.sendall(request_packet(SSL_REQUEST_CODE))
            data = b""
            with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                while chunk := tls.recv(65536):
                    data += chunk
            _assert_error_or_close(data)
            assert data[:1] == b"E"
    assert_serving(proxy)


# --------------------------------------------------------------- malformed startup


def _assert_error_or_close(data: bytes) -> None:
    """The proxy answered with a FATAL ErrorResponse, or just closed."""
    if not data:
        return
    assert data[:1] == b"E", f"expected an ErrorResponse or a close, got {data[:64]!r}"
    (length,) = struct.unpack("!i", data[1:5])
    fields = error_fields(data[5 : 1 + length])
    assert fields.get("S") == "FATAL", fields
    assert data[1 + length :] == b"", "nothing may follow the FATAL error"


def test_oversized_startup_packet(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        packet = struct.pack("!ii", 20000, PROTOCOL_3_0) + b"x" * (20000 - 8)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(packet)
        _assert_error_or_close(client.read_until_closed())
    assert_serving(proxy)


def _garbage_cases() -> list[Any]:
    cases = []
    for seed in (1, 2, 3):
        data = random.Random(seed).randbytes(256)
        (length,) = struct.unpack("!i", data[:4])
        # A length word of 9..10000 would make the proxy (rightly) wait for more bytes.
        assert not 256 < length <= 10000
        cases.append(pytest.param(data, id=f"random-{seed}"))
    cases.append(pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http"))
    # A TLS ClientHello without SSLRequest first (PG17 direct TLS, unsupported here).
    cases.append(pytest.param(bytes.fromhex("160301020001") + b"\0" * 512, id="tls-hello"))
    cases.append(pytest.param(struct.pack("!ii", 8, 12345678), id="unknown-request-code"))
    cases.append(pytest.param(struct.pack("!i", 3) + b"\0" * 16, id="length-too-small"))
    cases.append(
        pytest.param(startup_packet({"user": "app"})[:-1] + b"x", id="unterminated-parameters")
    )
    cases.append(pytest.param(startup_packet({"database": "app"}), id="no-user"))
    cases.append(
        pytest.param(
            startup_packet({"user": "app", "database": "app"}) + b"trailing", id="trailing-bytes"
        )
    )
    return cases


@pytest.mark.parametrize("garbage", _garbage_cases())
def test_garbage_bytes(proxy: RunningProxy, garbage: bytes) -> None:
    with raw_client(proxy) as client:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(garbage)
        _assert_error_or_close(client.read_until_closed())
    assert_serving(proxy)


def test_garbage_after_login(proxy: RunningProxy) -> None:
    """An unknown message type after login ends that client with a protocol error."""
    with raw_client(proxy) as client:
        raw_login(client)
        assert simple_query(client, "select 1")[-1] == (b"Z", b"I")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(message(b"\x01", b"garbage") + os.urandom(64))
        _assert_error_or_close(client.read_until_closed())
    assert_serving(proxy)


def test_ssl_request_then_plaintext_startup(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        client.send(request_packet(SSL_REQUEST_CODE))
        assert client.recv_exact(1) == b"S"
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            client.send(startup_packet({"user": "app", "database": "app"}))
        data = client.read_until_closed()
        # Nothing, or a TLS alert record (content type 21); never a PostgreSQL message.
        assert data == b"" or data[0] == 0x15, data[:32]
    assert_serving(proxy)


def test_ssl_request_with_pipelined_startup_is_refused(proxy: RunningProxy) -> None:
    """CVE-2021-23214: bytes sent in the clear after SSLRequest must not be processed."""
    with raw_client(proxy) as client:
        client.send(request_packet(SSL_REQUEST_CODE) + startup_packet({"user": "app"}))
        data = client.read_until_closed()
        assert not data.startswith(b"S"), "the proxy must not start TLS over injected bytes"
        _assert_error_or_close(data)
    assert_serving(proxy)


# --------------------------------------------------------------- protocol versions


def test_protocol_2_startup_refused(proxy: RunningProxy) -> None:
    # The protocol 2.0 StartupPacket: fixed-width fields (database 64, user 32, options 64,
    # unused 64, tty 64).
    body = struct.pack("!i", 2 << 16)
    for value, width in ((b"app", 64), (b"app", 32), (b"", 64), (b"", 64), (b"", 64)):
        body += value.ljust(width, b"\0")
    with raw_client(proxy) as client:
        client.send(struct.pack("!i", len(body) + 4) + body)
        data = client.read_until_closed()
    assert data[:1] == b"E", data[:64]
    (length,) = struct.unpack("!i", data[1:5])
    fields = error_fields(data[5 : 1 + length])
    assert fields["C"] == "0A000", fields
    assert "unsupported frontend protocol 2.0" in fields["M"], fields
    assert data[1 + length :] == b""
    assert_serving(proxy)


@pytest.mark.parametrize(
    ("minor", "options"),
    [
        pytest.param(9999, {}, id="3.9999-grease"),
        pytest.param(2, {}, id="3.2"),
        pytest.param(0, {"_pq_.test_extension": "on"}, id="3.0-unknown-option"),
        pytest.param(9999, {"_pq_.a": "1", "_pq_.b": "2"}, id="3.9999-two-options"),
    ],
)
def test_protocol_negotiation(proxy: RunningProxy, minor: int, options: dict[str, str]) -> None:
    with raw_client(proxy) as client:
        received = raw_login(client, version=(3 << 16) | minor, extra=options)
        types = [t for t, _ in received]
        # Exactly one NegotiateProtocolVersion, first, before the authentication request.
        assert types.count(b"v") == 1, types
        assert types[0] == b"v", types
        assert types[1] == b"R", types
        body = received[0][1]
        newest, count = struct.unpack_from("!ii", body)
        assert newest == 0
        names = [n.decode() for n in body[8:].split(b"\0")[:-1]]
        assert count == len(names)
        assert sorted(names) == sorted(options)
        # The session works, in protocol 3.0.
        answer = simple_query(client, "select 6 * 7")
        assert [t for t, _ in answer] == [b"T", b"D", b"C", b"Z"]
        assert answer[1][1].endswith(b"42")
        client.send(message(b"X", b""))
    assert_serving(proxy)


def test_protocol_3_0_has_no_negotiation(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        received = raw_login(client)
        assert b"v" not in [t for t, _ in received]
        assert received[0][0] == b"R"
    assert_serving(proxy)


def test_gssenc_request_answered_with_n(proxy: RunningProxy) -> None:
    with raw_client(proxy) as client:
        client.send(request_packet(GSSENC_REQUEST_CODE))
        assert client.recv_exact(1) == b"N"
        # libpq then goes on in the clear on the same connection (gssencmode=prefer) ...
        received = raw_login(client)
        assert received[-1] == (b"Z", b"I")
        assert simple_query(client, "select 1")[-1] == (b"Z", b"I")
    with raw_client(proxy) as client:
        # ... or asks for TLS next (gssencmode=prefer sslmode=prefer).
        client.send(request_packet(GSSENC_REQUEST_CODE))
        assert client.recv_exact(1) == b"N"
        client.send(request_packet(SSL_REQUEST_CODE))
        assert client.recv_exact(1) == b"S"
    # libpq itself with gssencmode=prefer (no Kerberos credentials: it falls back).
    with psycopg.connect(proxy.dsn(gssencmode="prefer"), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert_serving(proxy)


# ------------------------------------------------------------ disconnect mid-query


def _active_with_marker(pg: PostgresServer, marker: str) -> int:
    out = pg.psql(
        "-c",
        "select count(*) from pg_stat_activity where query like '%pg_sleep%' "
        f"and query like '%{marker}%' and state = 'active' and pid <> pg_backend_pid()",
    )
    return int(out.strip())


def _pids_with_marker(pg: PostgresServer, marker: str) -> set[int]:
    out = pg.psql(
        "-c",
        f"select pid from pg_stat_activity where query like '%{marker}%' "
        "and state = 'active' and pid <> pg_backend_pid()",
    )
    return {int(line) for line in out.split()}


def _wait_for_active(pg: PostgresServer, marker: str, *, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (count := _active_with_marker(pg, marker)) != want:
        assert time.monotonic() < deadline, f"{count} active queries with {marker}, want {want}"
        time.sleep(0.1)


def _abandon_query_psycopg(proxy: RunningProxy, sql: str) -> None:
    """psycopg runs ``sql`` in a thread; the socket is shut down from under it."""
    conn = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute(sql)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # let the query reach the server
        sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        thread.join(10)
        assert not thread.is_alive(), "psycopg did not notice its socket was shut down"
        assert errors, "the query cannot have succeeded"
        assert isinstance(errors[0], psycopg.OperationalError), repr(errors[0])
    finally:
        conn.close()


def _abandon_query_raw(proxy: RunningProxy, sql: str) -> None:
    """Plaintext login, send a Query, close without reading."""
    with raw_client(proxy) as client:
        raw_login(client)
        client.send(message(b"Q", sql.encode() + b"\0"))
        time.sleep(0.5)


@pytest.mark.parametrize("mode", ["session", "transaction"])
@pytest.mark.parametrize("way", ["psycopg", "raw"])
def test_client_disconnects_mid_query(
    proxy_factory: Any, pg: PostgresServer, mode: str, way: str
) -> None:
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 1})
    marker = f"m{uuid.uuid4().hex[:12]}"
    sql = f"select pg_sleep(8) /* {marker} */"
    abandon = _abandon_query_psycopg if way == "psycopg" else _abandon_query_raw
    started = time.monotonic()
    abandon(proxy, sql)
    dirty = _pids_with_marker(pg, marker)
    assert len(dirty) == 1, f"the abandoned query should still run (8 s), got pids {dirty}"
    # The only server connection is dirty (a query still runs on it): the next client must
    # get a fresh one at once, not the dirty one after the query ends.
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 'next client'").fetchone() == ("next client",)
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        assert row[0] not in dirty
    assert time.monotonic() - started < 6, "the next client waited for the abandoned query"
    # The abandoned query ends (at the latest when pg_sleep returns and the server notices
    # its client is gone).
    _wait_for_active(pg, marker, want=0, timeout=20)
    assert_serving(proxy)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_disconnects_during_large_result(
    proxy_factory: Any, pg: PostgresServer, mode: str
) -> None:
    """The server is still sending 200 MB when the client goes away without reading."""
    proxy = proxy_factory(pool={"pool_mode": mode, "max_connections": 1})
    marker = f"m{uuid.uuid4().hex[:12]}"
    sql = f"select repeat('x', 1000), pg_sleep(0) from generate_series(1, 200000) /* {marker} */"
    _abandon_query_raw(proxy, sql)
    started = time.monotonic()
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 'next client'").fetchone() == ("next client",)
    assert time.monotonic() - started < 6
    _wait_for_active(pg, marker, want=0, timeout=20)
    assert_serving(proxy)


def test_client_disconnects_inside_transaction(proxy_factory: Any, pg: PostgresServer) -> None:
    """Transaction mode, max_connections=1: a client leaves with a transaction open (idle in
    transaction, holding a row lock); the next client is served and does not inherit it."""
    proxy = proxy_factory(pool={"pool_mode": "transaction", "max_connections": 1})
    table = f"t_{uuid.uuid4().hex[:12]}"
    pg.psql(
        "-c",
        f"create table {table} (id int primary key, v int); "
        f"insert into {table} values (1, 0); grant all on {table} to app",
        dbname="app",
    )
    try:
        with raw_client(proxy) as client:
            raw_login(client)
            assert simple_query(client, "begin")[-1] == (b"Z", b"T")
            update = f"update {table} set v = 1 where id = 1"
            assert simple_query(client, update)[-1] == (b"Z", b"T")
        with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
            conn.execute("set lock_timeout = '3s'")
            # Not in the dead client's transaction, and its row lock is gone.
            conn.execute(f"update {table} set v = 2 where id = 1")
            conn.commit()
            assert conn.execute(f"select v from {table}").fetchone() == (2,)
        assert_serving(proxy)
    finally:
        pg.psql("-c", f"drop table if exists {table}", dbname="app")
