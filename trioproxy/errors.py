"""Exception hierarchy and the SQLSTATE codes trioproxy emits.

Leaf module: imports nothing from trioproxy. Every error that reaches a client carries the
SQLSTATE to send back (``sqlstate``) and whether the connection must end (``fatal``), in the
spirit of h11's ``error_status_hint``.
"""

from __future__ import annotations


class SQLState:
    """SQLSTATE codes used by the proxy (PostgreSQL Appendix A)."""

    PROTOCOL_VIOLATION = "08P01"
    CONNECTION_FAILURE = "08006"
    CONNECTION_EXCEPTION = "08000"
    FEATURE_NOT_SUPPORTED = "0A000"
    INVALID_AUTHORIZATION = "28000"
    INVALID_PASSWORD = "28P01"
    TOO_MANY_CONNECTIONS = "53300"
    PROGRAM_LIMIT_EXCEEDED = "54000"
    ADMIN_SHUTDOWN = "57P01"
    CANNOT_CONNECT_NOW = "57P03"
    QUERY_CANCELED = "57014"
    IDLE_SESSION_TIMEOUT = "57P05"
    IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
    INVALID_PARAMETER_VALUE = "22023"
    INTERNAL_ERROR = "XX000"


class TrioproxyError(Exception):
    """Base class of every error trioproxy raises on purpose."""

    sqlstate: str = SQLState.INTERNAL_ERROR
    fatal: bool = True

    def __init__(self, message: str, *, sqlstate: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        if sqlstate is not None:
            self.sqlstate = sqlstate


class ConfigError(TrioproxyError):
    """The configuration is invalid; the message names the key (and file)."""


class ProtocolError(TrioproxyError):
    """A peer broke the PostgreSQL wire protocol (malformed or oversized message)."""

    sqlstate = SQLState.PROTOCOL_VIOLATION


class RemoteProtocolError(ProtocolError):
    """The *peer* sent bytes that violate the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to produce bytes that violate the protocol (a bug on our side)."""


class AuthenticationFailed(TrioproxyError):
    """Client authentication failed. The message is safe to send to the client."""

    sqlstate = SQLState.INVALID_PASSWORD


class BackendError(TrioproxyError):
    """The backend PostgreSQL could not be reached, refused us, or died.

    ``permanent``: retrying cannot help (a certificate that fails verification, a server
    without TLS when TLS is required); the pool reports it at once instead of retrying
    until the borrow timeout.
    """

    sqlstate = SQLState.CONNECTION_FAILURE

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        detail: str | None = None,
        permanent: bool = False,
    ):
        super().__init__(message, sqlstate=sqlstate, detail=detail)
        self.permanent = permanent


class BorrowTimeout(TrioproxyError):
    """No server connection became free within ``connection_borrow_timeout``."""

    sqlstate = SQLState.TOO_MANY_CONNECTIONS
    fatal = False
