"""The proxy's own side of PostgreSQL: TLS towards the server, how it logs in there, the
client login timeout, and the command line as a real subprocess.

A second cluster (``tls_pg``, module-scoped) runs with ``ssl = on`` and a pg_hba.conf that
accepts only ``hostssl`` connections from 127.0.0.1; the shared ``pg`` cluster has TLS off.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.fix_pg import (
    APP_PASSWORD,
    APP_USER,
    CLEAR_PASSWORD,
    CLEAR_USER,
    MD5_PASSWORD,
    MD5_USER,
    RUN_AS,
    PostgresFactory,
    PostgresServer,
    destroy_cluster,
)
from trioproxy.testing.certs import TLSFiles, make_self_signed_ca_and_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.fix_proxy import RunningProxy

REPO = Path(__file__).resolve().parents[2]
SSL_QUERY = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
#: Only encrypted connections from 127.0.0.1; anything else is rejected by the server.
HOSTSSL_ONLY = (
    "hostssl    all  all  127.0.0.1/32  scram-sha-256",
    "hostnossl  all  all  127.0.0.1/32  reject",
)


# --------------------------------------------------------------------------- fixtures


def _give_to_postgres(path: Path) -> None:
    """PostgreSQL (running as RUN_AS when we are root) must own its key file (mode 0600)."""
    if os.geteuid() == 0:
        shutil.chown(path, user=RUN_AS, group=None)


@pytest.fixture(scope="module")
def backend_tls() -> Iterator[TLSFiles]:
    """CA + server certificate (localhost, 127.0.0.1, ::1) readable by the server."""
    base = Path(
        tempfile.mkdtemp(prefix="trioproxy-pgtls-", dir=os.environ.get("TRIOPROXY_PG_TMPDIR"))
    )
    try:
        files = make_self_signed_ca_and_server(base)
        for path in (base, files.ca_cert, files.server_cert, files.server_key):
            _give_to_postgres(path)
        files.server_key.chmod(0o600)
        yield files
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_pg(pg_factory: PostgresFactory, backend_tls: TLSFiles) -> Iterator[PostgresServer]:
    server = pg_factory(
        {
            "ssl": True,
            "ssl_cert_file": str(backend_tls.server_cert),
            "ssl_key_file": str(backend_tls.server_key),
        },
        hba_lines=HOSTSSL_ONLY,
    )
    yield server
    destroy_cluster(server)  # before its key files go; the factory's own teardown is a no-op


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the server's certificate."""
    return make_self_signed_ca_and_server(tmp_path_factory.mktemp("other-ca")).ca_cert


def query_one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def connect_error(dsn: str) -> psycopg.OperationalError:
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn, connect_timeout=30).close()
    assert time.monotonic() - started < 20, "the login failure took far too long"
    return caught.value


def assert_serving(proxy: RunningProxy) -> None:
    assert query_one(proxy.dsn(), "select 41 + 1") == 42


# --------------------------------------------------------------------------- backend TLS


def test_tls_server_refuses_plaintext(tls_pg: PostgresServer) -> None:
    """The fixture itself: plaintext to this server is refused by pg_hba.conf."""
    error = connect_error(tls_pg.dsn() + "?sslmode=disable")
    assert "no encryption" in str(error)
    assert query_one(tls_pg.dsn() + "?sslmode=require", SSL_QUERY) is True


def test_backend_tls_require(proxy_factory: Any, tls_pg: PostgresServer) -> None:
    proxy = proxy_factory(tls_pg, backend={"backend_tls": "require"})
    assert query_one(proxy.dsn(), SSL_QUERY) is True
    assert query_one(proxy.dsn(), "select current_user") == APP_USER


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_backend_tls_verify_full(
    proxy_factory: Any, tls_pg: PostgresServer, backend_tls: TLSFiles, host: str
) -> None:
    """The server certificate names localhost and 127.0.0.1: both verify."""
    proxy = proxy_factory(
        tls_pg,
        backend={
            "host": host,
            "backend_tls": "verify-full",
            "backend_tls_ca_file": str(backend_tls.ca_cert),
        },
    )
    assert query_one(proxy.dsn(), SSL_QUERY) is True
    # Transaction mode: each statement may take a pooled connection; all are encrypted.
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(3):
            assert conn.execute(SSL_QUERY).fetchone() == (True,)


def test_backend_tls_verify_full_with_a_wrong_ca(
    proxy_factory: Any, tls_pg: PostgresServer, wrong_ca: Path
) -> None:
    proxy = proxy_factory(
        tls_pg,
        backend={"backend_tls": "verify-full", "backend_tls_ca_file": str(wrong_ca)},
        pool={"connection_borrow_timeout": 2},
    )
    error = connect_error(proxy.dsn())
    message = str(error)
    assert "certificate" in message.lower(), message
    assert error.sqlstate in (None, "08006")
    # The proxy is still up and answers the next client the same way.
    error = connect_error(proxy.dsn())
    assert "certificate" in str(error).lower()


def test_backend_tls_wrong_ca_fails_fast_with_default_timeouts(
    proxy_factory: Any, tls_pg: PostgresServer, wrong_ca: Path
) -> None:
    proxy = proxy_factory(
        tls_pg,
        backend={"backend_tls": "verify-full", "backend_tls_ca_file": str(wrong_ca)},
        proxy={"client_login_timeout": 5},
    )
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(proxy.dsn(), connect_timeout=30).close()
    assert "certificate" in str(caught.value).lower(), str(caught.value)
    assert time.monotonic() - started < 4


def test_backend_tls_prefer_against_a_plaintext_server(
    proxy_factory: Any, pg: PostgresServer
) -> None:
    if query_one(pg.dsn() + "?sslmode=prefer", SSL_QUERY):
        pytest.skip("the shared test server has TLS on")
    proxy = proxy_factory(backend={"backend_tls": "prefer"})
    assert query_one(proxy.dsn(), SSL_QUERY) is False
    assert_serving(proxy)


def test_backend_tls_prefer_against_a_tls_server(
    proxy_factory: Any, tls_pg: PostgresServer
) -> None:
    proxy = proxy_factory(tls_pg, backend={"backend_tls": "prefer"})
    assert query_one(proxy.dsn(), SSL_QUERY) is True


def test_backend_tls_require_against_a_plaintext_server(
    proxy_factory: Any, pg: PostgresServer
) -> None:
    if query_one(pg.dsn() + "?sslmode=prefer", SSL_QUERY):
        pytest.skip("the shared test server has TLS on")
    proxy = proxy_factory(backend={"backend_tls": "require"}, pool={"connection_borrow_timeout": 2})
    error = connect_error(proxy.dsn())
    assert "does not support TLS" in str(error)


def test_backend_tls_disable_against_a_hostssl_only_server(
    proxy_factory: Any, tls_pg: PostgresServer
) -> None:
    proxy = proxy_factory(tls_pg, backend={"backend_tls": "disable"})
    error = connect_error(proxy.dsn())
    # The server's own pg_hba.conf error, forwarded (28000: permanent, not retried).
    assert "pg_hba.conf rejects connection" in str(error)
    assert "no encryption" in str(error)
    # A second attempt is answered the same way: the proxy is still serving.
    assert "pg_hba.conf rejects connection" in str(connect_error(proxy.dsn()))


# --------------------------------------------------------------------------- backend auth

AUTH_USERS: dict[str, dict[str, str]] = {
    APP_USER: {"password": APP_PASSWORD},
    MD5_USER: {"password": MD5_PASSWORD},
    CLEAR_USER: {"password": CLEAR_PASSWORD},
    # Logs in to the proxy fine, but the proxy holds a wrong password for the server.
    "badbackend": {
        "password": "proxy-side-ok",
        "backend_user": APP_USER,
        "backend_password": "not-the-app-password",
    },
}


@pytest.fixture
def auth_proxy(proxy_factory: Any, pg: PostgresServer) -> RunningProxy:
    return proxy_factory(users=AUTH_USERS)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("user", "password"), [(MD5_USER, MD5_PASSWORD), (CLEAR_USER, CLEAR_PASSWORD)]
)
def test_proxy_logs_in_with_md5_and_cleartext(
    auth_proxy: RunningProxy, user: str, password: str
) -> None:
    dsn = auth_proxy.dsn(user=user, password=password)
    assert query_one(dsn, "select current_user") == user
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(3):  # several statements, several server connections
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)


def test_pg_hba_forces_md5_and_password(pg: PostgresServer) -> None:
    """The premise of the test above: the server asks these users for md5 / cleartext."""
    rules = pg.psql(
        "-c",
        "select user_name[1], auth_method from pg_hba_file_rules"
        f" where user_name[1] in ('{MD5_USER}', '{CLEAR_USER}') order by line_number",
    )
    if not rules.strip():
        pytest.skip("the test server's pg_hba.conf has no rules for md5user/clearuser")
    assert f"{MD5_USER}|md5" in rules
    assert f"{CLEAR_USER}|password" in rules


def test_wrong_backend_password_forwards_the_server_error(auth_proxy: RunningProxy) -> None:
    error = connect_error(auth_proxy.dsn(user="badbackend", password="proxy-side-ok"))
    message = str(error)
    assert f'password authentication failed for user "{APP_USER}"' in message
    assert error.sqlstate in (None, "28P01")
    # Others are served meanwhile and afterwards.
    assert query_one(auth_proxy.dsn(user=MD5_USER, password=MD5_PASSWORD), "select 1") == 1
    assert query_one(auth_proxy.dsn(), "select 2") == 2
    assert "password authentication failed" in str(
        connect_error(auth_proxy.dsn(user="badbackend", password="proxy-side-ok"))
    )


# --------------------------------------------------------------------------- login timeout


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes; and when it closed (monotonic)."""
    sock.settimeout(limit)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the proxy did not close the idle login within {limit} s")
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk


def _assert_error_then_close(data: bytes) -> None:
    if not data:
        return  # closed without a word is fine too
    assert data[:1] == b"E", data
    (length,) = struct.unpack("!i", data[1:5])
    assert len(data) == 1 + length, "nothing may follow the ErrorResponse"
    assert b"timeout" in data


def test_client_login_timeout(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"client_login_timeout": 1})
    silent = socket.create_connection((proxy.host, proxy.port), timeout=5)
    half = socket.create_connection((proxy.host, proxy.port), timeout=5)
    started = time.monotonic()
    try:
        half.sendall(struct.pack("!ii", 80, 196608)[:6])  # 6 of 80 announced bytes
        # A normal client logs in and works while both stall.
        assert_serving(proxy)
        for sock in (silent, half):
            data, closed_at = _read_until_closed(sock, 10)
            assert closed_at - started < 3.5
            _assert_error_then_close(data)
        assert time.monotonic() - started >= 0.9
    finally:
        silent.close()
        half.close()
    assert_serving(proxy)


def test_client_login_timeout_after_ssl_request(proxy_factory: Any) -> None:
    """A client that negotiates TLS and then stalls is timed out as well."""
    proxy = proxy_factory(proxy={"client_login_timeout": 1})
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        _data, closed_at = _read_until_closed(sock, 10)  # never starts the handshake
        assert closed_at - started < 3.5
    assert_serving(proxy)


# --------------------------------------------------------------------------- the CLI


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_config(tmp_path: Path, pg: PostgresServer, port: int) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[proxy]
listen = "127.0.0.1:{port}"
shutdown_timeout = 5

[backend]
host = "{pg.host}"
port = {pg.port}

[pool]
max_connections = 2

[users.{APP_USER}]
password_env = "TRIOPROXY_TEST_APP_PASSWORD"
"""
    )
    return path


def _start_cli(config: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TRIOPROXY_TEST_APP_PASSWORD": APP_PASSWORD}
    return subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_port(proc: subprocess.Popen[str], port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _out, err = proc.communicate()
            pytest.fail(f"trioproxy exited with {proc.returncode} before listening:\n{err}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    pytest.fail(f"trioproxy did not listen on port {port} within {timeout} s")


@pytest.fixture
def cli_proxy(tmp_path: Path, pg: PostgresServer) -> Iterator[tuple[subprocess.Popen[str], int]]:
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = _free_port()
        proc = _start_cli(_write_config(tmp_path, pg, port))
        try:
            _wait_for_port(proc, port)
        except pytest.fail.Exception:
            if proc.poll() is None:
                raise
            continue
        break
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def _cli_dsn(port: int) -> str:
    return (
        f"host=127.0.0.1 port={port} dbname=app user={APP_USER} password={APP_PASSWORD}"
        " sslmode=disable"
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate(timeout=10)
        pytest.fail(f"trioproxy did not stop within 20 s of SIGTERM:\n{err}")
    return proc.returncode, err


def test_cli_serves_and_stops_cleanly_on_sigterm(
    cli_proxy: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = cli_proxy
    with psycopg.connect(_cli_dsn(port), autocommit=True) as conn:
        assert conn.execute("select current_user, 6 * 7").fetchone() == (APP_USER, 42)
    returncode, err = _stop(proc)
    assert returncode == 0, err
    assert "Traceback" not in err, err


def test_cli_sigterm_with_a_client_connected(cli_proxy: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = cli_proxy
    conn = psycopg.connect(_cli_dsn(port), autocommit=True)
    try:
        conn.execute("select 1")
        returncode, err = _stop(proc)
        assert returncode == 0, err
        assert "Traceback" not in err, err
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 1")
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("table", "line", "key"),
    [
        ("pool", 'connection_borrow_timeout = "abc"', "connection_borrow_timeout"),
        ("pool", "max_conections = 3", "max_conections"),
        ("backend", 'backend_tls = "verify-full"', "backend_tls_ca_file"),
    ],
)
def test_cli_check_config_rejects_a_bad_file(
    tmp_path: Path, table: str, line: str, key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[{table}]\n{line}\n\n[users.{APP_USER}]\npassword = "x"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr
    assert f"[{table}]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_check_config_accepts_a_good_file(tmp_path: Path, pg: PostgresServer) -> None:
    path = _write_config(tmp_path, pg, _free_port())
    proc = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--check-config", str(path)],
        cwd=REPO,
        env={**os.environ, "TRIOPROXY_TEST_APP_PASSWORD": APP_PASSWORD},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
