"""Server connections: open one (TCP, TLS, login), run the proxy's own statements on it.

[shell] A ``ServerConnection`` is owned by exactly one party at a time: the pool while
idle, one client session while borrowed. Only its owner reads or writes it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from trioproxy._auth.channel_binding import tls_server_end_point
from trioproxy._auth.login import LoginResult, backend_login, error_from_server
from trioproxy._protocol.codes import Backend, TxStatus
from trioproxy._protocol.framing import MessageReader
from trioproxy._protocol.messages import (
    BackendKeyData,
    ErrorResponse,
    ParameterStatus,
    Query,
    ReadyForQuery,
    SSLRequest,
    Terminate,
    decode_backend,
)
from trioproxy._server.transport import Transport, TransportClosed, open_tcp
from trioproxy._session.pinning import TRACKED_PARAMETERS, tracked_by_name
from trioproxy._session.prepared import ServerStatements
from trioproxy.errors import BackendError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger("trioproxy.backend")

_ids = itertools.count(1)


@attrs.frozen(kw_only=True)
class BackendTarget:
    """Where and how to reach PostgreSQL for one pool."""

    host: str
    port: int
    database: str
    user: str
    password: str | None = attrs.field(repr=False)
    tls_context: ssl.SSLContext | None = None
    tls_required: bool = False
    connect_timeout: float = 10.0
    max_message_size: int = 256 * 1024 * 1024


@attrs.define(eq=False)
class ServerConnection:
    transport: Transport
    key: BackendKeyData | None
    #: Current server-side values of the session parameters the proxy tracks.
    parameters: dict[str, str]
    created_at: float
    last_used: float
    id: int = attrs.field(factory=lambda: next(_ids))
    tx_status: TxStatus = TxStatus.IDLE
    #: Unreported parameters the proxy SET on this connection for its current client.
    extra_parameters: dict[str, str] = attrs.field(factory=dict)
    #: Protocol-level prepared statements this connection holds (shared server names).
    statements: ServerStatements = attrs.field(factory=lambda: ServerStatements(100))
    #: The server's host and port (where cancel requests for it go).
    address: tuple[str, int] = ("", 0)
    #: Called exactly once when the connection closes (the pool's budget unit).
    on_close: Callable[[], None] | None = None
    #: The tracked ones among ``parameters``, by lower-case name (as a client's
    #: ``parameters`` are): one dict comparison tells a client it is in sync here.
    #: Kept by ``set_parameter``.
    tracked_parameters: dict[str, str] = attrs.field(init=False)

    @tracked_parameters.default
    def _tracked_from_parameters(self) -> dict[str, str]:
        return tracked_by_name(self.parameters)

    def set_parameter(self, name: str, value: str) -> None:
        """The server reported a parameter's value (ParameterStatus)."""
        self.parameters[name] = value
        if name.lower() in TRACKED_PARAMETERS:
            self.tracked_parameters[name.lower()] = value

    @property
    def alive(self) -> bool:
        return not (self.transport.broken or self.transport.closed)

    def close(self) -> None:
        callback, self.on_close = self.on_close, None
        if callback is not None:  # first close: log it once
            logger.info("server connection %d closed", self.id)
        self.transport.close()
        if callback is not None:
            callback()

    async def terminate(self) -> None:
        """Say goodbye, wait (bounded) until the server has closed its end, then close.

        Waiting for the server's EOF means its backend process is gone from
        PostgreSQL's slot table before our budget unit is given back.
        """
        if self.alive:
            with trio.move_on_after(2):
                with contextlib.suppress(TransportClosed):
                    await self.transport.send_all(Terminate().encode())
                    while await self.transport.receive_some():
                        pass
        self.close()

    async def run(self, sql: str, *, timeout: float = math.inf) -> list[str | None]:  # noqa: ASYNC109 - a timeout breaks the connection, the caller must know
        """Run the proxy's own simple query; return the first column of each row.

        ParameterStatus changes update ``parameters``. Raises BackendError with the
        server's error, or when the server does not answer within ``timeout`` (then the
        connection is broken: it is never reused). The connection is left at
        ReadyForQuery (its transaction status in ``tx_status``).
        """
        try:
            with trio.fail_after(timeout):
                return await self._run(sql)
        except trio.TooSlowError:
            self.transport.broken = True
            raise BackendError(
                f"server connection {self.id} did not answer the proxy within {timeout:g} s"
            ) from None

    async def _run(self, sql: str) -> list[str | None]:
        await self.transport.send_all(Query(sql).encode())
        reader = MessageReader()
        values: list[str | None] = []
        error: ErrorResponse | None = None
        while True:
            data = await self.transport.receive_some()
            if not data:
                self.transport.broken = True
                raise BackendError("server closed the connection")
            reader.feed(data)
            for message in reader.messages():
                if message.type == Backend.DATA_ROW:
                    values.append(_first_column(message.body))
                elif message.type == Backend.PARAMETER_STATUS:
                    status = decode_backend(message)
                    assert isinstance(status, ParameterStatus)
                    self.set_parameter(status.name, status.value)
                elif message.type == Backend.ERROR_RESPONSE:
                    decoded = decode_backend(message)
                    assert isinstance(decoded, ErrorResponse)
                    error = decoded
                elif message.type == Backend.READY_FOR_QUERY:
                    ready = decode_backend(message)
                    assert isinstance(ready, ReadyForQuery)
                    self.tx_status = ready.status
                    if reader.buffered:
                        raise ProtocolError("server sent data after ReadyForQuery")
                    if error is not None:
                        raise error_from_server(error)
                    return values


def _first_column(body: bytes) -> str | None:
    (count,) = struct.unpack_from("!h", body, 0)
    if count < 1:
        return None
    (length,) = struct.unpack_from("!i", body, 2)
    if length < 0:
        return None
    return body[6 : 6 + length].decode()


async def _negotiate_tls(transport: Transport, target: BackendTarget) -> None:
    assert target.tls_context is not None
    await transport.send_all(SSLRequest().encode())
    answer = await transport.receive_some(1)
    if answer == b"S":
        try:
            await transport.start_tls(
                target.tls_context, server_side=False, server_hostname=target.host
            )
        except TransportClosed as exc:
            verify = isinstance(exc.__cause__, ssl.SSLCertVerificationError)
            raise BackendError(
                f"TLS handshake with server at {target.host}:{target.port} failed: "
                f"{exc.__cause__ or exc}",
                permanent=verify,
            ) from exc
    elif answer == b"N":
        if target.tls_required:
            raise BackendError(
                f"server at {target.host}:{target.port} does not support TLS "
                "(backend_tls requires it)",
                permanent=True,
            )
    else:
        raise BackendError(f"unexpected answer to SSLRequest from server: {answer!r}")


def _channel_binding(transport: Transport) -> bytes | None:
    """tls-server-end-point data of the server's certificate, when we are on TLS: the
    login then uses SCRAM-SHA-256-PLUS if the server offers it."""
    ssl_object = transport.ssl_object
    certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return tls_server_end_point(certificate) if certificate else None


async def _login(
    transport: Transport, target: BackendTarget, parameters: Mapping[str, str]
) -> LoginResult:
    procedure = backend_login(
        user=target.user,
        database=target.database,
        password=target.password,
        parameters=parameters,
        channel_binding=_channel_binding(transport),
    )
    reader = MessageReader(max_message_size=target.max_message_size)
    reply = None
    try:
        while True:
            wish = procedure.send(reply)
            reply = None
            if wish is not None:
                await transport.send_all(wish)
                continue
            while (reply := reader.next_message()) is None:
                data = await transport.receive_some()
                if not data:
                    break
                reader.feed(data)
    except StopIteration as done:
        result: LoginResult = done.value
        return result


async def connect_server(
    target: BackendTarget, *, now: float, parameters: Mapping[str, str] = {}
) -> ServerConnection:
    """Open and log in one server connection; BackendError (server's reason) on failure."""
    transport: Transport | None = None
    try:
        with trio.fail_after(target.connect_timeout):
            transport = await open_tcp(target.host, target.port)
            if target.tls_context is not None:
                await _negotiate_tls(transport, target)
            result = await _login(transport, target, parameters)
    except trio.TooSlowError:
        if transport is not None:
            transport.close()
        raise BackendError(
            f"timed out connecting to server at {target.host}:{target.port} "
            f"after {target.connect_timeout:g}s"
        ) from None
    except TransportClosed as exc:
        assert transport is not None
        transport.close()
        raise BackendError(f"connection to server lost during login: {exc}") from exc
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    connection = ServerConnection(
        transport=transport,
        key=result.key,
        parameters=dict(result.parameters),
        created_at=now,
        last_used=now,
        address=(target.host, target.port),
    )
    logger.info(
        "server connection %d opened to %s:%d as %s/%s",
        connection.id,
        target.host,
        target.port,
        target.user,
        target.database,
    )
    return connection


async def deliver_cancel(host: str, port: int, packet: bytes, timeout: float) -> str | None:  # noqa: ASYNC109 - each caller has its own bound
    """Send a CancelRequest ``packet`` to a PostgreSQL-protocol server (PostgreSQL, or
    another trioproxy) and wait until it closes (it never answers). Returns why it could
    not be delivered, or None."""
    transport: Transport | None = None
    with trio.move_on_after(timeout):
        try:
            transport = await open_tcp(host, port)
            await transport.send_all(packet)
            await transport.receive_some(1)  # the server closes when done
        except BackendError as exc:
            return exc.message
        except TransportClosed:
            pass
        finally:
            if transport is not None:
                transport.close()
    return None
