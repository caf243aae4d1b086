"""The batched data plane: one task moves the bytes of every parked client's requests.

[shell] Why: with one task per client, each transaction costs at least two trips through
trio's scheduler (wait for the client, wait for the server), each with its epoll
re-registration and a cancel scope. PERFORMANCE.md measured that floor at about twice
PgBouncer's CPU; one task draining a private epoll for all sockets came within 1.2x.

Theory of operation. A client task with nothing to do between transactions *parks* here
(``park()``): its socket joins the private epoll and the task sleeps. This task waits
for that epoll in trio (one wait for any number of ready sockets) and then, per ready
socket, does the whole common transaction without a single trio wait:

1. client readable: read, scan, and if the bytes are whole requests the client now
   waits answers for, borrow an idle server connection at once (``try_borrow``), or
   queue for one in the pool's own FIFO with a callback instead of a task
   (``BackendPool.join_queue``; a watchdog task keeps connection_borrow_timeout); check
   its session parameters, and send; the server's socket joins the epoll;
2. server readable: read, account (tracker, pinning, latency), send to the client; at
   ReadyForQuery with nothing owed and the link table saying RELEASE, give the server
   connection back. The client stays parked for its next request. A transaction block,
   a pin or session mode keeps the link here: the client's next statement is forwarded
   as it comes (what the client-to-server pump would do).

Anything else goes back to the client task (a *hand-back*) with the state as it is: the
bytes read and scanned (the pool would open a connection, parameters to set, a half
message, PAUSE, KILL, shutdown, a logout), or a link in progress (COPY, an open
transaction under idle_in_transaction_timeout, a protocol error, a server that fails, a
send the kernel did not take whole). The client task then goes on exactly as if it had
read the bytes itself, or resumes the link (``Relay.resume``). So every slow or rare
path, its timeouts and its backpressure, stays in the client task; this task only ever
does non-blocking socket calls.

Cancellation: a parked task's wait is cancellable at any moment (idle_client_timeout,
shutdown, admin KILL, the nursery). The abort takes its sockets out of the epoll and the
client out of the pool's queue at once; a link in progress is then the client task's to
finish (its ``_relay_in_progress``), or to close if the cancellation goes on outward, and
a queued request its to serve (``queued_request``). Nothing is ever lost between the two: this
task and the client task never run at the same time, and each step here is synchronous.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import select
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING

import attrs
import outcome
import trio

from trioproxy._protocol.framing import ScannedMessage
from trioproxy._server.relay import Outcome, Relay
from trioproxy._server.transport import Transport, TransportClosed
from trioproxy._session.express import express_answer, express_query
from trioproxy.errors import ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

    from trioproxy._pool.pool import BackendPool, Waiter
    from trioproxy._server.backend import ServerConnection
    from trioproxy._server.client import ClientSession

logger = logging.getLogger("trioproxy.dataplane")

#: Events taken from the epoll per wake-up (more wait for the next round).
BATCH = 256


@attrs.frozen
class Handback:
    """What a parked client task wakes up to."""

    #: Client bytes read here (``b""``: the client closed); scanned already when
    #: ``scanned`` is not None. A server connection may be borrowed (``session.server``).
    chunk: bytes = b""
    scanned: list[ScannedMessage] | None = None
    #: A link in progress for the client task to go on with (``Relay.resume``), and
    #: which side holds the rest of a send the kernel did not take whole.
    relay: Relay | None = None
    flush_server: bool = False
    flush_client: bool = False
    #: The request waited for a server connection in the data plane since then
    #: (connection_borrow_timeout counts from there).
    queued_at: float | None = None


class _Parked:
    __slots__ = (
        "client_fd",
        "express_conn",
        "express_sent_at",
        "on_assigned",
        "queued_at",
        "relay",
        "request",
        "server_fd",
        "session",
        "task",
        "waiter",
    )

    def __init__(self, session: ClientSession, task: trio.lowlevel.Task, client_fd: int) -> None:
        self.session = session
        self.task = task
        self.client_fd = client_fd
        self.relay: Relay | None = None
        self.server_fd = -1
        #: Queued for a server connection: the pool's waiter, the request and since when.
        #: The request's messages are None for an express one (not scanned).
        self.waiter: Waiter | None = None
        self.request: tuple[bytes, list[ScannedMessage] | None] = (b"", [])
        self.queued_at = 0.0
        self.on_assigned: Callable[[], None] | None = None
        #: An express link (trioproxy/_session/express.py): its server connection, once
        #: the request (``request[0]``) went out whole, and when.
        self.express_conn: ServerConnection | None = None
        self.express_sent_at = 0.0

    def queued_request(self) -> Handback | None:
        if self.waiter is None:
            return None
        chunk, messages = self.request
        if messages is None:
            messages = self.session.express_messages(chunk)
        return Handback(chunk=chunk, scanned=messages, queued_at=self.queued_at)


class DataPlane:
    """Run ``run()`` in a nursery; client tasks ``await park(session)``."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._task: trio.lowlevel.Task | None = None
        #: fd (a parked client's, or its linked server connection's) -> its entry.
        self._parked: dict[int, _Parked] = {}
        #: Server sockets left in the epoll between their links (fd -> its transport):
        #: a connection linked here again and again costs no epoll_ctl per transaction.
        #: One that becomes readable while not linked here (its next borrower is a
        #: client task, or the server spoke while it was idle) is taken out at once.
        self._watched: dict[int, Transport] = {}
        #: Queued entries the pool assigned something to, and the eventfd that wakes us
        #: when that happened in another task.
        self._assigned: deque[_Parked] = deque()
        self._wake_fd = -1
        self._wake_pending = False
        #: Per pool, the entries queued in it, oldest first (with the waiter they were
        #: queued with: an entry served meanwhile is skipped), and the wake-up of the task
        #: that hands back those that waited connection_borrow_timeout.
        self._queues: dict[BackendPool, deque[tuple[_Parked, Waiter]]] = {}
        self._queue_started: trio.Event | None = None
        #: Transactions served here from start to end, and hand-backs (for tests/stats).
        self.transactions = 0
        self.handbacks = 0
        #: Of those transactions, the ones served express (without a Relay).
        self.express = 0
        #: trio.current_time() of the batch being served.
        self._now = 0.0

    @property
    def running(self) -> bool:
        return self._epoll is not None

    @property
    def parked(self) -> int:
        return len({id(entry) for entry in self._parked.values()})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epoll = select.epoll()
        wake_fd = self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        epoll.register(wake_fd, select.EPOLLIN)
        self._epoll, self._task = epoll, trio.lowlevel.current_task()
        parked = self._parked
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_queued)
                task_status.started()
                await self._serve(epoll, wake_fd, parked)
        finally:
            self._epoll = self._task = None
            epoll.close()
            os.close(wake_fd)
            self._assigned.clear()
            self._watched.clear()
            # Not reached with tasks parked in normal operation (they are cancelled with
            # us); if it is, nobody must sleep forever.
            for entry in list({id(e): e for e in parked.values()}.values()):
                self._fail(entry, TransportClosed("the data plane stopped"))

    async def _serve(self, epoll: select.epoll, wake_fd: int, parked: dict[int, _Parked]) -> None:
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            now = self._now = trio.current_time()
            for fd, _events in epoll.poll(0, BATCH):
                entry = parked.get(fd)
                if entry is None:
                    if fd == wake_fd:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(wake_fd)
                        self._wake_pending = False
                    else:  # a watched server socket not linked here (or gone meanwhile)
                        self._unwatch(fd)
                    continue
                try:
                    if fd == entry.client_fd:
                        entry.session.last_active = now
                        self._client_ready(entry)
                    else:
                        self._server_ready(entry)
                except Exception as exc:  # a bug in one session must not stop the rest
                    self._fail(entry, exc)
            self._serve_assigned()

    async def park(self, session: ClientSession) -> Handback:
        """Sleep until this client needs its task again. Cancelling it is safe at any
        moment: a link in progress stays in ``session._relay_in_progress``, a request
        queued for a server connection goes to ``session.queued_request``."""
        epoll = self._epoll
        assert epoll is not None
        fd = session.transport.fileno()
        entry = _Parked(session, trio.lowlevel.current_task(), fd)
        self._parked[fd] = entry
        epoll.register(fd, select.EPOLLIN)

        def abort(_raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            session.queued_request = entry.queued_request()
            self._unpark(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        handback: Handback = await trio.lowlevel.wait_task_rescheduled(abort)
        return handback

    # --- internals --------------------------------------------------------------------

    def _unpark(self, entry: _Parked) -> None:
        if entry.express_conn is not None:
            # Its task takes over mid-request (cancelled, or failed): it gets the link as
            # an ordinary Relay, which knows an answer is owed.
            try:
                self._to_relay(entry)
            except Exception:  # (the connection was closed: the task sees it failed)
                logger.exception("client %d: express link not handed over", entry.session.id)
        parked, epoll = self._parked, self._epoll
        if parked.pop(entry.client_fd, None) is not None and epoll is not None:
            try:  # noqa: SIM105 - per transaction: no context manager
                epoll.unregister(entry.client_fd)
            except (OSError, ValueError):
                pass  # closed meanwhile: the kernel dropped it
        self._unlink(entry)
        waiter, entry.waiter = entry.waiter, None
        if waiter is not None:
            pool = entry.session.pool
            assert pool is not None
            pool.leave_queue(waiter)

    def _unlink(self, entry: _Parked) -> None:
        """The link ends here: its server socket stays watched (see ``_watched``)."""
        fd, entry.server_fd, entry.relay = entry.server_fd, -1, None
        entry.express_conn = None
        if fd >= 0:
            self._parked.pop(fd, None)

    def _watch(self, fd: int, transport: Transport) -> None:
        """Make sure a server socket being linked here is in the epoll."""
        if self._watched.get(fd) is transport:
            return  # still in since its last link here
        assert self._epoll is not None
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # (in, for a transport of the past: the kernel kept it)
            self._epoll.modify(fd, select.EPOLLIN)
        self._watched[fd] = transport

    def _unwatch(self, fd: int) -> None:
        """Take out a watched server socket (its reader is elsewhere now). A descriptor
        closed meanwhile left the epoll by itself."""
        self._watched.pop(fd, None)
        if self._epoll is not None:
            try:  # noqa: SIM105 - per event: no context manager
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def _hand_back(self, entry: _Parked, handback: Handback) -> None:
        self.handbacks += 1
        self._unpark(entry)
        trio.lowlevel.reschedule(entry.task, outcome.Value(handback))

    def _fail(self, entry: _Parked, exc: BaseException) -> None:
        """Give the client task an exception (a bug met while serving it: its task turns
        it into an ErrorResponse and closes), if it is still parked here."""
        if self._parked.get(entry.client_fd) is not entry:
            # Handed back already (the failure came after): its task is running on.
            logger.error("client %d: error after hand-back", entry.session.id, exc_info=exc)
            return
        self._unpark(entry)
        trio.lowlevel.reschedule(entry.task, outcome.Error(exc))

    def _client_ready(self, entry: _Parked) -> None:
        session = entry.session
        request = entry.queued_request()
        if request is not None:
            # The client speaks while its request waits for a server connection
            # (pipelining, leaving): its own task takes over.
            self._hand_back(entry, request)
            return
        if entry.express_conn is not None:
            # The client speaks while its express request is answered (pipelining,
            # leaving): the general path goes on with it.
            self._relay_client(entry, self._to_relay(entry))
            return
        if entry.relay is not None:
            self._relay_client(entry, entry.relay)
            return
        try:
            chunk = session.transport.receive_ready()
        except TransportClosed:
            chunk = b""
        if chunk is None:
            return
        if not chunk:
            self._hand_back(entry, Handback())
            return
        messages: list[ScannedMessage] | None
        if (
            express_query(chunk, session.config.proxy.max_message_size)
            or session.express_bound(chunk)
        ) and session.express_ready():
            messages = None  # whole messages: the scanner stays at its boundary
        else:
            messages = session.scanner.feed(chunk)
            if not session.may_link_now(messages):
                self._hand_back(entry, Handback(chunk=chunk, scanned=messages))
                return
        pool = session.pool
        assert pool is not None
        conn = pool.try_borrow()
        if conn is None:
            # Queue with everyone else, without the task: the pool's callback brings the
            # connection here; _expire_queued() enforces connection_borrow_timeout.
            on_assigned = entry.on_assigned
            if on_assigned is None:
                on_assigned = entry.on_assigned = functools.partial(self._on_assigned, entry)
            waiter = pool.join_queue(on_assigned)
            if waiter is None:  # the pool would open a connection: the task's job
                scanned = session.express_messages(chunk) if messages is None else messages
                self._hand_back(entry, Handback(chunk=chunk, scanned=scanned))
                return
            entry.waiter, entry.request, entry.queued_at = waiter, (chunk, messages), self._now
            queue = self._queues.get(pool)
            if queue is None:
                queue = self._queues[pool] = deque()
            while queue and queue[0][0].waiter is not queue[0][1]:
                queue.popleft()  # served or gone
            queue.append((entry, waiter))
            if self._queue_started is not None:
                self._queue_started.set()
            return
        self._start(entry, conn, chunk, messages)

    def _on_assigned(self, entry: _Parked) -> None:
        """The pool's callback (any task, inside the pool's bookkeeping): take note only."""
        self._assigned.append(entry)
        if trio.lowlevel.current_task() is not self._task and not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def _serve_assigned(self) -> None:
        assigned = self._assigned
        while assigned:
            entry = assigned.popleft()
            waiter = entry.waiter
            if waiter is None or self._parked.get(entry.client_fd) is not entry:
                continue  # gone meanwhile (its cancel handed the assignment on)
            try:
                pool = entry.session.pool
                assert pool is not None
                conn = pool.collect(waiter)
                if conn is None:  # borrow the usual way
                    handback = entry.queued_request()
                    assert handback is not None
                    self._hand_back(entry, handback)
                    continue
                entry.waiter = None
                chunk, messages = entry.request
                self._start(entry, conn, chunk, messages)
            except Exception as exc:
                self._fail(entry, exc)

    async def _expire_queued(self) -> None:
        """Hand back the requests queued for connection_borrow_timeout (their tasks then
        answer the timeout, as a borrowing task would)."""
        queues = self._queues
        while True:
            now = trio.current_time()
            next_deadline = math.inf
            for pool, queue in list(queues.items()):
                while queue:
                    entry, waiter = queue[0]
                    if entry.waiter is not waiter:
                        queue.popleft()  # served or gone
                        continue
                    timeout = entry.session.config.pool.connection_borrow_timeout
                    if entry.queued_at + timeout > now:
                        next_deadline = min(next_deadline, entry.queued_at + timeout)
                        break
                    queue.popleft()
                    handback = entry.queued_request()
                    assert handback is not None
                    self._hand_back(entry, handback)
                if not queue:
                    del queues[pool]
            if next_deadline == math.inf:
                self._queue_started = trio.Event()
                await self._queue_started.wait()
                self._queue_started = None
            else:
                await trio.sleep_until(next_deadline)

    def _start(
        self,
        entry: _Parked,
        conn: ServerConnection,
        chunk: bytes,
        messages: list[ScannedMessage] | None,
    ) -> None:
        """Link the client to ``conn`` (borrowed for it) and send its request."""
        if messages is None:
            data = entry.session.link_express(conn, chunk)
            if data is not None:
                self._start_express(entry, conn, chunk, data)
                return
            messages = entry.session.express_messages(chunk)
        relay = entry.session.link_with(conn, messages)
        if relay is None:  # parameters to set first: the task's job (it has ``conn``)
            self._hand_back(entry, Handback(chunk=chunk, scanned=messages))
            return
        if not self._forward(entry, relay, chunk, messages, from_boundary=True):
            return
        entry.relay = relay
        entry.server_fd = fd = conn.transport.fileno()
        self._parked[fd] = entry
        self._watch(fd, conn.transport)

    def _start_express(
        self, entry: _Parked, conn: ServerConnection, request: bytes, data: bytes
    ) -> None:
        """Send an express request (``data``: as the server gets it); its answer is
        checked in ``_express_ready``."""
        try:
            sent = conn.transport.send_nowait(data)
        except TransportClosed as exc:
            relay = entry.session.relay_for(conn, request, sent=False)
            relay.fail(Outcome.SERVER_FAILED, f"could not send to server: {exc}")
            self._hand_back(entry, Handback(relay=relay))
            return
        if not sent:  # the transport holds the rest
            relay = entry.session.relay_for(conn, request, sent=False)
            self._hand_back(entry, Handback(relay=relay, flush_server=True))
            return
        entry.session.express_sent(request)
        entry.request = (request, None)
        entry.express_conn = conn
        entry.express_sent_at = perf_counter()
        entry.server_fd = fd = conn.transport.fileno()
        self._parked[fd] = entry
        self._watch(fd, conn.transport)

    def _to_relay(self, entry: _Parked) -> Relay:
        """An express link in flight becomes an ordinary one (its request went out whole;
        its answer, if any came, is the caller's to pass on)."""
        conn, entry.express_conn = entry.express_conn, None
        assert conn is not None
        try:
            relay = entry.session.relay_for(conn, entry.request[0], sent=True)
        except BaseException:
            conn.close()  # an answer is owed on it: it must never be reused
            raise
        entry.relay = relay
        return relay

    def _express_ready(self, entry: _Parked, conn: ServerConnection) -> None:
        """The server answers an express request: pass it on and release the connection
        if it is exactly the expected answer; otherwise the general path takes it."""
        session = entry.session
        try:
            chunk = conn.transport.receive_ready()
        except TransportClosed as exc:
            relay = self._to_relay(entry)
            relay.fail(Outcome.SERVER_FAILED, str(exc))
            self._hand_back(entry, Handback(relay=relay))
            return
        if chunk is None:
            return
        errors = express_answer(chunk, session.config.proxy.max_message_size) if chunk else None
        if errors is None:
            self._server_chunk(entry, self._to_relay(entry), chunk)
            return
        try:
            sent = session.transport.send_nowait(chunk)
        except TransportClosed:
            sent = None
        if not sent:
            relay = self._to_relay(entry)
            data = relay.prepare_to_client(chunk)
            if sent is None or data is None:
                relay.fail(Outcome.CLIENT_GONE)
                self._hand_back(entry, Handback(relay=relay))
            else:
                relay.pending_count = len(data)
                self._hand_back(entry, Handback(relay=relay, flush_client=True))
            return
        request = entry.request[0]
        sent_at = entry.express_sent_at
        self._unlink(entry)
        session.express_done(conn, request, len(chunk), errors, sent_at)
        self.transactions += 1
        self.express += 1

    def _relay_client(self, entry: _Parked, relay: Relay) -> None:
        """The client speaks while linked (the next statement of its transaction, a
        pipelined request): forward, as the client-to-server pump would."""
        try:
            chunk = entry.session.transport.receive_ready()
        except TransportClosed:
            chunk = b""
        if chunk is None:
            return
        if not chunk:
            relay.fail(Outcome.CLIENT_GONE)
            self._hand_back(entry, Handback(relay=relay))
            return
        scanner = relay.client_scanner
        from_boundary = scanner.at_boundary
        try:
            messages = scanner.feed(chunk)
        except ProtocolError as exc:
            relay.fail(Outcome.CLIENT_PROTOCOL_ERROR, exc.message)
            self._hand_back(entry, Handback(relay=relay))
            return
        self._forward(entry, relay, chunk, messages, from_boundary=from_boundary)

    def _forward(
        self,
        entry: _Parked,
        relay: Relay,
        chunk: bytes,
        messages: list[ScannedMessage],
        *,
        from_boundary: bool,
    ) -> bool:
        """Send the client's bytes to the server; False when the client task took over."""
        data = relay.prepare_to_server(chunk, messages, from_boundary=from_boundary)
        if data is None:
            self._hand_back(entry, Handback(relay=relay))
            return False
        try:
            sent = relay.server.transport.send_nowait(data) if data else True
        except TransportClosed as exc:
            relay.fail(Outcome.SERVER_FAILED, f"could not send to server: {exc}")
            self._hand_back(entry, Handback(relay=relay))
            return False
        if not sent:
            relay.pending_count = len(data)
            self._hand_back(entry, Handback(relay=relay, flush_server=True))
            return False
        relay.sent_to_server(len(data))
        if relay.decided:
            self._hand_back(entry, Handback(relay=relay))
            return False
        return True

    def _server_ready(self, entry: _Parked) -> None:
        relay = entry.relay
        if relay is None:
            conn = entry.express_conn
            assert conn is not None
            self._express_ready(entry, conn)
            return
        try:
            chunk = relay.server.transport.receive_ready()
        except TransportClosed as exc:
            relay.fail(Outcome.SERVER_FAILED, str(exc))
            self._hand_back(entry, Handback(relay=relay))
            return
        if chunk is None:
            return
        self._server_chunk(entry, relay, chunk)

    def _server_chunk(self, entry: _Parked, relay: Relay, chunk: bytes) -> None:
        """Pass on bytes the server sent on a link (``b""``: it closed)."""
        if not chunk:
            server = relay.server.transport
            server.broken = True
            relay.fail(Outcome.SERVER_FAILED, "server closed the connection unexpectedly")
            self._hand_back(entry, Handback(relay=relay))
            return
        data = relay.prepare_to_client(chunk)
        if data is None:
            self._hand_back(entry, Handback(relay=relay))
            return
        if data:
            try:
                sent = entry.session.transport.send_nowait(data)
            except TransportClosed:
                relay.fail(Outcome.CLIENT_GONE)
                self._hand_back(entry, Handback(relay=relay))
                return
            if not sent:
                # The client's socket is full: backpressure (and the stall timeout) are
                # the client task's; it sends the rest and goes on.
                relay.pending_count = len(data)
                self._hand_back(entry, Handback(relay=relay, flush_client=True))
                return
        relay.sent_to_client(len(data))
        if relay.decided or relay.copy_started:
            self._hand_back(entry, Handback(relay=relay))
            return
        if relay.tracker.owed > 0:
            return  # more answers to come
        if relay.may_release():
            if not entry.session.end_link_now(relay):
                # Work that waits (reading back parameters): the client task's.
                self._hand_back(entry, Handback(relay=relay))
                return
            self._unlink(entry)
            self.transactions += 1
        elif relay.needs_timer:
            # A transaction that outlives the answer, under idle_in_transaction_timeout:
            # the pumps of the client task keep that clock.
            self._hand_back(entry, Handback(relay=relay))
        # Otherwise the link goes on here (a transaction block, a pin, session mode):
        # the client's next bytes are forwarded as they come.
