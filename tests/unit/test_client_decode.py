"""The client session's shortcut decoder agrees with the generic one, byte for byte.

``_decode_inspected`` (trioproxy/_server/client.py) decodes Query and simple Parse bodies
without the generic cursor, on every transaction; anything it does not recognise goes to
``decode_frontend``. Whatever the body, both must give the same message or the same error.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import Frontend
from trioproxy._protocol.framing import Message
from trioproxy._protocol.messages import Parse, Query, decode_frontend
from trioproxy._server.client import _decode_inspected
from trioproxy.errors import ProtocolError

#: Bytes that matter to the decoders: terminators, ASCII, invalid and valid UTF-8.
_PIECES = st.sampled_from([b"\0", b"a", b"S", b"\x01", b"\xff", b"\xc3\xa9", b"\0\0", b"\0\x01"])
_BODIES = st.lists(_PIECES, max_size=10).map(b"".join)


def _outcome(decode: object, *args: object) -> object:
    try:
        return decode(*args)  # type: ignore[operator]
    except ProtocolError as exc:
        return (type(exc), exc.message, exc.sqlstate)


@given(
    type_=st.sampled_from([Frontend.QUERY, Frontend.PARSE, Frontend.CLOSE]),
    body=_BODIES,
)
def test_shortcut_agrees_with_decode_frontend(type_: int, body: bytes) -> None:
    assert _outcome(_decode_inspected, type_, body) == _outcome(
        decode_frontend, Message(type_, body)
    )


@pytest.mark.parametrize(
    ("type_", "body", "expected"),
    [
        (Frontend.QUERY, b"select 1\0", Query("select 1")),
        (Frontend.PARSE, b"\0select $1\0\0\0", Parse("", "select $1")),
        (Frontend.PARSE, b"s1\0select 1\0\0\0", Parse("s1", "select 1")),
        (Frontend.PARSE, b"\0select $1\0\0\x01\0\0\0\x17", Parse("", "select $1", (23,))),
    ],
)
def test_common_messages(type_: int, body: bytes, expected: object) -> None:
    assert _decode_inspected(type_, body) == expected
