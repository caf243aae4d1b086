"""Black Friday, replayed on this machine: ``make demo`` / ``trioproxy demo`` /
``python -m trioproxy.demo [--clients N] [--quick]``.

The story (see README.md): on Black Friday an e-commerce backend on Lambda scaled to thousands
of concurrent functions, each opening its own connection, and PostgreSQL answered
``FATAL: sorry, too many clients already`` until checkout went down. The demo replays it on
loopback, in about a minute:

1. a throw-away PostgreSQL in a fresh temp dir (as the ``postgres`` system user via
   ``runuser`` when run as root): ``max_connections = 100``, TLS, scram-sha-256 everywhere,
   a role and database ``shop`` with an ``orders`` table;
2. *without a proxy*: N concurrent short-lived clients (default 2,000) each connect straight
   to PostgreSQL (TLS verify-full + SCRAM), run one checkout transaction (insert an order,
   read it back, ``pg_sleep(0.05)`` standing in for the rest of the checkout's queries) and
   disconnect, with a live progress line;
3. a ``proxy.toml`` mirroring the RDS Proxy Terraform of the story (``require_tls``,
   transaction pooling, ``max_connections_percent = 90``, ``connection_borrow_timeout = 120``,
   ...) and the real CLI, ``python -m trioproxy --config proxy.toml``, as a subprocess;
4. one checkout through the proxy in slow motion (psycopg, ``sslmode=verify-full``,
   ``require_auth=scram-sha-256``), every statement printed;
5. the same N clients again, through the proxy;
6. stops everything by PID (load generator, proxy, PostgreSQL) and deletes the temp dir:
   always, in a ``finally``, also after Ctrl-C, SIGTERM or an error; then prints the two
   runs side by side (attempts, completed, errors grouped, p50/p99 latency, peak server
   connections sampled from ``pg_stat_activity`` as superuser) and one sentence saying what
   the numbers mean.

The clients run in a separate process (``python -m trioproxy.demo --loadgen``, asyncio +
asyncpg, its open-files limit raised to the hard limit), so they share no interpreter with
the proxy or with the demo, which samples ``pg_stat_activity`` and draws the progress line.
Each client does its own TLS handshake and SCRAM exchange; only the client-side PBKDF2 is
computed once per process (each real Lambda has a CPU of its own; thousands of them sharing
this machine's would otherwise measure the load generator). PostgreSQL and the proxy do
their full work for every login. Everything shares this machine's CPUs, which is most of
the latency the table shows; the CPU seconds of each party are printed after each run.

``--quick`` is the smoke-test variant: 200 clients unless ``--clients`` says otherwise, a
shorter per-client timeout, and the proxy.toml is not printed.

Exit status: 0 when every client sent through the proxy completed its checkout, the proxy
never used more server connections than its pool allows (90% of the 97 slots left once
PostgreSQL keeps 3 for superusers: 87) and it exited with status 0 after SIGTERM (the
refusals of the direct run are the point of the demo, not a failure); 1 otherwise; 130 after
Ctrl-C or SIGTERM.

The demo needs psycopg and asyncpg (``pip install -e '.[test]'``, which ``make demo`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import decimal
import functools
import hashlib
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import ssl
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

from trioproxy.testing.certs import TLSFiles, make_self_signed_ca_and_server
from trioproxy.testing.postgres import (
    RUN_AS,
    SUPERUSER,
    PostgresSetupError,
    append_conf,
    chown_to_owner,
    clean_env,
    free_port,
    initdb,
    install_server_tls,
    kill_postmaster,
    pg_ctl,
    postmaster_pid,
    run_tool,
    start_on_free_port,
)
from trioproxy.testing.postgres import find_bindir as find_server_bindir

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType

    import psycopg

__all__ = ["main"]

APP = "shop"  # role and database
PASSWORD_ENV = "SHOP_PASSWORD"  # noqa: S105 - the variable's name, not a password
MAX_CONNECTIONS = 100  # PostgreSQL's max_connections, as in the story's undersized instance
RESERVED = 3  # superuser_reserved_connections (PostgreSQL's default): not for the app
POOL_PERCENT = 90  # the proxy's max_connections_percent, as in the story's Terraform
# RDS Proxy's rule, which trioproxy follows: the percentage of what the app may use.
POOL_SIZE = (MAX_CONNECTIONS - RESERVED) * POOL_PERCENT // 100
CLIENTS = 2000
QUICK_CLIENTS = 200
SLEEP = 0.05  # seconds of pg_sleep inside each checkout transaction
CLIENT_TIMEOUT = 60.0  # seconds one client may take (connect + checkout) before giving up
QUICK_CLIENT_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.02  # seconds between pg_stat_activity samples
TOO_MANY = "too many clients already"
FULL = "53300"  # SQLSTATE too_many_connections: "too many clients", "slots are reserved", ...

POSTGRESQL_CONF: dict[str, object] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": MAX_CONNECTIONS,
    "password_encryption": "scram-sha-256",
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
    "shared_buffers": "32MB",
    "logging_collector": False,
}
PG_HBA = """\
local  all  all                scram-sha-256
host   all  all  127.0.0.1/32  scram-sha-256
host   all  all  ::1/128       scram-sha-256
"""
ORDERS = """\
create table orders (
    id bigserial primary key,
    customer text not null,
    item text not null,
    qty int not null,
    price numeric(10, 2) not null,
    created_at timestamptz not null default now()
)"""
INSERT_ORDER = (
    "insert into orders (customer, item, qty, price) values ($1, $2, $3, $4) returning id"
)
SELECT_ORDER = "select id, item, qty * price as total from orders where id = $1"

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


def run(
    argv: Sequence[str], *, cwd: Path, timeout: float = 60, new_session: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run a trusted local tool (argv built by us, absolute path) and fail loudly."""
    try:
        return run_tool(argv, cwd=cwd, timeout=timeout, new_session=new_session)
    except PostgresSetupError as exc:
        raise DemoError(str(exc)) from exc


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# PostgreSQL


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest version first)."""
    if (bindir := find_server_bindir()) is not None:
        return bindir
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
        try:
            pg_ctl(self.bindir, self.datadir, *args, timeout=60, new_session=new_session)
        except PostgresSetupError as exc:
            raise DemoError(str(exc)) from exc

    def create(self) -> None:
        try:
            initdb(self.bindir, self.datadir, password=self.superuser_password, cwd=self.base)
        except PostgresSetupError as exc:
            raise DemoError(str(exc)) from exc
        settings = {**POSTGRESQL_CONF, "unix_socket_directories": str(self.base)}
        append_conf(self.datadir, settings, "trioproxy demo")
        (self.datadir / "pg_hba.conf").write_text(PG_HBA)

    def _start_on(self, port: int) -> None:
        self.port = port
        # pg_ctl start leaves the postmaster in our session unless we give it its own:
        # then Ctrl-C reaches only the demo, which shuts everything down in order.
        pg_ctl(
            self.bindir,
            self.datadir,
            *("-w", "-t", "60", "-l", str(self.logfile), "start"),
            timeout=60,
            new_session=True,
        )

    def start(self) -> None:
        try:
            start_on_free_port(self.datadir, self._start_on, lambda: tail(self.logfile))
        except PostgresSetupError:
            log = tail(self.logfile)
            raise DemoError(f"PostgreSQL did not start; its log:\n{indent(log)}") from None
        self.started = True

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


# --------------------------------------------------------------------------------------------
# The proxy


def proxy_toml(proxy_port: int, pg_port: int, clients: int) -> str:
    return f"""\
# Written by `trioproxy demo`: the story's aws_db_proxy Terraform, for trioproxy.
# No secret in here: the proxy reads the password of user "{APP}" from the
# environment variable {PASSWORD_ENV} (RDS Proxy: auth {{ secret_arn = ... }}).

[proxy]
listen = "127.0.0.1:{proxy_port}"
require_tls = true                  # require_tls = true
tls_cert_file = "tls/server.pem"    # relative to this file
tls_key_file = "tls/server.key"
idle_client_timeout = 1800          # idle_client_timeout = 1800
max_client_connections = {max(10000, clients + 100)}

[backend]                           # the "RDS instance": max_connections = {MAX_CONNECTIONS}
host = "127.0.0.1"
port = {pg_port}

[pool]                              # connection_pool_config {{ ... }}
pool_mode = "transaction"           # a client holds a server connection per transaction
max_connections_percent = {POOL_PERCENT}        # max_connections_percent = {POOL_PERCENT}
max_idle_connections_percent = 50   # max_idle_connections_percent = 50
connection_borrow_timeout = 120     # connection_borrow_timeout = 120

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
# A checkout in slow motion


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


def verbose_checkout(dsn: str) -> None:
    """One checkout through the proxy, every statement and its result printed."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        session = Session(conn)
        field("TLS in use (ssl_in_use)", conn.info.pgconn.ssl_in_use)
        field("server certificate", "verified against the demo CA (sslmode=verify-full)")
        field(
            "authentication",
            "SCRAM-SHA-256, checked by the proxy (require_auth=scram-sha-256)"
            if "require_auth" in dsn
            else "SCRAM-SHA-256, checked by the proxy",
        )
        say()
        session.run("begin")
        rows = session.run(psycopg_style(INSERT_ORDER), ["lambda-demo", "gift card", 1, "25.00"])
        session.run(psycopg_style(SELECT_ORDER), [rows[0][0]])
        session.run("commit")


def psycopg_style(sql: str) -> str:
    """$1, $2, ... (asyncpg, PostgreSQL) -> %s (psycopg)."""
    return re.sub(r"\$\d+", "%s", sql)


# --------------------------------------------------------------------------------------------
# The load generator: `python -m trioproxy.demo --loadgen`, a process of its own. It reads
# its spec (JSON) on stdin, writes one JSON progress line to stdout every 0.2 s and a last
# line {"result": ...}. It exits when stdout is gone (the demo died) or its deadline passed.


def raise_nofile_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def error_key(exc: BaseException) -> str:
    """Group errors: PostgreSQL's refusals (SQLSTATE 53300) by message, anything else by
    class and first line."""
    text = str(exc).strip()
    first = text.splitlines()[0][:160] if text else ""
    if TOO_MANY in text:
        return f"FATAL {FULL}: sorry, {TOO_MANY}"
    if getattr(exc, "sqlstate", None) == FULL:
        return f"FATAL {FULL}: {first}"
    if isinstance(exc, TimeoutError):
        return "TimeoutError: no answer within the client timeout"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclasses.dataclass
class Tally:
    attempts: int = 0
    ok: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)

    def progress(self, elapsed: float) -> dict[str, Any]:
        return {
            "elapsed": round(elapsed, 2),
            "attempts": self.attempts,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
        }


def emit(message: dict[str, Any]) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the demo is gone: so are we
        os._exit(3)


async def checkout(
    spec: dict[str, Any], context: ssl.SSLContext, tally: Tally, go: asyncio.Event, number: int
) -> None:
    """One Lambda invocation: connect, one checkout transaction, disconnect. No retry."""
    import asyncpg

    await go.wait()
    tally.attempts += 1
    began = time.monotonic()
    conn: Any = None
    try:
        async with asyncio.timeout(float(spec["timeout"])):
            conn = await asyncpg.connect(
                host=spec["host"],
                port=spec["port"],
                user=spec["user"],
                password=spec["password"],
                database=spec["database"],
                ssl=context,  # verify-full against the demo CA
                statement_cache_size=0,  # a fresh connection each time: nothing to cache
                timeout=float(spec["timeout"]),
            )
            async with conn.transaction():
                order = await conn.fetchval(
                    INSERT_ORDER, f"lambda-{number}", "gift card", 1, decimal.Decimal("25.00")
                )
                await conn.fetchrow(SELECT_ORDER, order)
                await conn.execute(f"select pg_sleep({float(spec['sleep'])})")
    except Exception as exc:  # counted, not raised: the tally is the point
        tally.errors[error_key(exc)] += 1
        if conn is not None:
            conn.terminate()
        return
    tally.latencies.append(time.monotonic() - began)
    tally.ok += 1
    try:
        await conn.close(timeout=5)
    except Exception:
        conn.terminate()


async def loadgen_async(spec: dict[str, Any]) -> dict[str, Any]:
    tally = Tally()
    go = asyncio.Event()
    context = ssl.create_default_context(cafile=spec["ca"])
    clients = int(spec["clients"])
    tasks = [
        asyncio.create_task(checkout(spec, context, tally, go, number)) for number in range(clients)
    ]
    await asyncio.sleep(0.1)  # every client parks on `go`: then all start at once
    start = time.monotonic()
    go.set()

    async def report() -> None:
        while True:
            emit(tally.progress(time.monotonic() - start))
            await asyncio.sleep(0.2)

    reporter = asyncio.create_task(report())
    _done, pending = await asyncio.wait(tasks, timeout=float(spec["timeout"]) + 15)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        tally.errors["unfinished: cancelled after the client timeout"] += len(pending)
    wall = time.monotonic() - start
    reporter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reporter
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **tally.progress(wall),
        "clients": clients,
        "cpu": round(usage.ru_utime + usage.ru_stime, 2),
        "error_counts": dict(tally.errors.most_common()),
        "latencies_ms": [round(value * 1000, 2) for value in tally.latencies],
    }


def share_pbkdf2() -> None:
    """Compute each (password, salt, iterations) PBKDF2 once in this process.

    Every simulated client is a Lambda with a CPU of its own; here thousands share this
    machine's few cores, and 4096 rounds of PBKDF2 per SCRAM login (~2 ms each) would make
    the load generator, not the database or the proxy, the bottleneck. The servers still do
    their full share of the work: PostgreSQL and the proxy verify every login.
    """
    hashlib.pbkdf2_hmac = functools.lru_cache(maxsize=16)(hashlib.pbkdf2_hmac)  # type: ignore[assignment]


def loadgen_main() -> int:
    raise_nofile_limit()
    share_pbkdf2()
    spec = json.loads(sys.stdin.read())
    emit({"result": asyncio.run(loadgen_async(spec))})
    return 0


# --------------------------------------------------------------------------------------------
# One run of the storm, seen from the demo: the load generator, a sampler, the progress line


class Sampler:
    """Counts the server connections to database ``shop`` in pg_stat_activity, as superuser,
    every SAMPLE_INTERVAL seconds, in a thread of its own."""

    QUERY = (
        "select count(*) from pg_stat_activity "
        "where datname = %s and backend_type = 'client backend'"
    )

    def __init__(self, cluster: Cluster) -> None:
        self.conn = cluster.connect()  # before the storm: it needs a slot too
        self.current = 0
        self.peak = 0
        self.samples = 0
        self.error: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="sampler", daemon=True)

    def sample(self) -> int:
        row = self.conn.execute(self.QUERY, [APP]).fetchone()
        return int(row[0]) if row else 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.current = self.sample()
                self.peak = max(self.peak, self.current)
                self.samples += 1
                self.stopping.wait(SAMPLE_INTERVAL)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.conn.close()


class Progress:
    """One line per run: redrawn in place with '\\r' on a terminal, else a line a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.interactive = sys.stdout.isatty()
        self.last_print = 0.0
        self.width = 0

    def text(self, state: dict[str, Any], sampler: Sampler) -> str:
        return (
            f"  {self.label:<6}{state['elapsed']:5.1f} s  attempts {state['attempts']:>5,}"
            f"  ok {state['ok']:>5,}  errors {state['errors']:>5,}"
            f"  db conns {sampler.current:>2} (peak {sampler.peak})"
        )

    def update(self, state: dict[str, Any], sampler: Sampler) -> None:
        line = self.text(state, sampler)
        if self.interactive:
            # A line that wraps cannot be redrawn in place: cut it to the terminal's width.
            line = line[: shutil.get_terminal_size().columns - 1]
            sys.stdout.write("\r" + line.ljust(self.width))
            sys.stdout.flush()
            self.width = len(line)
        elif time.monotonic() - self.last_print >= 1.0:
            self.last_print = time.monotonic()
            say(line)

    def finish(self, state: dict[str, Any], sampler: Sampler) -> None:
        line = self.text(state, sampler) + "  done"
        if self.interactive:
            sys.stdout.write("\r" + line.ljust(self.width) + "\n")
            sys.stdout.flush()
        else:
            say(line)


def percentile_ms(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (in milliseconds already); None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclasses.dataclass
class RunResult:
    label: str
    clients: int
    attempts: int
    ok: int
    errors: Counter[str]
    latencies_ms: list[float]
    wall: float
    peak_server: int
    samples: int
    sampler_error: str | None
    loadgen_cpu: float
    proxy_cpu: float | None
    postgres_cpu: float | None

    @property
    def too_many(self) -> int:
        """Refused with "sorry, too many clients already"."""
        return sum(n for key, n in self.errors.items() if TOO_MANY in key)

    @property
    def refused(self) -> int:
        """Refused for want of a connection slot (SQLSTATE 53300), whatever the message."""
        return sum(n for key, n in self.errors.items() if key.startswith(f"FATAL {FULL}:"))

    @property
    def other_errors(self) -> int:
        return self.failed - self.refused

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def process_cpu(pid: int, *, children: bool = False) -> float | None:
    """User + system CPU seconds of ``pid`` (plus its reaped children's with ``children``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    ticks = utime + stime + (cutime + cstime if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def parent_pid(proc_dir: Path) -> int | None:
    try:
        text = (proc_dir / "stat").read_text()
    except OSError:
        return None  # gone meanwhile
    return int(text[text.rindex(")") + 2 :].split()[1])


def minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM by PID, wait; SIGKILL if it does not exit in time. Returns the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"  pid {proc.pid} ignored SIGTERM for {timeout:g} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------------
# The demo


class Demo:
    """Everything the demo starts, so that ``close()`` can stop it whatever happened."""

    def __init__(self, clients: int, quick: bool) -> None:
        self.clients = clients
        self.quick = quick
        self.timeout = QUICK_CLIENT_TIMEOUT if quick else CLIENT_TIMEOUT
        self.bindir = find_bindir()
        # Last: nothing after it can fail before close() is sure to remove it.
        self.base = Path(tempfile.mkdtemp(prefix="trioproxy-demo-"))
        self.cluster = Cluster(self.bindir, self.base)
        self.proxy: ProxyProcess | None = None
        self.loadgen: subprocess.Popen[bytes] | None = None
        self.app_password = secrets.token_urlsafe(18)
        self.tls: TLSFiles | None = None
        self.results: list[RunResult] = []
        self.proxy_exit: int | None = None
        self.problems: list[str] = []

    # -- set-up ------------------------------------------------------------------------------

    def start_postgres(self) -> None:
        chown_to_owner(self.base)
        cluster = self.cluster
        version = run([str(self.bindir / "postgres"), "--version"], cwd=self.base).stdout
        field("server binaries", f"{self.bindir}  ({version.strip()})")
        self.tls = make_self_signed_ca_and_server(self.base / "tls")
        cluster.create()
        # TLS for direct clients too, with a copy of the demo certificate that the server
        # owns (PostgreSQL insists on owning its key).
        install_server_tls(cluster.datadir, self.tls.server_cert, self.tls.server_key)
        append_conf(cluster.datadir, {"ssl": True})
        cluster.start()
        owner = f", run as system user {RUN_AS!r}" if os.geteuid() == 0 else ""
        field("temp dir", self.base)
        field("listening", f"127.0.0.1:{cluster.port}{owner}")
        field(
            "max_connections",
            f"{MAX_CONNECTIONS}  (the last {RESERVED} free slots are kept for superusers)",
        )
        field("clients must use", "TLS (demo CA) + scram-sha-256")
        with cluster.connect() as admin:
            from psycopg import sql

            admin.execute(
                sql.SQL("create role {} login password {}").format(
                    sql.Identifier(APP), sql.Literal(self.app_password)
                )
            )
            admin.execute(
                sql.SQL("create database {} owner {}").format(
                    sql.Identifier(APP), sql.Identifier(APP)
                )
            )
        import psycopg

        with psycopg.connect(self.dsn(cluster.port), autocommit=True) as conn:
            conn.execute(ORDERS)
        field("role / database", f"{APP} / {APP}  (random password), table orders")

    def dsn(self, port: int) -> str:
        from psycopg import pq
        from psycopg.conninfo import make_conninfo

        assert self.tls is not None
        extra = {"require_auth": "scram-sha-256"} if pq.version() >= 160000 else {}
        return make_conninfo(
            host="localhost",  # the name verify-full checks against the certificate
            hostaddr="127.0.0.1",
            port=port,
            dbname=APP,
            user=APP,
            password=self.app_password,
            sslmode="verify-full",
            sslrootcert=str(self.tls.ca_cert),
            connect_timeout=30,
            **extra,
        )

    def start_proxy(self) -> None:
        proxy_port = free_port()
        config = self.base / "proxy.toml"
        config.write_text(proxy_toml(proxy_port, self.cluster.port, self.clients))
        if not self.quick:
            say(f"  {config}:")
            say()
            say(indent(config.read_text()))
            say()
        self.proxy = proxy = ProxyProcess(config, proxy_port, self.app_password)
        say(f"  $ {PASSWORD_ENV}=... {' '.join(proxy.argv)}")
        took = proxy.start()
        assert proxy.proc is not None
        field("pid", proxy.proc.pid)
        field("accepting on", f"127.0.0.1:{proxy_port}  after {took:.2f} s")
        field(
            "pool",
            f"{POOL_PERCENT}% of the {MAX_CONNECTIONS - RESERVED} non-reserved slots = "
            f"at most {POOL_SIZE} server connections",
        )

    # -- the storm ---------------------------------------------------------------------------

    def app_connections(self) -> int:
        with self.cluster.connect() as conn:
            row = conn.execute(
                "select count(*) from pg_stat_activity where datname = %s", [APP]
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_until_quiet(self, keep: int, timeout: float = 15) -> None:
        """Wait until at most ``keep`` connections to ``shop`` remain (a run's stragglers)."""
        deadline = time.monotonic() + timeout
        while self.app_connections() > keep and time.monotonic() < deadline:
            time.sleep(0.1)

    def storm(self, label: str, port: int) -> RunResult:
        assert self.tls is not None
        spec = {
            "host": "127.0.0.1",
            "port": port,
            "user": APP,
            "password": self.app_password,
            "database": APP,
            "ca": str(self.tls.ca_cert),
            "clients": self.clients,
            "sleep": SLEEP,
            "timeout": self.timeout,
        }
        errlog = self.base / f"loadgen-{label}.log"
        proxy_cpu, postgres_cpu = self.proxy_cpu(), self.postgres_cpu()
        progress = Progress(label)
        state: dict[str, Any] = {"elapsed": 0.0, "attempts": 0, "ok": 0, "errors": 0}
        result: dict[str, Any] | None = None
        with Sampler(self.cluster) as sampler, errlog.open("wb") as err:
            self.loadgen = proc = subprocess.Popen(
                [sys.executable, "-m", "trioproxy.demo", "--loadgen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=clean_env(),
                cwd=self.base,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops it by PID
            )
            assert proc.stdin is not None
            assert proc.stdout is not None
            # A watchdog in case the load generator hangs: it has its own deadline.
            watchdog = threading.Timer(self.timeout + 60, proc.kill)
            watchdog.daemon = True
            watchdog.start()
            try:
                proc.stdin.write(json.dumps(spec).encode())
                proc.stdin.close()
                for line in proc.stdout:
                    message = json.loads(line)
                    if "result" in message:
                        result = message["result"]
                        state = result
                    else:
                        state = message
                        progress.update(state, sampler)
            finally:
                watchdog.cancel()
            code = stop_process(proc, timeout=10)
            self.loadgen = None
            progress.finish(state, sampler)
        if result is None or code != 0:
            raise DemoError(
                f"the load generator failed (exit {code}); its log:\n{indent(tail(errlog))}"
            )
        if sampler.error:
            self.problems.append(f"the pg_stat_activity sampler failed: {sampler.error}")
        return RunResult(
            label=label,
            clients=int(result["clients"]),
            attempts=int(result["attempts"]),
            ok=int(result["ok"]),
            errors=Counter(result["error_counts"]),
            latencies_ms=[float(v) for v in result["latencies_ms"]],
            wall=float(result["elapsed"]),
            peak_server=sampler.peak,
            samples=sampler.samples,
            sampler_error=sampler.error,
            loadgen_cpu=float(result["cpu"]),
            proxy_cpu=minus(self.proxy_cpu(), proxy_cpu),
            postgres_cpu=minus(self.postgres_cpu(), postgres_cpu),
        )

    def proxy_cpu(self) -> float | None:
        proc = self.proxy.proc if self.proxy is not None else None
        return None if proc is None else process_cpu(proc.pid)

    def postgres_cpu(self) -> float | None:
        """CPU seconds of the postmaster and its backends, the live and the exited ones."""
        pid = postmaster_pid(self.cluster.datadir)
        if pid is None:
            return None
        total = process_cpu(pid, children=True)
        if total is None:
            return None
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and parent_pid(entry) == pid:
                total += process_cpu(int(entry.name)) or 0.0
        return total

    def show_run(self, result: RunResult) -> None:
        for message, count in result.errors.most_common(6):
            say(f"    {count:>6,} x {message}")
        cpu = [f"load generator {result.loadgen_cpu:.1f}"]
        if result.proxy_cpu is not None:
            cpu.append(f"proxy {result.proxy_cpu:.1f}")
        if result.postgres_cpu is not None:
            cpu.append(f"PostgreSQL {result.postgres_cpu:.1f}")
        say(f"  CPU seconds: {', '.join(cpu)}  (this machine: {os.cpu_count()} CPUs)")

    # -- the whole tour ----------------------------------------------------------------------

    def run(self) -> None:
        heading(f"1. A throw-away PostgreSQL, max_connections = {MAX_CONNECTIONS}")
        self.start_postgres()

        heading(f"2. Black Friday without a proxy: {self.clients:,} clients straight at PostgreSQL")
        say(
            f"  each client (a Lambda invocation): connect (TLS verify-full + SCRAM), one\n"
            f"  checkout transaction (insert an order, read it back, pg_sleep({SLEEP:g}) for the\n"
            f"  rest of its queries), disconnect; all at once, no retry. Server connections:\n"
            f"  pg_stat_activity, sampled every {SAMPLE_INTERVAL * 1000:.0f} ms as superuser."
        )
        say()
        direct = self.storm("direct", self.cluster.port)
        self.results.append(direct)
        self.show_run(direct)
        self.wait_until_quiet(keep=0)

        heading("3. The proxy, configured like the story's RDS Proxy Terraform")
        self.start_proxy()

        heading("4. One checkout through the proxy, in slow motion (psycopg)")
        assert self.proxy is not None
        verbose_checkout(self.dsn(self.proxy.port))

        heading(f"5. Black Friday through trioproxy: the same {self.clients:,} clients")
        say()
        proxied = self.storm("proxy", self.proxy.port)
        self.results.append(proxied)
        self.show_run(proxied)
        if proxied.failed:
            self.problems.append(f"{proxied.failed} client(s) failed through the proxy")
        if proxied.peak_server > POOL_SIZE:
            self.problems.append(
                f"the proxy used {proxied.peak_server} server connections (pool: {POOL_SIZE})"
            )

    def close(self) -> None:
        with uninterruptible():
            heading("6. Shutting down")
            if self.loadgen is not None:
                field("load generator", f"exit status {stop_process(self.loadgen, timeout=5)}")
                self.loadgen = None
            if self.proxy is not None:
                code = self.proxy_exit = self.proxy.stop()
                if code is not None:
                    field(
                        "proxy (SIGTERM)",
                        f"exit status {code}" + ("" if code == 0 else "  (expected 0)"),
                    )
                    if code != 0:
                        self.problems.append(f"the proxy exited with status {code}")
                        say(indent(tail(self.proxy.logfile), "    | "))
                if self.problems:
                    errors = [
                        line
                        for line in tail(self.proxy.logfile, 5000).splitlines()
                        if " ERROR " in line or " CRITICAL " in line or "Traceback" in line
                    ]
                    if errors:
                        field("proxy log errors", f"{len(errors)} line(s), the last ones:")
                        say(indent("\n".join(errors[-10:]), "    | "))
            try:
                self.cluster.stop()
                field("PostgreSQL", "stopped (pg_ctl stop -m fast)")
            except Exception as exc:
                field("PostgreSQL", f"could not be stopped cleanly: {exc}")
            shutil.rmtree(self.base, ignore_errors=True)
            field("temp dir", "removed" if not self.base.exists() else f"left behind: {self.base}")


# --------------------------------------------------------------------------------------------
# The verdict


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.2f} s" if value >= 1000 else f"{value:,.0f} ms"


def side_by_side(direct: RunResult, proxied: RunResult) -> str:
    rows: list[tuple[str, str, str]] = [
        ("clients (one checkout each)", f"{direct.attempts:,}", f"{proxied.attempts:,}"),
        ("checkouts completed", f"{direct.ok:,}", f"{proxied.ok:,}"),
        (f"errors: {TOO_MANY}", f"{direct.too_many:,}", f"{proxied.too_many:,}"),
        (
            "errors: slots reserved (53300)",
            f"{direct.refused - direct.too_many:,}",
            f"{proxied.refused - proxied.too_many:,}",
        ),
        ("errors: other", f"{direct.other_errors:,}", f"{proxied.other_errors:,}"),
        (
            "latency p50 (completed)",
            ms(percentile_ms(direct.latencies_ms, 50)),
            ms(percentile_ms(proxied.latencies_ms, 50)),
        ),
        (
            "latency p99 (completed)",
            ms(percentile_ms(direct.latencies_ms, 99)),
            ms(percentile_ms(proxied.latencies_ms, 99)),
        ),
        (
            "peak server connections",
            f"{direct.peak_server} of {MAX_CONNECTIONS}",
            f"{proxied.peak_server} of {MAX_CONNECTIONS}",
        ),
        ("wall time", f"{direct.wall:.1f} s", f"{proxied.wall:.1f} s"),
    ]
    headers = ("", "direct to PostgreSQL", "through trioproxy")
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(3)]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(headers), line(["-" * width for width in widths])]
    out += [line(row) for row in rows]
    return "\n".join(out)


def meaning(direct: RunResult, proxied: RunResult) -> str:
    """One sentence: what the numbers mean."""
    n = direct.attempts
    if direct.refused:
        before = (
            f"Straight to PostgreSQL, {direct.refused:,} of {n:,} checkouts "
            f'({100 * direct.refused / max(1, n):.0f}%) were refused ("{TOO_MANY}") because '
            f"every client wanted a server connection of its own at the same moment and the "
            f"server has {MAX_CONNECTIONS} slots"
        )
    else:
        before = (
            f"Straight to PostgreSQL all {n:,} clients happened to fit into its "
            f"{MAX_CONNECTIONS} slots (try more --clients)"
        )
    if proxied.failed == 0:
        after = (
            f"through trioproxy all {proxied.ok:,} completed on at most "
            f"{proxied.peak_server} server connections, because a client holds one only for "
            f"the length of its transaction and otherwise waits its turn in the proxy's queue"
        )
        p50_direct = percentile_ms(direct.latencies_ms, 50)
        p50_proxy = percentile_ms(proxied.latencies_ms, 50)
        if p50_direct is not None and p50_proxy is not None and p50_proxy > p50_direct:
            after += (
                f" (hence the higher latency: {proxied.ok:,} checkouts instead of "
                f"{direct.ok:,}, sharing {proxied.peak_server} server connections and this "
                f"machine's {os.cpu_count()} CPUs)"
            )
    else:
        after = (
            f"through trioproxy {proxied.failed:,} still failed, which points at the proxy "
            f"or at an overloaded machine: see the errors above"
        )
    return f"{before}; {after}."


# --------------------------------------------------------------------------------------------
# Main


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ignore further Ctrl-C and SIGTERM while cleaning up, so the cleanup runs to the end."""
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _sigterm(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # run the same cleanup as Ctrl-C


def parser(prog: str = "python -m trioproxy.demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Black Friday on this machine: a throw-away PostgreSQL (max_connections "
        f"{MAX_CONNECTIONS}) and trioproxy; thousands of short-lived clients, each running one "
        "checkout, first straight at PostgreSQL, then through the proxy; then the two side by "
        "side. Cleans up after itself.",
    )
    p.add_argument(
        "--clients",
        type=int,
        metavar="N",
        help=f"concurrent clients per run (default {CLIENTS:,}; {QUICK_CLIENTS} with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run for tests: {QUICK_CLIENTS} clients unless --clients, a "
        f"{QUICK_CLIENT_TIMEOUT:g} s client timeout, proxy.toml not printed",
    )
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m trioproxy.demo") -> int:
    args = parser(prog).parse_args(argv)
    if args.loadgen:
        return loadgen_main()
    clients = args.clients if args.clients is not None else QUICK_CLIENTS if args.quick else CLIENTS
    if clients < 1:
        parser(prog).error("--clients must be at least 1")
    try:
        import asyncpg  # noqa: F401 - fail early with a clear message
        import psycopg  # noqa: F401
    except ImportError:
        say("the demo needs psycopg and asyncpg: pip install -e '.[test]' (or run `make demo`)")
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    nofile = raise_nofile_limit()  # inherited by the proxy and the load generator
    say(
        f"trioproxy demo: Black Friday, {clients:,} Lambda-style clients against a PostgreSQL "
        f"with max_connections = {MAX_CONNECTIONS}"
    )
    if nofile < clients + 200:
        say(
            f"  warning: the open-files limit is {nofile}, below the ~{clients + 200} that "
            f"{clients:,} clients need; expect 'Too many open files' (raise ulimit -n)"
        )
    began = time.monotonic()
    demo: Demo | None = None
    interrupted = False
    try:
        demo = Demo(clients, args.quick)
        demo.run()
    except KeyboardInterrupt:
        interrupted = True
    except DemoError as exc:
        if demo is not None:
            demo.problems.append(str(exc))
        say(f"\n  demo failed: {exc}")
    except Exception:
        if demo is not None:
            demo.problems.append("unexpected error")
        say("\n  demo failed with an unexpected error:")
        say(indent(traceback.format_exc(), "    | "))
    finally:
        if demo is not None:
            try:
                demo.close()  # ignores Ctrl-C and SIGTERM while it runs
            except KeyboardInterrupt:  # one that came just before
                interrupted = True
    if interrupted:
        say("\ninterrupted: everything was stopped and removed")
        return 130
    if demo is None:
        return 1
    field("total time", f"{time.monotonic() - began:.1f} s")
    if len(demo.results) == 2:
        direct, proxied = demo.results
        heading("Black Friday, side by side")
        say(side_by_side(direct, proxied))
        say(
            "  latency: connect + checkout of the completed clients, on a machine whose "
            f"{os.cpu_count()} CPUs\n"
            f"  also run PostgreSQL, the proxy and all {clients:,} clients' TLS handshakes "
            "(CPU seconds\n"
            "  above); server connections: the peak of "
            f"{direct.samples + proxied.samples:,} samples of pg_stat_activity"
        )
        say()
        say(textwrap.fill(meaning(direct, proxied), WIDTH))
    say()
    if demo.problems:
        say("demo FAILED: " + "; ".join(demo.problems))
        return 1
    say("demo passed: every client served through the proxy, the pool cap held, clean shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
