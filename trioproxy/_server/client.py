"""One client connection, from the first byte to the last: a task in the clients nursery.

[shell] Phases:

1. *Login* (bounded by ``client_login_timeout``): SSLRequest/GSSENCRequest/CancelRequest
   negotiation, TLS, the StartupMessage, protocol-version negotiation, SCRAM-SHA-256
   checked by the proxy itself, then ParameterStatus, BackendKeyData, ReadyForQuery.
2. *Serving*: while unlinked, wait for the client (``idle_client_timeout``); the first
   complete message borrows a server connection (``connection_borrow_timeout``), the
   client's session parameters are put in force on it, and the ``Relay`` moves bytes until
   the transaction ends (transaction mode) or the client leaves (session mode / pinned).

No exception but ``Cancelled`` leaves ``run()``: a bug in one session never takes the
listener down. Every exit path gives the server connection back to the pool.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import secrets
import struct
import time
from typing import TYPE_CHECKING, NoReturn

import trio

from trioproxy._auth.scram import ScramServer
from trioproxy._auth.sigv4 import TokenRejected, looks_like_auth_token, verify_auth_token
from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy._protocol.framing import (
    Message,
    MessageReader,
    ScannedMessage,
    StartupReader,
    StreamScanner,
)
from trioproxy._protocol.messages import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    ParameterStatus,
    Parse,
    PasswordMessage,
    Query,
    ReadyForQuery,
    SASLInitialResponse,
    SASLResponse,
    decode_frontend,
    error_bytes,
    parameter_status_bytes,
)
from trioproxy._protocol.startup import (
    CancelRequestPacket,
    GSSENCRequestPacket,
    SSLRequestPacket,
    StartupPacket,
    parse_startup_packet,
)
from trioproxy._server.relay import CLIENT_INSPECT, SERVER_INSPECT, Outcome, Relay
from trioproxy._server.transport import Transport, TransportClosed
from trioproxy._session.pinning import (
    TRACKED_PARAMETERS,
    pin_reason_for_parse,
    pin_reason_for_query,
)
from trioproxy._session.tracker import EXTENDED, TransactionTracker
from trioproxy.config import IamAuth, PoolMode
from trioproxy.errors import (
    AuthenticationFailed,
    BackendError,
    BorrowTimeout,
    ProtocolError,
    SQLState,
    TrioproxyError,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from trioproxy._auth.credentials import UserCredentials
    from trioproxy._pool.pool import BackendPool
    from trioproxy._server.backend import ServerConnection
    from trioproxy._server.proxy import Proxy

logger = logging.getLogger("trioproxy.client")

_READY_IDLE = ReadyForQuery(TxStatus.IDLE).encode()


class _LoginFailed(Exception):
    """Login ended; the client was already told why (or cannot be)."""


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _parse_options(options: str) -> dict[str, str]:
    """``-c name=value`` / ``--name=value`` pairs of the ``options`` startup parameter."""
    result: dict[str, str] = {}
    words = options.split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word = words[i + 1]
            i += 1
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            raise AuthenticationFailed(
                f"unsupported option in startup packet: {word!r}",
                sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
            )
        name, sep, value = word.partition("=")
        if not sep:
            raise AuthenticationFailed(
                f"invalid option in startup packet: {word!r}",
                sqlstate=SQLState.INVALID_PARAMETER_VALUE,
            )
        result[name.replace("-", "_").lower()] = value.replace("\\ ", " ")
        i += 1
    return result


class ClientSession:
    def __init__(
        self, proxy: Proxy, transport: Transport, client_id: int, *, over_limit: bool
    ) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.transport = transport
        self.id = client_id
        self.over_limit = over_limit
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.pool: BackendPool | None = None
        self.server: ServerConnection | None = None
        #: The session parameters this client has in force (name -> value).
        self.parameters: dict[str, str] = {}
        self.pin_reason: str | None = None
        self.process_id = 0
        self.secret_key = b""
        self.scanner = StreamScanner(
            inspect=CLIENT_INSPECT, max_message_size=self.config.proxy.max_message_size
        )
        self.tracker = TransactionTracker()
        self.connected_at = trio.current_time()
        self.transactions = 0

    # --- entry point ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            try:
                with trio.fail_after(self.config.proxy.client_login_timeout):
                    await self._login()
            except trio.TooSlowError:
                logger.info("client %d: login timed out", self.id)
                await self._fatal(
                    SQLState.PROTOCOL_VIOLATION, "canceling authentication due to timeout"
                )
                return
            await self._serve()
        except _LoginFailed:
            pass
        except (TransportClosed, BrokenPipeError, ConnectionError) as exc:
            logger.debug("client %d: connection lost: %s", self.id, exc)
        except ProtocolError as exc:
            logger.info("client %d: protocol error: %s", self.id, exc.message)
            await self._fatal(exc.sqlstate, exc.message)
        except Exception:
            logger.exception("client %d: internal error", self.id)
            await self._fatal(SQLState.INTERNAL_ERROR, "internal error in trioproxy")
        finally:
            self._give_back_server(clean=False)
            self.proxy.forget_client(self)
            self.transport.close()

    # --- helpers ----------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        await self.transport.send_all(data)

    async def _fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """Tell the client why we close it (best effort, bounded), then close."""
        if self.transport.broken or self.transport.closed:
            return
        # Shielded (we may be closing because of a cancellation) but bounded.
        with (
            trio.CancelScope(shield=True, deadline=trio.current_time() + 1),
            contextlib.suppress(TransportClosed),
        ):
            await self._send(error_bytes(sqlstate, message, fatal=True, detail=detail))
        self.transport.close()

    async def _receive(self) -> bytes:
        data = await self.transport.receive_some()
        if not data:
            raise TransportClosed("client closed the connection")
        return data

    # --- login ------------------------------------------------------------------------

    async def _login(self) -> None:
        startup = await self._negotiate()
        if self.over_limit:
            limit = self.config.proxy.max_client_connections
            await self._fatal(
                SQLState.TOO_MANY_CONNECTIONS,
                f"sorry, too many clients already (max_client_connections = {limit})",
            )
            raise _LoginFailed
        if self.config.proxy.require_tls and not self.transport.is_tls:
            logger.info("client %d: refused: TLS required", self.id)
            await self._fatal(
                SQLState.INVALID_AUTHORIZATION,
                "TLS is required: this proxy accepts only encrypted connections",
                detail="Connect with sslmode=require (or stronger).",
            )
            raise _LoginFailed
        self.user = startup.user
        self.database = startup.database
        if startup.negotiate is not None:
            await self._send(startup.negotiate.encode())
        reader = MessageReader(max_message_size=8192)
        await self._authenticate(reader)
        try:
            requested = self._requested_parameters(startup.parameters)
            self.pool = self.proxy.pool_for(self.database, self.user)
            await self._establish_parameters(requested)
        except (BackendError, AuthenticationFailed, BorrowTimeout) as exc:
            logger.info("client %d: login failed at the server: %s", self.id, exc.message)
            await self._fatal(exc.sqlstate, exc.message, exc.detail)
            raise _LoginFailed from None
        self.process_id, secret = self.proxy.register_cancel_key(self)
        self.secret_key = struct.pack("!I", secret)
        await self._send(
            AuthenticationOk().encode()
            + parameter_status_bytes(self._reported_parameters())
            + BackendKeyData(self.process_id, secret).encode()
            + _READY_IDLE
        )
        self.application_name = self.parameters.get("application_name", "")
        logger.info(
            "client %d: logged in as %s to %s (tls=%s, application_name=%r)",
            self.id,
            self.user,
            self.database,
            self.transport.is_tls,
            self.application_name,
        )
        if reader.buffered:
            # Pipelined bytes after authentication belong to the serving phase.
            self._carry_over = reader.take_buffered()

    async def _negotiate(self) -> StartupPacket:
        reader = StartupReader()
        tls_context = self.proxy.tls_context
        while True:
            packet = reader.next_packet()
            if packet is None:
                reader.feed(await self._receive())
                continue
            request = parse_startup_packet(packet)
            if isinstance(request, SSLRequestPacket):
                if self.transport.is_tls:
                    raise ProtocolError("SSLRequest received over an encrypted connection")
                if reader.buffered:
                    # CVE-2021-23214: bytes after SSLRequest were sent in the clear.
                    raise ProtocolError("received unencrypted data after SSL request")
                if tls_context is None:
                    await self._send(b"N")
                    continue
                await self._send(b"S")
                await self.transport.start_tls(tls_context, server_side=True)
            elif isinstance(request, GSSENCRequestPacket):
                if reader.buffered:
                    raise ProtocolError("received unencrypted data after GSSENC request")
                await self._send(b"N")
            elif isinstance(request, CancelRequestPacket):
                await self.proxy.cancel(request.process_id, request.secret_key)
                raise _LoginFailed
            else:
                if reader.buffered:
                    self._carry_over = b""
                    raise ProtocolError("unexpected data after the startup packet")
                return request

    async def _read_password_message(self, reader: MessageReader) -> bytes:
        while (message := reader.next_message()) is None:
            reader.feed(await self._receive())
        if message.type != Frontend.PASSWORD:
            raise ProtocolError(f"expected SASL response, got message type {chr(message.type)!r}")
        return message.body

    async def _authenticate(self, reader: MessageReader) -> None:
        store = self.proxy.credentials
        user = store.lookup(self.user)
        if user is not None and user.iam_auth is not IamAuth.DISABLED:
            await self._authenticate_iam(reader, user)
            return
        scram = ScramServer(store.verifier_for(self.user))
        await self._send(AuthenticationSASL(ScramServer.MECHANISMS).encode())
        try:
            initial = SASLInitialResponse.parse(await self._read_password_message(reader))
            server_first = scram.handle_client_first(initial.mechanism, initial.data)
            await self._send(AuthenticationSASLContinue(server_first).encode())
            final = SASLResponse.parse(await self._read_password_message(reader))
            server_final = scram.handle_client_final(final.data)
            if store.lookup(self.user) is None:
                raise AuthenticationFailed("unknown user")  # unreachable: mock never matches
        except AuthenticationFailed as exc:
            # Same answer for a wrong password and an unknown user: no enumeration.
            logger.info(
                "client %d: authentication failed for user %r: %s", self.id, self.user, exc.message
            )
            self.proxy.stats.failed_logins += 1
            await self._fatal(
                SQLState.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"'
            )
            raise _LoginFailed from None
        await self._send(AuthenticationSASLFinal(server_final).encode())

    async def _login_failed(self, message: str, reason: str) -> NoReturn:
        """Refuse the login: the client gets ``message``, only the log gets ``reason``."""
        logger.info("client %d: authentication failed for user %r: %s", self.id, self.user, reason)
        self.proxy.stats.failed_logins += 1
        await self._fatal(SQLState.INVALID_PASSWORD, message)
        raise _LoginFailed

    async def _authenticate_iam(self, reader: MessageReader, user: UserCredentials) -> None:
        """An IAM-style auth token (or, with iam_auth = ENABLED, the password) sent as a
        cleartext password: asked for only over TLS, as RDS Proxy does."""
        if not self.transport.is_tls:
            logger.info("client %d: IAM login refused without TLS", self.id)
            await self._fatal(
                SQLState.INVALID_AUTHORIZATION,
                "IAM authentication is allowed only with SSL connections.",
            )
            raise _LoginFailed
        await self._send(AuthenticationCleartextPassword().encode())
        body = await self._read_password_message(reader)
        secret = PasswordMessage.parse(body).password.decode("utf-8", "surrogateescape")
        policy = self.proxy.iam_policy
        if looks_like_auth_token(secret) and policy is not None:
            try:
                verified = verify_auth_token(
                    secret,
                    db_user=self.user,
                    keys=self.proxy.iam_keys,
                    policy=policy,
                    now=time.time(),
                )
            except TokenRejected as exc:
                await self._login_failed(
                    f'IAM authentication failed for user "{self.user}"', f"token rejected: {exc}"
                )
            logger.info(
                "client %d: IAM token of key %s accepted for user %r",
                self.id,
                verified.access_key_id,
                self.user,
            )
            return
        if user.iam_auth is IamAuth.ENABLED and user.verifier is not None:
            verifier = user.verifier
            # PBKDF2 is deliberately slow: keep it off the event loop.
            if await trio.to_thread.run_sync(verifier.check_password, secret):
                return
            await self._login_failed(
                f'password authentication failed for user "{self.user}"', "wrong password"
            )
        await self._login_failed(
            f'IAM authentication failed for user "{self.user}"', "not an IAM auth token"
        )

    def _requested_parameters(self, startup: Mapping[str, str]) -> dict[str, str]:
        requested: dict[str, str] = {}
        for name, value in startup.items():
            lower = name.lower()
            if lower in ("user", "database", "replication"):
                if lower == "replication" and value.lower() not in ("false", "off", "0", "no"):
                    raise AuthenticationFailed(
                        "replication connections are not supported by trioproxy",
                        sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
                    )
                continue
            if lower == "options":
                requested.update(_parse_options(value))
                continue
            requested[lower] = value
        return requested

    async def _establish_parameters(self, requested: Mapping[str, str]) -> None:
        """Learn the server's parameters and put the client's requested ones in force.

        When the client asks for nothing that differs from the server's defaults, no
        server round trip is needed (the common case for most drivers).
        """
        assert self.pool is not None
        defaults = self.pool.server_parameters
        needs_server = defaults is None or any(
            name not in TRACKED_PARAMETERS or _lookup(defaults, name) != value
            for name, value in requested.items()
        )
        if not needs_server:
            assert defaults is not None
            self.parameters = {
                k.lower(): v for k, v in defaults.items() if k.lower() in TRACKED_PARAMETERS
            }
            return
        conn = await self._borrow()
        try:
            self.parameters = {
                k.lower(): v for k, v in conn.parameters.items() if k.lower() in TRACKED_PARAMETERS
            }
            # The server's defaults for the untracked ones are whatever RESET gives.
            self.extra_parameters = {
                k: v for k, v in requested.items() if k not in TRACKED_PARAMETERS
            }
            for name, value in requested.items():
                if name in TRACKED_PARAMETERS:
                    self.parameters[name] = value
            await self._sync_parameters(conn)
            # Adopt the server's spelling of what it accepted (e.g. 'ISO, MDY').
            for name, value in conn.parameters.items():
                if name.lower() in TRACKED_PARAMETERS:
                    self.parameters[name.lower()] = value
        finally:
            self._give_back_server(clean=True)

    extra_parameters: dict[str, str] = {}  # noqa: RUF012 - replaced per instance
    _carry_over: bytes = b""

    def _reported_parameters(self) -> dict[str, str]:
        assert self.pool is not None
        reported = dict(self.pool.server_parameters or {})
        canonical = {k.lower(): k for k in reported}
        for name, value in self.parameters.items():
            reported[canonical.get(name, name)] = value
        return reported

    async def _sync_parameters(self, conn: ServerConnection) -> None:
        """Make the server connection's session parameters this client's (one round trip
        only when something differs)."""
        statements: list[str] = []
        server_values = {k.lower(): v for k, v in conn.parameters.items()}
        for name, value in self.parameters.items():
            if server_values.get(name) != value:
                statements.append(f"SET {name} TO {_quote_literal(value)}")
        applied: dict[str, str] = conn.extra_parameters
        for name, value in self.extra_parameters.items():
            if applied.get(name) != value:
                statements.append(f"SET {name} TO {_quote_literal(value)}")
        for name in list(applied):
            if name not in self.extra_parameters:
                statements.append(f"RESET {name}")
        if not statements:
            return
        await conn.run("; ".join(statements))
        conn.extra_parameters = dict(self.extra_parameters)

    # --- serving ----------------------------------------------------------------------

    async def _borrow(self) -> ServerConnection:
        assert self.pool is not None
        conn = await self.pool.borrow(self.config.pool.connection_borrow_timeout)
        self.server = conn
        return conn

    def _give_back_server(self, *, clean: bool) -> None:
        conn, self.server = self.server, None
        if conn is None or self.pool is None:
            return
        tracker = self.tracker
        # A session that may hold state (session mode, or pinned) is reset with
        # DISCARD ALL before anyone else gets the connection.
        reset_session = self._keep_linked()
        at_boundary = (
            self.scanner.at_boundary
            and tracker.owed == 0
            and not tracker.unsynced
            and not tracker.copy_both
        )
        self.pool.release(
            conn,
            clean=clean and tracker.releasable,
            at_boundary=at_boundary,
            reset_session=reset_session,
        )
        self.tracker = TransactionTracker()

    def _keep_linked(self) -> bool:
        return self.pin_reason is not None or self.config.pool.pool_mode is PoolMode.SESSION

    def _on_client_message(self, type_: int, body: bytes | None) -> None:
        if self.pin_reason is not None or body is None:
            return
        reason: str | None = None
        try:
            if type_ == Frontend.QUERY:
                query = decode_frontend(Message(type_, body))
                assert isinstance(query, Query)
                reason = pin_reason_for_query(query.sql)
            elif type_ == Frontend.PARSE:
                parse = decode_frontend(Message(type_, body))
                assert isinstance(parse, Parse)
                reason = pin_reason_for_parse(parse.name) or pin_reason_for_query(parse.sql)
        except ProtocolError:
            reason = "unparsable statement"
        if reason is not None and self.config.pool.pool_mode is PoolMode.TRANSACTION:
            self.pin_reason = reason
            logger.info(
                "client %d: pinned to its server connection: %s (application_name=%r)",
                self.id,
                reason,
                self.application_name,
            )

    def _on_parameter_status(self, status: ParameterStatus) -> None:
        name = status.name.lower()
        if name in TRACKED_PARAMETERS:
            self.parameters[name] = status.value

    async def _serve(self) -> None:
        pending = bytearray(self._carry_over)
        scanned: list[ScannedMessage] = list(self.scanner.feed(pending)) if pending else []
        skipping = False  # after an error the proxy answered itself: discard until Sync
        idle_timeout = self.config.proxy.idle_client_timeout
        while True:
            if not scanned:
                with trio.move_on_after(idle_timeout if idle_timeout > 0 else float("inf")) as idle:
                    chunk = await self.transport.receive_some()
                if idle.cancelled_caught:
                    logger.info("client %d: closed after idle_client_timeout", self.id)
                    await self._fatal(
                        SQLState.IDLE_SESSION_TIMEOUT,
                        "terminating connection due to idle_client_timeout "
                        f"({idle_timeout:g} s without activity)",
                    )
                    return
                if not chunk:
                    return
                base = len(pending)
                pending += chunk
                scanned = [(t, b, base + e) for t, b, e in self.scanner.feed(chunk)]
                continue
            if scanned[0][0] == Frontend.TERMINATE:
                return
            if skipping:
                skipping, consumed = await self._skip_to_sync(scanned)
                del pending[:consumed]
                scanned = [(t, b, e - consumed) for t, b, e in scanned if e > consumed]
                continue
            try:
                conn = await self._borrow()
                await self._sync_parameters(conn)
            except (BorrowTimeout, BackendError) as exc:
                self._give_back_server(clean=True)
                skipping, consumed = await self._answer_error(scanned, exc)
                del pending[:consumed]
                scanned = [(t, b, e - consumed) for t, b, e in scanned if e > consumed]
                continue
            data, messages = bytes(pending), scanned
            pending.clear()
            scanned = []
            outcome = await self._relay(conn, data, messages)
            if outcome is not None:
                return

    async def _relay(
        self, conn: ServerConnection, data: bytes, messages: list[ScannedMessage]
    ) -> Outcome | None:
        """Run one linked period; None means the client goes on."""
        relay = Relay(
            client=self.transport,
            server=conn,
            tracker=self.tracker,
            client_scanner=self.scanner,
            server_scanner=StreamScanner(
                inspect=SERVER_INSPECT, max_message_size=self.config.proxy.max_message_size
            ),
            keep_linked=self._keep_linked,
            on_client_message=self._on_client_message,
            on_parameter_status=self._on_parameter_status,
            idle_in_transaction_timeout=self.config.proxy.idle_in_transaction_timeout,
        )
        outcome = await relay.run(data, messages)
        self.proxy.stats.bytes_from_clients += relay.bytes_from_client
        self.proxy.stats.bytes_from_servers += relay.bytes_from_server
        if outcome is Outcome.RELEASE:
            self.transactions += 1
            self._give_back_server(clean=True)
            return None
        if outcome is Outcome.CLIENT_GONE:
            self._give_back_server(clean=True)
            return outcome
        if outcome is Outcome.IDLE_IN_TRANSACTION:
            self._give_back_server(clean=False)
            await self._fatal(
                SQLState.IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
            return outcome
        if outcome is Outcome.CLIENT_PROTOCOL_ERROR:
            self._give_back_server(clean=False)
            await self._fatal(SQLState.PROTOCOL_VIOLATION, relay.error or "protocol violation")
            return outcome
        # The server connection failed under this client.
        owed, in_tx = self.tracker.owed, self.tracker.in_transaction
        pinned = self._keep_linked()
        conn.close()
        self._give_back_server(clean=False)
        logger.warning("client %d: server connection %d failed: %s", self.id, conn.id, relay.error)
        message = f"server connection lost: {relay.error}"
        if in_tx or pinned or not self.scanner.at_boundary:
            await self._fatal(SQLState.CONNECTION_FAILURE, message)
            return outcome
        # Autocommit statements in flight: each gets an error; the client may go on.
        await self._send(
            (error_bytes(SQLState.CONNECTION_FAILURE, message) + _READY_IDLE) * max(owed, 0)
        )
        return None

    async def _answer_error(
        self, scanned: list[ScannedMessage], exc: TrioproxyError
    ) -> tuple[bool, int]:
        """Answer the client's pending request ourselves with ``exc`` (no server).

        Returns (still skipping to Sync, bytes consumed)."""
        error = error_bytes(exc.sqlstate, exc.message, detail=self._borrow_detail(exc))
        type_, _body, end = scanned[0]
        if isinstance(exc, BorrowTimeout):
            logger.warning("client %d: borrow timeout (%s)", self.id, self._borrow_detail(exc))
        if type_ in (Frontend.QUERY, Frontend.FUNCTION_CALL):
            await self._send(error + _READY_IDLE)
            return False, end
        if type_ == Frontend.SYNC:
            await self._send(_READY_IDLE)
            return False, end
        if type_ in EXTENDED:
            await self._send(error)
            return True, end
        # Flush, stray Copy messages: nothing to answer.
        return False, end

    async def _skip_to_sync(self, scanned: list[ScannedMessage]) -> tuple[bool, int]:
        consumed = 0
        for type_, _body, end in scanned:
            consumed = end
            if type_ == Frontend.SYNC:
                await self._send(_READY_IDLE)
                return False, consumed
        return True, consumed

    def _borrow_detail(self, exc: TrioproxyError) -> str | None:
        if not isinstance(exc, BorrowTimeout) or self.pool is None:
            return exc.detail
        stats = self.pool.statistics()
        return (
            f"pool {self.pool.name}: {stats.max_size} server connections, "
            f"{stats.borrowed} in use ({self.proxy.pinned_count()} pinned), "
            f"{stats.waiting} clients waiting; waited "
            f"{self.config.pool.connection_borrow_timeout:g} s (connection_borrow_timeout)"
        )

    # --- cancel -----------------------------------------------------------------------

    def cancel_key_matches(self, secret_key: bytes) -> bool:
        return hmac.compare_digest(secret_key, self.secret_key)


def _lookup(parameters: Mapping[str, str], name: str) -> str | None:
    for key, value in parameters.items():
        if key.lower() == name:
            return value
    return None


def new_secret() -> int:
    return secrets.randbits(32)


_unused = (Backend,)
