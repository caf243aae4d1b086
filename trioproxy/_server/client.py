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
import math
import struct
from time import perf_counter
from typing import TYPE_CHECKING

import trio

from trioproxy._protocol.codes import Frontend, TxStatus
from trioproxy._protocol.framing import (
    Message,
    MessageReader,
    ScannedMessage,
    StreamScanner,
)
from trioproxy._protocol.messages import (
    AuthenticationOk,
    BackendKeyData,
    Close,
    FrontendMessage,
    NoticeResponse,
    ParameterStatus,
    Parse,
    Query,
    ReadyForQuery,
    decode_frontend,
    error_bytes,
)
from trioproxy._server.admin import ADMIN_DATABASE, SHUTDOWN_MESSAGE, admin_login, serve_admin
from trioproxy._server.authentication import ClientAuthentication, _LoginFailed
from trioproxy._server.dataplane import Handback
from trioproxy._server.parameters import ClientParameters
from trioproxy._server.relay import CLIENT_INSPECT, SERVER_INSPECT, Outcome, Relay
from trioproxy._server.transport import Transport, TransportClosed
from trioproxy._session.express import express_bind
from trioproxy._session.link import DISPOSITION, Disposition, LinkState, link_state
from trioproxy._session.pinning import (
    TRACKED_PARAMETERS,
)
from trioproxy._session.prepared import LinkedMapper, StatementDef, StatementMapper
from trioproxy._session.sqlscan import fingerprint, split_statements
from trioproxy._session.state import SessionState
from trioproxy._session.tracker import EXTENDED, TransactionTracker
from trioproxy.config import Config, EndpointRole, PoolMode
from trioproxy.errors import (
    AuthenticationFailed,
    BackendError,
    BorrowTimeout,
    ProtocolError,
    SQLState,
    TrioproxyError,
)

if TYPE_CHECKING:
    from trioproxy._pool.pool import BackendPool
    from trioproxy._server.backend import ServerConnection
    from trioproxy._server.proxy import Proxy

logger = logging.getLogger("trioproxy.client")

_READY_IDLE = ReadyForQuery(TxStatus.IDLE).encode()
_AUTHENTICATION_OK = AuthenticationOk().encode()
#: A client whose last message is one of these now waits for the answers.
_AWAITS_ANSWERS = frozenset({Frontend.QUERY, Frontend.SYNC})


class ClientSession(ClientAuthentication, ClientParameters):
    def __init__(
        self,
        proxy: Proxy,
        transport: Transport,
        client_id: int,
        *,
        over_limit: bool,
        role: EndpointRole = EndpointRole.READ_WRITE,
    ) -> None:
        self.proxy = proxy
        #: The endpoint the client came in through (read-only: served by standbys).
        self.role = role
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
        self.session = SessionState(
            exclude_variable_sets="EXCLUDE_VARIABLE_SETS"
            in self.config.pool.session_pinning_filters
        )
        #: Untracked parameters this client has set (startup options, session SETs).
        self.extra_parameters: dict[str, str] = {}
        self.startup_extra_parameters: dict[str, str] = {}
        self._errors_checked = 0
        #: This client's protocol-level prepared statements (virtualised in transaction mode).
        self.statements = StatementMapper()
        self._mapping = False
        #: (express_bound -> link_express) The statement an express Bind runs, and where
        #: its parameters start and end in the request.
        self._express_bind: tuple[StatementDef, int, int] | None = None
        self._reset_server = False
        self._relay_in_progress: Relay | None = None
        self.process_id = 0
        self.secret_key = b""
        self.scanner = StreamScanner(
            inspect=CLIENT_INSPECT, max_message_size=self.config.proxy.max_message_size
        )
        self.tracker = TransactionTracker()
        self._last_server_scanner: StreamScanner | None = None
        self._pool_mode_cache: tuple[Config, Config, str, PoolMode] | None = None
        self.connected_at = trio.current_time()
        self.transactions = 0
        #: When the client last sent something while parked (idle_client_timeout).
        self.last_active = self.connected_at
        #: A request the data plane had queued for a server connection when the parked
        #: wait was cancelled (with ``Handback.queued_at``).
        self.queued_request: Handback | None = None

    # --- entry point ------------------------------------------------------------------

    async def run(self) -> None:
        try:
            # trio.fail_after() without its context-manager layers: the bare cancel scope.
            deadline = trio.current_time() + self.config.proxy.client_login_timeout
            with trio.CancelScope(deadline=deadline) as login_scope:
                await self._login()
            if login_scope.cancelled_caught:
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
            # Each step runs even if an earlier one fails (close forcefully in finally).
            try:
                self._give_back_server()
            finally:
                try:
                    self.proxy.forget_client(self)
                finally:
                    self.transport.close()

    # --- helpers ----------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self._held_reply:
            data, self._held_reply = self._held_reply + data, b""
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
        if self.database == ADMIN_DATABASE:
            # The admin console: no server, no pool (trioproxy/_server/admin.py).
            if not await admin_login(self):
                raise _LoginFailed
            self.admin_console = True
            self._carry_over = reader.take_buffered() if reader.buffered else b""
            return
        try:
            requested = self._requested_parameters(startup.parameters)
            self.pool = self.proxy.pool_for(self.database, self.user, self.role)
            await self._establish_parameters(requested)
        except (BackendError, AuthenticationFailed, BorrowTimeout) as exc:
            logger.info("client %d: login failed at the server: %s", self.id, exc.message)
            await self._fatal(exc.sqlstate, exc.message, exc.detail)
            raise _LoginFailed from None
        self.process_id, secret = self.proxy.register_cancel_key(self)
        self.secret_key = struct.pack("!I", secret)
        await self._send(
            _AUTHENTICATION_OK
            + self._reported_parameter_bytes()
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

    @property
    def pool_mode(self) -> PoolMode:
        """This client's pooling mode: its user's ``pool_mode``, else ``[pool]``'s.

        Asked several times per transaction: remembered for the (frozen) configurations
        and the user it was derived from; a reload replaces them, and it is derived anew."""
        config = self.proxy.config
        cached = self._pool_mode_cache
        if (
            cached is not None
            and cached[0] is config
            and cached[1] is self.config
            and cached[2] is self.user
        ):
            return cached[3]
        user = config.users.get(self.user)
        if user is not None and user.pool_mode is not None:
            mode = user.pool_mode
        else:
            mode = self.config.pool.pool_mode
        self._pool_mode_cache = (config, self.config, self.user, mode)
        return mode

    @property
    def pin_reason(self) -> str | None:
        """Why this client holds its server connection across transactions, or None."""
        reasons = self.session.reasons
        return ", ".join(reasons) if reasons else None

    async def _borrow(self) -> ServerConnection:
        assert self.pool is not None
        conn = await self.pool.borrow(self.config.pool.connection_borrow_timeout)
        self.server = conn
        return conn

    def _try_borrow(self) -> ServerConnection | None:
        assert self.pool is not None
        conn = self.server = self.pool.try_borrow()
        return conn

    async def _wait_for_client(self) -> bytes | None:
        """The client's next bytes (``b""``: it closed, or was closed after
        idle_client_timeout); None when the proxy woke us."""
        idle_timeout = self.config.proxy.idle_client_timeout
        # One scope for both ways out of the wait (a cancel scope costs as much as a few
        # syscalls): the proxy cancels it to wake us (draining, admin KILL), and its
        # deadline is idle_client_timeout.
        deadline = trio.current_time() + idle_timeout if idle_timeout > 0 else math.inf
        chunk = None
        with trio.CancelScope(deadline=deadline) as wait:
            self.wait_scope = wait
            try:
                chunk = await self.transport.receive_some()
            finally:
                self.wait_scope = None
        if not wait.cancelled_caught:
            return chunk
        if self._woken() or trio.current_time() < deadline:
            return None
        logger.info("client %d: closed after idle_client_timeout", self.id)
        await self._fatal(
            SQLState.IDLE_SESSION_TIMEOUT,
            "terminating connection due to idle_client_timeout "
            f"({idle_timeout:g} s without activity)",
        )
        return b""  # closed: the session ends as if the client had left

    async def _wait_for_server(self, queued_at: float | None = None) -> ServerConnection | None:
        """Borrow, waiting if need be; None when the proxy woke us (a shutdown began:
        the wait is cancellation-safe, nothing was sent anywhere yet). The pool's own
        deadline scope is our wait_scope: one cancel scope per wait, not two.
        ``queued_at``: the request already waited in the data plane since then."""
        assert self.pool is not None
        timeout = self.config.pool.connection_borrow_timeout
        if queued_at is not None:
            timeout = max(0.0, queued_at + timeout - trio.current_time())
        conn = await self.pool.borrow_wakeable(timeout, self._expose_wait_scope)
        self.server = conn
        return conn

    def _expose_wait_scope(self, scope: trio.CancelScope | None) -> None:
        self.wait_scope = scope

    def _woken(self) -> bool:
        """Did the proxy cancel our wait_scope (shutdown, admin KILL)?"""
        return self.proxy.draining or self.kill_reason is not None

    def _give_back_server(self) -> None:
        """The link ends: the pool gets the connection back, in the state the link
        table (trioproxy/_session/link.py, DISPOSITION) says."""
        conn, self.server = self.server, None
        if conn is None or self.pool is None:
            return
        tracker = self.tracker
        session_mode = self.pool_mode is PoolMode.SESSION
        state = link_state(
            sending=False,
            client_at_boundary=self.scanner.at_boundary,
            owed=tracker.owed,
            unsynced=tracker.unsynced,
            mapping_idle=not self._mapping,
            copy_both=tracker.copy_both,
            tx_status=tracker.tx_status,
            pinned=self.session.pinned,
            session_mode=session_mode,
        )
        disposition = DISPOSITION[state]
        holds_state = self.session.pinned or self._reset_server or state is LinkState.PINNED
        if disposition in (Disposition.REUSE, Disposition.ROLLBACK) and (
            holds_state or session_mode
        ):
            # Session state (pinned, session mode, DISCARD/DEALLOCATE ran) goes with
            # DISCARD ALL, whatever the transaction state (ROLLBACK first if needed).
            disposition = Disposition.RESET
        self._reset_server = False
        self.pool.release(
            conn,
            clean=disposition is Disposition.REUSE,
            at_boundary=disposition is not Disposition.CLOSE,
            reset_session=disposition is Disposition.RESET,
        )
        self.tracker = TransactionTracker()

    def _server_scanner(self) -> StreamScanner:
        """The scanner for the next link's server stream: the last one again when it
        stopped at a message boundary (as every released link does), else a new one."""
        scanner = self._last_server_scanner
        if scanner is None or not scanner.at_boundary:
            scanner = self._last_server_scanner = StreamScanner(
                inspect=SERVER_INSPECT, max_message_size=self.config.proxy.max_message_size
            )
        return scanner

    def _enable_statements(self, conn: ServerConnection) -> LinkedMapper:
        """(Relay) Switch the link to message mode: statements are virtualised from here."""
        conn.statements.capacity = self.config.pool.max_prepared_statements
        self._mapping = True
        return self.statements.link(conn.statements)

    def drain_wake(self) -> None:
        """The proxy is shutting down: a client parked on its pinned or session-mode
        connection between transactions lets it go now (the pool resets it), and then
        gets its FATAL 57P01 like everyone else."""
        relay = self._relay_in_progress
        if relay is not None:
            relay.release_if_idle()

    def _hold(self) -> tuple[bool, bool]:
        """Asked at each transaction boundary: (pinned, session mode). Pending unpins
        settle here, unless an error happened since they were sent. While the proxy
        drains, nothing holds a connection past its transaction."""
        if self.proxy.draining:
            return False, False
        if self.session.pending:
            errors_seen = self.tracker.errors != self._errors_checked
            unpins = self.proxy.stats.unpins
            for reason in self.session.settle(errors_seen=errors_seen):
                unpins[reason] = unpins.get(reason, 0) + 1
                logger.info("client %d: unpinned: %s released", self.id, reason)
        self._errors_checked = self.tracker.errors
        return self.session.pinned, self.pool_mode is PoolMode.SESSION

    def _on_client_message(self, type_: int, body: bytes | None) -> None:
        if body is None:
            return
        if type_ == Frontend.QUERY and body.find(b"\0") == len(body) - 1 and body.isascii():
            # The common case, without building the message object.
            new = self._on_query(body[:-1].decode("ascii"))
        else:
            new = self._on_other_message(type_, body)
        if new and self.pool_mode is PoolMode.TRANSACTION:
            self._pinned(new)

    def _on_query(self, sql: str) -> list[str]:
        self._log_statement("query", sql)
        new = self.session.on_sql(sql)
        if self.session.forgets_statements():
            self._forget_statements()
        return new

    def _on_other_message(self, type_: int, body: bytes) -> list[str]:
        try:
            message = _decode_inspected(type_, body)
        except ProtocolError:
            return [r] if (r := self.session._pin("unparsable statement", None)) else []
        if isinstance(message, Query):
            return self._on_query(message.sql)
        if isinstance(message, Parse):
            self._log_statement("parse", message.sql)
            # Virtualised (message mode) statements move freely: no pin.
            name = "" if self._mapping else message.name
            return self.session.on_parse(name, message.sql)
        if isinstance(message, Close) and message.kind == b"S":
            self.session.on_close_statement(message.name)
        return []

    def _log_statement(self, kind: str, sql: str) -> None:
        """debug_logging: one line per statement, literals removed (no values, no secrets
        typed into SQL); not again for a request logged when it went out express."""
        if not self.config.proxy.debug_logging or self._logged_already:
            return
        logger.debug(
            "client %d: %s %s",
            self.id,
            kind,
            "; ".join(fingerprint(st) for st in split_statements(sql)),
        )

    def _forget_statements(self) -> None:
        """DISCARD ALL / DEALLOCATE ALL ran: the client's statement names are gone, and the
        server connection's shared statements too (the pool resets it)."""
        self.statements.statements.clear()
        self._reset_server = True
        if self.server is not None:
            self.server.statements.clear()

    def _pinned(self, reasons: list[str]) -> None:
        """Tell users why (RDS Proxy only says so in debug logs): one log line per new pin,
        counters by reason, and optionally a NOTICE to the client."""
        pins = self.proxy.stats.pins
        for reason in reasons:
            pins[reason] = pins.get(reason, 0) + 1
        statement = self.session.last_pin_statement
        logger.info(
            "client %d: pinned to its server connection: %s (user=%s, application_name=%r, "
            "statement=%r)",
            self.id,
            ", ".join(reasons),
            self.user,
            self.application_name,
            statement,
        )
        if self.config.proxy.notify_on_pin and self._relay_in_progress is not None:
            self._relay_in_progress.notice_to_client(
                NoticeResponse.build(
                    "01000",
                    f"trioproxy: this session is pinned to its server connection "
                    f"({', '.join(reasons)})",
                    severity="NOTICE",
                    detail="Transaction pooling is off for this client until the session "
                    "state is released (see docs/pinning.md).",
                ).encode()
            )

    def _on_parameter_status(self, status: ParameterStatus) -> None:
        name = status.name.lower()
        if name in TRACKED_PARAMETERS:
            self.parameters[name] = status.value

    #: (relay_for) The request being replayed was logged when it went out express.
    _logged_already = False
    #: Set while the client is waited for between transactions; the proxy cancels it to
    #: end an idle session at once when a graceful shutdown begins.
    wait_scope: trio.CancelScope | None = None
    #: Logged in to the admin console (database "trioproxy") rather than to a pool.
    admin_console = False
    #: Set by the admin console's KILL_CLIENT: close at the next transaction boundary.
    kill_reason: str | None = None

    async def _serve(self) -> None:
        if self.admin_console:
            await serve_admin(self)
            return
        pending = bytearray(self._carry_over)
        scanned: list[ScannedMessage] = list(self.scanner.feed(pending)) if pending else []
        skipping = False  # after an error the proxy answered itself: discard until Sync
        queued_at: float | None = None  # the data plane queued the request for a server
        read_now = False  # try the client's socket without waiting (see below)
        while True:
            # Between transactions (never linked here): the clean moment to leave.
            if self.proxy.draining or self.kill_reason is not None:
                logger.info("client %d: closed by the administrator", self.id)
                await self._fatal(SQLState.ADMIN_SHUTDOWN, self.kill_reason or SHUTDOWN_MESSAGE)
                return
            if not scanned:
                # Right after a transaction, the next request is often there already:
                # then nothing to wait for. Only then: that transaction waited for its
                # server, so this task has yielded since its last read (a client that
                # keeps its socket full never monopolises the event loop).
                chunk = self.transport.receive_now() if read_now else None
                read_now = False
                if chunk is None and self._parks(pending):
                    # The data plane serves the common transactions; we wake for the rest.
                    handback = await self._park()
                    if handback is None:
                        continue  # woken by the proxy: see draining above
                    if handback.relay is not None:
                        if await self._resume_relay(handback) is not None:
                            return
                        read_now = True
                        continue
                    if handback.scanned is not None:
                        pending += handback.chunk
                        scanned = handback.scanned
                        queued_at = handback.queued_at
                        continue
                    chunk = handback.chunk
                if chunk is None:
                    chunk = await self._wait_for_client()
                    if chunk is None:
                        continue  # woken by the proxy: see draining above
                if not chunk:
                    return
                base = len(pending)
                pending += chunk
                scanned = self.scanner.feed(chunk)  # a new list: ours to keep
                if base:
                    scanned = [(t, b, base + e) for t, b, e in scanned]
                continue
            if scanned[0][0] == Frontend.TERMINATE:
                return
            if skipping:
                skipping, consumed = await self._skip_to_sync(scanned)
                del pending[:consumed]
                scanned = [(t, b, e - consumed) for t, b, e in scanned if e > consumed]
                continue
            if self.proxy.is_paused(self.database):  # admin PAUSE: hold new transactions
                self._give_back_server()  # (one the data plane borrowed)
                await self.proxy.wait_resumed(self.database)
                continue
            try:
                # The data plane may have borrowed one already; an idle connection is
                # taken at once (sync: no cancel scope, no checkpoint); otherwise we wait.
                conn = self.server or self._try_borrow() or await self._wait_for_server(queued_at)
                queued_at = None
                if conn is None:
                    continue  # woken by the proxy: see draining above
                if not self._parameters_in_sync(conn):
                    await self._sync_parameters(conn)
            except (BorrowTimeout, BackendError) as exc:
                self._give_back_server()
                skipping, consumed = await self._answer_error(scanned, exc)
                del pending[:consumed]
                scanned = [(t, b, e - consumed) for t, b, e in scanned if e > consumed]
                continue
            data, messages = bytes(pending), scanned
            pending.clear()
            scanned = []
            released = self.transactions
            outcome = await self._relay(conn, data, messages)
            if outcome is not None:
                return
            read_now = self.transactions != released

    async def _relay(
        self, conn: ServerConnection, data: bytes, messages: list[ScannedMessage]
    ) -> Outcome | None:
        """Run one linked period; None means the client goes on."""
        relay = self._new_relay(conn, messages)
        try:
            outcome = await relay.run(data, messages)
        finally:
            self._mapping = False
            self._relay_in_progress = None
        return await self._after_relay(conn, relay, outcome)

    async def _resume_relay(self, handback: Handback) -> Outcome | None:
        """Go on with a link the data plane started (see trioproxy/_server/dataplane.py)."""
        relay = handback.relay
        assert relay is not None
        try:
            outcome = await relay.resume(
                flush_server=handback.flush_server, flush_client=handback.flush_client
            )
        finally:
            self._mapping = False
            self._relay_in_progress = None
        return await self._after_relay(relay.server, relay, outcome)

    def _new_relay(self, conn: ServerConnection, messages: list[ScannedMessage]) -> Relay:
        linked = None
        transaction_mode = self.pool_mode is PoolMode.TRANSACTION
        if transaction_mode and (self.statements.statements or _has_named_parse(messages)):
            conn.statements.capacity = self.config.pool.max_prepared_statements
            linked = self.statements.link(conn.statements)
        self._mapping = linked is not None
        relay = self._relay_in_progress = Relay(
            client=self.transport,
            server=conn,
            tracker=self.tracker,
            client_scanner=self.scanner,
            server_scanner=self._server_scanner(),
            hold=self._hold,
            on_client_message=self._on_client_message,
            on_parameter_status=self._on_parameter_status,
            idle_in_transaction_timeout=self.config.proxy.idle_in_transaction_timeout,
            statements=linked,
            response_latency=self.proxy.response_latency,
            enable_statements=self._enable_statements if transaction_mode else None,
        )
        return relay

    # --- the data plane's side (trioproxy/_server/dataplane.py) ------------------------

    def _parks(self, pending: bytearray) -> bool:
        """Wait for the next request in the data plane? (Nothing half read or held.)"""
        return (
            self.proxy.dataplane.running
            and self.proxy.config.proxy.data_plane
            and not pending
            and self.scanner.at_boundary
            and not self.transport.buffered
        )

    def may_link_now(self, messages: list[ScannedMessage]) -> bool:
        """(Data plane, between transactions) Can these client messages be served without
        this task: whole requests now awaiting answers, nothing that needs it (shutdown,
        admin KILL or PAUSE)?"""
        return (
            bool(messages)
            and messages[-1][0] in _AWAITS_ANSWERS
            and self.scanner.at_boundary
            and not self.proxy.draining
            and self.kill_reason is None
            and not self.proxy.is_paused(self.database)
        )

    def link_with(self, conn: ServerConnection, messages: list[ScannedMessage]) -> Relay | None:
        """(Data plane) Link to ``conn``, borrowed for this client, if its session
        parameters are this client's already; None otherwise (the client task sets them)."""
        self.server = conn
        if conn.transport.buffered or not self._parameters_in_sync(conn):
            return None
        return self._new_relay(conn, messages)

    # Express requests (trioproxy/_session/express.py): served without a Relay.

    def express_ready(self) -> bool:
        """(Data plane, between transactions) May a request be served express? Only when
        none of the session's state is in play: transaction mode, no pin or pending
        unpin, no parameters to read back, nothing for this task. (Prepared statements
        are fine: an express request either names none or one the server holds.)"""
        session = self.session
        return (
            self.server is None
            and not session.pins
            and not session.named_statements
            and not session.pending
            and not session.touched
            and not session.reset_all
            and not self._reset_server
            and self.pool_mode is PoolMode.TRANSACTION
            and not self.proxy.draining
            and self.kill_reason is None
            and not self.proxy.is_paused(self.database)
        )

    def express_bound(self, request: bytes) -> bool:
        """(Data plane) Is ``request`` a run of a statement this client prepared whose
        Bind may go express (``express_bind``, ``StatementDef.express``)? Noted for
        ``link_express``."""
        if request[0] != Frontend.BIND:
            return False  # (asked of every request express_query turned down)
        found = express_bind(request, self.config.proxy.max_message_size)
        if found is None:
            return False
        definition = self.statements.statements.get(found[0])
        if definition is None or not definition.express:
            return False
        self._express_bind = (definition, found[1], found[2])
        return True

    def express_messages(self, request: bytes) -> list[ScannedMessage]:
        """What this client's scanner, at its boundary, says about an express request
        (which it was not given: a request of whole messages leaves it where it is)."""
        scanner = StreamScanner(
            inspect=CLIENT_INSPECT, max_message_size=self.config.proxy.max_message_size
        )
        return scanner.feed(request)

    def express_sent(self, request: bytes) -> None:
        """(Data plane) An express request went out: what ``_on_client_message`` would
        note about it, which is only debug_logging's line (a Relay it turns into later
        does not log it again: ``relay_for(sent=True)``)."""
        if not self.config.proxy.debug_logging:
            return
        if request[0] == Frontend.QUERY:
            self._log_statement("query", request[5:-1].decode("ascii"))
        elif request[0] == Frontend.PARSE:  # the unnamed statement: name (empty), then SQL
            self._log_statement("parse", request[6 : request.index(b"\0", 6)].decode("ascii"))

    def link_express(self, conn: ServerConnection, request: bytes) -> bytes | None:
        """(Data plane) ``link_with`` for an express request: the bytes to send on
        ``conn``, borrowed for this client, if it is ready for them as it is; None when
        the general path must go first (parameters to set, a statement to prepare).
        A Bind names the server's statement, exactly as ``LinkedMapper`` would."""
        self.server = conn
        if conn.transport.buffered or not self._parameters_in_sync(conn):
            return None
        if request[0] != Frontend.BIND:
            return request
        assert self._express_bind is not None
        definition, start, end = self._express_bind
        held = conn.statements
        if definition.server_name not in held:
            return None
        held.touch(definition.server_name)
        return definition.bind_message(b"", request[start:end]) + request[end:]

    def relay_for(self, conn: ServerConnection, request: bytes, *, sent: bool) -> Relay:
        """(Data plane) The ``Relay`` an express link becomes when the general path must
        go on with it: built, and given the request's accounting (sent to the server, or
        held in its transport to be flushed), exactly as if the link had started that
        way. The bytes it prepares are the ones ``link_express`` sent."""
        messages = self.express_messages(request)
        relay = self._new_relay(conn, messages)
        self._logged_already = sent  # by express_sent()
        try:
            data = relay.prepare_to_server(request, messages)
        finally:
            self._logged_already = False
        if data is not None:
            if sent:
                relay.sent_to_server(len(data))
            else:
                relay.pending_count = len(data)
        return relay

    def express_done(
        self, conn: ServerConnection, request: bytes, answer: int, errors: int, sent_at: float
    ) -> None:
        """(Data plane) An express transaction ended at ReadyForQuery('I'): what
        ``end_link_now`` does for a Relay (statistics, latency, the connection back). The
        request's debug_logging line went out with it (``express_sent``)."""
        stats = self.proxy.stats
        stats.bytes_from_clients += len(request)
        stats.bytes_from_servers += answer
        stats.query_requests += 1
        self.proxy.response_latency.observe(perf_counter() - sent_at)
        self._errors_checked = errors  # what _hold() would have noted at this boundary
        self.transactions += 1
        self.server = None
        assert self.pool is not None
        self.pool.release(conn, clean=True)

    def idle_deadline(self) -> float:
        timeout = self.config.proxy.idle_client_timeout
        return self.last_active + timeout if timeout > 0 else math.inf

    def end_link_now(self, relay: Relay) -> bool:
        """(Data plane, at RELEASE) End the link without waiting; False (nothing done)
        when that needs a wait: parameters to read back."""
        if self.session.touched or self.session.reset_all:
            return False
        self._mapping = False
        self._relay_in_progress = None
        self._count(relay)
        self.transactions += 1
        self._give_back_server()
        return True

    async def _park(self) -> Handback | None:
        """Wait in the data plane for the next request (idle_client_timeout applies);
        None when the proxy woke us."""
        dataplane = self.proxy.dataplane
        idle_timeout = self.config.proxy.idle_client_timeout
        self.last_active = trio.current_time()
        while True:
            with trio.CancelScope(deadline=self.idle_deadline()) as wait:
                self.wait_scope = wait
                try:
                    return await dataplane.park(self)
                finally:
                    self.wait_scope = None
            relay = self._relay_in_progress
            if relay is not None:
                return Handback(relay=relay)  # woken mid-request: finish it first
            queued, self.queued_request = self.queued_request, None
            if queued is not None:
                # Woken while queued for a server connection (connection_borrow_timeout,
                # shutdown): the request is ours to serve or to answer now.
                return queued
            if self._woken():
                return None
            if trio.current_time() < self.idle_deadline():
                continue  # active in the data plane since: not idle
            logger.info("client %d: closed after idle_client_timeout", self.id)
            await self._fatal(
                SQLState.IDLE_SESSION_TIMEOUT,
                "terminating connection due to idle_client_timeout "
                f"({idle_timeout:g} s without activity)",
            )
            return Handback()  # closed: the session ends as if the client had left

    def _count(self, relay: Relay) -> None:
        stats = self.proxy.stats
        stats.bytes_from_clients += relay.bytes_from_client
        stats.bytes_from_servers += relay.bytes_from_server
        stats.query_requests += relay.requests

    async def _after_relay(
        self, conn: ServerConnection, relay: Relay, outcome: Outcome
    ) -> Outcome | None:
        """Act on how a link ended; None means the client goes on."""
        self._count(relay)
        if outcome is Outcome.RELEASE:
            self.transactions += 1
            if self.session.touched or self.session.reset_all:
                try:
                    await self._read_back_parameters(conn)
                except (BackendError, TransportClosed, ProtocolError) as exc:
                    logger.warning("client %d: reading back parameters failed: %s", self.id, exc)
                    conn.close()
            self._give_back_server()
            return None
        if outcome is Outcome.CLIENT_GONE:
            self._give_back_server()
            return outcome
        if outcome is Outcome.IDLE_IN_TRANSACTION:
            self._give_back_server()
            await self._fatal(
                SQLState.IDLE_IN_TRANSACTION_TIMEOUT,
                "terminating connection due to idle-in-transaction timeout",
            )
            return outcome
        if outcome is Outcome.CLIENT_STALLED:
            logger.info(
                "client %d: stopped reading its results; closed after idle_in_transaction_timeout",
                self.id,
            )
            self._give_back_server()
            self.transport.close()  # half a message went to it: nothing more can follow
            return outcome
        if outcome is Outcome.CLIENT_PROTOCOL_ERROR:
            self._give_back_server()
            await self._fatal(SQLState.PROTOCOL_VIOLATION, relay.error or "protocol violation")
            return outcome
        # The server connection failed under this client.
        owed, in_tx = self.tracker.owed, self.tracker.in_transaction
        pinned = self.session.pinned or self.pool_mode is PoolMode.SESSION
        conn.close()
        self._give_back_server()
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


def _decode_inspected(type_: int, body: bytes) -> FrontendMessage:
    """``decode_frontend``, with shortcuts for the common cases of the hot path: a Query,
    and a Parse without parameter types (the same checks, without the generic cursor).
    Anything else, or anything malformed, takes the generic path, which says why."""
    try:
        if type_ == Frontend.QUERY:
            if body and body.find(b"\0") == len(body) - 1:
                return Query(body[:-1].decode())
        elif type_ == Frontend.PARSE:
            name_end = body.find(b"\0")
            sql_end = body.find(b"\0", name_end + 1) if name_end >= 0 else -1
            if sql_end >= 0 and body[sql_end + 1 :] == b"\0\0":  # no parameter types
                return Parse(body[:name_end].decode(), body[name_end + 1 : sql_end].decode())
    except UnicodeDecodeError:
        pass
    return decode_frontend(Message(type_, body))


def _has_named_parse(messages: list[ScannedMessage]) -> bool:
    for type_, body, _end in messages:  # noqa: SIM110 - a loop, not any(): per transaction
        if type_ == Frontend.PARSE and body and body[0] != 0:
            return True
    return False
