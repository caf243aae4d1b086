"""Protocol-level prepared statements in transaction mode, without pinning.

[core] Drivers (asyncpg, psycopg ``prepare=True``, JDBC, node-postgres named queries,
``pgbench -M prepared``) Parse a statement once under a name and Bind it many times. In
transaction pooling the next Bind may run on another server connection that never saw
the Parse. This module makes that work:

* each client's names map to a *server name* derived from the statement's text and
  parameter types (``_tp<hash>``), shared by every client with the same statement;
* each server connection remembers which server names it has (an LRU bounded by
  ``max_prepared_statements``);
* a client Parse is forwarded under the server name, or, when the connection already has
  that statement, replaced by a harmless ``Close`` of a portal that does not exist, whose
  CloseComplete is turned back into the ParseComplete the client waits for;
* a Bind/Describe of a statement the connection lacks gets a Parse injected before it,
  whose ParseComplete the client never sees;
* a client Close of a statement becomes the same no-op Close (other clients may share the
  server statement).

Every client message that the server answers is put in a FIFO of ``Expect`` entries, so
each server answer is matched to its request in order: forwarded, swallowed (injected
Parse, eviction Close) or translated. An ErrorResponse makes the server skip to Sync: the
entries up to the Sync are dropped, and names whose Parse never completed are forgotten.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Final

import attrs

from trioproxy._protocol.codes import Backend, Frontend
from trioproxy._protocol.messages import Close, Parse, frame
from trioproxy._session.express import harmless_select
from trioproxy._session.sqlscan import StateKind, classify, split_statements
from trioproxy.errors import RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

_I16 = struct.Struct("!h")
_NOOP_PORTAL: Final = "_trioproxy_noop"
#: A Close of a portal nobody has: always answered by CloseComplete, never an error.
NOOP_CLOSE: Final = Close(b"P", _NOOP_PORTAL).encode()
_PARSE_COMPLETE: Final = frame(Backend.PARSE_COMPLETE, b"")
#: A Query the server answers with EmptyQueryResponse and ReadyForQuery, in any
#: transaction state, touching nothing.
_EMPTY_QUERY: Final = frame(Frontend.QUERY, b"\0")
_DEALLOCATE_COMPLETE: Final = frame(Backend.COMMAND_COMPLETE, b"DEALLOCATE\0")


def deallocated_name(sql_body: bytes) -> str | None:
    """The statement name, if a Query's body (SQL and its NUL) is exactly one
    ``DEALLOCATE [PREPARE] name`` (the name folded as the server folds it)."""
    head = sql_body[:40].lstrip().lower()
    if not head.startswith(b"deallocate"):
        return None  # the usual case, without decoding
    try:
        sql = sql_body[:-1].decode()
    except UnicodeDecodeError:
        return None
    statements = split_statements(sql)
    if len(statements) != 1 or statements[0].incomplete:
        return None
    effect = classify(statements[0])
    if effect.unpin is not StateKind.PREPARED_STATEMENT:
        return None
    return effect.name


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.find(b"\0", pos)
    if end < 0:
        raise RemoteProtocolError("malformed message: unterminated string")
    try:
        return body[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise RemoteProtocolError("malformed message: string is not valid UTF-8") from None


@attrs.frozen
class StatementDef:
    """What a Parse defined: the text and parameter types, and the shared server name."""

    sql: str
    param_types: tuple[int, ...]
    server_name: str
    #: May a Bind of it be served express (trioproxy/_session/express.py)? Decided once,
    #: at Parse: a single SELECT without a pinning trigger word.
    express: bool = attrs.field(default=False, eq=False)

    @classmethod
    def from_parse(cls, sql: str, param_types: tuple[int, ...]) -> StatementDef:
        digest = hashlib.sha1(
            sql.encode() + b"\0" + b",".join(str(t).encode() for t in param_types),
            usedforsecurity=False,
        ).hexdigest()[:24]
        # (Non-ASCII text is never express: harmless_select checks.)
        return cls(sql, param_types, f"_tp{digest}", express=harmless_select(sql.encode()))

    def parse_message(self) -> bytes:
        return Parse(self.server_name, self.sql, self.param_types).encode()

    def bind_message(self, portal: bytes, parameters: bytes) -> bytes:
        """A client's Bind of this statement, as the server gets it: the server name
        instead of the client's, and ``parameters`` (all that followed the two names)."""
        return frame(Frontend.BIND, portal + b"\0" + self.server_name.encode() + b"\0" + parameters)


class ServerStatements:
    """The statements one server connection holds, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._names: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __len__(self) -> int:
        return len(self._names)

    def touch(self, name: str) -> None:
        self._names.move_to_end(name)

    def add(self, name: str) -> None:
        self._names[name] = None
        self._names.move_to_end(name)

    def discard(self, name: str) -> None:
        self._names.pop(name, None)

    def clear(self) -> None:
        self._names.clear()

    def victims(self, keep: Iterable[str]) -> list[str]:
        """Names to close so that one more fits, never one of ``keep``."""
        keep = set(keep)
        out: list[str] = []
        excess = len(self._names) + 1 - self.capacity
        for name in self._names:
            if excess <= 0:
                break
            if name not in keep:
                out.append(name)
                excess -= 1
        return out


class Act(enum.Enum):
    FORWARD = "forward"
    SWALLOW = "swallow"  # an answer to something the proxy injected
    AS_PARSE_COMPLETE = "as ParseComplete"  # the no-op Close that stands for a Parse
    AS_DEALLOCATE = "as DEALLOCATE"  # the empty Query that stands for DEALLOCATE name


#: Server message types that end the answer to each kind of request.
_ENDS: Final[dict[int, frozenset[int]]] = {
    Frontend.PARSE: frozenset({Backend.PARSE_COMPLETE}),
    Frontend.BIND: frozenset({Backend.BIND_COMPLETE}),
    Frontend.CLOSE: frozenset({Backend.CLOSE_COMPLETE}),
    Frontend.DESCRIBE: frozenset({Backend.ROW_DESCRIPTION, Backend.NO_DATA}),
    Frontend.EXECUTE: frozenset(
        {Backend.COMMAND_COMPLETE, Backend.EMPTY_QUERY_RESPONSE, Backend.PORTAL_SUSPENDED}
    ),
    Frontend.SYNC: frozenset({Backend.READY_FOR_QUERY}),
    Frontend.QUERY: frozenset({Backend.READY_FOR_QUERY}),
    Frontend.FUNCTION_CALL: frozenset({Backend.READY_FOR_QUERY}),
}
#: Messages the server may send at any time; never an answer to a request.
_ASYNC: Final = frozenset(
    {Backend.NOTICE_RESPONSE, Backend.PARAMETER_STATUS, Backend.NOTIFICATION_RESPONSE}
)
#: After an error the server skips to Sync, except inside these (which end with 'Z').
_OWN_ERRORS: Final = frozenset({Frontend.QUERY, Frontend.FUNCTION_CALL, Frontend.SYNC})


@attrs.define
class Expect:
    request: int
    act: Act = Act.FORWARD
    #: The server name this Parse creates (marked as held when it completes).
    creates: str | None = None


@attrs.define
class StatementMapper:
    """One client's prepared statements, mapped onto whichever connection serves it."""

    #: client statement name -> definition
    statements: dict[str, StatementDef] = attrs.field(factory=dict)

    def link(self, server: ServerStatements) -> LinkedMapper:
        return LinkedMapper(self, server)


class LinkedMapper:
    """The rewriting for one linked period (one client, one server connection)."""

    def __init__(self, mapper: StatementMapper, server: ServerStatements) -> None:
        self.mapper = mapper
        self.server = server
        self.expect: deque[Expect] = deque()
        #: Server names whose Parse was sent but not yet completed.
        self._pending: set[str] = set()

    @property
    def idle(self) -> bool:
        return not self.expect

    # --- client -> server --------------------------------------------------------------

    def _has(self, name: str) -> bool:
        if name in self.server:
            self.server.touch(name)
            return True
        return name in self._pending

    def _prepare(self, definition: StatementDef, out: list[bytes], act: Act) -> None:
        """Parse ``definition`` on the server, closing least recently used statements
        first when the connection's cache is full."""
        for victim in self.server.victims(keep=self._pending):
            out.append(Close(b"S", victim).encode())
            self.expect.append(Expect(Frontend.CLOSE, Act.SWALLOW))
            self.server.discard(victim)
        out.append(definition.parse_message())
        self.expect.append(Expect(Frontend.PARSE, act, creates=definition.server_name))
        self._pending.add(definition.server_name)

    def _ensure(self, definition: StatementDef, out: list[bytes]) -> None:
        """Make sure the server has ``definition`` before the message that needs it."""
        if not self._has(definition.server_name):
            self._prepare(definition, out, Act.SWALLOW)

    def client_message(self, type_: int, body: bytes, raw: bytes) -> bytes:
        """Translate one complete client message; returns the bytes for the server."""
        out: list[bytes] = []
        if type_ == Frontend.PARSE:
            name, pos = _cstring(body, 0)
            if name:
                sql, pos = _cstring(body, pos)
                try:
                    (count,) = _I16.unpack_from(body, pos)
                    if count < 0:
                        raise RemoteProtocolError("malformed Parse: negative parameter count")
                    types = struct.unpack_from(f"!{count}I", body, pos + 2) if count else ()
                except struct.error:
                    raise RemoteProtocolError("malformed Parse: too short") from None
                definition = StatementDef.from_parse(sql, tuple(types))
                self.mapper.statements[name] = definition
                if self._has(definition.server_name):
                    self.expect.append(Expect(Frontend.CLOSE, Act.AS_PARSE_COMPLETE))
                    return NOOP_CLOSE
                self._prepare(definition, out, Act.FORWARD)
                return b"".join(out)
        elif type_ in (Frontend.BIND, Frontend.DESCRIBE, Frontend.CLOSE):
            rewritten = self._rewrite_named(type_, body, out)
            if rewritten is not None:
                return b"".join(out) + rewritten
        elif type_ == Frontend.QUERY:
            deallocated = deallocated_name(body)
            if deallocated is not None and deallocated in self.mapper.statements:
                # SQL DEALLOCATE of a protocol-level name (psycopg with libpq < 17 evicts
                # statements this way): the server knows only the shared server name, so
                # the client forgets its name, as for a Close, and the server answers an
                # empty Query in the transaction state it is in.
                del self.mapper.statements[deallocated]
                self.expect.append(Expect(Frontend.QUERY, Act.AS_DEALLOCATE))
                return _EMPTY_QUERY
        if type_ in _ENDS:
            self.expect.append(Expect(type_))
        return b"".join(out) + raw

    def _rewrite_named(self, type_: int, body: bytes, out: list[bytes]) -> bytes | None:
        if type_ == Frontend.BIND:
            portal, pos = _cstring(body, 0)
            statement, rest = _cstring(body, pos)
            definition = self.mapper.statements.get(statement) if statement else None
            if definition is None:
                return None
            self._ensure(definition, out)
            self.expect.append(Expect(Frontend.BIND))
            return definition.bind_message(portal.encode(), body[rest:])
        kind = body[:1]
        name, _ = _cstring(body, 1)
        if kind != b"S" or not name:
            return None
        definition = self.mapper.statements.get(name)
        if type_ == Frontend.CLOSE:
            # The client forgets its name; the server statement stays for others.
            self.mapper.statements.pop(name, None)
            self.expect.append(Expect(Frontend.CLOSE))
            return NOOP_CLOSE
        if definition is None:
            return None
        self._ensure(definition, out)
        self.expect.append(Expect(Frontend.DESCRIBE))
        return frame(Frontend.DESCRIBE, b"S" + definition.server_name.encode() + b"\0")

    # --- server -> client --------------------------------------------------------------

    def server_message(self, type_: int, raw: bytes) -> bytes:
        """Translate one complete server message; returns the bytes for the client."""
        if type_ in _ASYNC or not self.expect:
            return raw
        head = self.expect[0]
        if type_ == Backend.ERROR_RESPONSE and head.request not in _OWN_ERRORS:
            # The server now skips everything up to the next Sync.
            while self.expect and self.expect[0].request != Frontend.SYNC:
                dropped = self.expect.popleft()
                if dropped.creates is not None:
                    self._pending.discard(dropped.creates)
            return raw
        if type_ in _ENDS.get(head.request, frozenset()):
            self.expect.popleft()
            if head.creates is not None:
                self._pending.discard(head.creates)
                self.server.add(head.creates)
        if head.act is Act.SWALLOW:
            return b""
        if head.act is Act.AS_PARSE_COMPLETE:
            return _PARSE_COMPLETE if type_ == Backend.CLOSE_COMPLETE else raw
        if head.act is Act.AS_DEALLOCATE:
            return _DEALLOCATE_COMPLETE if type_ == Backend.EMPTY_QUERY_RESPONSE else raw
        return raw

    def forget_all(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL ran: the server holds no statements any more."""
        self.server.clear()
        self._pending.clear()
