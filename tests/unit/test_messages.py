"""Message builders and parsers: encode -> frame -> decode, and malformed bodies."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy._protocol import messages as m
from trioproxy._protocol.codes import (
    CANCEL_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    AuthCode,
    Backend,
    Frontend,
    TxStatus,
)
from trioproxy._protocol.framing import Message, MessageReader, StartupReader
from trioproxy._protocol.startup import (
    CancelRequestPacket,
    SSLRequestPacket,
    StartupPacket,
    parse_startup_packet,
)
from trioproxy.errors import RemoteProtocolError, SQLState

_I32 = struct.Struct("!i")

# --- strategies -------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)
nonempty_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=30
)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
blob = st.binary(max_size=60)
field_codes = st.characters(min_codepoint=1, max_codepoint=127)
fields = st.dictionaries(field_codes, text, max_size=8)
kinds = st.sampled_from([b"S", b"P"])
SMALL = 6
#: Per-class parametrized properties: fewer examples each, many classes.
per_class = settings(max_examples=50)

OTHER_AUTH_CODES = int32.filter(
    lambda c: (
        c
        not in {
            AuthCode.OK,
            AuthCode.CLEARTEXT_PASSWORD,
            AuthCode.MD5_PASSWORD,
            AuthCode.SASL,
            AuthCode.SASL_CONTINUE,
            AuthCode.SASL_FINAL,
        }
    )
)

BACKEND_STRATEGIES: dict[str, st.SearchStrategy[m.BackendMessage]] = {
    "AuthenticationOk": st.builds(m.AuthenticationOk),
    "AuthenticationCleartextPassword": st.builds(m.AuthenticationCleartextPassword),
    "AuthenticationMD5Password": st.builds(
        m.AuthenticationMD5Password, salt=st.binary(min_size=4, max_size=4)
    ),
    "AuthenticationSASL": st.builds(
        m.AuthenticationSASL, mechanisms=st.lists(nonempty_text, max_size=SMALL).map(tuple)
    ),
    "AuthenticationSASLContinue": st.builds(m.AuthenticationSASLContinue, data=blob),
    "AuthenticationSASLFinal": st.builds(m.AuthenticationSASLFinal, data=blob),
    "AuthenticationOther": st.builds(m.AuthenticationOther, code=OTHER_AUTH_CODES, data=blob),
    "ParameterStatus": st.builds(m.ParameterStatus, name=text, value=text),
    "BackendKeyData": st.builds(m.BackendKeyData, process_id=int32, secret_key=uint32),
    "ReadyForQuery": st.builds(m.ReadyForQuery, status=st.sampled_from(TxStatus)),
    "CommandComplete": st.builds(m.CommandComplete, tag=text),
    "NegotiateProtocolVersion": st.builds(
        m.NegotiateProtocolVersion,
        newest_minor=int32,
        unrecognized_options=st.lists(text, max_size=SMALL).map(tuple),
    ),
    "ErrorResponse": st.builds(m.ErrorResponse, fields=fields),
    "NoticeResponse": st.builds(m.NoticeResponse, fields=fields),
}

FRONTEND_STRATEGIES: dict[str, st.SearchStrategy[m.FrontendMessage]] = {
    "Query": st.builds(m.Query, sql=text),
    "Parse": st.builds(
        m.Parse, name=text, sql=text, param_types=st.lists(uint32, max_size=SMALL).map(tuple)
    ),
    "Bind": st.builds(
        m.Bind,
        portal=text,
        statement=text,
        param_formats=st.lists(int16, max_size=SMALL).map(tuple),
        params=st.lists(st.none() | blob, max_size=SMALL).map(tuple),
        result_formats=st.lists(int16, max_size=SMALL).map(tuple),
    ),
    "Describe": st.builds(m.Describe, kind=kinds, name=text),
    "Execute": st.builds(m.Execute, portal=text, max_rows=int32),
    "Close": st.builds(m.Close, kind=kinds, name=text),
    "Sync": st.builds(m.Sync),
    "Flush": st.builds(m.Flush),
    "Terminate": st.builds(m.Terminate),
}

#: Backend classes whose decoder checks the whole body (any truncation is malformed).
STRICT_BACKEND = [
    name
    for name in BACKEND_STRATEGIES
    if name not in {"AuthenticationSASLContinue", "AuthenticationSASLFinal", "AuthenticationOther"}
]
#: Frontend classes with a body to truncate.
FRONTEND_WITH_BODY = [n for n in FRONTEND_STRATEGIES if n not in {"Sync", "Flush", "Terminate"}]

BACKEND_TYPES = sorted(
    {
        Backend.AUTHENTICATION,
        Backend.PARAMETER_STATUS,
        Backend.BACKEND_KEY_DATA,
        Backend.READY_FOR_QUERY,
        Backend.COMMAND_COMPLETE,
        Backend.NEGOTIATE_PROTOCOL_VERSION,
        Backend.ERROR_RESPONSE,
        Backend.NOTICE_RESPONSE,
    }
)
FRONTEND_TYPES = sorted(
    {
        Frontend.QUERY,
        Frontend.PARSE,
        Frontend.BIND,
        Frontend.DESCRIBE,
        Frontend.EXECUTE,
        Frontend.CLOSE,
        Frontend.SYNC,
        Frontend.FLUSH,
        Frontend.TERMINATE,
    }
)


def framed(data: bytes) -> Message:
    """Frame ``data`` (one encoded message) with MessageReader, checking it is exactly one."""
    reader = MessageReader()
    reader.feed(data)
    messages = reader.messages()
    assert len(messages) == 1
    assert reader.buffered == 0
    return messages[0]


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKEND_STRATEGIES))
@per_class
@given(data=st.data())
def test_backend_round_trip(name: str, data: st.DataObject) -> None:
    original = data.draw(BACKEND_STRATEGIES[name])
    encoded = original.encode()
    decoded = m.decode_backend(framed(encoded))
    assert type(decoded) is type(original)
    assert decoded == original
    assert decoded.encode() == encoded


@pytest.mark.parametrize("name", list(FRONTEND_STRATEGIES))
@per_class
@given(data=st.data())
def test_frontend_round_trip(name: str, data: st.DataObject) -> None:
    original = data.draw(FRONTEND_STRATEGIES[name])
    encoded = original.encode()
    decoded = m.decode_frontend(framed(encoded))
    assert type(decoded) is type(original)
    assert decoded == original
    assert decoded.encode() == encoded


@given(password=st.binary(max_size=60).filter(lambda b: b"\0" not in b))
def test_password_message_round_trip(password: bytes) -> None:
    message = framed(m.PasswordMessage(password).encode())
    assert message.type == Frontend.PASSWORD
    assert m.PasswordMessage.parse(message.body) == m.PasswordMessage(password)


@given(mechanism=text, data=blob)
def test_sasl_initial_response_round_trip(mechanism: str, data: bytes) -> None:
    message = framed(m.SASLInitialResponse(mechanism, data).encode())
    assert message.type == Frontend.PASSWORD
    assert m.SASLInitialResponse.parse(message.body) == m.SASLInitialResponse(mechanism, data)


def test_sasl_initial_response_without_data() -> None:
    body = b"SCRAM-SHA-256\0" + _I32.pack(-1)
    assert m.SASLInitialResponse.parse(body) == m.SASLInitialResponse("SCRAM-SHA-256", b"")


@given(data=blob)
def test_sasl_response_round_trip(data: bytes) -> None:
    message = framed(m.SASLResponse(data).encode())
    assert message.type == Frontend.PASSWORD
    assert m.SASLResponse.parse(message.body) == m.SASLResponse(data)


def startup_payload(data: bytes) -> bytes:
    reader = StartupReader()
    reader.feed(data)
    payload = reader.next_packet()
    assert payload is not None
    assert reader.buffered == 0
    return payload


@given(
    user=nonempty_text,
    extra=st.dictionaries(
        nonempty_text.filter(lambda s: s != "user" and not s.startswith("_pq_.")), text, max_size=5
    ),
)
def test_startup_message_round_trip(user: str, extra: dict[str, str]) -> None:
    parameters = {"user": user, **extra}
    encoded = m.StartupMessage(parameters).encode()
    assert _I32.unpack_from(encoded, 4)[0] == PROTOCOL_3_0
    packet = parse_startup_packet(startup_payload(encoded))
    assert isinstance(packet, StartupPacket)
    assert (packet.major, packet.minor) == (3, 0)
    assert packet.parameters == parameters
    assert packet.negotiate is None


def test_ssl_request_round_trip() -> None:
    encoded = m.SSLRequest().encode()
    assert encoded == _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)
    assert parse_startup_packet(startup_payload(encoded)) == SSLRequestPacket()


@given(process_id=int32, secret_key=uint32)
def test_cancel_request_round_trip(process_id: int, secret_key: int) -> None:
    encoded = m.CancelRequest(process_id, secret_key).encode()
    assert _I32.unpack_from(encoded, 4)[0] == CANCEL_REQUEST_CODE
    packet = parse_startup_packet(startup_payload(encoded))
    assert packet == CancelRequestPacket(process_id, struct.pack("!I", secret_key))


def test_known_encodings() -> None:
    assert m.ReadyForQuery(TxStatus.IDLE).encode() == b"Z\0\0\0\x05I"
    assert m.AuthenticationOk().encode() == b"R\0\0\0\x08\0\0\0\0"
    assert m.Query("SELECT 1").encode() == b"Q\0\0\0\x0dSELECT 1\0"
    assert m.Sync().encode() == b"S\0\0\0\x04"
    assert m.Terminate().encode() == b"X\0\0\0\x04"
    assert m.ParameterStatus("a", "b").encode() == b"S\0\0\0\x08a\0b\0"
    assert m.NegotiateProtocolVersion(0, ("_pq_.x",)).encode() == (
        b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.x\0"
    )


def test_encode_refuses_nul_in_strings() -> None:
    with pytest.raises(ValueError, match="NUL"):
        m.Query("SELECT '\0'").encode()
    with pytest.raises(ValueError, match="NUL"):
        m.ParameterStatus("a\0b", "c").encode()


# --- ErrorResponse / NoticeResponse -----------------------------------------------------


def test_error_response_build_and_named() -> None:
    error = m.ErrorResponse.build(
        "28P01", "password authentication failed", detail="bad", hint="try again"
    )
    assert error.sqlstate == "28P01"
    assert error.message == "password authentication failed"
    assert error.severity == "ERROR"
    assert error.named() == {
        "severity_localized": "ERROR",
        "severity": "ERROR",
        "code": "28P01",
        "message": "password authentication failed",
        "detail": "bad",
        "hint": "try again",
    }
    decoded = m.decode_backend(framed(error.encode()))
    assert isinstance(decoded, m.ErrorResponse)
    assert decoded == error
    assert decoded.named() == error.named()


def test_error_response_without_optional_fields() -> None:
    error = m.ErrorResponse.build("08P01", "bad", severity="FATAL")
    assert set(error.fields) == {"S", "V", "C", "M"}
    assert error.severity == "FATAL"


def test_error_response_unknown_and_missing_fields() -> None:
    error = m.ErrorResponse({"S": "FEHLER", "Z": "future field"})
    assert error.named() == {"severity_localized": "FEHLER", "Z": "future field"}
    assert error.severity == "FEHLER"  # falls back to the localized severity
    assert error.sqlstate == ""
    assert error.message == ""
    assert m.ErrorResponse({}).severity == ""


def test_error_response_non_ascii_field_code_round_trip() -> None:
    body = b"\xe9x\0\0"
    decoded = m.decode_backend(Message(Backend.ERROR_RESPONSE, body))
    assert decoded == m.ErrorResponse({"\xe9": "x"})
    assert decoded.encode() == Message(Backend.ERROR_RESPONSE, body).encode()


def test_notice_response_type() -> None:
    notice = m.NoticeResponse.build("01000", "hello", severity="WARNING")
    assert notice.encode()[:1] == b"N"
    decoded = m.decode_backend(framed(notice.encode()))
    assert isinstance(decoded, m.NoticeResponse)
    assert decoded.severity == "WARNING"


def test_error_bytes() -> None:
    data = m.error_bytes(SQLState.PROTOCOL_VIOLATION, "nope", fatal=True, hint="h")
    decoded = m.decode_backend(framed(data))
    assert isinstance(decoded, m.ErrorResponse)
    assert decoded.named() == {
        "severity_localized": "FATAL",
        "severity": "FATAL",
        "code": "08P01",
        "message": "nope",
        "hint": "h",
    }
    plain = m.decode_backend(framed(m.error_bytes("42000", "x")))
    assert isinstance(plain, m.ErrorResponse)
    assert plain.severity == "ERROR"


def test_parameter_status_bytes() -> None:
    expected = m.ParameterStatus("a", "1").encode() + m.ParameterStatus("b", "2").encode()
    assert m.parameter_status_bytes({"a": "1", "b": "2"}) == expected
    assert m.parameter_status_bytes([("a", "1"), ("b", "2")]) == expected


# --- malformed bodies -------------------------------------------------------------------


@pytest.mark.parametrize("name", STRICT_BACKEND)
@per_class
@given(data=st.data())
def test_backend_truncated(name: str, data: st.DataObject) -> None:
    message = framed(data.draw(BACKEND_STRATEGIES[name]).encode())
    cut = data.draw(st.integers(0, len(message.body) - 1))
    with pytest.raises(RemoteProtocolError):
        m.decode_backend(Message(message.type, message.body[:cut]))


@pytest.mark.parametrize(
    "name", ["AuthenticationSASLContinue", "AuthenticationSASLFinal", "AuthenticationOther"]
)
@per_class
@given(data=st.data())
def test_backend_truncated_auth_code(name: str, data: st.DataObject) -> None:
    message = framed(data.draw(BACKEND_STRATEGIES[name]).encode())
    cut = data.draw(st.integers(0, 3))
    with pytest.raises(RemoteProtocolError):
        m.decode_backend(Message(message.type, message.body[:cut]))


@pytest.mark.parametrize("name", STRICT_BACKEND)
@per_class
@given(data=st.data(), extra=st.binary(min_size=1, max_size=8))
def test_backend_trailing_bytes(name: str, data: st.DataObject, extra: bytes) -> None:
    message = framed(data.draw(BACKEND_STRATEGIES[name]).encode())
    with pytest.raises(RemoteProtocolError):
        m.decode_backend(Message(message.type, message.body + extra))


@pytest.mark.parametrize("name", FRONTEND_WITH_BODY)
@per_class
@given(data=st.data())
def test_frontend_truncated(name: str, data: st.DataObject) -> None:
    message = framed(data.draw(FRONTEND_STRATEGIES[name]).encode())
    cut = data.draw(st.integers(0, len(message.body) - 1))
    with pytest.raises(RemoteProtocolError):
        m.decode_frontend(Message(message.type, message.body[:cut]))


@pytest.mark.parametrize("name", list(FRONTEND_STRATEGIES))
@per_class
@given(data=st.data(), extra=st.binary(min_size=1, max_size=8))
def test_frontend_trailing_bytes(name: str, data: st.DataObject, extra: bytes) -> None:
    message = framed(data.draw(FRONTEND_STRATEGIES[name]).encode())
    with pytest.raises(RemoteProtocolError):
        m.decode_frontend(Message(message.type, message.body + extra))


@pytest.mark.parametrize("status", [b"X", b"i", b"\0", b"", b"II"])
def test_ready_for_query_bad_status(status: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode_backend(Message(Backend.READY_FOR_QUERY, status))


@pytest.mark.parametrize(
    ("type_", "body"),
    [
        (Frontend.DESCRIBE, b"X\0"),
        (Frontend.CLOSE, b"s\0"),
        (Frontend.QUERY, b"\xff\xfe\0"),  # not UTF-8
        (Frontend.PARSE, b"\0SELECT 1\0\xff\xff"),  # negative count
        (Frontend.BIND, b"\0\0\0\0\xff\xff"),  # negative parameter count
        (Frontend.BIND, b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0"),  # length -2
        (Frontend.PASSWORD, b"secret\0"),  # not a regular message
        (Frontend.COPY_DATA, b"data"),
        (ord("?"), b""),
    ],
)
def test_frontend_malformed_examples(type_: int, body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode_frontend(Message(type_, body))


@pytest.mark.parametrize(
    ("type_", "body"),
    [
        (Backend.NEGOTIATE_PROTOCOL_VERSION, b"\0\0\0\0\xff\xff\xff\xff"),  # count -1
        (Backend.NEGOTIATE_PROTOCOL_VERSION, b"\0\0\0\0\x7f\xff\xff\xff"),  # huge count
        (Backend.AUTHENTICATION, _I32.pack(AuthCode.SASL) + b"SCRAM-SHA-256\0"),  # no end
        (Backend.AUTHENTICATION, _I32.pack(AuthCode.MD5_PASSWORD) + b"abc"),
        (Backend.ERROR_RESPONSE, b"Cabc"),  # unterminated value
        (Backend.ERROR_RESPONSE, b""),
        (Backend.DATA_ROW, b"\0\0"),  # forwarded, never decoded
        (ord("?"), b""),
    ],
)
def test_backend_malformed_examples(type_: int, body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.decode_backend(Message(type_, body))


@pytest.mark.parametrize(
    "body",
    [b"", b"abc", b"a\0b\0"],
)
def test_password_message_malformed(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.PasswordMessage.parse(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"SCRAM-SHA-256",
        b"SCRAM-SHA-256\0\0\0",
        b"SCRAM-SHA-256\0" + _I32.pack(5) + b"abcd",
        b"SCRAM-SHA-256\0" + _I32.pack(3) + b"abcd",
        b"SCRAM-SHA-256\0" + _I32.pack(-2),
        b"\xff\0" + _I32.pack(0),
    ],
)
def test_sasl_initial_response_malformed(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        m.SASLInitialResponse.parse(body)


# --- random bodies: a message or RemoteProtocolError, nothing else ----------------------


def _canonical_backend(decoded: m.BackendMessage) -> bool:
    # Error/Notice fields are a dict: repeated codes collapse, so no exact re-encoding.
    return not isinstance(decoded, m.ErrorResponse | m.NoticeResponse)


@pytest.mark.parametrize("type_", BACKEND_TYPES, ids=chr)
@given(body=st.binary(max_size=40))
def test_backend_random_bodies(type_: int, body: bytes) -> None:
    try:
        decoded = m.decode_backend(Message(type_, body))
    except RemoteProtocolError:
        return
    if _canonical_backend(decoded):
        # What decodes re-encodes to the same bytes: nothing was silently dropped.
        assert decoded.encode() == Message(type_, body).encode()


@pytest.mark.parametrize("type_", FRONTEND_TYPES, ids=chr)
@given(body=st.binary(max_size=40))
def test_frontend_random_bodies(type_: int, body: bytes) -> None:
    try:
        decoded = m.decode_frontend(Message(type_, body))
    except RemoteProtocolError:
        return
    assert decoded.encode() == Message(type_, body).encode()


@given(body=st.binary(max_size=40))
def test_authentication_random_tail(body: bytes) -> None:
    """Random bodies behind each known auth code (random bytes rarely pick one)."""
    for code in (0, 3, 5, 10, 11, 12):
        with contextlib.suppress(RemoteProtocolError):
            m.decode_backend(Message(Backend.AUTHENTICATION, _I32.pack(code) + body))


@given(type_=st.integers(0, 255), body=st.binary(max_size=40))
def test_any_type_random_bodies(type_: int, body: bytes) -> None:
    for decode in (m.decode_backend, m.decode_frontend):
        with contextlib.suppress(RemoteProtocolError):
            decode(Message(type_, body))


@given(body=st.binary(max_size=40))
def test_password_family_random_bodies(body: bytes) -> None:
    for parse in (m.PasswordMessage.parse, m.SASLInitialResponse.parse, m.SASLResponse.parse):
        with contextlib.suppress(RemoteProtocolError):
            parse(body)
