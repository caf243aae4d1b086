"""A guided tour of trioproxy against a throw-away PostgreSQL: ``python -m trioproxy.demo``.

What it does, in order (well under a minute, everything on loopback):

1. finds the PostgreSQL server binaries (``$PG_BIN``, ``PATH``, ``/usr/lib/postgresql/*/bin``)
   and creates a cluster in a fresh temp dir (as the ``postgres`` system user via ``runuser``
   when run as root): scram-sha-256 everywhere, a free port, ``max_connections = 100``, and a
   role and database ``shop``;
2. makes a throw-away CA and server certificate, writes ``proxy.toml`` (TLS required,
   transaction pooling, at most 10 server connections, the password taken from an
   environment variable) and prints it;
3. starts the real CLI, ``python -m trioproxy --config proxy.toml``, as a subprocess;
4. runs a short psycopg session through the proxy over TLS (``sslmode=verify-full``) and
   prints every statement and its result, an error included;
5. sends a burst of 200 concurrent clients through the proxy while counting, directly on
   PostgreSQL, how many server connections the proxy really uses (at most 10);
6. stops the proxy (SIGTERM) and PostgreSQL, and deletes the temp dir: always, in a
   ``finally``, also after Ctrl-C or an error.

Exit status: 0 when every check passed (no client errors, the pool cap held, the proxy
exited with status 0), 1 otherwise, 130 after Ctrl-C.

The demo needs psycopg (``pip install -e '.[test]'``, which ``make demo`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from trioproxy.testing.certs import make_self_signed_ca_and_server

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

    import psycopg

__all__ = ["main"]

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
RUN_AS = "postgres"  # the system user that owns the cluster when we run as root
SUPERUSER = "postgres"
APP = "shop"  # role and database
PASSWORD_ENV = "SHOP_PASSWORD"  # noqa: S105 - the variable's name, not a password
POOL_SIZE = 10
CLIENTS = 200
SLEEP = 0.05  # seconds each burst client spends in pg_sleep

POSTGRESQL_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "100",
    "password_encryption": "'scram-sha-256'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "logging_collector": "off",
}
PG_HBA = """\
local  all  all                scram-sha-256
host   all  all  127.0.0.1/32  scram-sha-256
host   all  all  ::1/128       scram-sha-256
"""

WIDTH = 78


class DemoError(Exception):
    """Something the demo depends on failed; the message says what."""


# --------------------------------------------------------------------------------------------
# Output


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text} ".ljust(WIDTH, "="))


def field(name: str, value: object) -> None:
    say(f"  {name:<26} {value}")


def indent(text: str, prefix: str = "    ") -> str:
    return textwrap.indent(text.rstrip("\n"), prefix)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """psql-style aligned output: numbers right-aligned, text left-aligned."""
    numeric = [
        all(isinstance(row[i], int | float | decimal.Decimal) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    cells = [["NULL" if value is None else str(value) for value in row] for row in rows]
    widths = [max([len(headers[i]), *(len(row[i]) for row in cells)]) for i in range(len(headers))]

    def line(row: Sequence[str], align_numbers: bool) -> str:
        parts = [
            value.rjust(width) if align_numbers and number else value.ljust(width)
            for value, width, number in zip(row, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(headers, False), "-+-".join("-" * width for width in widths)]
    out += [line(row, True) for row in cells]
    out.append(f"({len(rows)} {'row' if len(rows) == 1 else 'rows'})")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Processes


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment minus libpq settings (PGHOST, ...) that could redirect the tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def as_owner(argv: Sequence[str]) -> list[str]:
    """As root, run ``argv`` as the cluster owner (initdb and postgres refuse to run as root)."""
    if os.geteuid() != 0:
        return list(argv)
    runuser = shutil.which("runuser")
    if runuser is None:
        raise DemoError("running as root, but runuser (util-linux) is missing")
    return [runuser, "-u", RUN_AS, "--", *argv]


def run(
    argv: Sequence[str], *, cwd: Path, timeout: float = 60, new_session: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a trusted local tool (argv built by us, absolute path) and fail loudly."""
    try:
        proc = subprocess.run(  # noqa: S603 - argv built here from absolute tool paths
            list(argv),
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            # pg_ctl start leaves the postmaster in our session unless we give it its own:
            # then Ctrl-C reaches only the demo, which shuts everything down in order.
            start_new_session=new_session,
        )
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"timed out after {timeout:g} s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise DemoError(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{indent(output)}")
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# PostgreSQL


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest version first)."""
    candidates: list[Path] = []
    if pg_bin := os.environ.get("PG_BIN"):
        candidates.append(Path(pg_bin))
    for tool in SERVER_TOOLS:
        if found := shutil.which(tool):
            candidates += [Path(found).resolve().parent, Path(found).parent]

    def version(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in path.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in SERVER_TOOLS):
            return directory
    raise DemoError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in $PG_BIN, PATH or "
        "/usr/lib/postgresql/*/bin; run `make postgres` (or install them and set PG_BIN)"
    )


class Cluster:
    """A throw-away PostgreSQL cluster under ``base``."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.datadir = base / "data"
        self.logfile = base / "postgres.log"
        self.port = 0
        self.superuser_password = secrets.token_urlsafe(18)
        self.started = False

    def pg_ctl(self, *args: str, new_session: bool = False) -> None:
        argv = as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args])
        run(argv, cwd=self.base, new_session=new_session)

    def create(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.superuser_password + "\n")
        chown_to_owner(pwfile)
        try:
            run(
                as_owner(
                    [
                        str(self.bindir / "initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        SUPERUSER,
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "-E",
                        "UTF8",
                        "--locale=C",
                        "--no-sync",
                    ]
                ),
                cwd=self.base,
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        settings = {**POSTGRESQL_CONF, "unix_socket_directories": f"'{self.base}'"}
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# --- trioproxy demo ---\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        (self.datadir / "pg_hba.conf").write_text(PG_HBA)

    def start(self) -> None:
        for attempt in range(5):  # the probed port may be taken before postgres binds it
            self.port = free_port()
            with (self.datadir / "postgresql.conf").open("a") as conf:
                conf.write(f"port = {self.port}\n")
            try:
                self.pg_ctl("-w", "-t", "60", "-l", str(self.logfile), "start", new_session=True)
            except DemoError:
                log = tail(self.logfile)
                if attempt < 4 and ("could not bind" in log or "already in use" in log):
                    continue
                raise DemoError(f"PostgreSQL did not start; its log:\n{indent(log)}") from None
            self.started = True
            return

    def stop(self) -> None:
        if not self.started:
            return
        try:
            self.pg_ctl("-w", "-t", "30", "-m", "fast", "stop")
        except DemoError:
            kill_postmaster(self.datadir)
        self.started = False

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname=dbname,
            user=SUPERUSER,
            password=self.superuser_password,
            autocommit=True,
            connect_timeout=10,
        )


def chown_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=RUN_AS)


def kill_postmaster(datadir: Path) -> None:
    """Last resort when pg_ctl cannot stop the server: SIGQUIT, then SIGKILL."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# The proxy


def proxy_toml(proxy_port: int, pg_port: int) -> str:
    return f"""\
# Written by `python -m trioproxy.demo`. No secret in here: the proxy reads the
# password of user "{APP}" from the environment variable {PASSWORD_ENV}.

[proxy]
listen = "127.0.0.1:{proxy_port}"
require_tls = true                  # clients must negotiate TLS
tls_cert_file = "tls/server.pem"    # relative to this file
tls_key_file = "tls/server.key"

[backend]
host = "127.0.0.1"
port = {pg_port}

[pool]
pool_mode = "transaction"           # a client holds a server connection per transaction
max_connections = {POOL_SIZE}                # never more than this many server connections
connection_borrow_timeout = 30      # seconds a client may wait for one

[users.{APP}]
password_env = "{PASSWORD_ENV}"
"""


class ProxyProcess:
    """``python -m trioproxy --config proxy.toml`` as a child process."""

    def __init__(self, config: Path, port: int, password: str) -> None:
        self.config = config
        self.port = port
        self.env = clean_env(**{PASSWORD_ENV: password})
        self.logfile = config.parent / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "trioproxy", "--config", str(self.config)]

    def check_config(self) -> str:
        argv = [sys.executable, "-m", "trioproxy", "--check-config", str(self.config)]
        proc = subprocess.run(  # noqa: S603 - our own interpreter and CLI
            argv, env=self.env, capture_output=True, text=True, timeout=30, check=False
        )
        if proc.returncode != 0:
            raise DemoError(f"trioproxy --check-config failed:\n{indent(proc.stderr)}")
        return proc.stdout.strip()

    def start(self, timeout: float = 15) -> float:
        """Start the proxy and wait until its port accepts; return the seconds it took."""
        began = time.monotonic()
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops the proxy
            )
        deadline = began + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.exit_code = code
                raise DemoError(
                    f"the proxy exited with status {code} at startup; its log:\n"
                    f"{indent(tail(self.logfile))}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return time.monotonic() - began
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the proxy did not accept connections within {timeout:g} s; its log:\n"
                    f"{indent(tail(self.logfile))}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit status."""
        proc = self.proc
        if proc is None:
            return self.exit_code
        self.proc = None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"  the proxy (pid {proc.pid}) ignored SIGTERM for {timeout:g} s: SIGKILL")
                proc.kill()
                proc.wait()
        self.exit_code = proc.returncode
        return self.exit_code


# --------------------------------------------------------------------------------------------
# The session and the burst


class Session:
    """A psycopg connection through the proxy that prints what it runs, psql-style."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def run(self, sql: str, params: Sequence[object] | None = None) -> list[tuple[Any, ...]]:
        shown = f"{sql}    -- parameters {list(params)!r}" if params else sql
        say(f"  {APP}=> {shown}")
        cursor = self.conn.execute(sql, params)
        rows: list[tuple[Any, ...]] = []
        if cursor.description is not None:
            rows = cursor.fetchall()
            headers = [column.name for column in cursor.description]
            say(indent(render_table(headers, rows), "      "))
        else:
            say(f"      {cursor.statusmessage}")
        return rows


def guided_session(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        session = Session(conn)
        field("connected as", f"{conn.info.user} to database {conn.info.dbname}")
        field("TLS in use (ssl_in_use)", conn.info.pgconn.ssl_in_use)
        field("server certificate", "verified against the demo CA (sslmode=verify-full)")
        say()
        session.run("show server_version")
        session.run(
            "create table orders (id serial primary key, item text not null, "
            "qty int not null, price numeric(10, 2) not null)"
        )
        session.run("begin")
        for item, qty, price in (
            ("coffee beans", 2, "12.50"),
            ("mug", 1, "8.00"),
            ("grinder", 1, "79.90"),
        ):
            session.run(
                "insert into orders (item, qty, price) values (%s, %s, %s)", [item, qty, price]
            )
        session.run("commit")
        session.run("select id, item, qty, price, qty * price as total from orders order by id")
        try:
            session.run("select sum(price) / 0 as broken from orders")
        except psycopg.Error as exc:
            diag = exc.diag
            say(
                f"      ERROR {diag.sqlstate}: {diag.message_primary}"
                f"   ({type(exc).__name__}: a normal error, forwarded untouched)"
            )
        field("connection still usable", not conn.closed and not conn.broken)
        session.run("select count(*) as orders, sum(qty * price) as revenue from orders")


class BurstResult:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.peak_server = 0
        self.samples = 0
        self.monitor_error: str | None = None
        self.wall = 0.0


def burst(dsn: str, cluster: Cluster, clients: int) -> BurstResult:
    import psycopg

    result = BurstResult()
    go = threading.Event()
    stop_monitor = threading.Event()

    def client() -> None:
        go.wait()
        began = time.monotonic()
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("select pg_sleep(%s)", [SLEEP])
        except Exception as exc:  # reported, not raised: the tally is the point
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            with result.lock:
                result.errors[f"{type(exc).__name__}: {message}"] += 1
            return
        with result.lock:
            result.ok += 1
            result.latencies.append(time.monotonic() - began)

    def monitor(conn: psycopg.Connection[Any]) -> None:
        query = (
            "select count(*) from pg_stat_activity "
            "where datname = %s and backend_type = 'client backend'"
        )
        try:
            while not stop_monitor.is_set():
                row = conn.execute(query, [APP]).fetchone()
                count = int(row[0]) if row else 0
                result.peak_server = max(result.peak_server, count)
                result.samples += 1
                time.sleep(0.002)
        except psycopg.Error as exc:
            result.monitor_error = str(exc)

    with cluster.connect() as direct:
        watcher = threading.Thread(target=monitor, args=(direct,), name="monitor", daemon=True)
        watcher.start()
        threads = [
            threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        began = time.monotonic()
        go.set()
        for thread in threads:
            thread.join(timeout=max(0.0, began + 60 - time.monotonic()))
        result.wall = time.monotonic() - began
        stuck = sum(thread.is_alive() for thread in threads)
        if stuck:
            with result.lock:
                result.errors[f"still running after 60 s (hung) x{stuck}"] += stuck
        stop_monitor.set()
        watcher.join(timeout=5)
    return result


# --------------------------------------------------------------------------------------------
# Main


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ignore further Ctrl-C while cleaning up, so the cleanup itself runs to the end."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigterm(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # run the same cleanup as Ctrl-C


def demo(clients: int) -> bool:
    """Run the tour; return True when every check passed."""
    try:
        import psycopg  # noqa: F401 - fail early with a clear message
    except ImportError:
        raise DemoError(
            "the demo needs psycopg: pip install -e '.[test]' (or run `make demo`)"
        ) from None

    bindir = find_bindir()
    base = Path(tempfile.mkdtemp(prefix="trioproxy-demo-"))
    cluster = Cluster(bindir, base)
    proxy: ProxyProcess | None = None
    passed = True
    started = time.monotonic()
    try:
        chown_to_owner(base)
        heading("1. A throw-away PostgreSQL")
        version = run([str(bindir / "postgres"), "--version"], cwd=base).stdout.strip()
        field("server binaries", f"{bindir}  ({version})")
        cluster.create()
        cluster.start()
        field("cluster", cluster.datadir)
        owner = f", run as system user {RUN_AS!r}" if os.geteuid() == 0 else ""
        field("listening", f"127.0.0.1:{cluster.port}  (max_connections = 100{owner})")
        field("authentication", "scram-sha-256 (pg_hba.conf, every host)")
        app_password = secrets.token_urlsafe(18)
        with cluster.connect() as admin:
            from psycopg import sql

            admin.execute(
                sql.SQL("create role {} login password {}").format(
                    sql.Identifier(APP), sql.Literal(app_password)
                )
            )
            admin.execute(
                sql.SQL("create database {} owner {}").format(
                    sql.Identifier(APP), sql.Identifier(APP)
                )
            )
        field("role / database", f"{APP} / {APP}  (random password)")

        heading("2. TLS material and proxy.toml")
        tls = make_self_signed_ca_and_server(base / "tls")
        field("CA certificate", tls.ca_cert)
        field("server certificate", f"{tls.server_cert}  (localhost, 127.0.0.1, ::1)")
        proxy_port = free_port()
        config = base / "proxy.toml"
        config.write_text(proxy_toml(proxy_port, cluster.port))
        say(f"  {config}:")
        say()
        say(indent(config.read_text()))
        say()
        proxy = ProxyProcess(config, proxy_port, app_password)
        say(f"  $ python -m trioproxy --check-config {config.name}")
        say(f"    {proxy.check_config()}")

        heading("3. Starting the proxy")
        say(f"  $ {PASSWORD_ENV}=... {' '.join(proxy.argv)}")
        took = proxy.start()
        assert proxy.proc is not None
        field("pid", proxy.proc.pid)
        field("accepting on", f"127.0.0.1:{proxy_port}  after {took:.2f} s")
        field("log", proxy.logfile)

        from psycopg.conninfo import make_conninfo

        dsn = make_conninfo(
            host="localhost",  # the name verify-full checks against the certificate
            hostaddr="127.0.0.1",
            port=proxy_port,
            dbname=APP,
            user=APP,
            password=app_password,
            sslmode="verify-full",
            sslrootcert=str(tls.ca_cert),
            connect_timeout=30,
        )

        heading("4. A session through the proxy (psycopg, TLS verify-full, SCRAM)")
        guided_session(dsn)

        heading(f"5. Burst: {clients} clients at once, a pool of {POOL_SIZE} server connections")
        say(f"  each client: connect (TLS + SCRAM), select pg_sleep({SLEEP}), disconnect;")
        say(
            "  meanwhile a direct superuser connection polls pg_stat_activity for database "
            f"{APP!r}."
        )
        say()
        result = burst(dsn, cluster, clients)
        failed = sum(result.errors.values())
        field("attempts", clients)
        field("succeeded", result.ok)
        field("errors", failed)
        for message, count in result.errors.most_common(5):
            say(f"  {'':<26}   {count:>4} x {message}")
        cap = "OK" if result.peak_server <= POOL_SIZE else "EXCEEDED"
        field(
            "peak server connections",
            f"{result.peak_server}  (limit {POOL_SIZE}: {cap}; {result.samples} samples)",
        )
        if result.monitor_error:
            field("monitor error", result.monitor_error)
        field(
            "wall time",
            f"{result.wall:.2f} s  (ideal: {clients} x {SLEEP} s / {POOL_SIZE}"
            f" = {clients * SLEEP / POOL_SIZE:.2f} s)",
        )
        if result.latencies:
            lat = sorted(result.latencies)
            p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
            field(
                "per client latency",
                f"median {statistics.median(lat) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
                f"max {lat[-1] * 1000:.0f} ms",
            )
        with cluster.connect() as direct:
            row = direct.execute(
                "select count(*) from pg_stat_activity where datname = %s", [APP]
            ).fetchone()
        field(
            "server connections now",
            f"{row[0] if row else '?'}  (idle in the pool, ready for the next clients)",
        )
        passed = failed == 0 and result.peak_server <= POOL_SIZE and not result.monitor_error
    except DemoError as exc:
        passed = False
        say(f"\n  demo failed: {exc}")
    except Exception:
        passed = False
        say("\n  demo failed with an unexpected error:")
        say(indent(traceback.format_exc(), "    | "))
    except BaseException:
        passed = False
        raise
    finally:
        with uninterruptible():
            heading("6. Shutting down")
            if proxy is not None:
                code = proxy.stop()
                if code is not None:
                    field(
                        "proxy (SIGTERM)",
                        f"exit status {code}" + ("" if code == 0 else "  (expected 0)"),
                    )
                    if code != 0:
                        passed = False
                        say(indent(tail(proxy.logfile), "    | "))
            if not passed and proxy is not None:
                errors = [
                    line
                    for line in tail(proxy.logfile, 2000).splitlines()
                    if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
                ]
                if errors:
                    field("proxy log errors", f"{len(errors)} line(s), the last ones:")
                    say(indent("\n".join(errors[-10:]), "    | "))
            try:
                cluster.stop()
                field("PostgreSQL", "stopped (pg_ctl stop -m fast)")
            except Exception as exc:
                field("PostgreSQL", f"could not be stopped cleanly: {exc}")
            shutil.rmtree(base, ignore_errors=True)
            field("temp dir", "removed" if not base.exists() else f"left behind: {base}")
            field("total time", f"{time.monotonic() - started:.1f} s")
    return passed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trioproxy.demo",
        description="Start a throw-away PostgreSQL and trioproxy, run a session and a burst of "
        "clients through the proxy, then clean everything up.",
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=CLIENTS,
        metavar="N",
        help=f"concurrent clients in the burst (default {CLIENTS})",
    )
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    signal.signal(signal.SIGTERM, _sigterm)
    say("trioproxy demo: many short-lived clients, a small pool of server connections")
    try:
        passed = demo(args.clients)
    except KeyboardInterrupt:
        say("\ninterrupted: everything was stopped and removed")
        return 130
    except DemoError as exc:
        say(f"\ndemo failed: {exc}")
        return 1
    say()
    say(
        "demo passed: every client served, the pool cap held, clean shutdown"
        if passed
        else "demo FAILED: see above"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
