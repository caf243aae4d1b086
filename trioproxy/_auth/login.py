"""Logging in to a PostgreSQL server, as a linear sans-IO procedure.

[core] ``backend_login(...)`` is a generator in the psycopg style: it yields the bytes to
send (``bytes``) or ``None`` to ask for the next server message, and the shell sends
back that ``Message``. It returns a ``LoginResult`` or raises ``BackendError`` (the
server's own SQLSTATE and message) / ``AuthenticationFailed``.

The server picks the method; we answer SCRAM-SHA-256, md5 or cleartext with the password
the proxy holds for that role. The client's password never travels here.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping

import attrs

from trioproxy._auth.md5 import md5_password_message
from trioproxy._auth.scram import MECHANISM_PLUS, ScramClient, choose_mechanism
from trioproxy._protocol.framing import Message
from trioproxy._protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PasswordMessage,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    StartupMessage,
    decode_backend,
)
from trioproxy.errors import AuthenticationFailed, BackendError, RemoteProtocolError

#: What the procedure yields: bytes to send, or None to receive the next message.
LoginStep = Generator[bytes | None, Message | None, "LoginResult"]


@attrs.frozen
class LoginResult:
    parameters: dict[str, str]
    key: BackendKeyData | None
    notices: tuple[NoticeResponse, ...] = ()


def error_from_server(error: ErrorResponse) -> BackendError:
    """A BackendError carrying the server's own SQLSTATE and message."""
    detail = error.fields.get("D")
    return BackendError(
        error.message or "server error", sqlstate=error.sqlstate or None, detail=detail
    )


def backend_login(
    *,
    user: str,
    database: str,
    password: str | None,
    parameters: Mapping[str, str] = {},
    channel_binding: bytes | None = None,
) -> LoginStep:
    """``channel_binding``: tls-server-end-point data of the server's certificate (we are
    on TLS); used with SCRAM-SHA-256-PLUS when the server offers it."""
    startup = {"user": user, "database": database, **parameters}
    yield StartupMessage(startup).encode()
    scram: ScramClient | None = None
    parameter_values: dict[str, str] = {}
    key: BackendKeyData | None = None
    notices: list[NoticeResponse] = []

    def need_password() -> str:
        if password is None:
            raise AuthenticationFailed(
                f'the server asks for a password for role "{user}" and the proxy holds none'
            )
        return password

    while True:
        raw = yield None
        if raw is None:
            raise RemoteProtocolError("server closed the connection during login")
        message = decode_backend(raw)
        match message:
            case AuthenticationOk():
                pass
            case AuthenticationCleartextPassword():
                yield PasswordMessage(need_password().encode()).encode()
            case AuthenticationMD5Password(salt=salt):
                yield PasswordMessage(md5_password_message(user, need_password(), salt)).encode()
            case AuthenticationSASL(mechanisms=mechanisms):
                mechanism = choose_mechanism(
                    mechanisms, channel_binding=channel_binding is not None
                )
                scram = ScramClient(
                    need_password(),
                    channel_binding=channel_binding if mechanism == MECHANISM_PLUS else None,
                )
                yield SASLInitialResponse(mechanism, scram.client_first()).encode()
            case AuthenticationSASLContinue(data=data):
                if scram is None:
                    raise RemoteProtocolError("SASLContinue without SASL")
                yield SASLResponse(scram.handle_server_first(data)).encode()
            case AuthenticationSASLFinal(data=data):
                if scram is None:
                    raise RemoteProtocolError("SASLFinal without SASL")
                scram.handle_server_final(data)
            case AuthenticationOther(code=code):
                raise AuthenticationFailed(
                    f"the server asks for an authentication method the proxy does not "
                    f"support (code {code})"
                )
            case ParameterStatus(name=name, value=value):
                parameter_values[name] = value
            case BackendKeyData():
                key = message
            case NoticeResponse():
                notices.append(message)
            case ErrorResponse():
                raise error_from_server(message)
            case NegotiateProtocolVersion():
                pass  # the server speaks an older minor version; 3.0 is all we use
            case ReadyForQuery():
                return LoginResult(parameter_values, key, tuple(notices))
            case _:
                raise RemoteProtocolError(f"unexpected message during login: {message!r}")
