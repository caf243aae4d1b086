"""Incremental framing of the PostgreSQL byte stream, in both directions.

[core] No I/O. Bytes go in with ``feed()``; whole messages (or, for the relay, message
boundaries) come out. Bytes may arrive split at any position. Every length is checked
before anything is buffered, so a peer cannot make us allocate more than
``max_message_size`` for one message.

Three readers, one job each:

* ``StartupReader``: the untyped first packets (SSLRequest, StartupMessage, ...).
* ``MessageReader``: typed messages, whole bodies; used where the proxy reads everything
  (authentication, backend login, reset).
* ``StreamScanner``: the relay's view. It tracks message boundaries across chunks without
  copying bodies, and keeps the full body only of message types it was asked to inspect.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from trioproxy._protocol.codes import MAX_STARTUP_PACKET_LENGTH
from trioproxy.errors import RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Collection

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")

DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024

#: (type, body or None, end offset in the fed chunk)
ScannedMessage = tuple[int, bytes | None, int]


@attrs.frozen(slots=True)
class Message:
    """One typed message: its type byte (as int) and its body (without the header)."""

    type: int
    body: bytes

    def encode(self) -> bytes:
        return bytes((self.type,)) + _INT32.pack(len(self.body) + 4) + self.body


def _check_length(length: int, type_: int, limit: int) -> None:
    if length < 4:
        raise RemoteProtocolError(
            f"invalid message length {length} for message type {chr(type_)!r}"
        )
    if length - 4 > limit:
        raise RemoteProtocolError(
            f"message of type {chr(type_)!r} is {length - 4} bytes, over the limit of {limit}",
            sqlstate="54000",
        )


class MessageReader:
    """Frames typed messages (``type:1 length:4 body``), returning whole bodies."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buffer = bytearray()
        self._max = max_message_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_buffered(self) -> bytes:
        """Remove and return unparsed bytes (when the stream's ownership moves on)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def next_message(self) -> Message | None:
        """Return the next complete message, or None if more bytes are needed."""
        buf = self._buffer
        if len(buf) < 5:
            return None
        type_ = buf[0]
        (length,) = _INT32.unpack_from(buf, 1)
        _check_length(length, type_, self._max)
        end = 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[5:end])
        del buf[:end]
        return Message(type_, body)

    def messages(self) -> list[Message]:
        out: list[Message] = []
        while (message := self.next_message()) is not None:
            out.append(message)
        return out


class StartupReader:
    """Frames the untyped startup-phase packets (``length:4 payload``)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_packet(self) -> bytes | None:
        """Return the next packet's payload (after the length word), or None."""
        buf = self._buffer
        if len(buf) < 4:
            return None
        (length,) = _INT32.unpack_from(buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET_LENGTH:
            raise RemoteProtocolError(f"invalid length of startup packet: {length}")
        if len(buf) < length:
            return None
        payload = bytes(buf[4:length])
        del buf[:length]
        return payload


class StreamScanner:
    """Finds message boundaries in a forwarded byte stream without copying bodies.

    ``feed(chunk)`` returns the messages that *completed* inside the chunk, as
    ``(type, body, end)``: ``body`` is the full body for the inspected types and ``None``
    for the rest; ``end`` is the offset in the chunk just after the message. The caller
    forwards the chunk itself unchanged.
    """

    __slots__ = ("_header", "_inspect", "_max", "_partial", "_remaining", "_type")

    def __init__(
        self,
        *,
        inspect: Collection[int] = (),
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._inspect = frozenset(inspect)
        self._max = max_message_size
        self._header = bytearray()  # bytes of an incomplete 5-byte header
        self._type = 0
        self._remaining = 0  # body bytes still to come of the current message
        self._partial: bytearray | None = None  # body so far, for inspected types only

    @property
    def at_boundary(self) -> bool:
        """True when no message is partially received."""
        return self._remaining == 0 and not self._header and self._partial is None

    def feed(self, data: bytes | bytearray | memoryview) -> list[ScannedMessage]:
        out: list[ScannedMessage] = []
        pos = 0
        size = len(data)
        if not self._remaining and not self._header:
            # From a boundary, whole messages (nearly every chunk a relay sees): the
            # general loop's fast branch, with its lookups hoisted out of the loop.
            inspect, limit, unpack = self._inspect, self._max + 4, _INT32.unpack_from
            while size - pos >= 5:
                type_ = data[pos]
                (length,) = unpack(data, pos + 1)
                end = pos + 1 + length
                if length < 4 or length > limit or end > size:
                    break  # the general loop says why, or waits for the rest
                out.append((type_, bytes(data[pos + 5 : end]) if type_ in inspect else None, end))
                pos = end
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                if self._partial is not None:
                    self._partial += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish(out, pos)
                continue
            if self._header or size - pos < 5:
                need = 5 - len(self._header)
                self._header += data[pos : pos + need]
                pos += min(need, size - pos)
                if len(self._header) < 5:
                    break
                type_, length = self._header[0], _INT32.unpack_from(self._header, 1)[0]
                self._header.clear()
            else:
                type_ = data[pos]
                (length,) = _INT32.unpack_from(data, pos + 1)
                end = pos + 1 + length
                # Fast path: the whole message is inside this chunk, its length valid.
                if 4 <= length <= self._max + 4 and end <= size:
                    body = bytes(data[pos + 5 : end]) if type_ in self._inspect else None
                    out.append((type_, body, end))
                    pos = end
                    continue
                pos += 5
            _check_length(length, type_, self._max)
            self._type = type_
            self._remaining = length - 4
            self._partial = bytearray() if type_ in self._inspect else None
            if self._remaining == 0:
                self._finish(out, pos)
        return out

    def _finish(self, out: list[ScannedMessage], end: int) -> None:
        body = bytes(self._partial) if self._partial is not None else None
        self._partial = None
        out.append((self._type, body, end))
