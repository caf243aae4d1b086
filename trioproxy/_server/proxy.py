"""The running proxy: listeners, the clients nursery, pools, cancel routing.

[shell] Structure (every task lives in a nursery owned by ``serve``)::

    serve(config)
      nursery
        pools nursery       one BackendPool.run() per (database, user), started on demand
        clients nursery     one ClientSession.run() per accepted socket
        accept loop         per listening socket

Cancelling ``serve`` (Ctrl-C, SIGTERM via the CLI, or an embedder's cancel scope) stops
everything: client tasks close their sockets in ``finally``, pools close their
connections.
"""

from __future__ import annotations

import errno
import hmac
import itertools
import logging
import secrets
import socket
from typing import TYPE_CHECKING

import attrs
import trio

from trioproxy._auth.credentials import CredentialStore
from trioproxy._auth.sigv4 import AccessKey, TokenPolicy
from trioproxy._pool.budget import PoolLimits, ServerBudget
from trioproxy._pool.pool import BackendPool
from trioproxy._protocol.messages import CancelRequest
from trioproxy._server.backend import BackendTarget
from trioproxy._server.client import ClientSession
from trioproxy._server.tls import backend_context, server_context
from trioproxy._server.transport import Transport, TransportClosed, open_tcp
from trioproxy.config import BackendTLS, Config
from trioproxy.errors import AuthenticationFailed, SQLState, TrioproxyError

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator

logger = logging.getLogger("trioproxy")

_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.define
class ProxyStats:
    clients_accepted: int = 0
    failed_logins: int = 0
    bytes_from_clients: int = 0
    bytes_from_servers: int = 0


@attrs.frozen
class ProxyAddress:
    host: str
    port: int


class Proxy:
    """Shared state of one running proxy (one per ``serve`` call)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.credentials = CredentialStore(config.users)
        proxy_config = config.proxy
        self.tls_context: ssl.SSLContext | None = None
        if proxy_config.tls_cert_file is not None and proxy_config.tls_key_file is not None:
            self.tls_context = server_context(proxy_config.tls_cert_file, proxy_config.tls_key_file)
        backend = config.backend
        self.backend_tls = backend_context(backend.backend_tls, backend.backend_tls_ca_file)
        self.pools: dict[tuple[str, str], BackendPool] = {}
        self.clients: dict[int, ClientSession] = {}
        self._cancel_keys: dict[int, ClientSession] = {}
        self._client_ids = itertools.count(1)
        self._pool_nursery: trio.Nursery | None = None
        self.stats = ProxyStats()
        pool_config = config.pool
        self.limits = PoolLimits(
            max_connections=pool_config.max_connections,
            max_connections_percent=pool_config.max_connections_percent,
            max_idle_connections_percent=pool_config.max_idle_connections_percent,
            server_lifetime=pool_config.server_lifetime,
            server_idle_timeout=pool_config.server_idle_timeout,
        )
        self.budget = ServerBudget(self.limits)
        iam = config.iam
        self.iam_keys = {
            key_id: AccessKey(
                access_key_id=key_id,
                secret_access_key=key.secret_access_key,
                allowed_users=key.allowed_users,
            )
            for key_id, key in iam.keys.items()
        }
        self.iam_policy = (
            TokenPolicy(
                endpoints=iam.endpoints, regions=iam.regions, max_clock_skew=iam.max_clock_skew
            )
            if iam.endpoints
            else None
        )

    # --- pools ------------------------------------------------------------------------

    def pool_for(self, database: str, user: str) -> BackendPool:
        key = (database, user)
        pool = self.pools.get(key)
        if pool is not None:
            return pool
        credentials = self.credentials.lookup(user)
        if credentials is None:
            raise AuthenticationFailed(f'password authentication failed for user "{user}"')
        backend = self.config.backend
        pool_config = self.config.pool
        target = BackendTarget(
            host=backend.host,
            port=backend.port,
            database=database,
            user=credentials.backend_user,
            password=credentials.backend_password,
            tls_context=self.backend_tls,
            tls_required=backend.backend_tls in (BackendTLS.REQUIRE, BackendTLS.VERIFY_FULL),
            connect_timeout=backend.connect_timeout,
            max_message_size=self.config.proxy.max_message_size,
        )
        pool = BackendPool(
            name=f"{database}/{user}",
            target=target,
            limits=self.limits,
            init_query=pool_config.init_query,
            budget=self.budget,
        )
        assert self._pool_nursery is not None
        self._pool_nursery.start_soon(pool.run)
        self.pools[key] = pool
        return pool

    # --- clients ----------------------------------------------------------------------

    def register_cancel_key(self, session: ClientSession) -> tuple[int, int]:
        while True:
            process_id = secrets.randbits(31)
            if process_id and process_id not in self._cancel_keys:
                break
        self._cancel_keys[process_id] = session
        return process_id, secrets.randbits(32)

    def forget_client(self, session: ClientSession) -> None:
        self.clients.pop(session.id, None)
        if self._cancel_keys.get(session.process_id) is session:
            del self._cancel_keys[session.process_id]

    def pinned_count(self) -> int:
        return sum(1 for c in self.clients.values() if c.pin_reason is not None)

    def sessions(self) -> Iterator[ClientSession]:
        return iter(list(self.clients.values()))

    async def cancel(self, process_id: int, secret_key: bytes) -> None:
        """Forward a CancelRequest to the server connection the client uses right now."""
        session = self._cancel_keys.get(process_id)
        # Compare even when unknown, so timing does not reveal which ids exist.
        expected = session.secret_key if session is not None else b"\0\0\0\0"
        if not hmac.compare_digest(secret_key, expected) or session is None:
            logger.info("cancel request with an unknown key ignored")
            return
        server = session.server
        if server is None or server.key is None:
            return  # nothing running: nothing to cancel
        backend = self.config.backend
        with trio.move_on_after(backend.connect_timeout):
            try:
                transport = await open_tcp(backend.host, backend.port)
            except TrioproxyError as exc:
                logger.warning("cancel for client %d failed: %s", session.id, exc.message)
                return
            try:
                await transport.send_all(
                    CancelRequest(server.key.process_id, server.key.secret_key).encode()
                )
                await transport.receive_some(1)  # the server closes when done
            except TransportClosed:
                pass
            finally:
                transport.close()
        logger.info("client %d: query cancelled on server connection %d", session.id, server.id)

    async def _run_client(self, sock: socket.socket, peer: str) -> None:
        client_id = next(self._client_ids)
        over_limit = len(self.clients) >= self.config.proxy.max_client_connections
        session = ClientSession(self, Transport(sock, peer=peer), client_id, over_limit=over_limit)
        if not over_limit:
            self.clients[client_id] = session
        await session.run()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    logger.error("accept failed: %s; pausing the listener for 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            self.stats.clients_accepted += 1
            peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            nursery.start_soon(self._run_client, sock, peer)

    async def run(
        self, *, task_status: trio.TaskStatus[list[ProxyAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = open_listeners(self.config)
        try:
            async with trio.open_nursery() as nursery:
                self._pool_nursery = await nursery.start(_child_nursery)
                clients_nursery: trio.Nursery = await nursery.start(_child_nursery)
                addresses: list[ProxyAddress] = []
                for listener in listeners:
                    host, port = listener.getsockname()[:2]
                    addresses.append(ProxyAddress(host, port))
                    nursery.start_soon(self._accept_loop, listener, clients_nursery)
                logger.info(
                    "trioproxy listening on %s (tls=%s, pool_mode=%s)",
                    ", ".join(f"{a.host}:{a.port}" for a in addresses),
                    "required"
                    if self.config.proxy.require_tls
                    else ("available" if self.tls_context else "off"),
                    self.config.pool.pool_mode.value,
                )
                task_status.started(addresses)
        finally:
            for listener in listeners:
                listener.close()


async def _child_nursery(
    *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def open_listeners(config: Config) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    try:
        for address in config.proxy.listen:
            infos = socket.getaddrinfo(
                address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, type_, proto, _canon, sockaddr = infos[0]
            sock = socket.socket(family, type_, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(4096)
            sock.setblocking(False)
    except OSError as exc:
        for sock in listeners:
            sock.close()
        raise TrioproxyError(
            f"cannot listen on {address.host}:{address.port}: {exc.strerror}"
        ) from exc
    return listeners


async def serve(
    config: Config, *, task_status: trio.TaskStatus[list[ProxyAddress]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the proxy until cancelled. ``await nursery.start(serve, config)`` returns the
    bound addresses (useful with port 0)."""
    await Proxy(config).run(task_status=task_status)


_unused = (SQLState,)
