"""Express transactions: the requests whose whole effect on the session is known up front.

[core] Most transactions a pooler sees are one autocommit ``SELECT`` sent as a simple
Query, answered by rows and a ReadyForQuery('I'). For those, everything the general relay
accounts for is known before a byte is sent: the tracker would count one answer owed and
end at IDLE, the pinning scanner would find nothing (no trigger word), the link table
would say RELEASE. The data plane then serves them *express*: forward the request, check
the answer is exactly that, forward it and release, without building a ``Relay``.

The two predicates here are the whole contract. Anything they do not vouch for (another
statement, a second message, a half answer, a ParameterStatus, COPY, a status other than
'I') takes the general path; the data plane turns an express link into an ordinary
``Relay`` at that moment, with the same accounting replayed (``ClientSession.relay_for``),
so nothing is lost or counted twice. ``tests/unit/test_express.py`` checks both
predicates against the general path's own scanner, tracker and pinning scanner.
"""

from __future__ import annotations

import struct
from typing import Final

from trioproxy._protocol.codes import Backend, Frontend
from trioproxy._session.state import has_trigger_word

_INT32: Final = struct.Struct("!i")
_INT16: Final = struct.Struct("!h")
#: What an autocommit SELECT's answer may hold before its ReadyForQuery: rows, the
#: command tag (or an empty query), notices, an error, and for the extended batch the
#: completions of Parse and Bind, and NoData. Nothing the relay acts on.
_ANSWER_TYPES: Final = frozenset(
    {
        Backend.PARSE_COMPLETE,
        Backend.BIND_COMPLETE,
        Backend.NO_DATA,
        Backend.ROW_DESCRIPTION,
        Backend.DATA_ROW,
        Backend.COMMAND_COMPLETE,
        Backend.EMPTY_QUERY_RESPONSE,
        Backend.NOTICE_RESPONSE,
        Backend.ERROR_RESPONSE,
    }
)
_IDLE: Final = ord("I")


def express_query(chunk: bytes, max_message_size: int) -> bool:
    """Is ``chunk`` exactly one request holding one ``SELECT`` that cannot change session
    state (no pinning trigger word, no second statement)? Either a simple Query, or the
    unnamed extended batch a driver sends for a query with parameters: Parse (unnamed
    statement), Bind (unnamed portal and statement), Describe (optional), Execute (all
    rows), Sync."""
    size = len(chunk)
    if size < 6 or size - 5 > max_message_size:
        return False
    if chunk[0] == Frontend.QUERY:
        if chunk[-1] != 0 or _INT32.unpack_from(chunk, 1)[0] != size - 1:
            return False
        sql = chunk[5:-1]
        return b"\0" not in sql and harmless_select(sql)
    if chunk[0] == Frontend.PARSE:
        return _express_batch(chunk, max_message_size)
    return False


#: The extended batch's messages after Parse, in order (Describe may be left out).
_BATCH_REST: Final = (
    (Frontend.BIND, Frontend.DESCRIBE, Frontend.EXECUTE, Frontend.SYNC),
    (Frontend.BIND, Frontend.EXECUTE, Frontend.SYNC),
)


def _split(chunk: bytes, max_message_size: int) -> list[tuple[int, bytes]] | None:
    """The (type, body) of each of at most five whole messages that ``chunk`` is exactly."""
    size = len(chunk)
    limit = max_message_size + 4
    pos = 0
    bodies: list[tuple[int, bytes]] = []
    while pos < size:
        if size - pos < 5:
            return None
        (length,) = _INT32.unpack_from(chunk, pos + 1)
        end = pos + 1 + length
        if length < 4 or length > limit or end > size or len(bodies) == 5:
            return None
        bodies.append((chunk[pos], chunk[pos + 5 : end]))
        pos = end
    return bodies


def _plain_from_bind(bodies: list[tuple[int, bytes]]) -> bool:
    """Are ``bodies`` Bind (unnamed portal), Describe (optional), Execute (all rows),
    Sync? (Bind's statement is the caller's to check.)"""
    if tuple(type_ for type_, _body in bodies) not in _BATCH_REST:
        return False
    for type_, body in bodies:
        if type_ == Frontend.BIND and body[:1] != b"\0":
            return False  # a named portal
        if type_ == Frontend.DESCRIBE and body not in (b"P\0", b"S\0"):
            return False
        if type_ == Frontend.EXECUTE and body != b"\0\0\0\0\0":
            return False  # a named portal, or a row limit (PortalSuspended)
        if type_ == Frontend.SYNC and body:
            return False
    return True


def _express_batch(chunk: bytes, max_message_size: int) -> bool:
    bodies = _split(chunk, max_message_size)
    if bodies is None or len(bodies) < 2 or not _plain_from_bind(bodies[1:]):
        return False
    parse = bodies[0][1]
    # Unnamed statement, well formed: name, SQL, parameter type count and types.
    sql_end = parse.find(b"\0", 1)
    if not parse or parse[0] != 0 or sql_end < 0 or len(parse) < sql_end + 3:
        return False
    (count,) = _INT16.unpack_from(parse, sql_end + 1)
    if count < 0 or len(parse) != sql_end + 3 + 4 * count:
        return False
    if bodies[1][1][:2] != b"\0\0":
        return False  # Bind of a named statement
    return harmless_select(parse[1:sql_end])


def express_bind(chunk: bytes, max_message_size: int) -> tuple[str, int, int] | None:
    """Is ``chunk`` exactly the batch a driver sends to run a statement it prepared under
    a name: Bind (unnamed portal, named statement), Describe of the portal (optional),
    Execute (all rows), Sync? If so, the statement's name, and where in ``chunk`` Bind's
    parameters (what follows the two names) start and end. Whether the statement itself
    may go express is the caller's to know (``StatementDef.express``)."""
    if not chunk or chunk[0] != Frontend.BIND:
        return None
    bodies = _split(chunk, max_message_size)
    if bodies is None or not _plain_from_bind(bodies):
        return None
    bind = bodies[0][1]
    if bodies[1] == (Frontend.DESCRIBE, b"S\0"):
        return None  # the statement's Describe would need its server name too
    name_end = bind.find(b"\0", 1)
    if name_end <= 1:
        return None  # unterminated, or the unnamed statement
    try:
        name = bind[1:name_end].decode()
    except UnicodeDecodeError:
        return None
    return name, 5 + name_end + 1, 5 + len(bind)


def harmless_select(sql: bytes) -> bool:
    """One ASCII statement starting with SELECT, without a pinning trigger word."""
    if not sql.isascii():
        return False  # decoded the general way
    lowered = sql.decode("ascii").lower()
    if not lowered.lstrip().startswith("select"):
        return False
    if ";" in lowered.rstrip(" \t\r\n;"):
        return False  # a second statement (or a quoted ';': not worth telling apart)
    return not has_trigger_word(lowered)  # the pinning scanner's own pre-filter


def express_answer(chunk: bytes, max_message_size: int) -> int | None:
    """If ``chunk`` is exactly a whole answer to one express request (rows, command tag,
    notices, errors, then ReadyForQuery('I') as its last bytes), the number of
    ErrorResponses in it; otherwise None."""
    size = len(chunk)
    pos = 0
    errors = 0
    limit = max_message_size + 4
    unpack = _INT32.unpack_from
    while size - pos >= 5:
        type_ = chunk[pos]
        (length,) = unpack(chunk, pos + 1)
        end = pos + 1 + length
        if length < 4 or length > limit or end > size:
            return None
        if type_ == Backend.READY_FOR_QUERY:
            if end == size and length == 5 and chunk[pos + 5] == _IDLE:
                return errors
            return None
        if type_ not in _ANSWER_TYPES:
            return None
        if type_ == Backend.ERROR_RESPONSE:
            errors += 1
        pos = end
    return None
