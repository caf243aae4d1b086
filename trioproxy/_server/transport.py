"""A byte transport over a raw non-blocking socket, with optional TLS on memory BIOs.

[shell] Why not ``trio.SocketStream`` / ``trio.SSLStream``: measured on this project's
machines (docs/architecture.md, "hot path"), trio's per-operation stream wrapper costs
about 2x the CPU of this one, and its conflict detector is held across the trailing
yield of ``send_all``, so a pooled server connection handed to the next client at
ReadyForQuery can raise ``BusyResourceError``. Here the socket is owned directly:

* ``receive_some`` waits for readability *first*, then reads (no failed ``recv``);
  cancelling it is always safe: nothing has been consumed.
* ``send_all`` writes at once and waits only when the kernel buffer is full. A
  ``send_all`` interrupted after a partial write marks the transport ``broken``; the owner
  must then discard it (never reuse a server connection with half a message on it).
* TLS uses ``ssl.SSLObject`` over ``MemoryBIO`` pairs, the same design as trio's own
  SSLStream, so a future batched data plane can drive the very same objects.

Exactly one task may send at a time and one may receive at a time; ciphertext that a
*receive* produces (TLS 1.3 tickets, key updates) is flushed by whoever writes next, or
by the receiver itself when no send is in progress.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl

import trio

from trioproxy.errors import BackendError

RECEIVE_SIZE = 65536


class TransportClosed(Exception):
    """The peer closed the connection or the transport is broken."""


class Transport:
    __slots__ = (
        "_incoming",
        "_outgoing",
        "_pending_out",
        "_poller",
        "_sending",
        "_ssl",
        "broken",
        "closed",
        "fd",
        "peer",
        "sock",
    )

    def __init__(self, sock: socket.socket, *, peer: str = "") -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        #: The socket's descriptor, remembered (asked per transaction by the data plane).
        self.fd = sock.fileno()
        self.peer = peer
        self._ssl: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._pending_out = bytearray()  # ciphertext taken from the BIO, not yet sent
        self._poller: select.poll | None = None  # for peer_gone(), made on first use
        self._sending = False
        self.broken = False
        self.closed = False

    # --- plumbing ---------------------------------------------------------------------

    @property
    def is_tls(self) -> bool:
        return self._ssl is not None

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._ssl

    def fileno(self) -> int:
        return self.fd

    def peer_gone(self) -> bool:
        """Has an idle peer closed, or said something (a server's FATAL before it exits)?

        One zero-timeout poll, no round trip: the check the pool runs before it hands out
        an idle server connection, so a server restart or pg_terminate_backend is noticed
        without any client seeing an error. (A poll object, not a ``MSG_PEEK`` recv: an
        idle socket then costs no ``BlockingIOError``; this runs once per transaction.)
        """
        if self.broken or self.closed:
            return True
        if self._incoming is not None and self._incoming.pending:
            return True
        try:
            # Any event means gone: EOF, bytes nobody asked for, an error, a hang-up.
            return self._ready()
        except OSError:
            return True

    def _ready(self) -> bool:
        """Would a read return at once (bytes, EOF or an error)? One zero-timeout poll."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    def receive_now(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What ``receive_some`` would return, if that needs no wait; else None.

        The hot path's shortcut: a client that sent its next request while we were busy
        costs no cancel scope, no epoll registration and no trip through the scheduler.
        (Plain sockets only; with TLS this always says None.)"""
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        if self._ssl is not None or not self._ready():
            return None
        return self.receive_ready(max_bytes)

    # --- without waiting (the data plane) ---------------------------------------------

    @property
    def buffered(self) -> bool:
        """Are received bytes held here (TLS) that no epoll would announce?"""
        tls, incoming = self._ssl, self._incoming
        if tls is None or incoming is None:
            return False
        return incoming.pending > 0 or tls.pending() > 0

    def receive_ready(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """Read without waiting, once the caller knows the socket is readable (the data
        plane's epoll said so): the bytes, ``b""`` for EOF, None when nothing came (or,
        with TLS, no whole record yet). With TLS, everything decrypted is returned, so
        nothing stays ``buffered``."""
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        try:
            raw = self.sock.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.broken = True
            raise TransportClosed(str(exc)) from exc
        if self._ssl is None:
            return raw
        return self._decrypt(raw)

    def _decrypt(self, raw: bytes) -> bytes | None:
        tls, incoming = self._ssl, self._incoming
        assert tls is not None
        assert incoming is not None
        if raw:
            incoming.write(raw)
        else:
            incoming.write_eof()
        out: list[bytes] = []
        eof = False
        while (data := self._read_plaintext(RECEIVE_SIZE)) is not None:
            if not data:
                eof = True
                break
            out.append(data)
        self._flush_if_idle()
        if out:
            return b"".join(out)
        return b"" if eof else None

    def send_nowait(self, data: bytes) -> bool:
        """Send what the kernel takes now; True when everything went out. Otherwise the
        rest is held here, and ``flush()`` must be awaited before anything else is sent."""
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        tls = self._ssl
        if tls is not None:
            outgoing = self._outgoing
            assert outgoing is not None
            try:
                tls.write(data)
            except ssl.SSLError as exc:
                self.broken = True
                raise TransportClosed(f"TLS error: {exc}") from exc
            self._pending_out += outgoing.read()
            data = bytes(self._pending_out)
            self._pending_out.clear()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.broken = True
            raise TransportClosed(str(exc)) from exc
        if sent < len(data):
            self._pending_out += memoryview(data)[sent:]
            return False
        return True

    async def flush(self) -> None:
        """Send what ``send_nowait()`` left (a cancelled flush with bytes left marks the
        transport broken: half a message is on the wire)."""
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        self._sending = True
        try:
            await self._flush_pending()
        finally:
            self._sending = False

    async def _recv_raw(self, max_bytes: int) -> bytes:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.broken = True
                raise TransportClosed(str(exc)) from exc

    async def _send_raw(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        sent_any = False
        try:
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    self.broken = True
                    raise TransportClosed(str(exc)) from exc
                sent_any = True
                view = view[n:]
        except BaseException:
            if sent_any and view:
                self.broken = True  # half a message went out: never reuse
            raise

    async def _flush_pending(self) -> None:
        """Send the bytes held in ``_pending_out`` (and, with TLS, the BIO's ciphertext)."""
        outgoing = self._outgoing
        try:
            while True:
                if outgoing is not None and outgoing.pending:
                    self._pending_out += outgoing.read()
                if not self._pending_out:
                    return
                try:
                    sent = self.sock.send(self._pending_out)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                    continue
                except OSError as exc:
                    self.broken = True
                    raise TransportClosed(str(exc)) from exc
                del self._pending_out[:sent]
        except BaseException:
            if self._pending_out:
                self.broken = True  # a record is half on the wire: never reuse
            raise

    # --- public I/O -------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = RECEIVE_SIZE) -> bytes:
        """Return the next bytes from the peer; ``b""`` means the peer closed."""
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        tls = self._ssl
        if tls is None:
            # _recv_raw() written out: one coroutine less per read on the hot path.
            sock = self.sock
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(max_bytes)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.broken = True
                    raise TransportClosed(str(exc)) from exc
        incoming = self._incoming
        assert incoming is not None
        while True:
            data = self._read_plaintext(max_bytes)
            if data is not None:
                self._flush_if_idle()
                return data
            raw = await self._recv_raw(RECEIVE_SIZE)
            if not raw:
                incoming.write_eof()
            else:
                incoming.write(raw)

    def _read_plaintext(self, max_bytes: int) -> bytes | None:
        """One ``SSLObject.read``: plaintext, ``b""`` when the peer closed, None when it
        needs more ciphertext first."""
        tls = self._ssl
        assert tls is not None
        try:
            return tls.read(max_bytes)
        except ssl.SSLWantReadError:
            return None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        except ssl.SSLError as exc:
            self.broken = True
            raise TransportClosed(f"TLS error: {exc}") from exc

    def _flush_if_idle(self) -> None:
        """Send ciphertext a read produced, without blocking and without racing a writer.

        What the kernel does not take now stays queued for the next ``send_all``.
        """
        outgoing = self._outgoing
        if outgoing is None or self._sending or not (outgoing.pending or self._pending_out):
            return
        self._pending_out += outgoing.read()
        try:
            sent = self.sock.send(self._pending_out)
        except BlockingIOError:
            return
        except OSError:
            self.broken = True
            return
        del self._pending_out[:sent]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.broken or self.closed:
            raise TransportClosed("transport is closed")
        tls = self._ssl
        self._sending = True
        try:
            if tls is None:
                if self._pending_out:  # what send_nowait() left goes first
                    await self._flush_pending()
                await self._send_raw(data)
            else:
                try:
                    tls.write(data)
                except ssl.SSLError as exc:
                    self.broken = True
                    raise TransportClosed(f"TLS error: {exc}") from exc
                await self._flush_pending()
        finally:
            self._sending = False

    # --- TLS --------------------------------------------------------------------------

    async def start_tls(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        """Run the TLS handshake; afterwards every byte is encrypted."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._ssl, self._incoming, self._outgoing = tls, incoming, outgoing
        while True:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush_pending()
                raw = await self._recv_raw(RECEIVE_SIZE)
                if not raw:
                    self.broken = True
                    raise TransportClosed(
                        "peer closed the connection during the TLS handshake"
                    ) from None
                incoming.write(raw)
                continue
            except ssl.SSLError as exc:
                self.broken = True
                raise TransportClosed(f"TLS handshake failed: {exc.reason or exc}") from exc
            break
        await self._flush_pending()

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Close at once (never blocks, never raises).

        On a healthy TLS connection a close_notify alert goes out first (best effort,
        non-blocking), so the peer sees an orderly end rather than a truncation.
        """
        if self.closed:
            return
        self.closed = True
        tls = self._ssl
        if tls is not None and not self.broken and not self._sending:
            with contextlib.suppress(ssl.SSLError, ValueError):
                tls.unwrap()
            self._flush_if_idle()
        with contextlib.suppress(OSError):
            self.sock.close()


async def open_tcp(host: str, port: int) -> Transport:
    """Connect to host:port; raise BackendError with the OS's reason on failure."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise BackendError(f"could not resolve host {host!r}: {exc}") from exc
    last: OSError | None = None
    for family, type_, proto, _canon, address in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            err = sock.connect_ex(address)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, errno.errorcode.get(err, str(err)))
            if err:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, _strerror(err))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return Transport(sock, peer=f"{host}:{port}")
    raise BackendError(f"could not connect to server at {host}:{port}: {_reason(last)}")


def _strerror(err: int) -> str:
    return os.strerror(err)


def _reason(exc: OSError | None) -> str:
    if exc is None:
        return "no address"
    return exc.strerror or str(exc)
