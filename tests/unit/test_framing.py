"""Framing of the byte stream: MessageReader, StreamScanner and StartupReader.

Bytes may arrive split anywhere; every reader must give the same answer whatever the split,
and anything a peer can send must end as messages or RemoteProtocolError, nothing else.
"""

from __future__ import annotations

import struct
from itertools import accumulate, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy._protocol.codes import MAX_STARTUP_PACKET_LENGTH
from trioproxy._protocol.framing import (
    Message,
    MessageReader,
    StartupReader,
    StreamScanner,
)
from trioproxy.errors import RemoteProtocolError, SQLState

_I32 = struct.Struct("!i")

messages_st = st.builds(
    Message,
    type=st.integers(0, 255),
    body=st.binary(max_size=200),
)
message_lists = st.lists(messages_st, max_size=20)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given positions (sorted, deduplicated, may include 0/len)."""
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` split at arbitrary cut points (empty chunks included sometimes)."""
    if not data:
        return [b""] if draw(st.booleans()) else []
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=min(len(data) + 1, 40)))
    return split_at(data, cuts)


def header(type_: int, length: int) -> bytes:
    return bytes((type_,)) + _I32.pack(length)


def feed(scanner: StreamScanner, data: bytes, *, byte_by_byte: bool) -> None:
    if byte_by_byte:
        for i in range(len(data)):
            scanner.feed(data[i : i + 1])
    else:
        scanner.feed(data)


# --- (1) MessageReader round trip -------------------------------------------------------


@given(messages=message_lists, data=st.data())
def test_message_reader_round_trip(messages: list[Message], data: st.DataObject) -> None:
    stream = b"".join(m.encode() for m in messages)
    chunks = data.draw(chunked(stream))
    reader = MessageReader()
    out: list[Message] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(reader.messages())
    assert out == messages
    assert reader.buffered == 0
    assert reader.next_message() is None


@given(messages=message_lists)
def test_message_reader_byte_by_byte(messages: list[Message]) -> None:
    stream = b"".join(m.encode() for m in messages)
    reader = MessageReader()
    out: list[Message] = []
    for i in range(len(stream)):
        reader.feed(memoryview(stream)[i : i + 1])
        out.extend(reader.messages())
    assert out == messages


def test_message_encode_layout() -> None:
    assert Message(ord("Q"), b"SELECT 1\0").encode() == b"Q\0\0\0\x0dSELECT 1\0"
    assert Message(ord("S"), b"").encode() == b"S\0\0\0\x04"


def test_take_buffered_returns_the_rest() -> None:
    reader = MessageReader()
    reader.feed(Message(ord("Z"), b"I").encode() + b"Q\0\0")
    assert reader.next_message() == Message(ord("Z"), b"I")
    assert reader.next_message() is None
    assert reader.take_buffered() == b"Q\0\0"
    assert reader.buffered == 0


# --- (2) StreamScanner on the same streams ----------------------------------------------


@given(messages=message_lists, data=st.data())
def test_stream_scanner_matches_stream(messages: list[Message], data: st.DataObject) -> None:
    stream = b"".join(m.encode() for m in messages)
    ends = list(accumulate(len(m.encode()) for m in messages))
    boundaries = {0, *ends}
    inspect = data.draw(st.frozensets(st.sampled_from([m.type for m in messages] or [0])))
    chunks = data.draw(chunked(stream))

    scanner = StreamScanner(inspect=inspect)
    assert scanner.at_boundary
    seen: list[tuple[int, bytes | None, int]] = []
    offset = 0
    for chunk in chunks:
        for type_, body, end in scanner.feed(chunk):
            assert 0 < end <= len(chunk)
            seen.append((type_, body, offset + end))
        offset += len(chunk)
        assert scanner.at_boundary == (offset in boundaries), (offset, ends)

    assert [t for t, _, _ in seen] == [m.type for m in messages]
    assert [end for _, _, end in seen] == ends
    for (type_, body, _), message in zip(seen, messages, strict=True):
        if type_ in inspect:
            assert body == message.body
        else:
            assert body is None


@given(messages=message_lists)
def test_stream_scanner_byte_by_byte_boundaries(messages: list[Message]) -> None:
    """Fed one byte at a time, at_boundary is true exactly at message ends."""
    stream = b"".join(m.encode() for m in messages)
    boundaries = {0, *accumulate(len(m.encode()) for m in messages)}
    scanner = StreamScanner(inspect={m.type for m in messages[::2]})
    types: list[int] = []
    for i in range(len(stream)):
        out = scanner.feed(stream[i : i + 1])
        assert all(end == 1 for _, _, end in out)
        types.extend(t for t, _, _ in out)
        assert scanner.at_boundary == (i + 1 in boundaries)
    assert types == [m.type for m in messages]


def test_stream_scanner_whole_stream_in_one_chunk() -> None:
    messages = [Message(ord("Q"), b"SELECT 1\0"), Message(ord("S"), b""), Message(ord("X"), b"")]
    stream = b"".join(m.encode() for m in messages)
    out = StreamScanner(inspect={ord("Q")}).feed(stream)
    assert out == [(ord("Q"), b"SELECT 1\0", 14), (ord("S"), None, 19), (ord("X"), None, 24)]


def test_stream_scanner_empty_feed() -> None:
    scanner = StreamScanner()
    assert scanner.feed(b"") == []
    assert scanner.at_boundary


# --- (3) garbage ------------------------------------------------------------------------


@given(garbage=st.binary(max_size=300), data=st.data(), limit=st.sampled_from([0, 16, 1 << 20]))
def test_garbage_gives_messages_or_protocol_error(
    garbage: bytes, data: st.DataObject, limit: int
) -> None:
    """Random bytes: messages or RemoteProtocolError, and both framers agree."""
    reader = MessageReader(max_message_size=limit)
    reader.feed(garbage)
    read: list[Message] = []
    reader_failed = False
    try:
        while (message := reader.next_message()) is not None:
            read.append(message)
    except RemoteProtocolError:
        reader_failed = True

    scanner = StreamScanner(inspect=range(256), max_message_size=limit)
    scanned: list[Message] = []
    scanner_failed = False
    try:
        for chunk in data.draw(chunked(garbage)):
            scanned.extend(Message(t, b or b"") for t, b, _ in scanner.feed(chunk))
    except RemoteProtocolError:
        scanner_failed = True

    assert scanner_failed == reader_failed
    if reader_failed:
        # The scanner loses the messages of the chunk it failed in; the rest agree.
        assert scanned == read[: len(scanned)]
    else:
        assert scanned == read


# --- (4) limits -------------------------------------------------------------------------


BAD_LENGTHS = [-1, -(2**31), 0, 1, 2, 3]


@pytest.mark.parametrize("length", BAD_LENGTHS)
def test_reader_rejects_bad_length(length: int) -> None:
    reader = MessageReader()
    reader.feed(header(ord("Q"), length))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


@pytest.mark.parametrize("length", BAD_LENGTHS)
@pytest.mark.parametrize("split", [False, True])
def test_scanner_rejects_bad_length(length: int, split: bool) -> None:
    scanner = StreamScanner()
    data = header(ord("Q"), length) + b"x" * 8
    with pytest.raises(RemoteProtocolError):
        feed(scanner, data, byte_by_byte=split)


def test_reader_rejects_oversized_after_header_only() -> None:
    reader = MessageReader(max_message_size=100)
    reader.feed(header(ord("D"), 4 + 101))  # only the 5 header bytes, no body yet
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_message()
    assert info.value.sqlstate == SQLState.PROGRAM_LIMIT_EXCEEDED


def test_reader_rejects_oversized_default_limit() -> None:
    reader = MessageReader()
    reader.feed(header(ord("D"), 2**31 - 1))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


@pytest.mark.parametrize("split", [False, True])
def test_scanner_rejects_oversized_after_header_only(split: bool) -> None:
    scanner = StreamScanner(inspect={ord("D")}, max_message_size=100)
    data = header(ord("D"), 4 + 101)
    with pytest.raises(RemoteProtocolError) as info:
        feed(scanner, data, byte_by_byte=split)
    assert info.value.sqlstate == SQLState.PROGRAM_LIMIT_EXCEEDED


def test_scanner_rejects_oversized_even_when_whole_in_chunk() -> None:
    scanner = StreamScanner(max_message_size=3)
    with pytest.raises(RemoteProtocolError):
        scanner.feed(Message(ord("d"), b"abcd").encode())


def test_limit_is_inclusive() -> None:
    message = Message(ord("d"), b"x" * 100)
    reader = MessageReader(max_message_size=100)
    reader.feed(message.encode())
    assert reader.messages() == [message]
    scanner = StreamScanner(inspect={ord("d")}, max_message_size=100)
    assert scanner.feed(message.encode()) == [(ord("d"), b"x" * 100, 105)]


# --- (5) StartupReader ------------------------------------------------------------------


def startup_packet(payload: bytes) -> bytes:
    return _I32.pack(len(payload) + 4) + payload


@pytest.mark.parametrize("length", [-1, 0, 4, 7, MAX_STARTUP_PACKET_LENGTH + 1, 2**31 - 1])
def test_startup_reader_refuses_length(length: int) -> None:
    reader = StartupReader()
    reader.feed(_I32.pack(length))  # the length word alone is enough to refuse
    with pytest.raises(RemoteProtocolError):
        reader.next_packet()


@pytest.mark.parametrize("size", [8, MAX_STARTUP_PACKET_LENGTH])
def test_startup_reader_accepts_limits(size: int) -> None:
    payload = bytes(range(256)) * 40
    payload = payload[: size - 4]
    reader = StartupReader()
    reader.feed(startup_packet(payload))
    assert reader.next_packet() == payload
    assert reader.buffered == 0


@given(
    payloads=st.lists(st.binary(min_size=4, max_size=300), min_size=1, max_size=5),
    data=st.data(),
)
def test_startup_reader_split_delivery(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(startup_packet(p) for p in payloads)
    reader = StartupReader()
    out: list[bytes] = []
    for chunk in data.draw(chunked(stream)):
        reader.feed(chunk)
        while (packet := reader.next_packet()) is not None:
            out.append(packet)
    assert out == payloads
    assert reader.buffered == 0


def test_startup_reader_waits_for_whole_packet() -> None:
    reader = StartupReader()
    packet = startup_packet(b"\x04\xd2\x16\x2f")
    reader.feed(packet[:3])
    assert reader.next_packet() is None
    reader.feed(packet[3:7])
    assert reader.next_packet() is None
    reader.feed(packet[7:])
    assert reader.next_packet() == b"\x04\xd2\x16\x2f"


@settings(max_examples=200)
@given(garbage=st.binary(max_size=64))
def test_startup_reader_garbage(garbage: bytes) -> None:
    reader = StartupReader()
    reader.feed(garbage)
    try:
        while (packet := reader.next_packet()) is not None:
            assert 4 <= len(packet) <= MAX_STARTUP_PACKET_LENGTH - 4
    except RemoteProtocolError:
        pass
