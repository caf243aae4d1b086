"""Authentication hardening, end to end: SCRAM channel binding, MD5 for old clients, secret
sources that rotate (a JSON file, and Secrets Manager on a local moto server), client
networks, failed-login back-off, and no secret in any log line.

Rules of this module:

* Every test runs under the ``logged_secrets`` fixture (autouse): it captures the
  ``trioproxy`` loggers at DEBUG for the whole test (setup, call and teardown, so the
  proxy's start and stop too) and fails the test if any password, token or secret used in
  it appears in a log record. Tests register the secrets they make up at run time
  (tokens, rotated passwords) with ``logged_secrets.append``.
* Raw protocol clients (``_RawClient``) are used where libpq would not send what we need
  to see refused (a false channel-binding claim, a wrong binding) or where the client's
  source address matters (127.0.0.2: Linux routes all of 127.0.0.0/8 to loopback).
* Waiting is bounded: polls have deadlines, sockets have timeouts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from tests.fix_pg import APP_PASSWORD, APP_USER, RUN_AS, destroy_cluster
from tests.fix_proxy import PROXY_USERS
from trioproxy._auth.sigv4 import AccessKey, generate_auth_token
from trioproxy._server import backend as backend_module
from trioproxy.errors import ConfigError
from trioproxy.testing.certs import make_self_signed_ca_and_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.fix_pg import PostgresFactory, PostgresServer
    from tests.fix_proxy import RunningProxy

IAM_KEY_ID = "AKIATRIOPROXYHARDEN1"
IAM_SECRET = "hardening-secret-access-key-not-real"
REGION = "us-east-1"
MD5_CLIENT_PW = "old-client-md5-pw"
MIXED_PW = "mixed-hardening-pw"
WRONG_PW = "definitely-wrong-pw"

#: Every secret this module uses; tests add the ones they make up.
STATIC_SECRETS = {
    APP_PASSWORD,
    *(u["password"] for u in PROXY_USERS.values() if "password" in u),
    *(u["backend_password"] for u in PROXY_USERS.values() if "backend_password" in u),
    IAM_SECRET,
    MD5_CLIENT_PW,
    MIXED_PW,
    WRONG_PW,
}


@pytest.fixture(autouse=True)
def logged_secrets(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Fail the test if a secret shows up in any trioproxy log record."""
    caplog.set_level(logging.DEBUG, logger="trioproxy")
    extra: list[str] = []
    yield extra
    records = [
        *caplog.get_records("setup"),
        *caplog.get_records("call"),
        *caplog.get_records("teardown"),
    ]
    lines = []
    for record in records:
        lines.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            lines.append(repr(record.exc_info[1]))
        if record.exc_text:
            lines.append(record.exc_text)
    text = "\n".join(lines)
    for secret in sorted({*STATIC_SECRETS, *extra}):
        assert secret not in text, f"a secret ({len(secret)} characters) appears in the logs"
        # URL-quoted forms too (tokens are query strings).
        assert secret.replace("/", "%2F") not in text


# --------------------------------------------------------------------------- raw client


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed by the proxy")
        data += chunk
    return data


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode()
    return fields


class _RawClient:
    """Just enough of the frontend protocol to script a login byte by byte."""

    def __init__(self, proxy: RunningProxy, *, tls: bool, source: str | None = None) -> None:
        sock = socket.create_connection(
            (proxy.host, proxy.port),
            timeout=10,
            source_address=(source, 0) if source else None,
        )
        self.sock: socket.socket = sock
        if tls:
            sock.sendall(struct.pack("!II", 8, 80877103))
            assert _recv_exact(sock, 1) == b"S"
            context = ssl.create_default_context(cafile=str(proxy.tls.ca_cert))
            self.sock = context.wrap_socket(sock, server_hostname="localhost")

    def close(self) -> None:
        self.sock.close()

    def startup(self, user: str, database: str = "app") -> None:
        body = struct.pack("!I", 196608)
        body += b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)

    def send(self, type_: bytes, body: bytes) -> None:
        self.sock.sendall(type_ + struct.pack("!I", len(body) + 4) + body)

    def read(self) -> tuple[bytes, bytes]:
        header = _recv_exact(self.sock, 5)
        (length,) = struct.unpack("!I", header[1:])
        return header[:1], _recv_exact(self.sock, length - 4)

    def read_auth(self) -> tuple[int, bytes]:
        """The next Authentication message: (code, rest); an ErrorResponse raises."""
        type_, body = self.read()
        if type_ == b"E":
            raise _ServerError(_error_fields(body))
        assert type_ == b"R", type_
        (code,) = struct.unpack("!I", body[:4])
        return code, body[4:]

    def sasl_mechanisms(self) -> list[str]:
        code, rest = self.read_auth()
        assert code == 10  # AuthenticationSASL
        return [m.decode() for m in rest.split(b"\0") if m]

    def sasl_initial(self, mechanism: str, data: bytes) -> None:
        self.send(b"p", mechanism.encode() + b"\0" + struct.pack("!I", len(data)) + data)

    def peer_certificate(self) -> bytes:
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return der


class _ServerError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields


def _client_final(
    password: str, client_first_bare: bytes, server_first: bytes, cbind_input: bytes
) -> bytes:
    """An independent SCRAM-SHA-256 client proof (RFC 5802), any channel binding input."""
    fields = dict(item.split(b"=", 1) for item in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(fields[b"s"]), int(fields[b"i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + base64.b64encode(cbind_input) + b",r=" + fields[b"r"]
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


def _raw_scram_login(
    client: _RawClient, password: str, *, plus: bool, binding: bytes | None = None
) -> None:
    """A whole SCRAM login; raises _ServerError when the proxy refuses."""
    mechanisms = client.sasl_mechanisms()
    nonce = base64.b64encode(secrets.token_bytes(18))
    bare = b"n=,r=" + nonce
    gs2 = b"p=tls-server-end-point,," if plus else b"n,,"
    client.sasl_initial("SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256", gs2 + bare)
    code, server_first = client.read_auth()
    assert code == 11, mechanisms  # AuthenticationSASLContinue
    if plus and binding is None:
        binding = hashlib.sha256(client.peer_certificate()).digest()
    cbind_input = gs2 + (binding if plus else b"")
    client.send(b"p", _client_final(password, bare, server_first, cbind_input))
    code, _server_final = client.read_auth()
    assert code == 12  # AuthenticationSASLFinal
    code, _ = client.read_auth()
    assert code == 0  # AuthenticationOk


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connect_fails(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn, connect_timeout=10).close()
    return caught.value


def _wait_for(predicate: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


# --------------------------------------------------------------------------- channel binding


def test_channel_binding_require_logs_in_over_tls(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(channel_binding="require")) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)
    # alice logs in to the proxy with her own password, bound to our certificate.
    with psycopg.connect(proxy.dsn(user="alice", channel_binding="require")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_channel_binding_require_fails_without_tls(proxy: RunningProxy) -> None:
    error = _connect_fails(proxy.dsn(sslmode="disable", channel_binding="require"))
    assert "channel binding" in str(error)


def test_plus_is_offered_only_over_tls(proxy: RunningProxy) -> None:
    for tls, expected in ((True, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]), (False, None)):
        client = _RawClient(proxy, tls=tls)
        try:
            client.startup(APP_USER)
            assert client.sasl_mechanisms() == (expected or ["SCRAM-SHA-256"])
        finally:
            client.close()


def test_raw_plus_login_with_the_right_binding(proxy: RunningProxy) -> None:
    client = _RawClient(proxy, tls=True)
    try:
        client.startup(APP_USER)
        _raw_scram_login(client, APP_PASSWORD, plus=True)
    finally:
        client.close()


def test_client_claiming_binding_support_when_plus_was_offered_is_refused(
    proxy: RunningProxy,
) -> None:
    """gs2 flag 'y' = "I could bind, but you offered no PLUS": with PLUS offered, someone
    stripped it from the list on the way (a downgrade)."""
    client = _RawClient(proxy, tls=True)
    try:
        client.startup(APP_USER)
        assert "SCRAM-SHA-256-PLUS" in client.sasl_mechanisms()
        client.sasl_initial("SCRAM-SHA-256", b"y,,n=,r=" + base64.b64encode(b"n" * 18))
        with pytest.raises(_ServerError) as caught:
            client.read_auth()
    finally:
        client.close()
    assert caught.value.fields["S"] == "FATAL"
    assert caught.value.fields["C"] == "08P01"
    assert "channel binding negotiation error" in caught.value.fields["M"]
    assert proxy.proxy.stats.failed_logins == 1


def test_wrong_binding_is_refused(proxy: RunningProxy) -> None:
    """The right password, but the binding of another certificate: a relayed login."""
    client = _RawClient(proxy, tls=True)
    try:
        client.startup(APP_USER)
        with pytest.raises(_ServerError) as caught:
            _raw_scram_login(client, APP_PASSWORD, plus=True, binding=b"\x07" * 32)
    finally:
        client.close()
    assert caught.value.fields["C"] == "28P01"
    assert caught.value.fields["M"] == f'password authentication failed for user "{APP_USER}"'


# --------------------------------------------------------------------------- md5


@pytest.fixture
def md5_proxy(proxy_factory: Any) -> RunningProxy:
    users = {
        **PROXY_USERS,
        "oldclient": {
            "password": MD5_CLIENT_PW,
            "client_password_auth_type": "md5",
            "backend_user": APP_USER,
            "backend_password": APP_PASSWORD,
        },
    }
    return proxy_factory(users=users)  # type: ignore[no-any-return]


def test_md5_client_logs_in(md5_proxy: RunningProxy) -> None:
    dsn = md5_proxy.dsn(user="oldclient", password=MD5_CLIENT_PW)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)
    error = _connect_fails(md5_proxy.dsn(user="oldclient", password=WRONG_PW))
    assert 'password authentication failed for user "oldclient"' in str(error)
    # SCRAM users on the same proxy are not affected.
    with psycopg.connect(md5_proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_md5_salt_is_random_per_login(md5_proxy: RunningProxy) -> None:
    salts = set()
    for _ in range(3):
        client = _RawClient(md5_proxy, tls=False)
        try:
            client.startup("oldclient")
            code, salt = client.read_auth()
        finally:
            client.close()
        assert code == 5  # AuthenticationMD5Password
        assert len(salt) == 4
        salts.add(salt)
    assert len(salts) == 3


# --------------------------------------------------------------------------- client networks


def test_client_outside_allowed_cidrs_is_refused(
    proxy_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = proxy_factory(proxy={"allowed_client_cidrs": ["10.0.0.0/8", "::1/128"]})
    _connect_fails(proxy.dsn())
    _wait_for(lambda: "refused: address not in allowed_client_cidrs" in caplog.text)
    refused = [r.getMessage() for r in caplog.records if "allowed_client_cidrs" in r.getMessage()]
    assert refused[0].startswith("client 127.0.0.1:")
    # Refused before any authentication work: no session, no failed login counted.
    assert proxy.proxy.stats.failed_logins == 0
    assert not proxy.proxy.clients


def test_allowed_cidr_lets_its_clients_in(proxy_factory: Any) -> None:
    proxy = proxy_factory(proxy={"allowed_client_cidrs": ["127.0.0.1/32"]})
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    # 127.0.0.2 is loopback too, but not in 127.0.0.1/32: closed before the startup packet.
    client = _RawClient(proxy, tls=False, source="127.0.0.2")
    try:
        client.sock.settimeout(5)
        with contextlib.suppress(OSError):
            client.startup(APP_USER)
        with pytest.raises((ConnectionError, OSError)):
            client.read()
    finally:
        client.close()


# --------------------------------------------------------------------------- back-off


@pytest.fixture
def throttled_proxy(proxy_factory: Any) -> RunningProxy:
    return proxy_factory(  # type: ignore[no-any-return]
        proxy={
            "failed_login_free_attempts": 1,
            "failed_login_delay": 0.3,
            "failed_login_max_delay": 1.2,
            "failed_login_window": 60,
        }
    )


def _timed(fn: Callable[[], object]) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_repeated_wrong_passwords_get_slower(throttled_proxy: RunningProxy) -> None:
    bad = throttled_proxy.dsn(password=WRONG_PW)
    times = [_timed(lambda: _connect_fails(bad)) for _ in range(5)]
    # One free failure; then 0.3, 0.6, 1.2 (the cap) before each answer.
    assert times[0] < 0.3
    assert times[1] < 0.3
    assert times[2] >= 0.3
    assert times[3] >= 0.6
    assert times[4] >= 1.2
    assert times[4] > times[0] + 0.9
    # The right password still works from the same address, after the (capped) wait.
    start = time.monotonic()
    with psycopg.connect(throttled_proxy.dsn()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert time.monotonic() - start >= 1.2
    assert throttled_proxy.proxy.stats.failed_logins == 5


def test_backoff_never_slows_other_clients(throttled_proxy: RunningProxy) -> None:
    bad = throttled_proxy.dsn(password=WRONG_PW)
    for _ in range(4):
        _connect_fails(bad)
    # 127.0.0.1 now waits 1.2 s per answer. While one of its logins waits, a client from
    # 127.0.0.2 logs in at once: the wait is a sleep in that client's own task.
    slow = threading.Thread(target=lambda: _connect_fails(bad))
    slow.start()
    try:
        time.sleep(0.2)
        client = _RawClient(throttled_proxy, tls=False, source="127.0.0.2")
        try:
            client.startup(APP_USER)
            elapsed = _timed(lambda: _raw_scram_login(client, APP_PASSWORD, plus=False))
        finally:
            client.close()
        assert elapsed < 0.8
        assert slow.is_alive()  # still waiting out its back-off
    finally:
        slow.join(10)


# --------------------------------------------------------------------------- secret sources


@pytest.fixture
def rotating_role(pg: PostgresServer) -> Iterator[str]:
    """A PostgreSQL role of its own: its password is changed by the test."""
    if not pg.managed:
        pytest.skip("needs a cluster the tests own (ALTER ROLE)")
    role = f"rot_{secrets.token_hex(4)}"
    pg.psql(
        "-c",
        f"CREATE ROLE {role} LOGIN PASSWORD 'rot-initial-pw'",
        "-c",
        f"GRANT CONNECT ON DATABASE app TO {role}",
    )
    yield role
    pg.psql(
        "-c",
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
        "-c",
        f"DROP ROLE IF EXISTS {role}",
        check=False,
    )


def _set_role_password(pg: PostgresServer, role: str, password: str) -> None:
    pg.psql("-c", f"ALTER ROLE {role} PASSWORD '{password}'")


def _write_atomically(path: Path, document: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def _check_rotation(
    proxy: RunningProxy,
    pg: PostgresServer,
    role: str,
    user: str,
    rotate: Callable[[str], None],
    logged_secrets: list[str],
) -> None:
    """Log in with the first password, hold a server connection in a transaction, rotate,
    and check that new server connections use the new password while the held one
    stays."""
    first, second = "rot-initial-pw", f"rot-second-{secrets.token_hex(8)}"
    logged_secrets.extend([first, second])
    held = psycopg.connect(proxy.dsn(user=user, password=first))
    try:
        held.execute("begin")
        assert held.execute("select current_user").fetchone() == (role,)

        _set_role_password(pg, role, second)
        rotate(second)
        running = proxy.proxy
        _wait_for(lambda: running.credentials.backend_login(user) == (role, second))

        # The held client goes on undisturbed on its server connection...
        assert held.execute("select 2").fetchone() == (2,)
        # ...and a new client (checked against the new secret) gets a new server
        # connection, opened with the new password.
        with psycopg.connect(proxy.dsn(user=user, password=second)) as conn:
            assert conn.execute("select current_user").fetchone() == (role,)
        held.execute("commit")
        assert held.execute("select 3").fetchone() == (3,)
    finally:
        held.close()
    error = _connect_fails(proxy.dsn(user=user, password=first))
    assert f'password authentication failed for user "{user}"' in str(error)
    assert running.secrets.refreshes >= 1


def test_rotated_secret_file(
    proxy_factory: Any,
    pg: PostgresServer,
    rotating_role: str,
    tmp_path: Path,
    logged_secrets: list[str],
) -> None:
    secret_file = tmp_path / "db.json"
    _write_atomically(secret_file, {"username": rotating_role, "password": "rot-initial-pw"})
    proxy = proxy_factory(
        proxy={"secret_refresh_interval": 0.2},
        pool={"pool_mode": "transaction"},
        users={**PROXY_USERS, "rotating": {"secret_file": str(secret_file)}},
    )
    _check_rotation(
        proxy,
        pg,
        rotating_role,
        "rotating",
        lambda pw: _write_atomically(secret_file, {"username": rotating_role, "password": pw}),
        logged_secrets,
    )


def test_broken_secret_file_keeps_the_previous_credentials(
    proxy_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret_file = tmp_path / "db.json"
    _write_atomically(secret_file, {"username": APP_USER, "password": APP_PASSWORD})
    proxy = proxy_factory(
        proxy={"secret_refresh_interval": 0.1},
        users={"fromfile": {"secret_file": str(secret_file)}},
    )
    with psycopg.connect(proxy.dsn(user="fromfile", password=APP_PASSWORD)) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)
    secret_file.write_text('{"username": "app", "password": ')  # half-written
    _wait_for(lambda: proxy.proxy.secrets.failures >= 1)
    assert "secret refresh failed, keeping the previous credentials" in caplog.text
    with psycopg.connect(proxy.dsn(user="fromfile", password=APP_PASSWORD)) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials for moto; no profile or credentials file of the machine's user."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))


def test_rotated_secrets_manager_secret(
    proxy_factory: Any,
    pg: PostgresServer,
    rotating_role: str,
    moto_endpoint: str,
    aws_env: None,
    logged_secrets: list[str],
) -> None:
    import boto3

    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_endpoint)
    created = client.create_secret(
        Name=f"trioproxy/{rotating_role}",
        SecretString=json.dumps({"username": rotating_role, "password": "rot-initial-pw"}),
    )
    arn = created["ARN"]
    proxy = proxy_factory(
        proxy={"secret_refresh_interval": 0.2, "aws_endpoint_url": moto_endpoint},
        pool={"pool_mode": "transaction"},
        users={**PROXY_USERS, "fromaws": {"secret_arn": arn}},
    )

    def rotate(password: str) -> None:
        client.put_secret_value(
            SecretId=arn,
            SecretString=json.dumps({"username": rotating_role, "password": password}),
        )

    _check_rotation(proxy, pg, rotating_role, "fromaws", rotate, logged_secrets)


def test_unreadable_secret_arn_stops_the_start(
    proxy_factory: Any, moto_endpoint: str, aws_env: None
) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:trioproxy/missing-AbCdEf"
    with pytest.raises(RuntimeError, match="failed to start") as caught:
        proxy_factory(
            proxy={"aws_endpoint_url": moto_endpoint},
            users={"fromaws": {"secret_arn": arn}},
        )
    cause = caught.value.__cause__
    while isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    assert isinstance(cause, ConfigError)
    assert f"user 'fromaws': secret_arn {arn}: Secrets Manager: " in str(cause)


# --------------------------------------------------------------------------- a full tour


def test_no_secret_in_logs_of_a_full_auth_tour(
    proxy_factory: Any,
    tmp_path: Path,
    logged_secrets: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every way to log in, right and wrong, on one proxy; the logs mention each outcome
    and contain none of the secrets (checked by ``logged_secrets``)."""
    port = _free_port()
    secret_pw = f"from-the-file-{secrets.token_hex(6)}"
    logged_secrets.append(secret_pw)
    secret_file = tmp_path / "db.json"
    _write_atomically(secret_file, {"username": APP_USER, "password": APP_PASSWORD})
    client_file = tmp_path / "client.json"
    _write_atomically(client_file, {"password": secret_pw})
    proxy = proxy_factory(
        proxy={"listen": f"127.0.0.1:{port}"},
        iam={
            "endpoints": [f"localhost:{port}"],
            "regions": [REGION],
            "keys": {IAM_KEY_ID: {"secret_access_key": IAM_SECRET}},
        },
        users={
            **PROXY_USERS,
            "tokenuser": {
                "iam_auth": "REQUIRED",
                "backend_user": APP_USER,
                "backend_password": APP_PASSWORD,
            },
            "mixed": {
                "iam_auth": "ENABLED",
                "password": MIXED_PW,
                "backend_user": APP_USER,
                "backend_password": APP_PASSWORD,
            },
            "oldclient": {
                "password": MD5_CLIENT_PW,
                "client_password_auth_type": "md5",
                "backend_user": APP_USER,
                "backend_password": APP_PASSWORD,
            },
            "fromfile": {"secret_file": str(secret_file)},
        },
    )
    key = AccessKey(access_key_id=IAM_KEY_ID, secret_access_key=IAM_SECRET, allowed_users={"*"})

    def token(user: str, **kw: Any) -> str:
        value = generate_auth_token(
            host="localhost",
            port=port,
            db_user=user,
            region=REGION,
            key=key,
            now=kw.pop("now", time.time()),
        )
        logged_secrets.append(value)
        logged_secrets.append(value.rpartition("X-Amz-Signature=")[2])
        return value

    good = [
        proxy.dsn(),
        proxy.dsn(user="alice", channel_binding="require"),
        proxy.dsn(user="tokenuser", password=token("tokenuser")),
        proxy.dsn(user="mixed", password=MIXED_PW),
        proxy.dsn(user="mixed", password=token("mixed")),
        proxy.dsn(user="oldclient", password=MD5_CLIENT_PW),
        proxy.dsn(user="fromfile", password=APP_PASSWORD),
    ]
    for dsn in good:
        with psycopg.connect(dsn) as conn:
            conn.execute("select 1")
    expired = token("tokenuser", now=time.time() - 3600)
    tampered = token("tokenuser")[:-6] + "abcdef"
    logged_secrets.append(tampered)
    bad = [
        proxy.dsn(password=WRONG_PW),
        proxy.dsn(user="nobody", password=secret_pw),
        proxy.dsn(user="alice", password=APP_PASSWORD),  # the backend password: not hers
        proxy.dsn(user="tokenuser", password=expired),
        proxy.dsn(user="tokenuser", password=tampered),
        proxy.dsn(user="tokenuser", password=MIXED_PW),
        proxy.dsn(user="mixed", password=WRONG_PW),
        proxy.dsn(user="oldclient", password=WRONG_PW),
        proxy.dsn(user="fromfile", password=secret_pw),
        proxy.dsn(user="tokenuser", password=token("tokenuser"), sslmode="disable"),
    ]
    for dsn in bad:
        error = _connect_fails(dsn)
        for secret in {*STATIC_SECRETS, *logged_secrets}:
            assert secret not in str(error)
    # The capture works and saw every kind of outcome (so the grep is not vacuous).
    text = caplog.text
    assert "logged in as app" in text
    assert "IAM token of key" in text
    assert "token rejected" in text
    assert "wrong password (md5)" in text
    assert "IAM login refused without TLS" in text
    assert proxy.proxy.stats.failed_logins == len(bad) - 1  # the no-TLS refusal is not one


# --------------------------------------------------------------------------- backend PLUS


@pytest.fixture(scope="module")
def plus_pg(pg_factory: PostgresFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A cluster with ``ssl = on`` that accepts only hostssl SCRAM logins from 127.0.0.1:
    it offers SCRAM-SHA-256-PLUS to the proxy."""
    if os.environ.get("TRIOPROXY_TEST_DSN"):
        pytest.skip("needs a cluster the tests start")
    base = Path(
        tempfile.mkdtemp(prefix="trioproxy-plus-", dir=os.environ.get("TRIOPROXY_PG_TMPDIR"))
    )
    try:
        files = make_self_signed_ca_and_server(base)
        for path in (base, files.ca_cert, files.server_cert, files.server_key):
            if os.geteuid() == 0:
                shutil.chown(path, user=RUN_AS, group=None)
        files.server_key.chmod(0o600)
        server = pg_factory(
            {
                "ssl": True,
                "ssl_cert_file": str(files.server_cert),
                "ssl_key_file": str(files.server_key),
            },
            hba_lines=(
                "hostssl    all  all  127.0.0.1/32  scram-sha-256",
                "hostnossl  all  all  127.0.0.1/32  reject",
            ),
        )
        try:
            yield server
        finally:
            destroy_cluster(server)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_backend_login_uses_plus_when_offered(proxy_factory: Any, plus_pg: Any) -> None:
    proxy = proxy_factory(plus_pg, backend={"backend_tls": "require"})
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select current_user").fetchone() == (APP_USER,)


def test_backend_plus_binding_is_checked_by_the_server(
    proxy_factory: Any, plus_pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proof that the proxy really binds: with wrong binding data (as a proxy facing a
    man in the middle would compute it) the server refuses the login."""
    monkeypatch.setattr(backend_module, "tls_server_end_point", lambda _der: b"\x05" * 32)
    proxy = proxy_factory(plus_pg, backend={"backend_tls": "require"})
    error = _connect_fails(proxy.dsn())
    assert "channel binding" in str(error)
