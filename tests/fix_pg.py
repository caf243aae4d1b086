"""Real PostgreSQL servers for the integration tests.

Fixtures (both session-scoped):

``pg`` -> :class:`PostgresServer`
    One shared server. If ``TRIOPROXY_TEST_DSN`` is set (a libpq URL or key=value string naming a
    superuser), that server is used; otherwise a throw-away cluster is created with ``initdb`` in
    a temp dir and started with ``pg_ctl`` on a free 127.0.0.1 port.

``pg_factory`` -> :class:`PostgresFactory`
    ``pg_factory(max_connections=20)`` starts an additional throw-away cluster with extra
    ``postgresql.conf`` settings (needs local binaries even when ``TRIOPROXY_TEST_DSN`` is set).
    Every cluster is stopped (``-m immediate``) and deleted at session end, or at interpreter
    exit if the session dies first.

Every server has these roles (see the constants below):

=============  ================  =========================================================
role           password          notes
=============  ================  =========================================================
``postgres``   random            superuser (``pg.superuser`` / ``pg.superuser_password``)
``app``        ``app-secret``    LOGIN CREATEDB, owns database ``app``; scram-sha-256
``md5user``    ``md5-secret``    password stored as md5; pg_hba forces ``md5`` auth
``clearuser``  ``clear-secret``  pg_hba forces ``password`` (cleartext) auth
=============  ================  =========================================================

(With ``TRIOPROXY_TEST_DSN`` the roles and database are created or updated idempotently, but the
pg_hba.conf methods are whatever that server has.)

Binaries are looked up like scripts/ensure-postgres.sh does: ``$PG_BIN``, ``PATH``, then
``/usr/lib/postgresql/*/bin`` (newest first). When there are none, the fixtures skip - except
under ``CI=true``, where they fail, so CI never silently skips the integration tier.

As root (CI), initdb/pg_ctl run as the ``postgres`` system user via ``runuser`` (initdb refuses
to run as root); the cluster lives in a fresh ``mkdtemp`` dir owned by that user, because
pytest's own temp root is mode 0700 and root-owned.

The cluster plumbing (binaries, runuser, ownership, ports, pg_ctl, stopping by PID) lives in
:mod:`trioproxy.testing.postgres`, shared with the demo and the benchmark.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import attrs
import pytest

from trioproxy.testing.postgres import (
    RUN_AS,
    SERVER_TOOLS,
    SUPERUSER,
    PostgresSetupError,
    append_conf,
    check_can_run_as_owner,
    chown_to_owner,
    clean_env,
    conf_value,
    find_bindir,
    free_port,
    initdb,
    kill_postmaster,
    pg_ctl,
    run_tool,
    start_on_free_port,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

__all__ = [
    "APP_DB",
    "APP_PASSWORD",
    "APP_USER",
    "CLEAR_PASSWORD",
    "CLEAR_USER",
    "MD5_PASSWORD",
    "MD5_USER",
    "SUPERUSER",
    "PostgresFactory",
    "PostgresServer",
    "PostgresSetupError",
    "find_bindir",
    "pg",
    "pg_factory",
]

APP_USER = "app"
APP_PASSWORD = "app-secret"
APP_DB = "app"
MD5_USER = "md5user"
MD5_PASSWORD = "md5-secret"
CLEAR_USER = "clearuser"
CLEAR_PASSWORD = "clear-secret"

KNOWN_PASSWORDS = {APP_USER: APP_PASSWORD, MD5_USER: MD5_PASSWORD, CLEAR_USER: CLEAR_PASSWORD}

# Kept under their old names for the tests that import them from here.
__all__ += ["RUN_AS", "SERVER_TOOLS"]
_clean_env = clean_env
_free_port = free_port
_conf_value = conf_value
_run = run_tool
_chown_to_owner = chown_to_owner
_check_can_run_as_owner = check_can_run_as_owner
_kill_postmaster = kill_postmaster

DEFAULT_CONF: dict[str, object] = {
    "listen_addresses": "127.0.0.1",
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "max_connections": 100,
    "password_encryption": "scram-sha-256",
    "shared_buffers": "128MB",
    "log_min_messages": "warning",
    "logging_collector": False,
}

# Specific users first: pg_hba.conf is first-match.
DEFAULT_HBA = (
    "local  all  all                     scram-sha-256",
    f"host   all  {MD5_USER}   127.0.0.1/32  md5",
    f"host   all  {CLEAR_USER} 127.0.0.1/32  password",
    "host   all  all        127.0.0.1/32  scram-sha-256",
    "host   all  all        ::1/128       scram-sha-256",
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(reason: str) -> None:
    """Skip locally, fail under CI: CI must never silently skip the integration tier."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true, so this is an error rather than a skip)", pytrace=False)
    pytest.skip(reason)


def _find_client(name: str, bindir: Path | None) -> str:
    if bindir is not None and os.access(bindir / name, os.X_OK):
        return str(bindir / name)
    if found := shutil.which(name):
        return found
    if (fallback := find_bindir()) is not None and os.access(fallback / name, os.X_OK):
        return str(fallback / name)
    raise PostgresSetupError(f"{name} not found (PG_BIN, PATH, /usr/lib/postgresql/*/bin)")


@attrs.frozen
class PostgresServer:
    """Where a test PostgreSQL server listens, and helpers to talk to it.

    ``bindir``/``datadir`` are None for an external server (``TRIOPROXY_TEST_DSN``).
    """

    host: str
    port: int
    superuser: str
    superuser_password: str
    bindir: Path | None = None
    datadir: Path | None = None
    socket_dir: Path | None = None
    logfile: Path | None = None

    @property
    def managed(self) -> bool:
        """True if the fixtures created this cluster (and may stop/restart it)."""
        return self.datadir is not None

    def _password_for(self, user: str, password: str | None) -> str | None:
        if password is not None:
            return password or None  # "" means: send no password
        if user == self.superuser:
            return self.superuser_password
        return KNOWN_PASSWORDS.get(user)

    def dsn(self, dbname: str = APP_DB, user: str = APP_USER, password: str | None = None) -> str:
        """A ``postgresql://`` URL (accepted by psycopg, asyncpg and psql).

        ``password=None`` uses the known password of ``user`` (superuser or a provisioned
        role); ``password=""`` leaves the password out.
        """
        password = self._password_for(user, password)
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        if self.host.startswith("/"):
            return (
                f"postgresql://{auth}@/{quote(dbname, safe='')}"
                f"?host={quote(self.host, safe='')}&port={self.port}"
            )
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{auth}@{host}:{self.port}/{quote(dbname, safe='')}"

    def psql(
        self,
        *args: str,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        check: bool = True,
        timeout: float = 60,
    ) -> str:
        """Run psql (unaligned, tuples only, ON_ERROR_STOP) against this server; return stdout.

        Defaults to the superuser on database ``postgres``. Example:
        ``pg.psql("-c", "show max_connections")`` -> ``"100\\n"``.
        """
        user = user or self.superuser
        pw = self._password_for(user, password)
        url = self.dsn(dbname=dbname, user=user, password="")
        env = _clean_env(PGCONNECT_TIMEOUT="10")
        if pw is not None:
            env["PGPASSWORD"] = pw
        argv = [_find_client("psql", self.bindir), "-X", "-w", "-q", "-A", "-t"]
        argv += ["-v", "ON_ERROR_STOP=1", "-d", url, *args]
        return _run(argv, input=input, check=check, timeout=timeout, env=env).stdout

    # -- lifecycle of managed clusters ------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float = 90, check: bool = True) -> str:
        if self.bindir is None or self.datadir is None:
            raise PostgresSetupError("not a managed cluster (TRIOPROXY_TEST_DSN server)")
        return pg_ctl(self.bindir, self.datadir, *args, timeout=timeout, check=check)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def start(self) -> None:
        """Start a stopped managed server again, on the same port; waits until it accepts."""
        assert self.logfile is not None
        self._pg_ctl("-w", "-t", "60", "-l", str(self.logfile), "start")
        self.wait_ready()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def reload(self) -> None:
        """Re-read postgresql.conf / pg_hba.conf (e.g. after ``ALTER SYSTEM``)."""
        self._pg_ctl("reload")

    def is_running(self) -> bool:
        if self.datadir is None:
            return True
        return "server is running" in self._pg_ctl("status", check=False)

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until the superuser can run ``select 1`` (bounded)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.psql("-c", "select 1", timeout=10).strip() == "1":
                    return
            except PostgresSetupError as exc:
                last = exc
            time.sleep(0.1)
        raise PostgresSetupError(f"server {self.host}:{self.port} not ready: {last}\n{self.log()}")

    def log(self, tail: int = 50) -> str:
        """The last ``tail`` lines of the server log (managed clusters only)."""
        if self.logfile is None:
            return ""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])


# -- provisioning -------------------------------------------------------------------------

PROVISION_SQL = f"""
SET client_min_messages = warning;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_USER}') THEN
    CREATE ROLE {APP_USER};
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MD5_USER}') THEN
    CREATE ROLE {MD5_USER};
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{CLEAR_USER}') THEN
    CREATE ROLE {CLEAR_USER};
  END IF;
END $$;
ALTER ROLE {APP_USER} LOGIN CREATEDB PASSWORD '{APP_PASSWORD}';
SET password_encryption = 'md5';
ALTER ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
SET password_encryption = 'scram-sha-256';
ALTER ROLE {CLEAR_USER} LOGIN PASSWORD '{CLEAR_PASSWORD}';
SELECT 'CREATE DATABASE {APP_DB} OWNER {APP_USER}'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{APP_DB}') \\gexec
GRANT CONNECT ON DATABASE {APP_DB} TO {APP_USER}, {MD5_USER}, {CLEAR_USER};
"""


def provision(server: PostgresServer) -> None:
    """Create (or update) the test roles and the ``app`` database. Idempotent."""
    server.psql("-f", "-", input=PROVISION_SQL)


# -- managed clusters -----------------------------------------------------------------------

_live: dict[Path, PostgresServer] = {}  # base dir -> server, for teardown / atexit
_live_lock = threading.Lock()


def _destroy(base: Path, server: PostgresServer | None) -> None:
    """Stop the cluster (immediate) however we can, then delete its directory."""
    if server is not None and server.datadir is not None:
        stopped = False
        with contextlib.suppress(Exception):
            server._pg_ctl("-w", "-t", "30", "-m", "immediate", "stop", check=True)
            stopped = True
        if not stopped:
            _kill_postmaster(server.datadir)
    shutil.rmtree(base, ignore_errors=True)


def _new_base() -> Path:
    base = Path(tempfile.mkdtemp(prefix="trioproxy-pg-", dir=os.environ.get("TRIOPROXY_PG_TMPDIR")))
    try:
        chown_to_owner(base)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base


def _start_managed(
    base: Path,
    bindir: Path,
    superuser: str,
    password: str,
    *,
    with_log: bool = False,
) -> PostgresServer:
    """Start the cluster in ``base/data`` on a free port (retried if taken), registered for
    teardown. On failure it is destroyed; ``with_log`` puts the server log in the error."""
    datadir = base / "data"
    server: PostgresServer | None = None

    def start(port: int) -> None:
        nonlocal server
        server = PostgresServer(
            host="127.0.0.1",
            port=port,
            superuser=superuser,
            superuser_password=password,
            bindir=bindir,
            datadir=datadir,
            socket_dir=base,
            logfile=base / "postgres.log",
        )
        with _live_lock:
            _live[base] = server
        server.start()

    def log() -> str:
        return server.log() if server is not None else ""

    try:
        start_on_free_port(datadir, start, log)
    except BaseException as exc:
        text = log() if with_log and isinstance(exc, PostgresSetupError) else None
        with _live_lock:
            _live.pop(base, None)
        _destroy(base, server)
        if text is not None:
            raise PostgresSetupError(f"PostgreSQL failed to start; log:\n{text}") from None
        raise
    assert server is not None
    return server


def create_cluster(
    bindir: Path,
    conf: Mapping[str, object] | None = None,
    hba_lines: Sequence[str] = (),
) -> PostgresServer:
    """initdb + start + provision a throw-away cluster; registered for teardown."""
    check_can_run_as_owner()
    base = _new_base()
    datadir = base / "data"
    password = secrets.token_urlsafe(18)
    try:
        initdb(bindir, datadir, password=password, cwd=base)
        settings = dict(DEFAULT_CONF)
        settings["unix_socket_directories"] = str(base)
        settings.update(conf or {})
        append_conf(datadir, settings, "trioproxy test fixture")
        (datadir / "pg_hba.conf").write_text("\n".join([*hba_lines, *DEFAULT_HBA]) + "\n")
    except BaseException:
        _destroy(base, None)
        raise

    server = _start_managed(base, bindir, SUPERUSER, password, with_log=True)
    try:
        provision(server)
    except BaseException:
        destroy_cluster(server)
        raise
    return server


def create_standby(primary: PostgresServer) -> PostgresServer:
    """A streaming standby of ``primary`` (pg_basebackup -R), started on its own port and
    registered for teardown. The primary's pg_hba.conf must allow replication from
    127.0.0.1 (``pg_factory(hba_lines=[REPLICATION_HBA])``)."""
    bindir = primary.bindir
    assert bindir is not None
    base = _new_base()
    datadir = base / "data"
    try:
        conninfo = (
            f"host=127.0.0.1 port={primary.port} user={primary.superuser} "
            f"password={primary.superuser_password}"
        )
        run_tool(
            [
                str(bindir / "pg_basebackup"),
                "-d",
                conninfo,
                "-D",
                str(datadir),
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "--checkpoint=fast",
            ],
            as_owner=True,
            cwd=base,
        )
        append_conf(datadir, {"unix_socket_directories": str(base)})
    except BaseException:
        _destroy(base, None)
        raise

    return _start_managed(base, bindir, primary.superuser, primary.superuser_password)


#: pg_hba.conf line a primary needs for create_standby.
REPLICATION_HBA = "host replication all 127.0.0.1/32 scram-sha-256"


def destroy_cluster(server: PostgresServer) -> None:
    if server.socket_dir is None:
        return
    with _live_lock:
        _live.pop(server.socket_dir, None)
    _destroy(server.socket_dir, server)


@atexit.register
def _destroy_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live.items())
        _live.clear()
    for base, server in leftovers:
        _destroy(base, server)


def _external_server(dsn: str) -> PostgresServer:
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] = conninfo_to_dict(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "127.0.0.1").split(",")[0]
    port = int(str(params.get("port") or os.environ.get("PGPORT") or 5432).split(",")[0])
    user = str(params.get("user") or os.environ.get("PGUSER") or SUPERUSER)
    password = str(params.get("password") or os.environ.get("PGPASSWORD") or "")
    return PostgresServer(host=host, port=port, superuser=user, superuser_password=password)


@attrs.define
class PostgresFactory:
    """``pg_factory(max_connections=20)`` -> a new, provisioned, running :class:`PostgresServer`.

    Settings with dots (``auto_explain.log_min_duration``) go in the positional mapping.
    ``hba_lines`` are put before the default pg_hba.conf lines.
    """

    _started: list[PostgresServer] = attrs.field(factory=list)

    def __call__(
        self,
        conf: Mapping[str, object] | None = None,
        /,
        *,
        hba_lines: Sequence[str] = (),
        **conf_overrides: object,
    ) -> PostgresServer:
        bindir = find_bindir()
        if bindir is None:
            _unavailable(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in $PG_BIN, "
                "PATH or /usr/lib/postgresql/*/bin; run `make postgres`"
            )
            raise AssertionError("unreachable")  # pragma: no cover
        server = create_cluster(bindir, {**(conf or {}), **conf_overrides}, hba_lines)
        self._started.append(server)
        return server

    start = __call__

    def close(self) -> None:
        while self._started:
            destroy_cluster(self._started.pop())


@pytest.fixture(scope="session")
def pg_factory() -> Iterator[PostgresFactory]:
    factory = PostgresFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def pg(pg_factory: PostgresFactory) -> PostgresServer:
    if dsn := os.environ.get("TRIOPROXY_TEST_DSN"):
        server = _external_server(dsn)
        server.wait_ready()
        provision(server)
        return server
    return pg_factory()
