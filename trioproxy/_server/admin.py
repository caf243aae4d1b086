"""The admin console: ``psql -d trioproxy`` as one of ``[proxy] admin_users``.

[shell] A simple-query responder in the manner of PgBouncer's ``pgbouncer`` database: the
client logs in with SCRAM as usual (``ClientSession._login``), then every Query message is
one command answered by the proxy itself with RowDescription / DataRow / CommandComplete /
ReadyForQuery. No server connection is ever involved. Column names follow PgBouncer's
where the same thing is shown, so habits and dashboards carry over.

Commands (case-insensitive, an optional trailing ``;``)::

    SHOW POOLS | CLIENTS | SERVERS | STATS | CONFIG | DATABASES | USERS | LISTS | VERSION | HELP
    PAUSE [db]      hold new transactions; waits (up to shutdown_timeout) for the running ones
    RESUME [db]
    RELOAD          re-read the configuration file (as SIGHUP)
    SHUTDOWN        graceful shutdown (as SIGTERM)
    KILL_CLIENT id  close one client (at once if idle, else when its transaction ends)

The extended protocol is refused (one error per Sync): ``psql``, ``psycopg`` without
parameters and PgBouncer tooling all use simple queries here.
"""

from __future__ import annotations

import datetime
import enum
import logging
import os
import re
import signal
import struct
import time
from typing import TYPE_CHECKING

import attrs
import trio

from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy._protocol.framing import MessageReader
from trioproxy._protocol.messages import (
    AuthenticationOk,
    BackendKeyData,
    CommandComplete,
    NoticeResponse,
    ReadyForQuery,
    error_bytes,
    frame,
    parameter_status_bytes,
)
from trioproxy.config import BackendConfig, EndpointRole, PoolConfig, ProxyConfig
from trioproxy.errors import SQLState, TrioproxyError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trioproxy._server.client import ClientSession
    from trioproxy._server.proxy import Proxy

logger = logging.getLogger("trioproxy.admin")

#: The database name that reaches the console instead of a pool.
ADMIN_DATABASE = "trioproxy"
SHUTDOWN_MESSAGE = "terminating connection due to administrator command (trioproxy shutdown)"
KILLED_MESSAGE = "terminating connection due to administrator command (KILL_CLIENT)"

_READY = ReadyForQuery(TxStatus.IDLE).encode()
_INT8 = 20
_TEXT = 25
Value = str | int | float | None


@attrs.frozen
class Result:
    """What one command answers: rows (if any) and the CommandComplete tag."""

    tag: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Value, ...], ...] = ()
    notices: tuple[str, ...] = ()


class AdminError(TrioproxyError):
    """A command the console refuses; the session goes on."""

    sqlstate = SQLState.FEATURE_NOT_SUPPORTED
    fatal = False


# --- wire encoding ----------------------------------------------------------------------


def _row_description(columns: Sequence[str], rows: Sequence[Sequence[Value]]) -> bytes:
    body = struct.pack("!h", len(columns))
    for index, name in enumerate(columns):
        numeric = bool(rows) and all(
            isinstance(row[index], int) or row[index] is None for row in rows
        )
        body += (
            name.encode()
            + b"\0"
            + struct.pack("!ihihih", 0, 0, _INT8 if numeric else _TEXT, 8 if numeric else -1, -1, 0)
        )
    return frame(Backend.ROW_DESCRIPTION, body)


def _data_row(row: Sequence[Value]) -> bytes:
    body = struct.pack("!h", len(row))
    for value in row:
        if value is None:
            body += struct.pack("!i", -1)
            continue
        text = str(value).encode()
        body += struct.pack("!i", len(text)) + text
    return frame(Backend.DATA_ROW, body)


def encode_result(result: Result) -> bytes:
    out = b"".join(
        NoticeResponse.build("00000", note, severity="NOTICE").encode() for note in result.notices
    )
    if result.columns:
        out += _row_description(result.columns, result.rows)
        out += b"".join(_data_row(row) for row in result.rows)
    return out + CommandComplete(result.tag).encode()


# --- login --------------------------------------------------------------------------------


async def admin_login(session: ClientSession) -> bool:
    """Finish the login of an authenticated client to the console; False if refused
    (the client was told why)."""
    proxy = session.proxy
    if session.user not in proxy.config.proxy.admin_users:
        logger.info("client %d: admin console refused to user %r", session.id, session.user)
        await session._fatal(
            SQLState.INVALID_AUTHORIZATION,
            f'user "{session.user}" is not allowed to use the admin console',
            detail="Add the user to [proxy] admin_users.",
        )
        return False
    session.process_id, secret = proxy.register_cancel_key(session)
    session.secret_key = struct.pack("!I", secret)
    parameters = {
        "server_version": f"16.0 (trioproxy {_version()})",
        "server_encoding": "UTF8",
        "client_encoding": "UTF8",
        "DateStyle": "ISO, MDY",
        "TimeZone": "UTC",
        "integer_datetimes": "on",
        "standard_conforming_strings": "on",
        "is_superuser": "off",
        "application_name": "",
    }
    await session._send(
        AuthenticationOk().encode()
        + parameter_status_bytes(parameters)
        + BackendKeyData(session.process_id, secret).encode()
        + _READY
    )
    logger.info("client %d: admin console login as %s", session.id, session.user)
    return True


# --- serving --------------------------------------------------------------------------------


async def serve_admin(session: ClientSession) -> None:
    """Answer commands until the client leaves (or the proxy drains / kills it)."""
    proxy = session.proxy
    reader = MessageReader(max_message_size=1024 * 1024)
    carry = session._carry_over
    if carry:
        reader.feed(carry)
    failed_extended = False
    while True:
        message = reader.next_message()
        if message is None:
            if proxy.draining or session.kill_reason is not None:
                await session._fatal(
                    SQLState.ADMIN_SHUTDOWN, session.kill_reason or SHUTDOWN_MESSAGE
                )
                return
            with trio.CancelScope() as wait:
                session.wait_scope = wait
                data = await session.transport.receive_some()
            session.wait_scope = None
            if wait.cancelled_caught:
                continue
            if not data:
                return
            reader.feed(data)
            continue
        if message.type == Frontend.TERMINATE:
            return
        if message.type == Frontend.QUERY:
            sql = message.body.rstrip(b"\0").decode("utf-8", "replace")
            await session.transport.send_all(await _answer(proxy, session, sql) + _READY)
        elif message.type == Frontend.SYNC:
            failed_extended = False
            await session.transport.send_all(_READY)
        elif not failed_extended and message.type != Frontend.FLUSH:
            failed_extended = True
            await session.transport.send_all(
                error_bytes(
                    SQLState.FEATURE_NOT_SUPPORTED,
                    "the admin console supports only the simple query protocol",
                )
            )


async def _answer(proxy: Proxy, session: ClientSession, sql: str) -> bytes:
    statements = [s.strip() for s in sql.split(";") if s.strip()]
    if not statements:
        return frame(Backend.EMPTY_QUERY_RESPONSE, b"")
    out = b""
    for statement in statements:
        try:
            result = await run_command(proxy, statement, session_id=session.id)
        except TrioproxyError as exc:
            return out + error_bytes(exc.sqlstate, exc.message, detail=exc.detail)
        logger.info("client %d: admin command %s", session.id, result.tag)
        out += encode_result(result)
    return out


# --- commands -------------------------------------------------------------------------------

_HELP = (
    "SHOW POOLS|CLIENTS|SERVERS|STATS|CONFIG|DATABASES|USERS|LISTS|VERSION|HELP",
    "PAUSE [db]",
    "RESUME [db]",
    "RELOAD",
    "SHUTDOWN",
    "KILL_CLIENT id",
)


async def run_command(proxy: Proxy, statement: str, *, session_id: int = 0) -> Result:
    """Run one console command (no trailing ``;``)."""
    words = statement.split()
    verb = words[0].upper()
    args = words[1:]
    if verb == "SHOW" and len(args) == 1:
        what = args[0].upper()
        show = _SHOW.get(what)
        if show is None:
            raise AdminError(f"unknown SHOW {args[0]!r}", detail="Try SHOW HELP.")
        columns, rows = show(proxy)
        return Result("SHOW", columns, tuple(rows))
    if verb == "PAUSE" and len(args) <= 1:
        return await _pause(proxy, _database_arg(args))
    if verb == "RESUME" and len(args) <= 1:
        proxy.resume(_database_arg(args))
        return Result("RESUME")
    if verb == "RELOAD" and not args:
        notes = await proxy.reload()
        if proxy.runtime is not None:  # workers = N: the others reload too
            os.kill(proxy.runtime.spec.supervisor_pid, signal.SIGHUP)
            notes = [*notes, "every worker reloads (SIGHUP sent to the supervisor)"]
        return Result("RELOAD", notices=tuple(notes))
    if verb == "SHUTDOWN" and not args:
        logger.warning("admin client %d asked for SHUTDOWN", session_id)
        if proxy.runtime is not None:
            # workers = N: the supervisor's SIGTERM drains every worker, this one too (a
            # drain begun here first would take that SIGTERM for a second one: stop now).
            os.kill(proxy.runtime.spec.supervisor_pid, signal.SIGTERM)
        else:
            proxy.shutdown()
        return Result("SHUTDOWN")
    if verb == "KILL_CLIENT" and len(args) == 1 and args[0].isdigit():
        return _kill(proxy, int(args[0]))
    raise AdminError(
        f"unknown admin command: {statement[:60]!r}", detail="Commands: " + "; ".join(_HELP)
    )


def _database_arg(args: Sequence[str]) -> str | None:
    if not args:
        return None
    name = args[0]
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    if not re.fullmatch(r"[^\s;]+", name):
        raise AdminError(
            f"invalid database name {args[0]!r}", sqlstate=SQLState.INVALID_PARAMETER_VALUE
        )
    return name


async def _pause(proxy: Proxy, database: str | None) -> Result:
    proxy.pause(database)
    timeout = proxy.config.proxy.shutdown_timeout
    with trio.move_on_after(timeout):
        # Polled: a transaction's end is not an event the proxy publishes.
        while proxy.linked_clients(database) > 0:  # noqa: ASYNC110
            await trio.sleep(0.02)
    busy = proxy.linked_clients(database)
    notes: tuple[str, ...] = ()
    if busy:
        notes = (
            f"{busy} clients still hold a server connection after {timeout:g} s "
            "(pinned, or a long transaction); new transactions are held",
        )
    return Result("PAUSE", notices=notes)


def _kill(proxy: Proxy, client_id: int) -> Result:
    session = proxy.clients.get(client_id)
    if session is None:
        raise AdminError(
            f"no client with id {client_id}", sqlstate=SQLState.INVALID_PARAMETER_VALUE
        )
    session.kill_reason = KILLED_MESSAGE
    if session.wait_scope is not None:
        session.wait_scope.cancel()
    return Result("KILL_CLIENT")


# --- SHOW -------------------------------------------------------------------------------------

Rows = list[tuple[Value, ...]]


def _wall_clock(trio_time: float) -> str:
    seconds = time.time() - (trio.current_time() - trio_time)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _split_peer(peer: str) -> tuple[str, int | None]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer, None
    return host.strip("[]"), int(port)


def show_pools(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    columns = (
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "cl_pinned",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_login",
        "sv_max",
        "maxwait",
        "maxwait_us",
        "pool_mode",
        "borrow_timeouts",
        "setup_failures",
        "paused",
    )
    mode = proxy.config.pool.pool_mode.value
    rows: Rows = []
    sessions = list(proxy.sessions())
    for database, user, role, pool in proxy.pool_list():
        stats = pool.statistics()
        mine = [s for s in sessions if s.database == database and s.user == user and s.role is role]
        rows.append(
            (
                shown_database(database, role),
                user,
                max(0, len(mine) - stats.waiting),
                stats.waiting,
                sum(1 for s in mine if s.pin_reason is not None),
                stats.borrowed,
                stats.idle,
                0,
                stats.opening,
                stats.max_size,
                0,
                0,
                mode,
                pool.borrow_timeouts,
                pool.setup_failures,
                int(proxy.is_paused(database)),
            )
        )
    return columns, rows


def show_clients(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    columns = (
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "tls",
        "application_name",
        "id",
        "link",
        "pinned",
        "pin_reason",
        "transactions",
    )
    rows: Rows = []
    for s in sorted(proxy.sessions(), key=lambda s: s.id):
        addr, port = _split_peer(s.transport.peer)
        if s.admin_console:
            state = "admin"
        elif s.server is not None:
            state = "active"
        elif s.wait_scope is not None:
            state = "idle"
        else:
            state = "waiting" if s.user else "login"
        rows.append(
            (
                "C",
                s.user,
                s.database,
                state,
                addr,
                port,
                _wall_clock(s.connected_at),
                "on" if s.transport.is_tls else "off",
                s.application_name,
                s.id,
                s.server.id if s.server is not None else None,
                "yes" if s.pin_reason is not None else "no",
                s.pin_reason,
                s.transactions,
            )
        )
    return columns, rows


def show_servers(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    columns = (
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "id",
        "link",
        "tx_status",
        "tls",
    )
    link = {s.server.id: s.id for s in proxy.sessions() if s.server is not None}
    rows: Rows = []
    for database, user, role, pool in proxy.pool_list():
        target = pool.target
        conns = [(c, "active") for c in pool.core.borrowed()] + [
            (c, "idle") for c in pool.core.idle()
        ]
        for conn, state in sorted(conns, key=lambda item: item[0].id):
            rows.append(
                (
                    "S",
                    user,
                    shown_database(database, role),
                    state,
                    conn.address[0] or target.host,  # with targets: the server it is on
                    conn.address[1] or target.port,
                    _wall_clock(conn.created_at),
                    conn.id,
                    link.get(conn.id),
                    conn.tx_status.value.decode(),
                    "on" if conn.transport.is_tls else "off",
                )
            )
    return columns, rows


def show_stats(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    stats = proxy.stats
    columns = (
        "database",
        "total_xact_count",
        "total_received",
        "total_sent",
        "clients_accepted",
        "clients_closed",
        "failed_logins",
        "borrow_timeouts",
        "server_setup_failures",
        "reloads",
        "uptime_seconds",
    )
    sessions = list(proxy.sessions())
    pools = [pool for _database, _user, _role, pool in proxy.pool_list()]
    row: tuple[Value, ...] = (
        "*",
        sum(s.transactions for s in sessions),
        stats.bytes_from_clients,
        stats.bytes_from_servers,
        stats.clients_accepted,
        stats.clients_closed,
        stats.failed_logins,
        sum(p.borrow_timeouts for p in pools),
        sum(p.setup_failures for p in pools),
        stats.reloads,
        int(trio.current_time() - stats.started_at),
    )
    return columns, [row]


_RESTART = {
    "proxy.listen",
    "proxy.tls_cert_file",
    "proxy.tls_key_file",
    "proxy.metrics_listen",
    "backend.host",
    "backend.port",
    "backend.backend_tls",
    "backend.backend_tls_ca_file",
    "pool.pool_mode",
}


def _show_value(value: object) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (tuple, frozenset)):
        return ", ".join(sorted(str(v) for v in value))
    return "" if value is None else str(value)


def show_config(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    """PgBouncer's columns: key, value, default, changeable. Secrets are never shown."""
    config = proxy.config
    rows: Rows = []
    for section, current, default in (
        ("proxy", config.proxy, ProxyConfig()),
        ("backend", config.backend, BackendConfig()),
        ("pool", config.pool, PoolConfig()),
    ):
        for field in attrs.fields(type(current)):
            key = f"{section}.{field.name}"
            rows.append(
                (
                    key,
                    _show_value(getattr(current, field.name)),
                    _show_value(getattr(default, field.name)),
                    "no" if key in _RESTART else "yes",
                )
            )
    rows.append(("users", ", ".join(sorted(config.users)), "", "yes"))
    return ("key", "value", "default", "changeable"), rows


def show_databases(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    """PgBouncer's SHOW DATABASES, for the databases clients have used so far."""
    columns = (
        "name",
        "host",
        "port",
        "database",
        "pool_size",
        "pool_mode",
        "max_connections",
        "current_connections",
        "paused",
        "disabled",
    )
    backend = proxy.config.backend
    per_database: dict[tuple[str, str], int] = {}  # (shown name, database) -> connections
    for database, _user, role, pool in proxy.pool_list():
        stats = pool.statistics()
        key = (shown_database(database, role), database)
        per_database[key] = per_database.get(key, 0) + stats.idle + stats.borrowed + stats.opening
    rows: Rows = [
        (
            name,
            backend.host,
            backend.port,
            database,
            proxy.budget.cap,
            proxy.config.pool.pool_mode.value,
            proxy.budget.cap,
            current,
            int(proxy.is_paused(database)),
            0,
        )
        for (name, database), current in sorted(per_database.items())
    ]
    return columns, rows


def shown_database(database: str, role: EndpointRole) -> str:
    """The database column of a pool: read-only endpoints' pools are marked."""
    return database if role is EndpointRole.READ_WRITE else f"{database} (read-only)"


def show_users(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    """PgBouncer's SHOW USERS: the configured users (never their secrets)."""
    mode = proxy.config.pool.pool_mode.value
    return ("name", "pool_mode", "admin"), [
        (name, mode, "yes" if name in proxy.config.proxy.admin_users else "no")
        for name in sorted(proxy.config.users)
    ]


def show_lists(proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    """PgBouncer's SHOW LISTS: counts of the proxy's internal lists."""
    sessions = list(proxy.sessions())
    pools = proxy.pool_list()
    stats = [pool.statistics() for _database, _user, _role, pool in pools]
    rows: Rows = [
        ("databases", len({shown_database(d, role) for d, _user, role, _pool in pools})),
        ("users", len(proxy.config.users)),
        ("pools", len(pools)),
        ("used_clients", len(sessions)),
        ("used_servers", sum(s.idle + s.borrowed for s in stats)),
        ("free_servers", sum(max(0, s.max_size - s.idle - s.borrowed) for s in stats)),
        ("login_clients", sum(1 for s in sessions if not s.user)),
    ]
    return ("list", "items"), rows


def show_version(_proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    return ("version",), [(f"trioproxy {_version()}",)]


def show_help(_proxy: Proxy) -> tuple[tuple[str, ...], Rows]:
    return ("command",), [(line,) for line in _HELP]


def _version() -> str:
    import trioproxy

    return str(trioproxy.__version__)


_SHOW = {
    "POOLS": show_pools,
    "CLIENTS": show_clients,
    "SERVERS": show_servers,
    "STATS": show_stats,
    "CONFIG": show_config,
    "DATABASES": show_databases,
    "USERS": show_users,
    "LISTS": show_lists,
    "VERSION": show_version,
    "HELP": show_help,
}
