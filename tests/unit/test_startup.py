"""The startup phase: classifying the first packets and protocol-version negotiation."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    NEWEST_MINOR_VERSION,
    SSL_REQUEST_CODE,
)
from trioproxy._protocol.framing import StartupReader
from trioproxy._protocol.messages import NegotiateProtocolVersion, StartupMessage
from trioproxy._protocol.startup import (
    CancelRequestPacket,
    GSSENCRequestPacket,
    SSLRequestPacket,
    StartupPacket,
    StartupRequest,
    cancel_key_bytes,
    parse_startup_packet,
)
from trioproxy.errors import RemoteProtocolError, SQLState

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


def version(major: int, minor: int) -> int:
    return (major << 16) | minor


def params_bytes(*pairs: tuple[str, str]) -> bytes:
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs) + b"\0"


def startup(major: int, minor: int, *pairs: tuple[str, str]) -> bytes:
    """The payload (after the length word) of a StartupMessage."""
    return _U32.pack(version(major, minor)) + params_bytes(*pairs)


def parse_ok(payload: bytes) -> StartupPacket:
    result = parse_startup_packet(payload)
    assert isinstance(result, StartupPacket)
    return result


# --- requests ---------------------------------------------------------------------------


def test_ssl_request() -> None:
    assert parse_startup_packet(_I32.pack(SSL_REQUEST_CODE)) == SSLRequestPacket()


def test_gssenc_request() -> None:
    assert parse_startup_packet(_I32.pack(GSSENC_REQUEST_CODE)) == GSSENCRequestPacket()


@pytest.mark.parametrize("code", [SSL_REQUEST_CODE, GSSENC_REQUEST_CODE])
def test_ssl_and_gssenc_with_extra_bytes_refused(code: int) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_startup_packet(_I32.pack(code) + b"\0\0\0\0")


def test_cancel_request() -> None:
    payload = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(4242) + cancel_key_bytes(0xDEADBEEF)
    assert parse_startup_packet(payload) == CancelRequestPacket(4242, b"\xde\xad\xbe\xef")


def test_cancel_request_long_key() -> None:
    """Protocol 3.2 allows cancel keys of up to 256 bytes."""
    key = bytes(range(256))
    payload = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(7) + key
    assert parse_startup_packet(payload) == CancelRequestPacket(7, key)


@pytest.mark.parametrize("key_size", [0, 3, 257])
def test_cancel_request_bad_length_refused(key_size: int) -> None:
    payload = _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(7) + b"k" * key_size
    with pytest.raises(RemoteProtocolError):
        parse_startup_packet(payload)


def test_cancel_key_bytes() -> None:
    assert cancel_key_bytes(1) == b"\0\0\0\x01"
    assert cancel_key_bytes(2**32 - 1) == b"\xff\xff\xff\xff"


# --- StartupMessage 3.0 -----------------------------------------------------------------


def test_startup_3_0() -> None:
    packet = parse_ok(
        startup(3, 0, ("user", "alice"), ("database", "shop"), ("application_name", "psql"))
    )
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.parameters == {"user": "alice", "database": "shop", "application_name": "psql"}
    assert packet.user == "alice"
    assert packet.database == "shop"
    assert packet.negotiate is None


def test_database_defaults_to_user() -> None:
    assert parse_ok(startup(3, 0, ("user", "alice"))).database == "alice"
    assert parse_ok(startup(3, 0, ("user", "alice"), ("database", ""))).database == "alice"


def test_empty_value_and_non_ascii() -> None:
    packet = parse_ok(startup(3, 0, ("user", "j\u00f6rg"), ("options", "")))
    assert packet.parameters == {"user": "j\u00f6rg", "options": ""}


def test_through_startup_reader_after_ssl_request() -> None:
    stream = (
        _I32.pack(8)
        + _I32.pack(SSL_REQUEST_CODE)
        + StartupMessage({"user": "bob", "database": "db"}).encode()
    )
    reader = StartupReader()
    results: list[StartupRequest] = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (payload := reader.next_packet()) is not None:
            results.append(parse_startup_packet(payload))
    assert results[0] == SSLRequestPacket()
    assert isinstance(results[1], StartupPacket)
    assert results[1].parameters == {"user": "bob", "database": "db"}
    assert len(results) == 2


# --- negotiation ------------------------------------------------------------------------


@pytest.mark.parametrize("minor", [1, 2, 9999, 0xFFFF])
def test_newer_minor_negotiates(minor: int) -> None:
    packet = parse_ok(startup(3, minor, ("user", "alice")))
    assert (packet.major, packet.minor) == (3, NEWEST_MINOR_VERSION)
    assert packet.negotiate == NegotiateProtocolVersion(NEWEST_MINOR_VERSION, ())
    assert packet.negotiate.newest_minor == 0
    assert packet.parameters == {"user": "alice"}


def test_pq_options_negotiate() -> None:
    packet = parse_ok(startup(3, 0, ("user", "alice"), ("_pq_.foo", "1"), ("_pq_.bar", "x")))
    assert packet.minor == 0
    assert packet.negotiate == NegotiateProtocolVersion(0, ("_pq_.foo", "_pq_.bar"))
    assert packet.parameters == {"user": "alice"}  # options are not parameters


def test_newer_minor_and_options_one_negotiation() -> None:
    packet = parse_ok(startup(3, 2, ("_pq_.foo", "on"), ("user", "alice")))
    assert packet.minor == 0
    assert packet.negotiate == NegotiateProtocolVersion(0, ("_pq_.foo",))
    assert packet.negotiate.encode() == (
        b"v" + _I32.pack(4 + 4 + 4 + 9) + _I32.pack(0) + _I32.pack(1) + b"_pq_.foo\0"
    )


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (4, 0), (1, 0), (0, 0), (0xFFFF, 0)])
def test_unsupported_protocol_refused(major: int, minor: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_startup_packet(startup(major, minor, ("user", "alice")))
    assert info.value.sqlstate == SQLState.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize(
    "pairs",
    [
        (),
        (("database", "shop"),),
        (("user", ""), ("database", "shop")),
        (("_pq_.foo", "1"),),
    ],
)
def test_missing_user_refused(pairs: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_startup_packet(startup(3, 0, *pairs))
    assert info.value.sqlstate == SQLState.INVALID_AUTHORIZATION


V30 = _I32.pack(version(3, 0))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\0\x03",
        V30,  # no terminator at all
        V30 + b"user\0alice\0",  # missing final terminator
        V30 + b"user\0alice",  # unterminated value
        V30 + b"user\0",  # missing value
        V30 + b"user\0\0",  # missing value, then a terminator where a value should be
        V30 + b"user\0alice\0\0\0",  # a byte after the terminator
        V30 + b"user\0alice\0\0x",  # trailing garbage
        V30 + b"\0alice\0\0",  # empty name inside the list
        V30 + b"user\0\xff\xfe\0\0",  # not UTF-8
    ],
)
def test_bad_layout_refused(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_startup_packet(payload)
    assert info.value.sqlstate == SQLState.PROTOCOL_VIOLATION


# --- properties -------------------------------------------------------------------------

names = st.text(
    st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20
).filter(lambda s: not s.startswith("_pq_."))
values = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)


@given(
    user=values.filter(bool),
    extra=st.dictionaries(names.filter(lambda s: s != "user"), values, max_size=5),
    options=st.lists(st.from_regex(r"_pq_\.[a-z_]{1,10}", fullmatch=True), max_size=3, unique=True),
    minor=st.integers(0, 0xFFFF),
)
def test_valid_startup_packets(
    user: str, extra: dict[str, str], options: list[str], minor: int
) -> None:
    pairs = [("user", user), *extra.items(), *((o, "1") for o in options)]
    packet = parse_ok(startup(3, minor, *pairs))
    assert packet.parameters == {"user": user, **extra}
    assert packet.user == user
    assert packet.database == (extra.get("database") or user)
    assert (packet.major, packet.minor) == (3, 0)
    if minor > NEWEST_MINOR_VERSION or options:
        assert packet.negotiate == NegotiateProtocolVersion(NEWEST_MINOR_VERSION, tuple(options))
    else:
        assert packet.negotiate is None


@given(payload=st.binary(max_size=80))
def test_random_payloads(payload: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_startup_packet(payload)


@given(
    code=st.sampled_from([version(3, 0), version(3, 2), version(2, 0), SSL_REQUEST_CODE]),
    tail=st.binary(max_size=60),
)
def test_random_tails(code: int, tail: bytes) -> None:
    """Random bytes behind a plausible code, so the parameter parser sees them."""
    try:
        result = parse_startup_packet(_I32.pack(code) + tail)
    except RemoteProtocolError:
        return
    if isinstance(result, StartupPacket):
        assert result.user
        assert tail.endswith(b"\0")
