"""Configuration: a TOML file parsed into frozen attrs classes.

Pure code (no trio). Every setting is described once, in a small table of *checks* per TOML
table (``_PROXY_KEYS`` and friends); a check turns a raw TOML value into the typed value or
raises :class:`_Invalid`, which :func:`parse_config` turns into a :class:`ConfigError` naming
the file, the table and the key::

    proxy.toml: [pool] connection_borrow_timeout: must be a number > 0 and <= 3600, got "abc"

Setting names follow AWS RDS Proxy where it has an equivalent (``connection_borrow_timeout``,
``max_connections_percent``, ``idle_client_timeout``, ``session_pinning_filters``, ...).
Every class has defaults matching ``docs/configuration.md`` so ``Config()`` works when
trioproxy is embedded. Secrets (passwords, SCRAM verifiers) never appear in ``repr()`` or in
error messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import difflib
import enum
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

from trioproxy.errors import ConfigError

__all__ = [
    "BackendConfig",
    "BackendTLS",
    "Config",
    "ListenAddress",
    "LogFormat",
    "PoolConfig",
    "PoolMode",
    "ProxyConfig",
    "UserConfig",
    "load_config",
    "parse_config",
]

_K = TypeVar("_K")
_V = TypeVar("_V")
_E = TypeVar("_E", bound=enum.Enum)


class BackendTLS(enum.Enum):
    """TLS towards PostgreSQL, with libpq ``sslmode`` semantics."""

    DISABLE = "disable"
    PREFER = "prefer"
    REQUIRE = "require"
    VERIFY_FULL = "verify-full"


class PoolMode(enum.Enum):
    """When a server connection goes back to the pool."""

    TRANSACTION = "transaction"
    SESSION = "session"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


SESSION_PINNING_FILTERS: Final = frozenset({"EXCLUDE_VARIABLE_SETS"})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen(kw_only=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``"host:port"`` / ``"[v6addr]:port"``; raise ValueError with a short reason."""
        match = re.fullmatch(r"\[([^\[\]]+)\]:([0-9]{1,5})|([A-Za-z0-9_.-]+):([0-9]{1,5})", text)
        if match is None:
            if text.count(":") > 1 and not text.startswith("["):
                raise ValueError('must be "host:port"; write IPv6 addresses as "[::1]:6432"')
            raise ValueError('must be "host:port" (IPv6 as "[::1]:6432")')
        v6host, v6port, host, port = match.groups()
        if v6host is not None:
            try:
                ipaddress.IPv6Address(v6host)
            except ValueError:
                raise ValueError(f"{v6host!r} is not an IPv6 address") from None
            host, port = v6host, v6port
        if int(port) > 65535:
            raise ValueError("port must be between 0 and 65535")
        return cls(host=host, port=int(port))


@attrs.frozen(kw_only=True)
class ProxyConfig:
    """``[proxy]``: the client-facing side."""

    listen: tuple[ListenAddress, ...] = (ListenAddress(host="127.0.0.1", port=6432),)
    require_tls: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    client_login_timeout: float = 60.0
    idle_client_timeout: float = 1800.0
    idle_in_transaction_timeout: float = 0.0
    max_client_connections: int = 10000
    max_message_size: int = 256 * 1024 * 1024
    debug_logging: bool = False
    log_format: LogFormat = LogFormat.TEXT
    shutdown_timeout: float = 30.0
    notify_on_pin: bool = False
    #: Serve the common transactions in one batched task (trioproxy/_server/dataplane.py);
    #: off: each client's own task moves its bytes (a fallback, and the A/B reference).
    data_plane: bool = True
    #: Clients must come from one of these networks; None = from anywhere.
    allowed_client_cidrs: tuple[IPNetwork, ...] | None = None
    #: Seconds between re-reads of secret_file / secret_arn secrets; 0 = never.
    secret_refresh_interval: float = 300.0
    #: Secrets Manager endpoint override (a local moto server in tests); None = AWS.
    aws_endpoint_url: str | None = None
    #: Failed-login back-off per client address: this many failures are free; after the
    #: k-th failure beyond them, every auth answer to that address waits
    #: failed_login_delay * 2**(k-1) seconds, at most failed_login_max_delay.
    failed_login_free_attempts: int = 5
    failed_login_delay: float = 0.5
    failed_login_max_delay: float = 15.0
    #: Failures older than this many seconds are forgotten.
    failed_login_window: float = 600.0
    #: Where to serve Prometheus metrics (``GET /metrics``); None = off.
    metrics_listen: ListenAddress | None = None
    #: Users who may log in to the admin console (database ``trioproxy``).
    admin_users: frozenset[str] = frozenset()
    #: Processes sharing the listening ports (SO_REUSEPORT) under a supervisor; the CLI
    #: only (an embedded proxy is one worker in the host's process).
    workers: int = 1
    #: This instance's id among ``[[peers]]`` (written into cancel keys); 0 = no peering.
    peer_id: int = 0


@attrs.frozen(kw_only=True)
class BackendConfig:
    """``[backend]``: the PostgreSQL server behind the proxy."""

    host: str = "127.0.0.1"
    port: int = 5432
    backend_tls: BackendTLS = BackendTLS.DISABLE
    backend_tls_ca_file: Path | None = None
    connect_timeout: float = 10.0
    #: Several servers (primary and standbys): new connections go to the writer. Empty:
    #: just ``host:port``.
    targets: tuple[ListenAddress, ...] = ()

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        if self.targets:
            return tuple((t.host, t.port) for t in self.targets)
        return ((self.host, self.port),)


@attrs.frozen(kw_only=True)
class PoolConfig:
    """``[pool]``: RDS Proxy's ``connection_pool_config``."""

    pool_mode: PoolMode = PoolMode.TRANSACTION
    connection_borrow_timeout: float = 120.0
    max_connections: int = 0
    max_connections_percent: int = 100
    max_idle_connections_percent: int = 50  # resolved: never -1
    server_lifetime: float = 3600.0
    server_idle_timeout: float = 600.0
    init_query: str = ""
    session_pinning_filters: frozenset[str] = frozenset()
    max_prepared_statements: int = 100


def _default_backend_password(self: UserConfig) -> str | None:
    return self.password


class ClientPasswordAuthType(enum.Enum):
    """How a client proves its password (RDS Proxy's ``ClientPasswordAuthType``)."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"  # for old clients; needs the user's plaintext password


class IamAuth(enum.Enum):
    """``iam_auth`` of a user, as RDS Proxy names it."""

    DISABLED = "DISABLED"
    REQUIRED = "REQUIRED"  # only an IAM-style auth token
    ENABLED = "ENABLED"  # a token or the password


@attrs.frozen(kw_only=True)
class IamKeyConfig:
    """``[iam.keys.<access key id>]``: one signing key of the proxy's key registry."""

    access_key_id: str
    secret_access_key: str = attrs.field(repr=False)
    allowed_users: frozenset[str] = frozenset({"*"})


def _frozen_keys_converter(keys: Mapping[str, IamKeyConfig]) -> Mapping[str, IamKeyConfig]:
    return _frozen_keys(keys)


@attrs.frozen(kw_only=True)
class IamConfig:
    """``[iam]``: how auth tokens are checked."""

    #: The ``host:port`` names clients sign tokens for (the proxy's endpoint names).
    endpoints: frozenset[str] = frozenset()
    regions: frozenset[str] = frozenset({"us-east-1"})
    max_clock_skew: float = 300.0
    keys: Mapping[str, IamKeyConfig] = attrs.field(
        factory=lambda: _frozen_keys({}), converter=_frozen_keys_converter
    )


@attrs.frozen(kw_only=True)
class UserConfig:
    """``[users.<name>]``. ``backend_password`` defaults to ``password``."""

    name: str
    iam_auth: IamAuth = IamAuth.DISABLED
    #: Overrides ``[pool] pool_mode`` for this user's pools.
    pool_mode: PoolMode | None = None
    password: str | None = attrs.field(default=None, repr=False)
    scram_verifier: str | None = attrs.field(default=None, repr=False)
    backend_user: str = attrs.field(default=attrs.Factory(lambda self: self.name, takes_self=True))
    backend_password: str | None = attrs.field(
        default=attrs.Factory(_default_backend_password, takes_self=True), repr=False
    )
    client_password_auth_type: ClientPasswordAuthType = ClientPasswordAuthType.SCRAM_SHA_256
    #: A JSON file in Secrets Manager's shape: the backend credentials (re-read).
    secret_file: Path | None = None
    #: An AWS Secrets Manager secret (``arn:aws:secretsmanager:...``), read through boto3.
    secret_arn: str | None = None


class _FrozenMap(Mapping[_K, _V]):
    """An immutable, hashable mapping (``MappingProxyType`` is not hashable)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[_K, _V] | None = None) -> None:
        self._data: dict[_K, _V] = dict(data or {})

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self._data.items())}}}"


def _frozen_keys(keys: Mapping[str, IamKeyConfig]) -> Mapping[str, IamKeyConfig]:
    return keys if isinstance(keys, _FrozenMap) else _FrozenMap(keys)


def _freeze_users(users: Mapping[str, UserConfig]) -> Mapping[str, UserConfig]:
    return users if isinstance(users, _FrozenMap) else _FrozenMap(users)


def _check_user_names(
    _instance: object, _attribute: object, users: Mapping[str, UserConfig]
) -> None:
    for name, user in users.items():
        if name != user.name:
            raise ValueError(f"users[{name!r}] holds the UserConfig of {user.name!r}")


class EndpointRole(enum.Enum):
    READ_WRITE = "read-write"
    READ_ONLY = "read-only"


@attrs.frozen(kw_only=True)
class EndpointConfig:
    """``[[endpoints]]``: an extra listener. ``read-only`` endpoints spread their clients
    over the healthy standbys among ``[backend] targets`` (RDS Proxy's reader endpoint)."""

    listen: tuple[ListenAddress, ...]
    role: EndpointRole = EndpointRole.READ_ONLY


@attrs.frozen(kw_only=True)
class PeerConfig:
    """``[[peers]]``: another instance behind the same load balancer. A CancelRequest
    whose key another instance issued is forwarded to it (PgBouncer's peering)."""

    peer_id: int
    host: str
    port: int


@attrs.frozen(kw_only=True)
class Config:
    proxy: ProxyConfig = attrs.field(factory=ProxyConfig)
    endpoints: tuple[EndpointConfig, ...] = ()
    peers: tuple[PeerConfig, ...] = ()
    backend: BackendConfig = attrs.field(factory=BackendConfig)
    pool: PoolConfig = attrs.field(factory=PoolConfig)
    iam: IamConfig = attrs.field(factory=IamConfig)
    users: Mapping[str, UserConfig] = attrs.field(
        factory=_FrozenMap, converter=_freeze_users, validator=_check_user_names
    )
    source: Path | None = None


# --------------------------------------------------------------------------------------------
# Checks: raw TOML value -> typed value, or _Invalid("must be ...").


class _Invalid(Exception):
    """A check rejected a value; :class:`_Context` adds the file, table and key."""


_Check = Callable[[object], object]


def _show(value: object) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    for cls, name in names.items():
        if type(value) is cls:
            return name
    if isinstance(value, Mapping):
        return "a table"
    return "an array" if isinstance(value, list) else type(value).__name__


def _fmt(x: float) -> str:
    return f"{x:g}"


def _number(low: float, high: float = math.inf, *, above: bool = False) -> _Check:
    """A finite int or float with ``low <= x`` (``low < x`` if *above*) and ``x <= high``."""
    want = f"a number {'>' if above else '>='} {_fmt(low)}"
    if high != math.inf:
        want += f" and <= {_fmt(high)}"

    def check(value: object) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            in_range = (low < value if above else low <= value) and value <= high
            if in_range and value < math.inf:  # NaN fails every comparison
                with contextlib.suppress(OverflowError):  # huge ints
                    return float(value)
        raise _Invalid(f"must be {want}, got {_show(value)}")

    return check


def _integer(low: int, high: int | None = None) -> _Check:
    want = f"an integer >= {low}" if high is None else f"an integer between {low} and {high}"

    def check(value: object) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise _Invalid(f"must be {want}, got {_show(value)}")
        return value

    return check


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _string(*, empty_ok: bool = True, secret: bool = False) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            got = _type_name(value) if secret else _show(value)
            raise _Invalid(f"must be a string, got {got}")
        if "\0" in value:
            raise _Invalid("must not contain NUL characters")
        if not value and not empty_ok:
            raise _Invalid("must not be empty")
        return value

    return check


def _optional_string(value: object) -> str | None:
    """A string where ``""`` means unset."""
    return _string()(value) or None


def _enum(cls: type[_E]) -> Callable[[object], _E]:
    choices = ", ".join(json.dumps(member.value) for member in cls)

    def check(value: object) -> _E:
        for member in cls:
            if member.value == value and isinstance(value, str):
                return member
        raise _Invalid(f"must be one of {choices}, got {_show(value)}")

    return check


def _path(value: object) -> Path | None:
    """A file name; ``""`` means unset. Relative names are resolved later, in ``_Context``."""
    text = _string()(value)
    if not text:
        return None
    try:
        return Path(text).expanduser()
    except RuntimeError:  # '~name' of a user this machine does not know
        raise _Invalid(f"cannot expand the home directory in {_show(value)}") from None


def _file_name(value: object) -> Path:
    path = _path(value)
    if path is None:
        raise _Invalid('must be a file name, got ""')
    return path


def _env_name(value: object) -> str:
    text = _string()(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text):
        raise _Invalid(f"must be an environment variable name, got {_show(value)}")
    return text


def _listen(value: object) -> tuple[ListenAddress, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise _Invalid(f'must be "host:port" or a non-empty array of them, got {_show(value)}')
    addresses: list[ListenAddress] = []
    for item in items:
        try:
            address = ListenAddress.parse(item)
        except ValueError as exc:
            raise _Invalid(f"{exc}, got {_show(item)}") from None
        if address in addresses:
            raise _Invalid(f"{_show(item)} is listed twice")
        addresses.append(address)
    return tuple(addresses)


def _targets(value: object) -> tuple[ListenAddress, ...]:
    targets = _listen(value)
    if any(t.port == 0 for t in targets):
        raise _Invalid(f"ports must be 1..65535, got {_show(value)}")
    return targets


def _optional_listen(value: object) -> ListenAddress | None:
    """One ``"host:port"``; ``""`` means off."""
    text = _string()(value)
    if not text:
        return None
    try:
        return ListenAddress.parse(text)
    except ValueError as exc:
        raise _Invalid(f"{exc}, got {_show(value)}") from None


def _pinning_filters(value: object) -> frozenset[str]:
    allowed = ", ".join(json.dumps(f) for f in sorted(SESSION_PINNING_FILTERS))
    if not isinstance(value, list) or not all(
        isinstance(f, str) and f in SESSION_PINNING_FILTERS for f in value
    ):
        raise _Invalid(f"must be an array of {allowed}, got {_show(value)}")
    return frozenset(value)


_SCRAM_RE: Final = re.compile(
    r"SCRAM-SHA-256\$([0-9]{1,9}):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)


def _scram_verifier(value: object) -> str | None:
    text = _string(secret=True)(value)
    if not text:
        return None
    match = _SCRAM_RE.fullmatch(text)
    try:
        iterations, *keys = match.groups() if match else ("0", "", "", "")
        salt, stored, server = (base64.b64decode(key, validate=True) for key in keys)
        ok = int(iterations) > 0 and bool(salt) and len(stored) == len(server) == 32
    except binascii.Error:
        ok = False
    if not ok:
        raise _Invalid(
            "must be a PostgreSQL SCRAM-SHA-256 verifier "
            '"SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"'
        )
    return text


def _cidrs(value: object) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Invalid(
            f'must be a non-empty array of networks like "10.0.0.0/8", got {_show(value)}'
        )
    networks: list[IPNetwork] = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise _Invalid(f"{exc}, got {_show(item)}") from None
    return tuple(networks)


_SECRET_ARN_RE: Final = re.compile(
    r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[^\s:]+"
)


def _secret_arn(value: object) -> str:
    text = _string()(value)
    if not _SECRET_ARN_RE.fullmatch(text):
        raise _Invalid(
            'must be a Secrets Manager ARN "arn:aws:secretsmanager:<region>:<account>:secret:'
            f'<name>", got {_show(value)}'
        )
    return text


def _url(value: object) -> str | None:
    text = _string()(value)
    if text and not re.fullmatch(r"https?://\S+", text):
        raise _Invalid(f"must be an http(s) URL, got {_show(value)}")
    return text or None


def _string_list(value: object) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"must be a list of non-empty strings, got {_show(value)}")
    return frozenset(value)


_SECRET_KEYS: Final[Mapping[str, _Check]] = {
    "": _string(empty_ok=False, secret=True),
    "_env": _env_name,
    "_file": _file_name,
}

_PROXY_KEYS: Final[Mapping[str, _Check]] = {
    "listen": _listen,
    "require_tls": _boolean,
    "tls_cert_file": _path,
    "tls_key_file": _path,
    "client_login_timeout": _number(0, above=True),
    "idle_client_timeout": _number(0),
    "idle_in_transaction_timeout": _number(0),
    "max_client_connections": _integer(1),
    "max_message_size": _integer(1024, 1024 * 1024 * 1024),
    "debug_logging": _boolean,
    "log_format": _enum(LogFormat),
    "shutdown_timeout": _number(0),
    "notify_on_pin": _boolean,
    "data_plane": _boolean,
    "allowed_client_cidrs": _cidrs,
    "secret_refresh_interval": _number(0),
    "aws_endpoint_url": _url,
    "failed_login_free_attempts": _integer(0),
    "failed_login_delay": _number(0, 60),
    "failed_login_max_delay": _number(0, 3600),
    "failed_login_window": _number(0, above=True),
    "metrics_listen": _optional_listen,
    "admin_users": _string_list,
    "workers": _integer(1, 64),
    "peer_id": _integer(0, 127),
}
_BACKEND_KEYS: Final[Mapping[str, _Check]] = {
    "host": _string(empty_ok=False),
    "port": _integer(1, 65535),
    "backend_tls": _enum(BackendTLS),
    "backend_tls_ca_file": _path,
    "connect_timeout": _number(0, above=True),
    "targets": _targets,
}
_POOL_KEYS: Final[Mapping[str, _Check]] = {
    "pool_mode": _enum(PoolMode),
    "connection_borrow_timeout": _number(0, 3600, above=True),
    "max_connections": _integer(0),
    "max_connections_percent": _integer(1, 100),
    "max_idle_connections_percent": _integer(-1, 100),
    "server_lifetime": _number(0),
    "server_idle_timeout": _number(0),
    "init_query": _string(),
    "session_pinning_filters": _pinning_filters,
    "max_prepared_statements": _integer(1, 100_000),
}
_USER_KEYS: Final[Mapping[str, _Check]] = {
    **{f"password{suffix}": check for suffix, check in _SECRET_KEYS.items()},
    **{f"backend_password{suffix}": check for suffix, check in _SECRET_KEYS.items()},
    "scram_verifier": _scram_verifier,
    "backend_user": _optional_string,
    "iam_auth": _enum(IamAuth),
    "client_password_auth_type": _enum(ClientPasswordAuthType),
    "secret_file": _file_name,
    "secret_arn": _secret_arn,
    "pool_mode": _enum(PoolMode),
}
_IAM_KEYS: Final[Mapping[str, _Check]] = {
    "endpoints": _string_list,
    "regions": _string_list,
    "max_clock_skew": _number(0, 3600),
    "keys": lambda value: value,  # checked table by table below
}
_IAM_KEY_KEYS: Final[Mapping[str, _Check]] = {
    **{f"secret_access_key{suffix}": check for suffix, check in _SECRET_KEYS.items()},
    "allowed_users": _string_list,
}
_TABLES: Final = ("proxy", "backend", "pool", "iam", "users", "endpoints", "peers")
_PEER_KEYS: Final[Mapping[str, _Check]] = {
    "peer_id": _integer(1, 127),
    "host": _string(empty_ok=False),
    "port": _integer(1, 65535),
}
_ENDPOINT_KEYS: Final[Mapping[str, _Check]] = {
    "listen": _listen,
    "role": _enum(EndpointRole),
}


# --------------------------------------------------------------------------------------------
# Parsing


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


@attrs.frozen
class _Context:
    source: str
    base_dir: Path | None
    environ: Mapping[str, str]

    def error(self, table: str | None, key: str, message: str) -> ConfigError:
        where = f"[{table}] {key}" if table is not None else key
        return ConfigError(f"{self.source}: {where}: {message}")

    def resolve(self, path: Path | None) -> Path | None:
        if path is None or self.base_dir is None:
            return path
        return self.base_dir / path

    def table(
        self, parent: Mapping[str, object], key: str, table: str | None
    ) -> Mapping[str, object]:
        raw = parent.get(key, {})
        if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
            raise self.error(table, key, f"must be a table, got {_type_name(raw)}")
        return raw

    def check(
        self, raw: Mapping[str, object], table: str, checks: Mapping[str, _Check]
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key, value in raw.items():
            check = checks.get(key)
            if check is None:
                raise self.error(table, _toml_key(key), "unknown key" + _suggest(key, checks))
            try:
                values[key] = check(value)
            except _Invalid as exc:
                raise self.error(table, key, str(exc)) from None
        return values

    def existing_file(self, values: dict[str, Any], table: str, key: str) -> Path | None:
        path = self.resolve(values.get(key))
        if path is not None and not path.is_file():
            raise self.error(table, key, f"file {_show(str(path))} does not exist")
        return path

    def secret(self, values: Mapping[str, Any], table: str, key: str) -> str | None:
        """The one of ``key``, ``key_env``, ``key_file`` given in *values*, read; or None."""
        given = [key + suffix for suffix in _SECRET_KEYS if key + suffix in values]
        if len(given) > 1:
            raise self.error(
                table, given[1], f"conflicts with {given[0]}; give only one of {', '.join(given)}"
            )
        if not given:
            return None
        if given[0] == key:
            return str(values[key])
        if given[0] == key + "_env":
            text = self.environ.get(str(values[given[0]]))
            what = f"environment variable {values[given[0]]}"
            if text is None:
                raise self.error(table, given[0], f"{what} is not set")
        else:
            path = self.resolve(values[given[0]]) or Path()
            what = f"file {_show(str(path))}"
            try:
                text = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, ValueError) as exc:
                reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                raise self.error(table, given[0], f"cannot read {what}: {reason}") from None
        if not text or "\0" in text:
            raise self.error(table, given[0], f"{what} is empty or contains NUL characters")
        return text


def _parse_proxy(ctx: _Context, raw: Mapping[str, object]) -> ProxyConfig:
    values = ctx.check(raw, "proxy", _PROXY_KEYS)
    for key in ("tls_cert_file", "tls_key_file"):
        values[key] = ctx.existing_file(values, "proxy", key)
        if values.get("require_tls") and values[key] is None:
            raise ctx.error("proxy", key, "required when require_tls = true")
    if (values["tls_cert_file"] is None) != (values["tls_key_file"] is None):
        missing = "tls_key_file" if values["tls_key_file"] is None else "tls_cert_file"
        raise ctx.error("proxy", missing, "tls_cert_file and tls_key_file must be given together")
    return ProxyConfig(**values)


def _parse_backend(ctx: _Context, raw: Mapping[str, object]) -> BackendConfig:
    values = ctx.check(raw, "backend", _BACKEND_KEYS)
    values["backend_tls_ca_file"] = ctx.existing_file(values, "backend", "backend_tls_ca_file")
    if values.get("backend_tls") is BackendTLS.VERIFY_FULL and not values["backend_tls_ca_file"]:
        raise ctx.error(
            "backend", "backend_tls_ca_file", 'required when backend_tls = "verify-full"'
        )
    return BackendConfig(**values)


def _parse_pool(ctx: _Context, raw: Mapping[str, object]) -> PoolConfig:
    values = ctx.check(raw, "pool", _POOL_KEYS)
    percent: int = values.get("max_connections_percent", PoolConfig().max_connections_percent)
    idle: int = values.get("max_idle_connections_percent", -1)
    if idle > percent:
        raise ctx.error(
            "pool",
            "max_idle_connections_percent",
            f"must be <= max_connections_percent ({percent}), got {idle}",
        )
    values["max_idle_connections_percent"] = percent // 2 if idle == -1 else idle
    return PoolConfig(**values)


def _parse_user(ctx: _Context, name: str, raw: Mapping[str, object]) -> UserConfig:
    table = f"users.{_toml_key(name)}"
    values = ctx.check(raw, table, _USER_KEYS)
    password = ctx.secret(values, table, "password")
    verifier = values.get("scram_verifier")
    iam_auth = values.get("iam_auth", IamAuth.DISABLED)
    # A secret source (secret_file / secret_arn) holds the backend credentials, re-read at
    # run time; as in RDS Proxy, clients are checked against its password unless the
    # table gives a client credential of its own.
    sources = [key for key in ("secret_file", "secret_arn") if key in values]
    if len(sources) > 1:
        raise ctx.error(table, "secret_arn", "conflicts with secret_file; give only one")
    secret_file = ctx.existing_file(values, table, "secret_file")
    if sources:
        for key in values:
            if key.startswith("backend_password"):
                raise ctx.error(
                    table, key, f"conflicts with {sources[0]} (the secret holds the password)"
                )
    if password is None and verifier is None and not sources and iam_auth is not IamAuth.REQUIRED:
        raise ctx.error(
            table,
            "password",
            "no client credential: set one of password, password_env, password_file, "
            "scram_verifier, secret_file or secret_arn",
        )
    auth_type = values.get("client_password_auth_type", ClientPasswordAuthType.SCRAM_SHA_256)
    if auth_type is ClientPasswordAuthType.MD5 and password is None and not sources:
        raise ctx.error(
            table,
            "client_password_auth_type",
            '"md5" needs the plaintext password: set password, password_env, password_file, '
            "secret_file or secret_arn (a scram_verifier cannot check MD5 answers)",
        )
    backend_password = ctx.secret(values, table, "backend_password")
    if sources:
        backend_password = None  # comes from the secret
    elif backend_password is None:
        backend_password = password
    return UserConfig(
        name=name,
        iam_auth=iam_auth,
        pool_mode=values.get("pool_mode"),
        password=password,
        scram_verifier=verifier,
        backend_user=values.get("backend_user") or name,
        backend_password=backend_password,
        client_password_auth_type=auth_type,
        secret_file=secret_file,
        secret_arn=values.get("secret_arn"),
    )


def _parse_iam(ctx: _Context, raw: Mapping[str, object]) -> IamConfig:
    values = ctx.check(raw, "iam", _IAM_KEYS)
    keys: dict[str, IamKeyConfig] = {}
    raw_keys = ctx.table(raw, "keys", "iam")
    for key_id in raw_keys:
        table = f"iam.keys.{_toml_key(key_id)}"
        if not re.fullmatch(r"[A-Z0-9]{8,128}", key_id):
            raise ctx.error(None, table, "must be an access key id (A-Z, 0-9)")
        key_values = ctx.check(ctx.table(raw_keys, key_id, "iam.keys"), table, _IAM_KEY_KEYS)
        secret = ctx.secret(key_values, table, "secret_access_key")
        if secret is None:
            raise ctx.error(table, "secret_access_key_env", "a secret access key is required")
        keys[key_id] = IamKeyConfig(
            access_key_id=key_id,
            secret_access_key=secret,
            allowed_users=key_values.get("allowed_users", frozenset({"*"})),
        )
    for endpoint in values.get("endpoints", ()):
        if not re.fullmatch(r"[^:\s]+:\d{1,5}", endpoint):
            raise ctx.error("iam", "endpoints", f'must be "host:port" names, got {_show(endpoint)}')
    values["keys"] = _FrozenMap(keys)
    return IamConfig(**values)


def _parse_users(ctx: _Context, raw: Mapping[str, object]) -> dict[str, UserConfig]:
    users: dict[str, UserConfig] = {}
    for name in raw:
        if not name or "\0" in name:
            raise ctx.error(
                None, f"users.{_toml_key(name)}", "must be a non-empty name without NUL characters"
            )
        users[name] = _parse_user(ctx, name, ctx.table(raw, name, "users"))
    return users


def parse_config(
    data: Mapping[str, object],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate an already-decoded TOML document.

    *source* names the file in error messages; relative file names are resolved against
    *base_dir* (left as they are if None); ``*_env`` keys are looked up in *environ*
    (default ``os.environ``). Raises :class:`ConfigError`.
    """
    ctx = _Context(source, base_dir, os.environ if environ is None else environ)
    for key in data:
        if key not in _TABLES:
            raise ctx.error(
                None, _toml_key(str(key)), "unknown table" + _suggest(str(key), _TABLES)
            )
    iam = _parse_iam(ctx, ctx.table(data, "iam", None))
    users = _parse_users(ctx, ctx.table(data, "users", None))
    proxy = _parse_proxy(ctx, ctx.table(data, "proxy", None))
    return Config(
        endpoints=_parse_endpoints(ctx, data.get("endpoints", [])),
        peers=_parse_peers(ctx, data.get("peers", []), proxy),
        proxy=proxy,
        backend=_parse_backend(ctx, ctx.table(data, "backend", None)),
        pool=_parse_pool(ctx, ctx.table(data, "pool", None)),
        iam=_check_iam_users(ctx, iam, users),
        users=users,
    )


def _parse_endpoints(ctx: _Context, raw: object) -> tuple[EndpointConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
        raise ctx.error(None, "endpoints", "must be an array of tables ([[endpoints]])")
    endpoints: list[EndpointConfig] = []
    for index, item in enumerate(raw):
        table = f"endpoints.{index}"
        values = ctx.check(item, table, _ENDPOINT_KEYS)
        if "listen" not in values:
            raise ctx.error(table, "listen", "required")
        endpoints.append(EndpointConfig(**values))
    return tuple(endpoints)


def _parse_peers(ctx: _Context, raw: object, proxy: ProxyConfig) -> tuple[PeerConfig, ...]:
    if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
        raise ctx.error(None, "peers", "must be an array of tables ([[peers]])")
    peers: list[PeerConfig] = []
    for index, item in enumerate(raw):
        table = f"peers.{index}"
        values = ctx.check(item, table, _PEER_KEYS)
        for key in _PEER_KEYS:
            if key not in values:
                raise ctx.error(table, key, "required")
        peer = PeerConfig(**values)
        if proxy.peer_id == 0:
            raise ctx.error("proxy", "peer_id", "required (1..127) when [[peers]] are listed")
        if peer.peer_id == proxy.peer_id:
            raise ctx.error(table, "peer_id", f"{peer.peer_id} is this instance's own peer_id")
        if any(p.peer_id == peer.peer_id for p in peers):
            raise ctx.error(table, "peer_id", f"{peer.peer_id} is listed twice")
        peers.append(peer)
    return tuple(peers)


def _check_iam_users(ctx: _Context, iam: IamConfig, users: Mapping[str, UserConfig]) -> IamConfig:
    needs_iam = [u.name for u in users.values() if u.iam_auth is not IamAuth.DISABLED]
    if needs_iam and not iam.endpoints:
        raise ctx.error("iam", "endpoints", f"required: user {needs_iam[0]!r} has iam_auth enabled")
    if needs_iam and not iam.keys:
        raise ctx.error("iam", "keys", f"required: user {needs_iam[0]!r} has iam_auth enabled")
    return iam


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read and validate a TOML configuration file. Raises :class:`ConfigError`.

    Relative file names in it are resolved against the file's directory; ``*_env`` keys are
    looked up in *environ* (default ``os.environ``).
    """
    source = os.fspath(path)
    file = Path(path).absolute()
    try:
        with file.open("rb") as fp:
            data = tomllib.load(fp)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read configuration: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    config = parse_config(data, source=source, base_dir=file.parent, environ=environ)
    return attrs.evolve(config, source=file)
