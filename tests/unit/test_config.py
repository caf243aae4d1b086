from __future__ import annotations

import base64
import math
import textwrap
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import config as config_module
from trioproxy.config import (
    BackendConfig,
    BackendTLS,
    Config,
    ListenAddress,
    LogFormat,
    PoolConfig,
    PoolMode,
    ProxyConfig,
    UserConfig,
    load_config,
    parse_config,
)
from trioproxy.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "proxy.toml"
EXAMPLE_ENV = {
    "TRIOPROXY_ALICE_PASSWORD": "alice-secret",
    "TRIOPROXY_REPORTING_PASSWORD": "reporting-secret",
    "TRIOPROXY_REPORTING_BACKEND_PASSWORD": "ro-backend-secret",
}
ENV = {"ALICE_PASSWORD": "env-secret", "EMPTY": ""}
VERIFIER = "SCRAM-SHA-256$4096:{}${}:{}".format(
    base64.b64encode(b"salty-salt-1234").decode(),
    base64.b64encode(b"s" * 32).decode(),
    base64.b64encode(b"k" * 32).decode(),
)


def load_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Config:
    """Write *text* to tmp_path/proxy.toml and load it by its relative name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proxy.toml").write_text(textwrap.dedent(text), encoding="utf-8")
    return load_config("proxy.toml", environ=ENV)


# ------------------------------------------------------------------------------- defaults


def test_defaults_match_documented_values():
    config = Config()
    assert config.proxy.listen == (ListenAddress(host="127.0.0.1", port=6432),)
    assert config.proxy.require_tls is False
    assert config.proxy.tls_cert_file is None
    assert config.proxy.client_login_timeout == 60.0
    assert config.proxy.idle_client_timeout == 1800.0
    assert config.proxy.idle_in_transaction_timeout == 0.0
    assert config.proxy.max_client_connections == 10000
    assert config.proxy.max_message_size == 268435456
    assert config.proxy.log_format is LogFormat.TEXT
    assert config.proxy.shutdown_timeout == 30.0
    assert config.backend == BackendConfig(
        host="127.0.0.1",
        port=5432,
        backend_tls=BackendTLS.DISABLE,
        backend_tls_ca_file=None,
        connect_timeout=10.0,
    )
    assert config.pool.pool_mode is PoolMode.TRANSACTION
    assert config.pool.connection_borrow_timeout == 120.0
    assert config.pool.max_connections == 0
    assert config.pool.max_connections_percent == 100
    assert config.pool.max_idle_connections_percent == 50
    assert config.pool.server_lifetime == 3600.0
    assert config.pool.server_idle_timeout == 600.0
    assert config.pool.init_query == ""
    assert config.pool.session_pinning_filters == frozenset()
    assert dict(config.users) == {}
    assert config.source is None


def test_empty_document_gives_defaults():
    assert parse_config({}) == Config()
    assert parse_config({"proxy": {}, "backend": {}, "pool": {}, "users": {}}) == Config()


@pytest.mark.parametrize(
    ("cls", "checks"),
    [
        (ProxyConfig, config_module._PROXY_KEYS),
        (BackendConfig, config_module._BACKEND_KEYS),
        (PoolConfig, config_module._POOL_KEYS),
    ],
)
def test_every_field_has_a_check(cls, checks):
    assert {field.name for field in attrs.fields(cls)} == set(checks)


def test_embedding_config_is_frozen_and_hashable():
    user = UserConfig(name="alice", password="pw")
    config = Config(users={"alice": user})
    assert config.users["alice"].backend_user == "alice"
    assert config.users["alice"].backend_password == "pw"
    assert hash(config) == hash(Config(users={"alice": UserConfig(name="alice", password="pw")}))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.pool = PoolConfig()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.users["bob"] = user  # type: ignore[index]
    with pytest.raises(ValueError, match="bob"):
        Config(users={"bob": user})


# --------------------------------------------------------------------------- valid files


def test_example_file_parses():
    config = load_config(EXAMPLE, environ=EXAMPLE_ENV)
    assert config.source == EXAMPLE.absolute()
    assert [str(a) for a in config.proxy.listen] == ["127.0.0.1:6432", "[::1]:6432"]
    assert config.proxy.listen[1] == ListenAddress(host="::1", port=6432)
    assert config.pool.max_idle_connections_percent == 50
    alice = config.users["alice"]
    assert (alice.password, alice.backend_user, alice.backend_password) == (
        "alice-secret",
        "alice",
        "alice-secret",
    )
    reporting = config.users["reporting"]
    assert reporting.password == "reporting-secret"
    assert reporting.backend_user == "reporting_ro"
    assert reporting.backend_password == "ro-backend-secret"
    assert reporting.scram_verifier is None


def test_example_file_has_no_inline_secrets():
    for line in EXAMPLE.read_text().splitlines():
        code = line.split("#", 1)[0]
        assert "password =" not in code.replace("_password =", "")
        assert "scram_verifier" not in code


def test_full_file_with_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "tls").mkdir()
    for name in ("server.crt", "server.key", "ca.pem"):
        (tmp_path / "tls" / name).write_text("-----BEGIN-----\n")
    (tmp_path / "bob.secret").write_text("file-secret\n")
    config = load_text(
        tmp_path,
        monkeypatch,
        f"""
        [proxy]
        listen = ["0.0.0.0:0", "[::]:6433", "localhost:6434"]
        require_tls = true
        tls_cert_file = "tls/server.crt"
        tls_key_file = "tls/server.key"
        client_login_timeout = 0.5
        idle_client_timeout = 0
        idle_in_transaction_timeout = 30
        max_client_connections = 5
        max_message_size = 1024
        debug_logging = true
        log_format = "json"
        shutdown_timeout = 0.1

        [backend]
        host = "db.internal"
        port = 6543
        backend_tls = "verify-full"
        backend_tls_ca_file = "tls/ca.pem"
        connect_timeout = 2

        [pool]
        pool_mode = "session"
        connection_borrow_timeout = 0.05
        max_connections = 20
        max_connections_percent = 40
        max_idle_connections_percent = 10
        server_lifetime = 0
        server_idle_timeout = 1.5
        init_query = "SET application_name = 'x'"
        session_pinning_filters = ["EXCLUDE_VARIABLE_SETS"]

        [users.alice]
        password_env = "ALICE_PASSWORD"

        [users.bob]
        password_file = "bob.secret"
        backend_user = "bob_backend"
        backend_password = "inline-backend-secret"

        [users."app.reader"]
        scram_verifier = "{VERIFIER}"
        """,
    )
    proxy = config.proxy
    assert proxy.listen == (
        ListenAddress(host="0.0.0.0", port=0),  # noqa: S104 - it is the value under test
        ListenAddress(host="::", port=6433),
        ListenAddress(host="localhost", port=6434),
    )
    assert proxy.tls_cert_file == tmp_path / "tls" / "server.crt"
    assert proxy.tls_key_file == tmp_path / "tls" / "server.key"
    assert proxy.tls_cert_file is not None
    assert proxy.tls_cert_file.is_absolute()
    assert (proxy.client_login_timeout, proxy.idle_client_timeout) == (0.5, 0.0)
    assert isinstance(proxy.idle_in_transaction_timeout, float)
    assert (proxy.max_client_connections, proxy.max_message_size) == (5, 1024)
    assert proxy.debug_logging is True
    assert proxy.log_format is LogFormat.JSON
    assert config.backend == BackendConfig(
        host="db.internal",
        port=6543,
        backend_tls=BackendTLS.VERIFY_FULL,
        backend_tls_ca_file=tmp_path / "tls" / "ca.pem",
        connect_timeout=2.0,
    )
    assert config.pool == PoolConfig(
        pool_mode=PoolMode.SESSION,
        connection_borrow_timeout=0.05,
        max_connections=20,
        max_connections_percent=40,
        max_idle_connections_percent=10,
        server_lifetime=0.0,
        server_idle_timeout=1.5,
        init_query="SET application_name = 'x'",
        session_pinning_filters=frozenset({"EXCLUDE_VARIABLE_SETS"}),
    )
    assert config.users["alice"].password == "env-secret"
    bob = config.users["bob"]
    assert (bob.password, bob.backend_user, bob.backend_password) == (
        "file-secret",
        "bob_backend",
        "inline-backend-secret",
    )
    reader = config.users["app.reader"]
    assert (reader.password, reader.scram_verifier) == (None, VERIFIER)
    assert (reader.backend_user, reader.backend_password) == ("app.reader", None)
    assert config.source == tmp_path / "proxy.toml"


@pytest.mark.parametrize(("percent", "expected"), [(100, 50), (51, 25), (1, 0)])
def test_idle_percent_defaults_to_half(percent, expected):
    pool = parse_config({"pool": {"max_connections_percent": percent}}).pool
    assert pool.max_idle_connections_percent == expected


def test_empty_strings_mean_unset():
    config = parse_config(
        {
            "backend": {"backend_tls_ca_file": ""},
            "users": {"u": {"password": "pw", "scram_verifier": "", "backend_user": ""}},
        }
    )
    assert config.backend.backend_tls_ca_file is None
    assert config.users["u"].scram_verifier is None
    assert config.users["u"].backend_user == "u"


def test_parse_config_without_base_dir_keeps_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("crt").write_text("x")
    Path("key").write_text("x")
    proxy = parse_config({"proxy": {"tls_cert_file": "crt", "tls_key_file": "key"}}).proxy
    assert proxy.tls_cert_file == Path("crt")


def test_environ_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("TRIOPROXY_TEST_PW", "from-os")
    config = parse_config({"users": {"u": {"password_env": "TRIOPROXY_TEST_PW"}}})
    assert config.users["u"].password == "from-os"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:6432", ListenAddress(host="127.0.0.1", port=6432)),
        ("[::1]:0", ListenAddress(host="::1", port=0)),
        ("[fe80::1%eth0]:5", ListenAddress(host="fe80::1%eth0", port=5)),
        ("my-host.example:65535", ListenAddress(host="my-host.example", port=65535)),
    ],
)
def test_listen_address_round_trip(text, address):
    assert ListenAddress.parse(text) == address
    assert str(address) == text


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # unknown tables and keys, in every table
        ("[proxi]", "proxy.toml: proxi: unknown table (did you mean proxy?)"),
        ("listen = 'x:1'", "proxy.toml: listen: unknown table"),
        ("[proxy]\nlisten_port = 1", "proxy.toml: [proxy] listen_port: unknown key"),
        ("[backend]\nhostname = 'x'", "proxy.toml: [backend] hostname: unknown key (did you"),
        ("[pool]\nmax_conections = 1", "[pool] max_conections: unknown key (did you mean max_c"),
        ("[users.bob]\npasword = 'x'", "proxy.toml: [users.bob] pasword: unknown key"),
        ("[users.a]\npassword='x'\n'odd key' = 1", '[users.a] "odd key": unknown key'),
        # tables of the wrong shape
        ("proxy = 1", "proxy.toml: proxy: must be a table, got an integer"),
        ("users = []", "proxy.toml: users: must be a table, got an array"),
        ("[users]\nbob = 'pw'", "proxy.toml: [users] bob: must be a table, got a string"),
        # wrong types
        (
            "[pool]\nconnection_borrow_timeout = 'abc'",
            '[pool] connection_borrow_timeout: must be a number > 0 and <= 3600, got "abc"',
        ),
        ("[proxy]\nrequire_tls = 'yes'", '[proxy] require_tls: must be true or false, got "yes"'),
        (
            "[proxy]\nmax_client_connections = 1.5",
            "max_client_connections: must be an integer >= 1, got 1.5",
        ),
        (
            "[proxy]\nidle_client_timeout = true",
            "idle_client_timeout: must be a number >= 0, got true",
        ),
        (
            "[backend]\nport = '5432'",
            '[backend] port: must be an integer between 1 and 65535, got "5432"',
        ),
        ("[backend]\nhost = ''", "[backend] host: must not be empty"),
        ("[pool]\ninit_query = 1", "[pool] init_query: must be a string, got 1"),
        ("[proxy]\nlisten = 6432", '[proxy] listen: must be "host:port" or a non-empty array'),
        ("[proxy]\nlisten = []", "[proxy] listen: must be"),
        # out of range
        ("[proxy]\nclient_login_timeout = 0", "client_login_timeout: must be a number > 0, got 0"),
        ("[proxy]\nidle_client_timeout = -1", "idle_client_timeout: must be a number >= 0, got -1"),
        (
            "[proxy]\nshutdown_timeout = inf",
            "shutdown_timeout: must be a number >= 0, got Infinity",
        ),
        ("[proxy]\nshutdown_timeout = nan", "shutdown_timeout: must be a number >= 0, got NaN"),
        (
            "[proxy]\nmax_message_size = 1023",
            "max_message_size: must be an integer between 1024 and 1073741824",
        ),
        ("[proxy]\nmax_message_size = 1073741825", "max_message_size: must be an integer between"),
        ("[proxy]\nmax_client_connections = 0", "max_client_connections: must be an integer >= 1"),
        ("[backend]\nport = 0", "[backend] port: must be an integer between 1 and 65535, got 0"),
        ("[backend]\nconnect_timeout = 0", "[backend] connect_timeout: must be a number > 0"),
        (
            "[pool]\nconnection_borrow_timeout = 0",
            "connection_borrow_timeout: must be a number > 0",
        ),
        (
            "[pool]\nconnection_borrow_timeout = 3601",
            "connection_borrow_timeout: must be a number > 0 and <= 3600, got 3601",
        ),
        ("[pool]\nmax_connections = -1", "[pool] max_connections: must be an integer >= 0"),
        (
            "[pool]\nmax_connections_percent = 0",
            "max_connections_percent: must be an integer between 1 and 100",
        ),
        (
            "[pool]\nmax_connections_percent = 101",
            "max_connections_percent: must be an integer between 1 and 100",
        ),
        (
            "[pool]\nmax_idle_connections_percent = -2",
            "max_idle_connections_percent: must be an integer between -1 and 100",
        ),
        (
            "[pool]\nmax_connections_percent = 50\nmax_idle_connections_percent = 60",
            "[pool] max_idle_connections_percent: must be <= max_connections_percent (50), got 60",
        ),
        ("[pool]\nserver_lifetime = -0.5", "[pool] server_lifetime: must be a number >= 0"),
        # listen syntax
        ("[proxy]\nlisten = '::1:6432'", 'write IPv6 addresses as "[::1]:6432", got "::1:6432"'),
        ("[proxy]\nlisten = 'localhost'", '[proxy] listen: must be "host:port"'),
        ("[proxy]\nlisten = ':6432'", '[proxy] listen: must be "host:port"'),
        ("[proxy]\nlisten = 'h:65536'", "[proxy] listen: port must be between 0 and 65535"),
        ("[proxy]\nlisten = '[nope]:1'", "[proxy] listen: 'nope' is not an IPv6 address"),
        ("[proxy]\nlisten = ['a:1', 'a:1']", '[proxy] listen: "a:1" is listed twice'),
        ("[proxy]\nlisten = ['a:1', 2]", "[proxy] listen: must be"),
        # bad enums
        (
            "[proxy]\nlog_format = 'xml'",
            '[proxy] log_format: must be one of "text", "json", got "xml"',
        ),
        (
            "[backend]\nbackend_tls = 'verify-ca'",
            'backend_tls: must be one of "disable", "prefer", "require", "verify-full", got "verif',
        ),
        ("[backend]\nbackend_tls = 1", "[backend] backend_tls: must be one of"),
        (
            "[pool]\npool_mode = 'statement'",
            '[pool] pool_mode: must be one of "transaction", "session", got "statement"',
        ),
        (
            "[pool]\nsession_pinning_filters = ['EXCLUDE_EVERYTHING']",
            '[pool] session_pinning_filters: must be an array of "EXCLUDE_VARIABLE_SETS"',
        ),
        (
            "[pool]\nsession_pinning_filters = 'EXCLUDE_VARIABLE_SETS'",
            "[pool] session_pinning_filters: must be an array",
        ),
        # cross-field rules
        (
            "[proxy]\nrequire_tls = true",
            "proxy.toml: [proxy] tls_cert_file: required when require_tls = true",
        ),
        (
            "[proxy]\ntls_cert_file = 'proxy.toml'",
            "[proxy] tls_key_file: tls_cert_file and tls_key_file must be given together",
        ),
        (
            "[proxy]\ntls_cert_file = 'missing.crt'\ntls_key_file = 'proxy.toml'",
            '[proxy] tls_cert_file: file "',
        ),
        (
            "[backend]\nbackend_tls = 'verify-full'",
            '[backend] backend_tls_ca_file: required when backend_tls = "verify-full"',
        ),
        ("[backend]\nbackend_tls_ca_file = 'nope.pem'", "[backend] backend_tls_ca_file: file "),
        # users
        (
            "[users.alice]\npassword = 'x'\npassword_env = 'ALICE_PASSWORD'",
            "[users.alice] password_env: conflicts with password; give only one of password, pas",
        ),
        (
            "[users.alice]\npassword_env = 'ALICE_PASSWORD'\npassword_file = 'f'",
            "[users.alice] password_file: conflicts with password_env",
        ),
        (
            "[users.a]\npassword = 'x'\nbackend_password = 'y'\nbackend_password_file = 'f'",
            "[users.a] backend_password_file: conflicts with backend_password",
        ),
        (
            "[users.alice]\nbackend_user = 'x'",
            "proxy.toml: [users.alice] password: no client credential",
        ),
        (
            "[users.alice]\npassword_env = 'NOT_SET_ANYWHERE'",
            "[users.alice] password_env: environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            "[users.alice]\npassword_env = 'EMPTY'",
            "[users.alice] password_env: environment variable EMPTY is empty",
        ),
        (
            "[users.alice]\npassword_env = 'not a name'",
            '[users.alice] password_env: must be an environment variable name, got "not a name"',
        ),
        (
            "[users.alice]\npassword_file = 'missing.secret'",
            '[users.alice] password_file: cannot read file "',
        ),
        ("[users.alice]\npassword_file = '.'", "[users.alice] password_file: cannot read file"),
        ("[users.alice]\npassword = ''", "[users.alice] password: must not be empty"),
        ("[users.alice]\npassword_file = ''", "[users.alice] password_file: must be a file name"),
        (
            "[users.alice]\npassword = 'x'\nbackend_password_env = 'NOPE'",
            "[users.alice] backend_password_env: environment variable NOPE is not set",
        ),
        (
            "[users.alice]\nscram_verifier = 'md5abc'",
            "[users.alice] scram_verifier: must be a PostgreSQL SCRAM-SHA-256 verifier",
        ),
        (
            "[users.alice]\nscram_verifier = 'SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA'",
            "[users.alice] scram_verifier: must be",
        ),
        ('[users.""]\npassword = "x"', 'proxy.toml: users."": must be a non-empty name'),
        ('[users."bob smith"]\npassword = 1', '[users."bob smith"] password: must be a string'),
    ],
)
def test_errors_name_file_table_and_key(tmp_path, monkeypatch, toml, message):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, monkeypatch, toml)
    text = str(info.value)
    assert text.startswith("proxy.toml: ")
    assert message in text
    assert text == info.value.message


def test_secret_values_never_in_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, monkeypatch, "[users.a]\npassword = 123456789")
    assert "123456789" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, monkeypatch, "[users.a]\nscram_verifier = 'SCRAM-hunter2'")
    assert "hunter2" not in str(info.value)


def test_password_file_relative_to_config_and_newline_stripped(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pw").write_text("line-secret\r\n")
    (tmp_path / "conf" / "proxy.toml").write_text("[users.a]\npassword_file = 'pw'\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("conf/proxy.toml")
    assert config.users["a"].password == "line-secret"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read configuration: No such file"):
        load_config(tmp_path / "nope.toml")


def test_a_home_directory_that_cannot_be_expanded_is_a_config_error(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('[users.a]\nsecret_file = "~no-such-user-x9/secret"\n')
    with pytest.raises(
        ConfigError, match=r"\[users\.a\] secret_file: cannot expand the home directory"
    ):
        load_config(path)


@pytest.mark.parametrize(
    "content", [b"[proxy\n", b"[proxy]\nlisten = \n", b"a = 1\na = 2\n", b"\xff\xfe"]
)
def test_invalid_toml(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: "):
        load_config(path)


def test_secrets_absent_from_repr(tmp_path, monkeypatch):
    (tmp_path / "bob.secret").write_text("file-secret-777\n")
    config = load_text(
        tmp_path,
        monkeypatch,
        f"""
        [users.alice]
        password_env = "ALICE_PASSWORD"
        backend_password = "inline-backend-555"
        [users.bob]
        password_file = "bob.secret"
        scram_verifier = "{VERIFIER}"
        """,
    )
    assert config.users["alice"].password == ENV["ALICE_PASSWORD"]
    for text in (repr(config), str(config), repr(config.users), repr(config.users["bob"])):
        assert "alice" in text or "bob" in text
        for secret in ("env-secret", "inline-backend-555", "file-secret-777", VERIFIER[20:40]):
            assert secret not in text


# ---------------------------------------------------------------------------- hypothesis

_KNOWN_STRINGS = [
    "",
    "127.0.0.1:0",
    "[::1]:0",
    "localhost:6432",
    "transaction",
    "session",
    "json",
    "verify-full",
    "prefer",
    "EXCLUDE_VARIABLE_SETS",
    "ALICE_PASSWORD",
    "EMPTY",
    "/dev/null",
    ".",
    "a\x00b",
    VERIFIER,
]
_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.dates(),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
# Values that pass some check, so that many documents get past the first key.
_plausible = st.sampled_from(
    [0, 1, 2, 50, 100, 5432, -1, 0.5, 1.5, True, False, ["EXCLUDE_VARIABLE_SETS"], *_KNOWN_STRINGS]
)


@st.composite
def _table(draw, keys):
    table = {}
    for _ in range(draw(st.integers(0, 5))):
        odd = draw(st.integers(0, 9)) == 5
        key = draw(st.text(max_size=8) if odd else st.sampled_from(sorted(keys)))
        table[key] = draw(_values if draw(st.booleans()) else _plausible)
    return table


@st.composite
def _documents(draw):
    tables = {
        "proxy": config_module._PROXY_KEYS,
        "backend": config_module._BACKEND_KEYS,
        "pool": config_module._POOL_KEYS,
    }
    document = {}
    for name, keys in tables.items():
        if draw(st.booleans()):
            document[name] = draw(_values if draw(st.integers(0, 9)) == 5 else _table(keys))
    if draw(st.booleans()):
        names = st.sampled_from(["alice", "bob", ""]) | st.text(max_size=6)
        user = _table(config_module._USER_KEYS)
        document["users"] = draw(st.dictionaries(names, user, max_size=3) | _values)
    if draw(st.integers(0, 19)) == 5:
        document[draw(st.text(max_size=8))] = draw(_values)
    return document


@settings(max_examples=500)
@given(_documents())
def test_random_documents_parse_or_raise_config_error(document):
    try:
        config = parse_config(
            document, source="fuzz.toml", base_dir=Path("/nonexistent"), environ=ENV
        )
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml: ")
    else:
        assert isinstance(config, Config)
        assert config.pool.max_idle_connections_percent <= config.pool.max_connections_percent
        for part in (config.proxy, config.backend, config.pool):
            floats = [v for v in attrs.astuple(part, recurse=False) if isinstance(v, float)]
            assert all(math.isfinite(v) for v in floats)
        hash(config)


@settings(max_examples=300)
@given(_table(config_module._USER_KEYS))
def test_random_user_tables_parse_or_raise_config_error(table):
    try:
        config = parse_config({"users": {"u": table}}, base_dir=Path("/nonexistent"), environ=ENV)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("<config>: [users.u] ")
    else:
        user = config.users["u"]
        assert user.password is not None or user.scram_verifier is not None


# --------------------------------------------------------------------------- workers, peers


def test_workers_and_peers(tmp_path, monkeypatch):
    config = load_text(
        tmp_path,
        monkeypatch,
        """
        [proxy]
        workers = 4
        peer_id = 1

        [[peers]]
        peer_id = 2
        host = "proxy-b.internal"
        port = 6432

        [[peers]]
        peer_id = 3
        host = "10.0.0.3"
        port = 6433
        """,
    )
    assert config.proxy.workers == 4
    assert config.proxy.peer_id == 1
    assert [(p.peer_id, p.host, p.port) for p in config.peers] == [
        (2, "proxy-b.internal", 6432),
        (3, "10.0.0.3", 6433),
    ]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[proxy]\nworkers = 0", "[proxy] workers: must be"),
        ("[proxy]\nworkers = 65", "[proxy] workers: must be"),
        ("[proxy]\npeer_id = 128", "[proxy] peer_id: must be"),
        (
            "[[peers]]\npeer_id = 2\nhost = 'b'\nport = 6432",
            "[proxy] peer_id: required (1..127) when [[peers]] are listed",
        ),
        (
            "[proxy]\npeer_id = 1\n[[peers]]\npeer_id = 1\nhost = 'b'\nport = 6432",
            "[peers.0] peer_id: 1 is this instance's own peer_id",
        ),
        (
            "[proxy]\npeer_id = 1\n[[peers]]\npeer_id = 2\nhost = 'b'\nport = 1\n"
            "[[peers]]\npeer_id = 2\nhost = 'c'\nport = 2",
            "[peers.1] peer_id: 2 is listed twice",
        ),
        ("[proxy]\npeer_id = 1\n[[peers]]\npeer_id = 2\nport = 6432", "[peers.0] host: required"),
        ("[proxy]\npeer_id = 1\n[[peers]]\npeer_id = 2\nhost = 'b'\nport = 0", "[peers.0] port"),
        ("[proxy]\npeer_id = 1\npeers = 3", "[proxy] peers: unknown key"),
    ],
)
def test_workers_and_peers_errors(tmp_path, monkeypatch, toml, message):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, monkeypatch, toml)
    assert message in str(info.value)
