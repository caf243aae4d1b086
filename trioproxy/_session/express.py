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
from trioproxy._session.state import TRIGGER_WORDS

_INT32: Final = struct.Struct("!i")
_TRIGGERS: Final = tuple(word.encode() for word in TRIGGER_WORDS)
#: What an autocommit SELECT's answer may hold before its ReadyForQuery: rows, the
#: command tag (or an empty query), notices, an error. Nothing the relay acts on.
_ANSWER_TYPES: Final = frozenset(
    {
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
    """Is ``chunk`` exactly one simple Query holding one ``SELECT`` that cannot change
    session state (no pinning trigger word, no second statement)?"""
    size = len(chunk)
    if size < 6 or chunk[0] != Frontend.QUERY or chunk[-1] != 0:
        return False
    if _INT32.unpack_from(chunk, 1)[0] != size - 1 or size - 5 > max_message_size:
        return False
    sql = chunk[5:-1]
    if b"\0" in sql or not sql.isascii():
        return False  # malformed, or not ASCII: the general path decides
    lowered = sql.lower()
    if not lowered.lstrip().startswith(b"select"):
        return False
    if b";" in lowered.rstrip(b" \t\r\n;"):
        return False  # a second statement (or a quoted ';': not worth telling apart)
    for word in _TRIGGERS:  # noqa: SIM110 - a loop, not any(): per transaction
        if word in lowered:
            return False
    return True


def express_answer(chunk: bytes, max_message_size: int) -> int | None:
    """If ``chunk`` is exactly a whole answer to one autocommit SELECT (rows, command
    tag, notices, errors, then ReadyForQuery('I') as its last bytes), the number of
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
