"""Constants of the PostgreSQL frontend/backend protocol, version 3.

[core] Pure data: no I/O, no clock.
"""

from __future__ import annotations

import enum
from typing import Final

PROTOCOL_3_0: Final = (3 << 16) | 0
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102

#: PostgreSQL refuses startup packets larger than this (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET_LENGTH: Final = 10_000
#: The newest minor protocol version the proxy speaks: it answers newer requests with
#: NegotiateProtocolVersion carrying this number.
NEWEST_MINOR_VERSION: Final = 0


class TxStatus(enum.Enum):
    """The transaction status byte of ReadyForQuery."""

    IDLE = b"I"
    IN_TRANSACTION = b"T"
    FAILED = b"E"


class Frontend:
    """Type bytes of messages a client sends (as ints, to compare with ``data[i]``)."""

    BIND: Final = ord("B")
    CLOSE: Final = ord("C")
    COPY_DATA: Final = ord("d")
    COPY_DONE: Final = ord("c")
    COPY_FAIL: Final = ord("f")
    DESCRIBE: Final = ord("D")
    EXECUTE: Final = ord("E")
    FLUSH: Final = ord("H")
    FUNCTION_CALL: Final = ord("F")
    PARSE: Final = ord("P")
    PASSWORD: Final = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
    QUERY: Final = ord("Q")
    SYNC: Final = ord("S")
    TERMINATE: Final = ord("X")


class Backend:
    """Type bytes of messages a server sends."""

    AUTHENTICATION: Final = ord("R")
    BACKEND_KEY_DATA: Final = ord("K")
    BIND_COMPLETE: Final = ord("2")
    CLOSE_COMPLETE: Final = ord("3")
    COMMAND_COMPLETE: Final = ord("C")
    COPY_BOTH_RESPONSE: Final = ord("W")
    COPY_DATA: Final = ord("d")
    COPY_DONE: Final = ord("c")
    COPY_IN_RESPONSE: Final = ord("G")
    COPY_OUT_RESPONSE: Final = ord("H")
    DATA_ROW: Final = ord("D")
    EMPTY_QUERY_RESPONSE: Final = ord("I")
    ERROR_RESPONSE: Final = ord("E")
    FUNCTION_CALL_RESPONSE: Final = ord("V")
    NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
    NO_DATA: Final = ord("n")
    NOTICE_RESPONSE: Final = ord("N")
    NOTIFICATION_RESPONSE: Final = ord("A")
    PARAMETER_DESCRIPTION: Final = ord("t")
    PARAMETER_STATUS: Final = ord("S")
    PARSE_COMPLETE: Final = ord("1")
    PORTAL_SUSPENDED: Final = ord("s")
    READY_FOR_QUERY: Final = ord("Z")
    ROW_DESCRIPTION: Final = ord("T")


class AuthCode:
    """Sub-codes of the Authentication ('R') message."""

    OK: Final = 0
    CLEARTEXT_PASSWORD: Final = 3
    MD5_PASSWORD: Final = 5
    GSS: Final = 7
    SSPI: Final = 9
    SASL: Final = 10
    SASL_CONTINUE: Final = 11
    SASL_FINAL: Final = 12


#: Field codes of ErrorResponse / NoticeResponse.
ERROR_FIELD_NAMES: Final = {
    "S": "severity_localized",
    "V": "severity",
    "C": "code",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "where",
    "s": "schema_name",
    "t": "table_name",
    "c": "column_name",
    "d": "data_type_name",
    "n": "constraint_name",
    "F": "file",
    "L": "line",
    "R": "routine",
}
