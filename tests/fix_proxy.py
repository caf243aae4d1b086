"""Fixtures that run trioproxy in front of the test PostgreSQL.

``proxy_factory(**overrides)`` starts an in-process proxy (its own trio loop in a thread,
so sync psycopg, asyncpg on asyncio and psql/pgbench subprocesses can all talk to it) and
stops it at the end of the test. ``tls_files`` is a session-wide CA + server certificate.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from tests.fix_pg import APP_PASSWORD, APP_USER, PostgresServer
from trioproxy.config import parse_config
from trioproxy.testing.certs import TLSFiles, make_self_signed_ca_and_server
from trioproxy.testing.thread import ProxyThread

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Users the proxy knows in tests. "app" has the same password on both sides; "alice"
#: logs in to the proxy with her own password and to PostgreSQL as "app" (the client never
#: learns the backend password).
PROXY_USERS: dict[str, dict[str, str]] = {
    APP_USER: {"password": APP_PASSWORD},
    "alice": {
        "password": "alice-proxy-pw",
        "backend_user": APP_USER,
        "backend_password": APP_PASSWORD,
    },
}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_self_signed_ca_and_server(tmp_path_factory.mktemp("tls"))


@attrs.define
class RunningProxy:
    thread: ProxyThread
    pg: PostgresServer
    tls: TLSFiles

    @property
    def host(self) -> str:
        return self.thread.host

    @property
    def port(self) -> int:
        return self.thread.port

    def dsn(
        self,
        dbname: str = "app",
        user: str = APP_USER,
        password: str | None = None,
        sslmode: str = "verify-full",
        **extra: str,
    ) -> str:
        if password is None:
            password = PROXY_USERS.get(user, {}).get("password", "")
        parts = {
            "host": "localhost" if sslmode == "verify-full" else self.host,
            "hostaddr": self.host,
            "port": str(self.port),
            "dbname": dbname,
            "user": user,
            "password": password,
            "sslmode": sslmode,
            "sslrootcert": str(self.tls.ca_cert),
            **extra,
        }
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def env(self, user: str = APP_USER, sslmode: str = "verify-full") -> dict[str, str]:
        """libpq environment for psql/pgbench through the proxy."""
        return {
            "PGHOST": "localhost",
            "PGHOSTADDR": self.host,
            "PGPORT": str(self.port),
            "PGUSER": user,
            "PGPASSWORD": PROXY_USERS.get(user, {}).get("password", ""),
            "PGDATABASE": "app",
            "PGSSLMODE": sslmode,
            "PGSSLROOTCERT": str(self.tls.ca_cert),
        }

    @property
    def proxy(self) -> Any:
        return self.thread.proxy


def build_config(
    pg: PostgresServer,
    tls: TLSFiles,
    users: dict[str, dict[str, str]] | None = None,
    **sections: Any,
) -> Any:
    data: dict[str, Any] = {
        "proxy": {
            "listen": "127.0.0.1:0",
            "tls_cert_file": str(tls.server_cert),
            "tls_key_file": str(tls.server_key),
            "debug_logging": True,
        },
        "backend": {"host": pg.host, "port": pg.port},
        "pool": {"max_connections": 10},
        "users": users if users is not None else PROXY_USERS,
    }
    for section, values in sections.items():
        if isinstance(values, list):  # arrays of tables, e.g. [[endpoints]]
            data[section] = values
        else:
            data.setdefault(section, {}).update(values)
    return parse_config(data, source="<test>", base_dir=Path("."))


@pytest.fixture
def proxy_factory(pg: PostgresServer, tls_files: TLSFiles) -> Iterator[Any]:
    started: list[ProxyThread] = []

    def start(pg_server: PostgresServer | None = None, **sections: Any) -> RunningProxy:
        server = pg_server or pg
        users = sections.pop("users", None)
        thread = ProxyThread(build_config(server, tls_files, users, **sections))
        thread.start()
        started.append(thread)
        return RunningProxy(thread, server, tls_files)

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def proxy(proxy_factory: Any) -> RunningProxy:
    """A proxy in session mode with TLS available (not required)."""
    return proxy_factory(pool={"pool_mode": "session"})  # type: ignore[no-any-return]


logging.getLogger("trioproxy").setLevel(logging.DEBUG)
