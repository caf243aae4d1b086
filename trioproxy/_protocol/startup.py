"""The startup phase: what a client's first packets ask for, and what to answer.

[core] ``parse_startup_packet(payload)`` classifies one untyped packet (from
``StartupReader``) as an SSL/GSSENC/Cancel request or a StartupMessage, and decides
protocol-version negotiation (PostgreSQL's ProcessStartupPacket rules):

* protocol 3.0: accepted as is;
* protocol 3.x, x > 0 (3.2, or libpq's 3.9999 "grease" probe), or ``_pq_.`` options we
  do not know: accepted, and the client must get one NegotiateProtocolVersion naming 3.0
  and the unknown options before authentication starts;
* anything else (protocol 2, 4.x, garbage): refused with 08P01 / 0A000.
"""

from __future__ import annotations

import struct

import attrs

from trioproxy._protocol.codes import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    NEWEST_MINOR_VERSION,
    SSL_REQUEST_CODE,
)
from trioproxy._protocol.messages import NegotiateProtocolVersion
from trioproxy.errors import RemoteProtocolError, SQLState

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

#: First byte of a TLS record (handshake): a client that starts TLS without SSLRequest.
TLS_HANDSHAKE_RECORD = 0x16


@attrs.frozen
class SSLRequestPacket:
    pass


@attrs.frozen
class GSSENCRequestPacket:
    pass


@attrs.frozen
class CancelRequestPacket:
    process_id: int
    secret_key: bytes  # raw, compared in constant time by its owner


@attrs.frozen
class StartupPacket:
    major: int
    minor: int
    parameters: dict[str, str]
    #: The NegotiateProtocolVersion to send before authentication, if any.
    negotiate: NegotiateProtocolVersion | None

    @property
    def user(self) -> str:
        return self.parameters.get("user", "")

    @property
    def database(self) -> str:
        return self.parameters.get("database") or self.user


StartupRequest = SSLRequestPacket | GSSENCRequestPacket | CancelRequestPacket | StartupPacket


def parse_startup_packet(payload: bytes) -> StartupRequest:
    """Classify one startup-phase packet (its payload, after the length word)."""
    if len(payload) < 4:
        raise RemoteProtocolError("invalid startup packet: too short")
    (code,) = _I32.unpack_from(payload, 0)
    if code == SSL_REQUEST_CODE:
        if len(payload) != 4:
            raise RemoteProtocolError("invalid SSLRequest packet length")
        return SSLRequestPacket()
    if code == GSSENC_REQUEST_CODE:
        if len(payload) != 4:
            raise RemoteProtocolError("invalid GSSENCRequest packet length")
        return GSSENCRequestPacket()
    if code == CANCEL_REQUEST_CODE:
        # Protocol 3.2 allows keys up to 256 bytes; 3.0 uses 4.
        if len(payload) < 12 or len(payload) > 8 + 256:
            raise RemoteProtocolError("invalid CancelRequest packet length")
        (pid,) = _I32.unpack_from(payload, 4)
        return CancelRequestPacket(pid, payload[8:])
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise RemoteProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to "
            f"3.{NEWEST_MINOR_VERSION}",
            sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
        )
    parameters, unknown_options = _parse_parameters(payload[4:])
    if "user" not in parameters or not parameters["user"]:
        raise RemoteProtocolError(
            "no PostgreSQL user name specified in startup packet",
            sqlstate=SQLState.INVALID_AUTHORIZATION,
        )
    negotiate = None
    if minor > NEWEST_MINOR_VERSION or unknown_options:
        negotiate = NegotiateProtocolVersion(NEWEST_MINOR_VERSION, tuple(unknown_options))
    return StartupPacket(major, min(minor, NEWEST_MINOR_VERSION), parameters, negotiate)


def _parse_parameters(data: bytes) -> tuple[dict[str, str], list[str]]:
    parts = data.split(b"\0")
    # A well-formed list ends with an empty name, i.e. the data ends with b"\0\0" (or is
    # just b"\0" when there are no parameters).
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise RemoteProtocolError("invalid startup packet layout: expected terminator")
    parameters: dict[str, str] = {}
    unknown_options: list[str] = []
    for i in range(0, len(parts) - 2, 2):
        try:
            name, value = parts[i].decode(), parts[i + 1].decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError("invalid startup packet: not valid UTF-8") from None
        if not name:
            raise RemoteProtocolError("invalid startup packet layout: empty parameter name")
        if name.startswith("_pq_."):
            unknown_options.append(name)  # we implement no protocol extensions yet
            continue
        parameters[name] = value
    return parameters, unknown_options


def cancel_key_bytes(secret_key: int) -> bytes:
    """The 4-byte wire form of a protocol-3.0 cancel key."""
    return _U32.pack(secret_key)
