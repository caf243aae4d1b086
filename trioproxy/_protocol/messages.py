"""Builders and parsers for the messages the proxy itself reads or writes.

[core] Messages the proxy only forwards (DataRow, RowDescription, CopyData, ...) are never
decoded. Each class here has ``encode() -> bytes``; ``decode_frontend`` / ``decode_backend``
turn a framed ``Message`` back into a class. Parsers raise ``RemoteProtocolError`` on any
malformed body, never another exception.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Self, TypeAlias

import attrs

from trioproxy._protocol.codes import (
    ERROR_FIELD_NAMES,
    AuthCode,
    Backend,
    Frontend,
    TxStatus,
)
from trioproxy.errors import RemoteProtocolError

if TYPE_CHECKING:
    from trioproxy._protocol.framing import Message

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")


def frame(type_: int, body: bytes) -> bytes:
    """Encode one typed message."""
    return bytes((type_,)) + _I32.pack(len(body) + 4) + body


def _as_dict(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(mapping)


def _cstr(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError("string contains a NUL byte")
    return data + b"\0"


class _Cursor:
    """Reads fields out of a message body; every overrun is a protocol error."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _fail(self, why: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"malformed {self.what} message: {why}")

    def int16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise self._fail("too short")
        (value,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return int(value)

    def int32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self._fail("too short")
        (value,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self._fail("too short")
        (value,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return int(value)

    def cstr(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self._fail("unterminated string")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise self._fail("string is not valid UTF-8") from None

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self._fail("too short")
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value

    def rest(self) -> bytes:
        value = self.data[self.pos :]
        self.pos = len(self.data)
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self._fail(f"{len(self.data) - self.pos} unexpected trailing bytes")


# --- backend messages (server -> client) ------------------------------------------------


@attrs.frozen
class AuthenticationOk:
    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.OK))


@attrs.frozen
class AuthenticationCleartextPassword:
    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.CLEARTEXT_PASSWORD))


@attrs.frozen
class AuthenticationMD5Password:
    salt: bytes

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.MD5_PASSWORD) + self.salt)


@attrs.frozen
class AuthenticationSASL:
    mechanisms: tuple[str, ...]

    def encode(self) -> bytes:
        body = b"".join(_cstr(m) for m in self.mechanisms) + b"\0"
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.SASL) + body)


@attrs.frozen
class AuthenticationSASLContinue:
    data: bytes

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.SASL_CONTINUE) + self.data)


@attrs.frozen
class AuthenticationSASLFinal:
    data: bytes

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(AuthCode.SASL_FINAL) + self.data)


@attrs.frozen
class AuthenticationOther:
    """An authentication request the proxy does not support as a client (GSS, SSPI...)."""

    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, _I32.pack(self.code) + self.data)


@attrs.frozen
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(Backend.PARAMETER_STATUS, _cstr(self.name) + _cstr(self.value))


@attrs.frozen
class BackendKeyData:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return frame(
            Backend.BACKEND_KEY_DATA, _I32.pack(self.process_id) + _U32.pack(self.secret_key)
        )


@attrs.frozen
class ReadyForQuery:
    status: TxStatus

    def encode(self) -> bytes:
        return frame(Backend.READY_FOR_QUERY, self.status.value)


@attrs.frozen
class CommandComplete:
    tag: str

    def encode(self) -> bytes:
        return frame(Backend.COMMAND_COMPLETE, _cstr(self.tag))


@attrs.frozen
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized_options: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = _I32.pack(self.newest_minor) + _I32.pack(len(self.unrecognized_options))
        body += b"".join(_cstr(o) for o in self.unrecognized_options)
        return frame(Backend.NEGOTIATE_PROTOCOL_VERSION, body)


def _encode_fields(fields: Mapping[str, str]) -> bytes:
    return b"".join(code.encode("latin-1") + _cstr(value) for code, value in fields.items()) + b"\0"


def _decode_fields(cur: _Cursor) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = cur.take(1)
        if code == b"\0":
            break
        fields[code.decode("latin-1")] = cur.cstr()
    cur.end()
    return fields


@attrs.frozen
class _FieldsMessage:
    """Shared shape of ErrorResponse and NoticeResponse: one-letter codes -> values."""

    fields: Mapping[str, str] = attrs.field(converter=_as_dict)

    TYPE: ClassVar[int] = Backend.ERROR_RESPONSE

    @classmethod
    def build(
        cls,
        sqlstate: str,
        message: str,
        *,
        severity: str = "ERROR",
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail:
            fields["D"] = detail
        if hint:
            fields["H"] = hint
        return cls(fields)

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))

    def named(self) -> dict[str, str]:
        """The fields under readable names (``code``, ``message``, ``detail`` ...)."""
        return {ERROR_FIELD_NAMES.get(k, k): v for k, v in self.fields.items()}

    def encode(self) -> bytes:
        return frame(self.TYPE, _encode_fields(self.fields))


@attrs.frozen
class ErrorResponse(_FieldsMessage):
    TYPE: ClassVar[int] = Backend.ERROR_RESPONSE


@attrs.frozen
class NoticeResponse(_FieldsMessage):
    TYPE: ClassVar[int] = Backend.NOTICE_RESPONSE


BackendMessage: TypeAlias = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | CommandComplete
    | NegotiateProtocolVersion
    | ErrorResponse
    | NoticeResponse
)


def _decode_auth(cur: _Cursor) -> BackendMessage:
    code = cur.int32()
    if code == AuthCode.OK:
        cur.end()
        return AuthenticationOk()
    if code == AuthCode.CLEARTEXT_PASSWORD:
        cur.end()
        return AuthenticationCleartextPassword()
    if code == AuthCode.MD5_PASSWORD:
        salt = cur.take(4)
        cur.end()
        return AuthenticationMD5Password(salt)
    if code == AuthCode.SASL:
        mechanisms: list[str] = []
        while (name := cur.cstr()) != "":
            mechanisms.append(name)
        cur.end()
        return AuthenticationSASL(tuple(mechanisms))
    if code == AuthCode.SASL_CONTINUE:
        return AuthenticationSASLContinue(cur.rest())
    if code == AuthCode.SASL_FINAL:
        return AuthenticationSASLFinal(cur.rest())
    return AuthenticationOther(code, cur.rest())


def decode_backend(message: Message) -> BackendMessage:
    """Decode a server message the proxy inspects; other types are a protocol error."""
    type_ = message.type
    cur = _Cursor(message.body, chr(type_))
    if type_ == Backend.AUTHENTICATION:
        return _decode_auth(cur)
    if type_ == Backend.PARAMETER_STATUS:
        name, value = cur.cstr(), cur.cstr()
        cur.end()
        return ParameterStatus(name, value)
    if type_ == Backend.BACKEND_KEY_DATA:
        pid, key = cur.int32(), cur.uint32()
        cur.end()
        return BackendKeyData(pid, key)
    if type_ == Backend.READY_FOR_QUERY:
        raw = cur.take(1)
        cur.end()
        try:
            return ReadyForQuery(TxStatus(raw))
        except ValueError:
            raise RemoteProtocolError(f"invalid transaction status {raw!r}") from None
    if type_ == Backend.COMMAND_COMPLETE:
        tag = cur.cstr()
        cur.end()
        return CommandComplete(tag)
    if type_ == Backend.NEGOTIATE_PROTOCOL_VERSION:
        minor, count = cur.int32(), cur.int32()
        if count < 0 or count > len(message.body):
            raise RemoteProtocolError("malformed NegotiateProtocolVersion message")
        options = tuple(cur.cstr() for _ in range(count))
        cur.end()
        return NegotiateProtocolVersion(minor, options)
    if type_ == Backend.ERROR_RESPONSE:
        return ErrorResponse(_decode_fields(cur))
    if type_ == Backend.NOTICE_RESPONSE:
        return NoticeResponse(_decode_fields(cur))
    raise RemoteProtocolError(f"unexpected server message type {chr(type_)!r}")


# --- frontend messages (client -> server) -----------------------------------------------


@attrs.frozen
class StartupMessage:
    parameters: Mapping[str, str] = attrs.field(converter=_as_dict)
    protocol: int = (3 << 16) | 0

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol)
        body += b"".join(_cstr(k) + _cstr(v) for k, v in self.parameters.items()) + b"\0"
        return _I32.pack(len(body) + 4) + body


@attrs.frozen
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(80877103)


@attrs.frozen
class CancelRequest:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return (
            _I32.pack(16)
            + _I32.pack(80877102)
            + _I32.pack(self.process_id)
            + _U32.pack(self.secret_key)
        )


@attrs.frozen
class PasswordMessage:
    """PasswordMessage; also carries MD5 responses. ``password`` excludes the NUL."""

    password: bytes

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, self.password + b"\0")

    @classmethod
    def parse(cls, body: bytes) -> PasswordMessage:
        if not body.endswith(b"\0") or b"\0" in body[:-1]:
            raise RemoteProtocolError("malformed password message")
        return cls(body[:-1])


@attrs.frozen
class SASLInitialResponse:
    mechanism: str
    data: bytes

    def encode(self) -> bytes:
        return frame(
            Frontend.PASSWORD, _cstr(self.mechanism) + _I32.pack(len(self.data)) + self.data
        )

    @classmethod
    def parse(cls, body: bytes) -> SASLInitialResponse:
        cur = _Cursor(body, "SASLInitialResponse")
        mechanism = cur.cstr()
        length = cur.int32()
        data = b"" if length == -1 else cur.take(length)
        cur.end()
        return cls(mechanism, data)


@attrs.frozen
class SASLResponse:
    data: bytes

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, self.data)

    @classmethod
    def parse(cls, body: bytes) -> SASLResponse:
        return cls(body)


@attrs.frozen
class Query:
    sql: str

    def encode(self) -> bytes:
        return frame(Frontend.QUERY, _cstr(self.sql))


@attrs.frozen
class Parse:
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = _cstr(self.name) + _cstr(self.sql) + _I16.pack(len(self.param_types))
        body += b"".join(_U32.pack(t) for t in self.param_types)
        return frame(Frontend.PARSE, body)


@attrs.frozen
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        body = _cstr(self.portal) + _cstr(self.statement)
        body += _I16.pack(len(self.param_formats)) + b"".join(
            _I16.pack(f) for f in self.param_formats
        )
        body += _I16.pack(len(self.params))
        for value in self.params:
            body += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
        body += _I16.pack(len(self.result_formats)) + b"".join(
            _I16.pack(f) for f in self.result_formats
        )
        return frame(Frontend.BIND, body)


@attrs.frozen
class Describe:
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def encode(self) -> bytes:
        return frame(Frontend.DESCRIBE, self.kind + _cstr(self.name))


@attrs.frozen
class Execute:
    portal: str
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(Frontend.EXECUTE, _cstr(self.portal) + _I32.pack(self.max_rows))


@attrs.frozen
class Close:
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def encode(self) -> bytes:
        return frame(Frontend.CLOSE, self.kind + _cstr(self.name))


@attrs.frozen
class Sync:
    def encode(self) -> bytes:
        return frame(Frontend.SYNC, b"")


@attrs.frozen
class Flush:
    def encode(self) -> bytes:
        return frame(Frontend.FLUSH, b"")


@attrs.frozen
class Terminate:
    def encode(self) -> bytes:
        return frame(Frontend.TERMINATE, b"")


FrontendMessage: TypeAlias = (
    Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate
)


def _counted(cur: _Cursor, read: str) -> tuple[int, ...]:
    count = cur.int16()
    if count < 0:
        raise cur._fail("negative count")
    return tuple(cur.uint32() if read == "u32" else cur.int16() for _ in range(count))


def _kind(cur: _Cursor) -> bytes:
    kind = cur.take(1)
    if kind not in (b"S", b"P"):
        raise cur._fail(f"invalid kind {kind!r}")
    return kind


def decode_frontend(message: Message) -> FrontendMessage:
    """Decode a regular client message the proxy inspects (not the password family)."""
    type_ = message.type
    cur = _Cursor(message.body, chr(type_))
    result: FrontendMessage
    if type_ == Frontend.QUERY:
        result = Query(cur.cstr())
    elif type_ == Frontend.PARSE:
        name, sql = cur.cstr(), cur.cstr()
        result = Parse(name, sql, _counted(cur, "u32"))
    elif type_ == Frontend.BIND:
        portal, statement = cur.cstr(), cur.cstr()
        formats = _counted(cur, "i16")
        count = cur.int16()
        if count < 0:
            raise cur._fail("negative parameter count")
        params: list[bytes | None] = []
        for _ in range(count):
            length = cur.int32()
            params.append(None if length == -1 else cur.take(length))
        result = Bind(portal, statement, formats, tuple(params), _counted(cur, "i16"))
    elif type_ == Frontend.DESCRIBE:
        result = Describe(_kind(cur), cur.cstr())
    elif type_ == Frontend.EXECUTE:
        result = Execute(cur.cstr(), cur.int32())
    elif type_ == Frontend.CLOSE:
        result = Close(_kind(cur), cur.cstr())
    elif type_ == Frontend.SYNC:
        result = Sync()
    elif type_ == Frontend.FLUSH:
        result = Flush()
    elif type_ == Frontend.TERMINATE:
        result = Terminate()
    else:
        raise RemoteProtocolError(f"unexpected client message type {chr(type_)!r}")
    cur.end()
    return result


def error_bytes(
    sqlstate: str,
    message: str,
    *,
    fatal: bool = False,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Convenience: the encoded ErrorResponse the proxy sends to a client."""
    return ErrorResponse.build(
        sqlstate, message, severity="FATAL" if fatal else "ERROR", detail=detail, hint=hint
    ).encode()


def parameter_status_bytes(parameters: Mapping[str, str] | Sequence[tuple[str, str]]) -> bytes:
    items = parameters.items() if isinstance(parameters, Mapping) else parameters
    return b"".join(ParameterStatus(k, v).encode() for k, v in items)
