"""The byte relay: moves bytes between a linked client and server connection.

[shell] Kept a component of its own behind one call, ``Relay.run()``, so it can become a
batched data plane (one task multiplexing every linked pair) without touching the
client session, the pool or authentication.

Theory of operation. While linked, two pumps run in a private nursery:

* client -> server: read a chunk, let the scanner find the message boundaries, update the
  tracker *before* sending (so a ReadyForQuery can never look final while a message is
  on its way), then forward the chunk unchanged;
* server -> client: read a chunk, update the tracker, forward it unchanged.

After each send, the pump that sent checks whether the link may end (``_maybe_finish``):
``link_state`` (trioproxy/_session/link.py) must be IDLE: nothing owed, no open
transaction, the client at a message boundary, neither pump mid-send, the session not
pinned and not in session mode. Then it cancels the nursery. At that moment both pumps
are parked in ``receive_some``, which is safe to cancel; a send is never cancelled by the
relay itself.

Fast path. Most links are one request and its answer (autocommit statements, an extended
batch ending in Sync). When the client's first bytes end with a Query or a Sync, the
client task carries the answer itself: it forwards the request, relays the server's bytes
and releases at ReadyForQuery, with no nursery and no pump tasks (measured: -41% proxy CPU
per select-only transaction, +67% tps). It hands over to the two pumps, with both scanners'
state intact, as soon as the link must watch the client: an answer slower than
``INLINE_PATIENCE`` (the client may leave mid-query), COPY IN, or a transaction or pin that
outlives the answer.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

import trio

from trioproxy._protocol.codes import Backend, Frontend
from trioproxy._protocol.framing import Message, ScannedMessage, StreamScanner
from trioproxy._protocol.messages import ParameterStatus, Terminate, decode_backend
from trioproxy._server.transport import Transport, TransportClosed
from trioproxy._session.link import DECISION, Decision, LinkState, link_state
from trioproxy._session.tracker import ANSWERED_BY_READY, SERVER_TYPES
from trioproxy.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from trioproxy._pool.latency import LatencyHistogram
    from trioproxy._server.backend import ServerConnection
    from trioproxy._session.prepared import LinkedMapper
    from trioproxy._session.tracker import TransactionTracker

logger = logging.getLogger("trioproxy.relay")

_TERMINATE = Terminate().encode()


class Outcome(enum.Enum):
    #: Transaction finished: the server connection is clean and may go back to the pool.
    RELEASE = "release"
    #: The client said Terminate or closed its socket.
    CLIENT_GONE = "client gone"
    #: The server connection failed or closed (the client was not told yet).
    SERVER_FAILED = "server failed"
    #: The client sent bytes that break the protocol (not forwarded).
    CLIENT_PROTOCOL_ERROR = "client protocol error"
    #: Idle in transaction for longer than allowed.
    IDLE_IN_TRANSACTION = "idle in transaction timeout"
    #: The client stopped reading its results for longer than idle_in_transaction_timeout
    #: (the send to it was cut: the client stream is broken and gets closed).
    CLIENT_STALLED = "client stopped reading"


class Relay:
    """One linked period of a client and a server connection."""

    # One per transaction: slots make it cheaper to build and to use.
    __slots__ = (
        "_asked",
        "_client_tail",
        "_copy_started",
        "_enable_statements",
        "_hold",
        "_idle_in_tx",
        "_notice",
        "_on_client_message",
        "_on_parameter_status",
        "_outcome",
        "_receive_scope",
        "_response_latency",
        "_scope",
        "_server_tail",
        "_statements",
        "_terminating",
        "_to_client_busy",
        "_to_server_busy",
        "bytes_from_client",
        "bytes_from_server",
        "client",
        "client_scanner",
        "error",
        "pending_count",
        "requests",
        "server",
        "server_scanner",
        "tracker",
    )

    def __init__(
        self,
        *,
        client: Transport,
        server: ServerConnection,
        tracker: TransactionTracker,
        client_scanner: StreamScanner,
        server_scanner: StreamScanner,
        hold: Callable[[], tuple[bool, bool]],
        on_client_message: Callable[[int, bytes | None], None],
        on_parameter_status: Callable[[ParameterStatus], None],
        idle_in_transaction_timeout: float,
        statements: LinkedMapper | None = None,
        enable_statements: Callable[[ServerConnection], LinkedMapper] | None = None,
        response_latency: LatencyHistogram | None = None,
    ) -> None:
        self.client = client
        self.server = server
        self.tracker = tracker
        self.client_scanner = client_scanner
        self.server_scanner = server_scanner
        self._hold = hold
        self._on_client_message = on_client_message
        self._on_parameter_status = on_parameter_status
        self._idle_in_tx = idle_in_transaction_timeout
        #: Message mode: prepared statements are renamed/injected, so bytes are
        #: forwarded whole messages at a time (partial tails held back).
        self._statements = statements
        #: Switches to message mode mid-period, at a point where nothing is outstanding.
        self._enable_statements = enable_statements
        self._client_tail = b""
        self._server_tail = b""
        #: A message of the proxy's own for the client, sent at the next message boundary
        #: of the server stream (the server->client pump is the client's only writer).
        self._notice = b""
        #: The server asked for COPY data (CopyIn/CopyBoth): the client must be read.
        self._copy_started = False
        #: When each request still owed a ReadyForQuery was sent (for the latency metric).
        self._asked: deque[float] = deque()
        self._response_latency = response_latency
        self.requests = 0
        self._to_server_busy = False
        self._to_client_busy = False
        self._outcome: Outcome | None = None
        self.error: str | None = None
        self._scope: trio.CancelScope | None = None
        self._receive_scope: trio.CancelScope | None = None
        self.bytes_from_client = 0
        self.bytes_from_server = 0
        #: Terminate was among the client's messages: the link ends once the rest is sent.
        self._terminating = False
        #: (data plane hand-over) the byte count of the prepared chunk resume() finishes.
        self.pending_count = 0

    def _finish(self, outcome: Outcome, error: str | None = None) -> None:
        if self._outcome is None:
            self._outcome = outcome
            self.error = error
        if self._scope is not None:  # None on the inline fast path: nothing to cancel
            self._scope.cancel()

    def state(self, *, pinned: bool = False, session_mode: bool = False) -> LinkState:
        tracker = self.tracker
        return link_state(
            sending=self._to_server_busy or self._to_client_busy,
            client_at_boundary=self.client_scanner.at_boundary,
            owed=tracker.owed,
            unsynced=tracker.unsynced,
            mapping_idle=self._statements is None or self._statements.idle,
            copy_both=tracker.copy_both,
            tx_status=tracker.tx_status,
            pinned=pinned,
            session_mode=session_mode,
        )

    def release_if_idle(self) -> None:
        """End the link now if it is between transactions (called from another task;
        both pumps are then parked in receive_some, which is safe to cancel)."""
        if self._scope is not None and DECISION[self.state()] is Decision.RELEASE:
            self._finish(Outcome.RELEASE)

    def _maybe_finish(self) -> None:
        # The session is asked (and settles its pending unpins) only at a real
        # boundary, i.e. when everything else already allows a release.
        if self.tracker.owed > 0:
            return  # answers owed: AWAITING_ANSWERS at best, which keeps (as after a request)
        if self.may_release():
            self._finish(Outcome.RELEASE)

    async def run(
        self, initial: bytes = b"", initial_messages: Sequence[ScannedMessage] = ()
    ) -> Outcome:
        """Relay until the link may end; return why it ended.

        ``initial`` holds client bytes read before the link existed, already scanned
        (``initial_messages``): they go to the server first.
        """
        if initial and _answers_awaited(initial_messages) and self.client_scanner.at_boundary:
            # Fast path: the client sent whole requests and now waits for the answers, so
            # this task can carry them itself: no nursery, no pump tasks. It hands over to
            # the two pumps only if the link must go on (a transaction stays open, COPY IN).
            outcome = await self._run_inline(initial, initial_messages)
            if outcome is not None:
                return outcome
            initial = b""
        return await self._run_pumps(initial, initial_messages)

    async def _run_pumps(
        self, initial: bytes = b"", initial_messages: Sequence[ScannedMessage] = ()
    ) -> Outcome:
        """The two pumps, until the link may end (``initial``: client bytes to send first)."""
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            if self._outcome is not None:  # decided while handing over
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._server_to_client)
            if initial:
                await self._forward_to_server(initial, initial_messages)
            await self._client_to_server()
        assert self._outcome is not None
        return self._outcome

    async def _run_inline(
        self, initial: bytes, initial_messages: Sequence[ScannedMessage]
    ) -> Outcome | None:
        """Forward the client's requests and relay the answers in this task. Returns the
        outcome, or None when the pumps must take over (nothing is lost: both scanners
        keep their state, and the client's next bytes are still in its socket)."""
        await self._forward_to_server(initial, initial_messages)
        while not self._decided():
            # Only quick answers are carried inline: a slow one hands over to the pumps,
            # which also watch the client (a client gone mid-query must be noticed).
            chunk: bytes | None = None
            with trio.move_on_after(INLINE_PATIENCE):
                chunk = await self._receive_server()
            if chunk is None and not self._decided():
                break
            if chunk is not None:
                await self._handle_server_chunk(chunk)
            if self._decided() or self._copy_started:
                break
            if self.tracker.owed == 0:
                if self.may_release():
                    return Outcome.RELEASE
                break  # linked on (a transaction, a pin): the client must be read now
        return self._outcome

    # --- client -> server -----------------------------------------------------------

    def _maybe_enable_statements(self, messages: Sequence[ScannedMessage]) -> None:
        """A named Parse arrives in raw mode (e.g. after BEGIN): switch to message mode if
        the streams are at rest (nothing owed, no half message either way), so the answer
        queue can start empty and stay exact."""
        if (
            self._enable_statements is not None
            and self._statements is None
            and any(t == Frontend.PARSE and b and b[0] != 0 for t, b, _ in messages)
            and self.tracker.owed == 0
            and not self.tracker.unsynced
            and self.server_scanner.at_boundary
        ):
            self._statements = self._enable_statements(self.server)

    async def _forward_to_server(
        self, chunk: bytes, messages: Sequence[ScannedMessage], *, from_boundary: bool = True
    ) -> None:
        data = self.prepare_to_server(chunk, messages, from_boundary=from_boundary)
        if data is None:
            return
        if data:
            self._to_server_busy = True
            try:
                await self.server.transport.send_all(data)
            except TransportClosed as exc:
                self._finish(Outcome.SERVER_FAILED, f"could not send to server: {exc}")
                return
            finally:
                self._to_server_busy = False
        self.sent_to_server(len(data))

    def prepare_to_server(
        self, chunk: bytes, messages: Sequence[ScannedMessage], *, from_boundary: bool = True
    ) -> bytes | None:
        """Account for the client's scanned bytes; return what goes to the server (None:
        nothing does, the outcome is decided). Sync: the data plane calls it too."""
        if from_boundary:
            self._maybe_enable_statements(messages)
        terminate_end = -1
        now = perf_counter()  # (a duration's start: the cheapest monotonic clock)
        for type_, body, end in messages:
            if type_ == Frontend.TERMINATE:
                terminate_end = end
                break
            if type_ in ANSWERED_BY_READY:
                self._asked.append(now)
                self.requests += 1
            try:
                self.tracker.client_message(type_)
            except ProtocolError as exc:
                self._finish(Outcome.CLIENT_PROTOCOL_ERROR, exc.message)
                return None
            self._on_client_message(type_, body)
        if terminate_end >= 0:
            # Everything before Terminate still goes to the server; Terminate (the last
            # message a client may send) does not: the pool keeps the connection.
            chunk = chunk[: terminate_end - len(_TERMINATE)]
            messages = [m for m in messages if m[2] <= terminate_end - len(_TERMINATE)]
            self._terminating = True
        if self._statements is not None:
            try:
                chunk = self._translate_client(chunk, messages)
            except ProtocolError as exc:
                self._finish(Outcome.CLIENT_PROTOCOL_ERROR, exc.message)
                return None
        return chunk

    def sent_to_server(self, count: int) -> None:
        """The bytes prepare_to_server() returned are on their way."""
        self.bytes_from_client += count
        if self._terminating:
            self._finish(Outcome.CLIENT_GONE)
            return
        self._maybe_finish()

    def notice_to_client(self, message: bytes) -> None:
        self._notice += message

    def _translate_client(self, chunk: bytes, messages: Sequence[ScannedMessage]) -> bytes:
        mapper = self._statements
        assert mapper is not None
        out: list[bytes] = []
        start = 0
        tail = self._client_tail
        for type_, _body, end in messages:
            raw = tail + chunk[start:end]
            tail = b""
            out.append(mapper.client_message(type_, raw[5:], raw))
            start = end
        self._client_tail = tail + chunk[start:]
        return b"".join(out)

    def _translate_server(self, chunk: bytes, messages: Sequence[ScannedMessage]) -> bytes:
        mapper = self._statements
        assert mapper is not None
        out: list[bytes] = []
        start = 0
        tail = self._server_tail
        for type_, _body, end in messages:
            raw = tail + chunk[start:end]
            tail = b""
            out.append(mapper.server_message(type_, raw))
            start = end
        self._server_tail = tail + chunk[start:]
        return b"".join(out)

    def _arm_idle_in_transaction(self) -> None:
        """Start the idle-in-transaction clock when the server has answered everything
        inside an open transaction; any client byte stops it."""
        if self._idle_in_tx > 0 and self._receive_scope is not None:
            if self.tracker.in_transaction and not self.tracker.waiting_for_server:
                self._receive_scope.deadline = trio.current_time() + self._idle_in_tx
            else:
                self._receive_scope.deadline = math.inf

    async def _client_to_server(self) -> None:
        while True:
            try:
                with trio.CancelScope() as scope:
                    self._receive_scope = scope
                    self._arm_idle_in_transaction()
                    chunk = await self.client.receive_some()
                self._receive_scope = None
                if scope.cancelled_caught:
                    self._finish(Outcome.IDLE_IN_TRANSACTION)
                    return
            except TransportClosed:
                chunk = b""
            if not chunk:
                self._finish(Outcome.CLIENT_GONE)
                return
            from_boundary = self.client_scanner.at_boundary
            try:
                messages = self.client_scanner.feed(chunk)
            except ProtocolError as exc:
                self._finish(Outcome.CLIENT_PROTOCOL_ERROR, exc.message)
                return
            await self._forward_to_server(chunk, messages, from_boundary=from_boundary)

    # --- server -> client -----------------------------------------------------------

    async def _server_to_client(self) -> None:
        while not self._decided():
            chunk = await self._receive_server()
            if chunk is not None:
                await self._handle_server_chunk(chunk)
            if not self._decided():
                self._maybe_finish()

    def _decided(self) -> bool:
        return self._outcome is not None

    async def _receive_server(self) -> bytes | None:
        """The server's next bytes; None when it failed (the outcome is then set).
        Cancelling it is safe: nothing is consumed before the bytes are returned."""
        transport = self.server.transport
        try:
            chunk = await transport.receive_some()
        except TransportClosed as exc:
            self._finish(Outcome.SERVER_FAILED, str(exc))
            return None
        if not chunk:
            transport.broken = True
            self._finish(Outcome.SERVER_FAILED, "server closed the connection unexpectedly")
            return None
        return chunk

    async def _handle_server_chunk(self, chunk: bytes) -> None:
        """Account for one chunk of the server's bytes and forward it to the client."""
        data = self.prepare_to_client(chunk)
        if data is None:
            return
        if data and not await self.send_to_client(data):
            return
        self.sent_to_client(len(data))

    def prepare_to_client(self, chunk: bytes) -> bytes | None:
        """Account for a chunk of the server's bytes; return what goes to the client (None:
        the server broke the protocol, the outcome is decided). Sync: the data plane calls
        it too."""
        transport = self.server.transport
        at_boundary = self.server_scanner.at_boundary
        try:
            scanned = self.server_scanner.feed(chunk)
            for type_, body, _end in scanned:
                if type_ not in _SERVER_NOTABLE:
                    continue  # DataRow, RowDescription, ...: nothing to account for
                if type_ == Backend.READY_FOR_QUERY and self._asked:
                    asked = self._asked.popleft()
                    if self._response_latency is not None:
                        self._response_latency.observe(perf_counter() - asked)
                self.tracker.server_message(type_, body)
                if type_ in _COPY_STARTS:
                    self._copy_started = True
                if type_ == Backend.PARAMETER_STATUS and body is not None:
                    status = decode_backend(Message(type_, body))
                    assert isinstance(status, ParameterStatus)
                    self.server.set_parameter(status.name, status.value)
                    self._on_parameter_status(status)
        except ProtocolError as exc:
            transport.broken = True
            self._finish(Outcome.SERVER_FAILED, f"protocol error from server: {exc.message}")
            return None
        if self._statements is not None:
            chunk = self._translate_server(chunk, scanned)
            at_boundary = True  # message mode forwards whole messages only
        if self._notice and at_boundary:
            chunk, self._notice = self._notice + chunk, b""
        return chunk

    async def send_to_client(self, data: bytes, *, flush: bool = False) -> bool:
        """Send to the client (or, with ``flush``, what the data plane could not), with
        backpressure; False when that failed (the outcome is then decided)."""
        client = self.client
        self._to_client_busy = True
        try:
            if self._idle_in_tx <= 0:
                # Backpressure: while the client does not read, neither do we (memory
                # stays bounded).
                await (client.flush() if flush else client.send_all(data))
            else:
                # ... and a client that stops reading for longer than
                # idle_in_transaction_timeout loses its connection, not the server.
                with trio.move_on_after(self._idle_in_tx) as stalled:
                    await (client.flush() if flush else client.send_all(data))
                if stalled.cancelled_caught:
                    self._finish(Outcome.CLIENT_STALLED)
                    return False
        except TransportClosed:
            self._finish(Outcome.CLIENT_GONE)
            return False
        finally:
            self._to_client_busy = False
        return True

    def sent_to_client(self, count: int) -> None:
        """The bytes prepare_to_client() returned reached the client."""
        self.bytes_from_server += count
        self.server.tx_status = self.tracker.tx_status
        self._arm_idle_in_transaction()

    # --- hand-over from the data plane (trioproxy/_server/dataplane.py) ---------------

    @property
    def decided(self) -> bool:
        return self._outcome is not None

    @property
    def copy_started(self) -> bool:
        return self._copy_started

    @property
    def needs_timer(self) -> bool:
        """Does an open transaction here need idle_in_transaction_timeout's clock?"""
        return self._idle_in_tx > 0

    def may_release(self) -> bool:
        """Nothing owed: may the link end here? (Asks the session, which settles pending
        unpins, only when everything else already allows it.)"""
        if DECISION[self.state()] is not Decision.RELEASE:
            return False
        pinned, session_mode = self._hold()
        if not pinned and not session_mode:
            return True  # the state just computed, which assumed exactly that
        return DECISION[self.state(pinned=pinned, session_mode=session_mode)] is Decision.RELEASE

    def fail(self, outcome: Outcome, error: str | None = None) -> None:
        """Decide the outcome from outside (the data plane saw a socket fail)."""
        self._finish(outcome, error)

    async def resume(self, *, flush_server: bool = False, flush_client: bool = False) -> Outcome:
        """Go on with a link the data plane started: first the rest of a send the kernel
        did not take whole (the transport holds it), then as run() would."""
        if flush_server and not self.decided:
            self._to_server_busy = True
            try:
                await self.server.transport.flush()
            except TransportClosed as exc:
                self._finish(Outcome.SERVER_FAILED, f"could not send to server: {exc}")
            finally:
                self._to_server_busy = False
            if not self.decided:
                self.sent_to_server(self.pending_count)
        elif flush_client and not self.decided and await self.send_to_client(b"", flush=True):
            self.sent_to_client(self.pending_count)
        self.pending_count = 0
        decided = self._outcome
        if decided is not None:
            return decided
        if self.tracker.owed == 0 and not self._copy_started and self.may_release():
            return Outcome.RELEASE
        return await self._run_pumps()


SERVER_INSPECT = frozenset({Backend.READY_FOR_QUERY, Backend.PARAMETER_STATUS})
#: How long the inline fast path waits for the server before the pumps take over.
INLINE_PATIENCE = 0.05
_COPY_STARTS = frozenset({Backend.COPY_IN_RESPONSE, Backend.COPY_BOTH_RESPONSE})
#: Server messages the relay (or the tracker) does something about; the rest pass.
_SERVER_NOTABLE = SERVER_TYPES | _COPY_STARTS | {Backend.PARAMETER_STATUS}


def _answers_awaited(messages: Sequence[ScannedMessage]) -> bool:
    """Does the client now wait for answers (its last message a Query or a Sync)?"""
    return bool(messages) and messages[-1][0] in (Frontend.QUERY, Frontend.SYNC)


CLIENT_INSPECT = frozenset({Frontend.QUERY, Frontend.PARSE, Frontend.CLOSE})
