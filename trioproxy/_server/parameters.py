"""Session parameters: what each client has in force, put on whichever connection serves it.

[shell] A mixin of ``ClientSession``. Reported parameters (application_name, TimeZone,
...) follow ParameterStatus; untracked ones (startup options, session SETs) are read back
from the server at the end of the transaction that changed them and replayed with
``set_config`` on the next connection, which costs a round trip only when something differs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trioproxy._protocol.messages import parameter_status_bytes
from trioproxy._server.session_base import SessionBase
from trioproxy._session.pinning import TRACKED_PARAMETERS, tracked_by_name
from trioproxy.errors import (
    AuthenticationFailed,
    SQLState,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from trioproxy._server.backend import ServerConnection


logger = logging.getLogger("trioproxy.client")


def _same_value(name: str, current: str | None, requested: str) -> bool:
    """Would asking for ``requested`` change ``current``? Encoding names are compared the
    way PostgreSQL matches them ('utf-8', 'UTF8' and "'utf-8'" are one encoding), so a
    driver that spells it differently (asyncpg) costs no server round trip at login."""
    if current is None:
        return False
    if name == "client_encoding":
        return _encoding_key(current) == _encoding_key(requested)
    return current == requested


def _taken_as_sent(name: str, value: str) -> bool:
    """Would the server take ``value`` exactly as sent, with nothing to check at login?
    True for an application_name of printable ASCII that fits in NAMEDATALEN - 1 bytes
    (PostgreSQL replaces anything else by '?' and truncates longer names): the value
    most drivers and frameworks send, so a login like that needs no server connection."""
    return (
        name == "application_name"
        and len(value) <= _NAME_MAX
        and value.isascii()
        and value.isprintable()
    )


#: NAMEDATALEN - 1: the longest application_name PostgreSQL keeps whole.
_NAME_MAX = 63


def _encoding_key(value: str) -> str:
    return "".join(ch for ch in value.lower() if ch.isalnum())


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _parse_options(options: str) -> dict[str, str]:
    """``-c name=value`` / ``--name=value`` pairs of the ``options`` startup parameter."""
    result: dict[str, str] = {}
    words = options.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word = words[i + 1]
            i += 1
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            raise AuthenticationFailed(
                f"unsupported option in startup packet: {word!r}",
                sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
            )
        name, sep, value = word.partition("=")
        if not sep:
            raise AuthenticationFailed(
                f"invalid option in startup packet: {word!r}",
                sqlstate=SQLState.INVALID_PARAMETER_VALUE,
            )
        result[name.replace("-", "_").lower()] = value.replace("\\ ", " ")
        i += 1
    return result


#: Reported parameters whose names PostgreSQL spells in mixed case (ParameterStatus).
_SERVER_SPELLING = {
    "datestyle": "DateStyle",
    "intervalstyle": "IntervalStyle",
    "timezone": "TimeZone",
}


#: The encoded ParameterStatus block of a login, by (the pool's server defaults, the
#: client's parameters in order): most clients of a pool get the very same bytes. The
#: defaults dict is set once per pool and never changed; holding it in the value keeps
#: its id() from being reused while the entry lives.
_REPORTED_BYTES: dict[
    tuple[int, tuple[tuple[str, str], ...]], tuple[Mapping[str, str] | None, bytes]
] = {}
_REPORTED_BYTES_MAX = 256


def _lookup(parameters: Mapping[str, str], name: str) -> str | None:
    for key, value in parameters.items():
        if key.lower() == name:
            return value
    return None


class ClientParameters(SessionBase):
    def _requested_parameters(self, startup: Mapping[str, str]) -> dict[str, str]:
        requested: dict[str, str] = {}
        for name, value in startup.items():
            lower = name.lower()
            if lower in ("user", "database", "replication"):
                if lower == "replication" and value.lower() not in ("false", "off", "0", "no"):
                    raise AuthenticationFailed(
                        "replication connections are not supported by trioproxy",
                        sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
                    )
                continue
            if lower == "options":
                requested.update(_parse_options(value))
                continue
            requested[lower] = value
        return requested

    async def _establish_parameters(self, requested: Mapping[str, str]) -> None:
        """Learn the server's parameters and put the client's requested ones in force.

        When the client asks for nothing that differs from the server's defaults, or
        only for what the server takes as sent (``_taken_as_sent``), no server
        connection is needed at login (the common case for most drivers).
        """
        assert self.pool is not None
        defaults = self.pool.server_parameters
        if defaults is not None:
            tracked = tracked_by_name(defaults)
            # What differs from the defaults (an untracked name always does: it has none
            # here, and is never taken as sent).
            taken = {
                name: value
                for name, value in requested.items()
                if not _same_value(name, tracked.get(name), value)
            }
            if all(_taken_as_sent(name, value) for name, value in taken.items()):
                # As the server spells the defaults; the first link puts the others on
                # its connection (_sync_parameters).
                self.parameters = {**tracked, **taken}
                return
        # An idle connection is taken at once (sync, as on the serving path's hot path:
        # no cancel scope); otherwise we wait for one.
        conn = self._try_borrow() or await self._borrow()
        try:
            self.parameters = dict(conn.tracked_parameters)
            # The server's defaults for the untracked ones are whatever RESET gives.
            self.extra_parameters = {
                k: v for k, v in requested.items() if k not in TRACKED_PARAMETERS
            }
            self.startup_extra_parameters = dict(self.extra_parameters)
            for name, value in requested.items():
                if name in TRACKED_PARAMETERS:
                    self.parameters[name] = value
            await self._sync_parameters(conn)
            # Adopt the server's spelling of what it accepted (e.g. 'ISO, MDY').
            self.parameters.update(conn.tracked_parameters)
        finally:
            self._give_back_server()

    _carry_over: bytes = b""

    def _reported_parameters(self) -> dict[str, str]:
        assert self.pool is not None
        reported = dict(self.pool.server_parameters or {})
        canonical = {k.lower(): k for k in reported}
        for name, value in self.parameters.items():
            reported[canonical.get(name, name)] = value
        return reported

    def _reported_parameter_bytes(self) -> bytes:
        """``parameter_status_bytes(self._reported_parameters())``, remembered."""
        assert self.pool is not None
        defaults = self.pool.server_parameters
        key = (id(defaults), tuple(self.parameters.items()))
        cached = _REPORTED_BYTES.get(key)
        if cached is not None and cached[0] is defaults:
            return cached[1]
        data = parameter_status_bytes(self._reported_parameters())
        if len(_REPORTED_BYTES) >= _REPORTED_BYTES_MAX:
            _REPORTED_BYTES.clear()
        _REPORTED_BYTES[key] = (defaults, data)
        return data

    def _parameters_in_sync(self, conn: ServerConnection) -> bool:
        """Does the server connection already have this client's session parameters?
        (Asked before every transaction, so sync and cheap: the usual answer is yes.)"""
        extra_in_sync = self.extra_parameters == conn.extra_parameters
        if self.parameters == conn.tracked_parameters:  # the usual case: one comparison
            return extra_in_sync
        server_values = conn.parameters  # as the server spells the names (TimeZone)
        for name, value in self.parameters.items():
            # Look the name up as PostgreSQL spells it, and only if that misses,
            # case-insensitively.
            current = server_values.get(_SERVER_SPELLING.get(name, name))
            if current != value and (current is not None or _lookup(server_values, name) != value):
                return False
        return extra_in_sync

    async def _sync_parameters(self, conn: ServerConnection) -> None:
        """Make the server connection's session parameters this client's (one round trip
        only when something differs)."""
        if self._parameters_in_sync(conn):
            return
        # set_config takes the value as the server printed it (a list such as
        # search_path '"$user", public' included), which SET name TO 'literal' does not.
        changes: list[str] = []
        server_values = conn.tracked_parameters
        for name, value in self.parameters.items():
            if server_values.get(name) != value:
                changes.append(f"({_quote_literal(name)}, {_quote_literal(value)})")
        applied: dict[str, str] = conn.extra_parameters
        for name, value in self.extra_parameters.items():
            if applied.get(name) != value:
                changes.append(f"({_quote_literal(name)}, {_quote_literal(value)})")
        resets = [name for name in applied if name not in self.extra_parameters]
        if not changes and not resets:
            return
        statements = [f"RESET {_quote_ident(name)}" for name in resets]
        if changes:
            statements.append(  # every name and value went through _quote_literal
                "SELECT pg_catalog.set_config(n, v, false) FROM (VALUES "  # noqa: S608
                + ", ".join(changes)
                + ") AS t(n, v)"
            )
        await conn.run("; ".join(statements), timeout=self.config.backend.connect_timeout)
        conn.extra_parameters = dict(self.extra_parameters)

    async def _read_back_parameters(self, conn: ServerConnection) -> None:
        """After a transaction that SET untracked parameters: learn their values from the
        server, to replay them on the next connection (instead of pinning)."""
        session = self.session
        if session.reset_all:
            # RESET ALL / DISCARD ALL go back to the session defaults, which include the
            # startup options: those are put back on the next connection that serves.
            self.extra_parameters = dict(self.startup_extra_parameters)
            conn.extra_parameters.clear()
            session.reset_all = False
        names = sorted(session.touched)
        session.touched.clear()
        if not names:
            return
        rows = ", ".join(
            f"({i}, pg_catalog.current_setting({_quote_literal(name)}, true))"
            for i, name in enumerate(names)
        )
        query = f"SELECT v FROM (VALUES {rows}) AS t(i, v) ORDER BY i"  # noqa: S608 - quoted
        values = await conn.run(query, timeout=self.config.backend.connect_timeout)
        for name, value in zip(names, values, strict=True):
            if value is None:
                self.extra_parameters.pop(name, None)
                conn.extra_parameters.pop(name, None)
            else:
                self.extra_parameters[name] = value
                conn.extra_parameters[name] = value

    # --- serving ----------------------------------------------------------------------
