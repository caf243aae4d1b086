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

import contextlib
import errno
import hmac
import itertools
import logging
import secrets
import socket
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trioproxy._auth.channel_binding import tls_server_end_point
from trioproxy._auth.sigv4 import AccessKey, TokenPolicy
from trioproxy._cluster.forwarding import (
    cancel_socket_path,
    forward_to_peer,
    forward_to_worker,
    serve_cancel_socket,
)
from trioproxy._cluster.keys import KeyLayout, Owner, Route
from trioproxy._pool.budget import PoolLimits, ServerBudget, derive_max_size
from trioproxy._pool.latency import LatencyHistogram
from trioproxy._pool.pool import BackendPool
from trioproxy._pool.targets import TargetSet
from trioproxy._protocol.messages import CancelRequest
from trioproxy._server.admission import ClientFilter, LoginThrottle, peer_host
from trioproxy._server.backend import BackendTarget, deliver_cancel
from trioproxy._server.client import ClientSession
from trioproxy._server.dataplane import DataPlane
from trioproxy._server.metrics import serve_metrics
from trioproxy._server.secret_refresh import SecretRefresher
from trioproxy._server.tls import backend_context, server_context
from trioproxy._server.transport import Transport
from trioproxy.config import (
    BackendTLS,
    Config,
    EndpointRole,
    IamConfig,
    ListenAddress,
    load_config,
)
from trioproxy.errors import AuthenticationFailed, ConfigError, TrioproxyError

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Iterator, Sequence
    from pathlib import Path

    from trioproxy._auth.credentials import CredentialStore
    from trioproxy._cluster.worker import WorkerRuntime

logger = logging.getLogger("trioproxy")

_ACCEPT_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@attrs.define
class ProxyStats:
    """Proxy-wide counters (monotonic); gauges are read from the live objects instead."""

    clients_accepted: int = 0
    clients_closed: int = 0
    failed_logins: int = 0
    bytes_from_clients: int = 0
    bytes_from_servers: int = 0
    reloads: int = 0
    reload_failures: int = 0
    started_at: float = 0.0
    #: pin reason -> times a client was pinned / unpinned for it
    #: Queries, Syncs and function calls relayed (each answered by one ReadyForQuery).
    query_requests: int = 0
    pins: dict[str, int] = attrs.field(factory=dict)
    unpins: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class ProxyAddress:
    host: str
    port: int
    role: EndpointRole = EndpointRole.READ_WRITE


class Proxy:
    """Shared state of one running proxy (one per ``serve`` call)."""

    def __init__(self, config: Config, runtime: WorkerRuntime | None = None) -> None:
        self.config = config
        #: Set when this proxy is one worker of several (``workers = N``, the CLI).
        self.runtime = runtime
        self.key_layout = KeyLayout(
            config.proxy.peer_id, runtime.worker_id if runtime is not None else 0
        )
        #: Addresses of [[peers]] (resolved when run() starts): cancels they forward are
        #: never forwarded again (a misconfigured pair must not bounce one forever).
        self.peer_addresses: set[str] = set()
        # Users' secrets (secret_file / secret_arn) are read here; secrets.run() re-reads
        # them and swaps self.credentials (see _server/secret_refresh.py).
        self.secrets = SecretRefresher(config)
        self.credentials = self.secrets.load_initial()
        proxy_config = config.proxy
        self.client_filter = ClientFilter(proxy_config.allowed_client_cidrs)
        self.login_throttle = LoginThrottle(
            free_attempts=proxy_config.failed_login_free_attempts,
            base_delay=proxy_config.failed_login_delay,
            max_delay=proxy_config.failed_login_max_delay,
            window=proxy_config.failed_login_window,
        )
        self.tls_context: ssl.SSLContext | None = None
        #: tls-server-end-point data of our certificate: clients on TLS are offered
        #: SCRAM-SHA-256-PLUS with it. None without TLS or for Ed25519/Ed448 certificates.
        self.channel_binding: bytes | None = None
        if proxy_config.tls_cert_file is not None and proxy_config.tls_key_file is not None:
            self.tls_context = server_context(proxy_config.tls_cert_file, proxy_config.tls_key_file)
            self.channel_binding = tls_server_end_point(proxy_config.tls_cert_file.read_bytes())
        backend = config.backend
        self.backend_tls = backend_context(backend.backend_tls, backend.backend_tls_ca_file)
        self.pools: dict[tuple[str, str], BackendPool] = {}
        self.clients: dict[int, ClientSession] = {}
        self._cancel_keys: dict[int, ClientSession] = {}
        self._client_ids = itertools.count(1)
        self._pool_nursery: trio.Nursery | None = None
        self.stats = ProxyStats()
        #: Time from a client's request to the server's ReadyForQuery.
        self.response_latency = LatencyHistogram()
        #: Moves the bytes of the common transactions for every parked client.
        self.dataplane = DataPlane()
        pool_config = config.pool
        self.limits = PoolLimits(
            max_connections=pool_config.max_connections,
            max_connections_percent=pool_config.max_connections_percent,
            max_idle_connections_percent=pool_config.max_idle_connections_percent,
            server_lifetime=pool_config.server_lifetime,
            server_idle_timeout=pool_config.server_idle_timeout,
        )
        self.budget = ServerBudget(
            self.limits, shared=runtime.ledger if runtime is not None else None
        )
        #: Pools of read-only endpoints (standbys), apart from the writer's pools.
        self.read_only_pools: dict[tuple[str, str], BackendPool] = {}
        self._listener_roles: dict[socket.socket, EndpointRole] = {}
        #: Which of [backend] targets is the writer; shared by every pool.
        self.targets = TargetSet(config.backend.addresses)
        self.iam_keys, self.iam_policy = iam_registry(config.iam)
        self._init_operations()

    # --- operations state (drain, pause, reload) --------------------------------------

    def _init_operations(self) -> None:
        #: True once a graceful shutdown began: no new clients, sessions leave at their
        #: next transaction boundary.
        self.draining = False
        self._paused: set[str] | None = set()  # None: every database; else these
        self._resumed = trio.Event()
        self._resumed.set()
        self._accept_scope = trio.CancelScope()
        self._run_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._client_left = trio.Event()
        self._reload_lock = trio.Lock()  # one reload at a time (SIGHUP vs admin RELOAD)
        #: Where clients connect / where metrics are served (filled in by ``run()``).
        self.addresses: list[ProxyAddress] = []
        self.metrics_addresses: list[ProxyAddress] = []

    # --- pools ------------------------------------------------------------------------

    def pool_for(
        self, database: str, user: str, role: EndpointRole = EndpointRole.READ_WRITE
    ) -> BackendPool:
        key = (database, user)
        pools = self.pools if role is EndpointRole.READ_WRITE else self.read_only_pools
        pool = pools.get(key)
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
            name=f"{database}/{user}" + ("" if role is EndpointRole.READ_WRITE else " (read-only)"),
            target=target,
            limits=self.limits,
            init_query=pool_config.init_query,
            budget=self.budget,
            targets=self.targets,
            role=role,
            # Rotated secrets: each new server connection logs in with the backend user
            # and password of the credentials in force at that moment.
            backend_login=lambda: self.credentials.backend_login(user),
        )
        assert self._pool_nursery is not None
        self._pool_nursery.start_soon(pool.run)
        pools[key] = pool
        return pool

    def pool_list(self) -> list[tuple[str, str, EndpointRole, BackendPool]]:
        """Every pool as (database, user, role, pool): the writer's, then those of
        read-only endpoints (the admin console and the metrics show both)."""
        out = [(d, u, EndpointRole.READ_WRITE, p) for (d, u), p in sorted(self.pools.items())]
        out.extend(
            (d, u, EndpointRole.READ_ONLY, p) for (d, u), p in sorted(self.read_only_pools.items())
        )
        return out

    # --- clients ----------------------------------------------------------------------

    def register_cancel_key(self, session: ClientSession) -> tuple[int, int]:
        """A (process id, secret) pair for BackendKeyData; the process id names this
        instance and worker (trioproxy/_cluster/keys.py), the secret is 32 random bits."""
        layout = self.key_layout
        while True:
            process_id = layout.process_id(secrets.randbits(32))
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

    async def cancel(self, process_id: int, secret_key: bytes, *, sender: str = "") -> bool:
        """Act on a CancelRequest from ``sender`` (an address), wherever its key was
        issued. Returns False when the key is known to be wrong (a failed login)."""
        route = self.key_layout.route(process_id)
        if len(secret_key) != 4:
            # Protocol 3.2 allows longer keys; ours are 4 bytes, so it is a wrong key,
            # checked here (never forwarded: a worker's channel carries 4-byte keys).
            route = Route(Owner.HERE)
        if sender in self.peer_addresses:
            # Forwarded by a peer: a wrong key is the guesser's, not the peer's (the
            # back-off must not block every cancel that peer forwards).
            if route.owner is Owner.HERE:
                await self.cancel_here(process_id, secret_key)
            else:
                logger.info("cancel request from a peer with another instance's key ignored")
            return True
        if route.owner is Owner.HERE:
            return await self.cancel_here(process_id, secret_key)
        runtime = self.runtime
        if route.owner is Owner.WORKER:
            if runtime is None or route.target >= runtime.spec.workers:
                return await self.cancel_here(process_id, secret_key)  # unknown: wrong key
            logger.info("cancel request forwarded to worker %d", route.target)
            verdict = await forward_to_worker(
                runtime.directory, route.target, process_id, secret_key
            )
            return verdict is not False
        peer = next((p for p in self.config.peers if p.peer_id == route.target), None)
        if peer is None:
            return await self.cancel_here(process_id, secret_key)  # unknown: wrong key
        logger.info(
            "cancel request forwarded to peer %d (%s:%d)", peer.peer_id, peer.host, peer.port
        )
        await forward_to_peer(peer, process_id, secret_key)
        return True  # only the peer can tell, and PostgreSQL's protocol has no answer

    async def cancel_here(self, process_id: int, secret_key: bytes) -> bool:
        """Forward a CancelRequest to the server connection the client uses right now.
        Returns whether the key was right."""
        session = self._cancel_keys.get(process_id)
        # Compare even when unknown, so timing does not reveal which ids exist.
        expected = session.secret_key if session is not None else b"\0\0\0\0"
        if not hmac.compare_digest(secret_key, expected) or session is None:
            logger.info("cancel request with an unknown key ignored")
            return False
        server = session.server
        if server is None or server.key is None:
            return True  # nothing running: nothing to cancel
        failure = await deliver_cancel(
            *server.address,
            CancelRequest(server.key.process_id, server.key.secret_key).encode(),
            self.config.backend.connect_timeout,
        )
        if failure is not None:
            logger.warning("cancel for client %d failed: %s", session.id, failure)
            return True
        logger.info("client %d: query cancelled on server connection %d", session.id, server.id)
        return True

    async def _run_client(
        self, sock: socket.socket, peer: str, role: EndpointRole = EndpointRole.READ_WRITE
    ) -> None:
        # The periodic secret refresh runs in the pools' nursery, started with the first
        # client (idempotent: a no-op once running, or without secrets to refresh).
        self.secrets.start_once(self._pool_nursery, self)
        if not self.client_filter.allows(peer_host(peer)):
            # Before any authentication work: not even the startup packet is read.
            logger.info("client %s refused: address not in allowed_client_cidrs", peer)
            sock.close()
            return
        client_id = next(self._client_ids)
        over_limit = len(self.clients) >= self.config.proxy.max_client_connections
        session = ClientSession(
            self, Transport(sock, peer=peer), client_id, over_limit=over_limit, role=role
        )
        if not over_limit:
            self.clients[client_id] = session
        await session.run()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while not self.draining:
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
            role = self._listener_roles.get(listener, EndpointRole.READ_WRITE)
            nursery.start_soon(self._run_counted, sock, peer, role)

    async def _run_counted(self, sock: socket.socket, peer: str, role: EndpointRole) -> None:
        """``_run_client``, counted out however it ends (refused, failed, or served)."""
        try:
            await self._run_client(sock, peer, role)
        finally:
            self.stats.clients_closed += 1
            self._client_left.set()

    async def _accept_until_drained(
        self, listeners: list[socket.socket], clients_nursery: trio.Nursery
    ) -> None:
        """The accept loops; they end (and the listening sockets close, so new
        connections are refused at once) when a drain begins."""
        try:
            with self._accept_scope:
                async with trio.open_nursery() as nursery:
                    for listener in listeners:
                        nursery.start_soon(self._accept_loop, listener, clients_nursery)
        finally:
            for listener in listeners:
                listener.close()

    async def run(
        self, *, task_status: trio.TaskStatus[list[ProxyAddress]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled, or until a drain (``drain()``, ``shutdown()``) ends."""
        self.stats.started_at = trio.current_time()
        runtime = self.runtime
        listeners = open_listeners(
            self.config, ports=runtime.spec.listen_ports if runtime is not None else None
        )
        try:
            with trio.CancelScope() as self._run_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self._pool_nursery = await nursery.start(_child_nursery)
                    self.secrets.start_once(self._pool_nursery, self)
                    await self._resolve_peers()
                    if runtime is not None:
                        self._pool_nursery.start_soon(self.budget.share)
                        await nursery.start(
                            serve_cancel_socket,
                            cancel_socket_path(runtime.directory, runtime.worker_id),
                            self.cancel_here,
                        )
                    await nursery.start(self.dataplane.run)
                    clients_nursery: trio.Nursery = await nursery.start(_child_nursery)
                    addresses: list[ProxyAddress] = []
                    roles = [role for _address, role in listen_roles(self.config)]
                    for listener, role in zip(listeners, roles, strict=True):
                        host, port = listener.getsockname()[:2]
                        addresses.append(ProxyAddress(host, port, role))
                        self._listener_roles[listener] = role
                    self.addresses = addresses
                    nursery.start_soon(self._accept_until_drained, listeners, clients_nursery)
                    metrics_listen = self.config.proxy.metrics_listen
                    if metrics_listen is not None:
                        port = metrics_listen.port
                        if runtime is not None and port:
                            port += runtime.worker_id  # one endpoint per worker
                        self.metrics_addresses = await nursery.start(
                            serve_metrics, self, metrics_listen.host, port
                        )
                    logger.info(
                        "trioproxy%s listening on %s (tls=%s, pool_mode=%s)",
                        f" worker {runtime.worker_id}" if runtime is not None else "",
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
            self._nursery = None
            self._stopped.set()

    # --- graceful shutdown --------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop accepting; idle clients are told FATAL 57P01 now, linked ones at their
        next transaction boundary. Sync and idempotent."""
        if self.draining:
            return
        self.draining = True
        logger.info("shutting down: no new connections; %d clients to finish", self.open_clients)
        self._accept_scope.cancel()
        self._resumed.set()  # paused clients must not wait through a shutdown
        for session in self.sessions():
            scope = session.wait_scope
            if scope is not None:
                scope.cancel()
            session.drain_wake()

    @property
    def open_clients(self) -> int:
        return self.stats.clients_accepted - self.stats.clients_closed

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the deadline is the point
        """Graceful shutdown: stop accepting, let transactions in flight finish for up to
        *timeout* seconds (default ``shutdown_timeout``), then cancel whatever is left
        and stop ``run()``. Returns once the proxy has stopped (or at once, if it never
        ran)."""
        if timeout is None:
            timeout = self.config.proxy.shutdown_timeout
        self.begin_drain()
        with trio.move_on_after(timeout) as waited:
            while self.open_clients > 0:
                await self._client_left.wait()
                self._client_left = trio.Event()
        if waited.cancelled_caught:
            logger.warning(
                "shutdown_timeout (%g s) passed: closing %d clients still busy",
                timeout,
                self.open_clients,
            )
        else:
            logger.info("all clients finished; stopping")
        self.stop()
        if self._run_scope is not None:
            await self._stopped.wait()

    def shutdown(self, timeout: float | None = None) -> None:
        """Start ``drain(timeout)`` in the background (signal handlers, admin SHUTDOWN).
        The draining state is in force when this returns."""
        self.begin_drain()
        if self._nursery is not None:
            self._nursery.start_soon(self.drain, timeout)

    def stop(self) -> None:
        """Stop at once: cancel every task of ``run()`` (clients are disconnected)."""
        self.begin_drain()
        if self._run_scope is not None:
            self._run_scope.cancel()

    # --- pause ----------------------------------------------------------------------------

    def is_paused(self, database: str) -> bool:
        return self._paused is None or database in self._paused

    def pause(self, database: str | None = None) -> None:
        """Hold new transactions (all databases, or one) until ``resume()``."""
        if database is None:
            self._paused = None
        elif self._paused is not None:
            self._paused.add(database)
        if self._resumed.is_set():
            self._resumed = trio.Event()

    def resume(self, database: str | None = None) -> None:
        if database is None or self._paused is None:
            self._paused = set()
        else:
            self._paused.discard(database)
        # Wake every held client; those whose database is still paused park again.
        self._resumed.set()
        if self._paused:
            self._resumed = trio.Event()

    async def wait_resumed(self, database: str) -> None:
        """Park while *database* is paused (never during a drain)."""
        while self.is_paused(database) and not self.draining:
            await self._resumed.wait()

    def linked_clients(self, database: str | None = None) -> int:
        return sum(
            1
            for c in self.clients.values()
            if c.server is not None and (database is None or c.database == database)
        )

    # --- live reload ----------------------------------------------------------------------

    async def reload(self, config: Config | None = None) -> list[str]:
        """Re-read the configuration file (or take *config*) and apply what can change
        live: users and secrets, pool sizes, timeouts. Returns the notes logged (settings
        that need a restart). A configuration that fails validation raises ConfigError and
        leaves the running one in force."""
        try:
            if config is None:
                source = self.config.source
                if source is None:
                    raise ConfigError("no configuration file to reload (embedded proxy)")
            # Reading files and secrets and deriving SCRAM verifiers (PBKDF2) is slow:
            # in a worker thread. Verifiers of unchanged passwords are reused.
            async with self._reload_lock:
                new_config, refresher, credentials = await trio.to_thread.run_sync(
                    _load_for_reload, self.config.source, self.credentials, config
                )
                notes = self._apply_config(new_config, credentials)
                # The new refresher replaces the old one (which stops at its next wake-up).
                self.secrets = refresher
                refresher.start_once(self._pool_nursery, self)
        except TrioproxyError as exc:
            self.stats.reload_failures += 1
            logger.error("reload failed, the running configuration stays: %s", exc.message)
            raise
        self.stats.reloads += 1
        logger.info("configuration reloaded (%d users)", len(new_config.users))
        for note in notes:
            logger.warning("reload: %s", note)
        return notes

    def _apply_config(self, new: Config, credentials: CredentialStore) -> list[str]:
        """Swap in *new* (sync: nothing can interleave). Settings that cannot change live
        keep their running values and are reported."""
        old = self.config
        notes: list[str] = []
        keep_proxy: dict[str, Any] = {}
        for key in _RESTART_PROXY_KEYS:
            if getattr(new.proxy, key) != getattr(old.proxy, key):
                notes.append(f"[proxy] {key} changed: requires restart")
                keep_proxy[key] = getattr(old.proxy, key)
        keep_backend: dict[str, Any] = {}
        for key in _RESTART_BACKEND_KEYS:
            if getattr(new.backend, key) != getattr(old.backend, key):
                notes.append(f"[backend] {key} changed: requires restart")
                keep_backend[key] = getattr(old.backend, key)
        pool_mode = new.pool.pool_mode
        if pool_mode is not old.pool.pool_mode:
            notes.append("[pool] pool_mode changed: requires restart")
            pool_mode = old.pool.pool_mode
        for key in ("server_lifetime", "server_idle_timeout"):
            if getattr(new.pool, key) != getattr(old.pool, key):
                notes.append(f"[pool] {key} changed: applies to pools created from now on")
        effective = attrs.evolve(
            new,
            proxy=attrs.evolve(new.proxy, **keep_proxy),
            backend=attrs.evolve(new.backend, **keep_backend),
            pool=attrs.evolve(new.pool, pool_mode=pool_mode),
            source=new.source or old.source,
        )
        self.config = effective
        self.credentials = credentials
        self.client_filter = ClientFilter(effective.proxy.allowed_client_cidrs)
        throttle, proxy_config = self.login_throttle, effective.proxy
        throttle.free_attempts = proxy_config.failed_login_free_attempts
        throttle.base_delay = proxy_config.failed_login_delay
        throttle.max_delay = proxy_config.failed_login_max_delay
        throttle.window = proxy_config.failed_login_window
        self.iam_keys, self.iam_policy = iam_registry(effective.iam)
        # Timeouts: every session reads its config at the point of use.
        for session in self.sessions():
            session.config = effective
        self._apply_limits(effective)
        for _database, _user, _role, pool in self.pool_list():
            pool.init_query = effective.pool.init_query
            # The backend user and password come from self.credentials at each new
            # server connection (pool.backend_login); only the timeout is in the target.
            pool.target = attrs.evolve(
                pool.target, connect_timeout=effective.backend.connect_timeout
            )
        return notes

    async def _resolve_peers(self) -> None:
        for peer in self.config.peers:
            try:
                infos = await trio.socket.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("peer %d: cannot resolve %s: %s", peer.peer_id, peer.host, exc)
                continue
            self.peer_addresses.update(str(info[4][0]) for info in infos)

    def _apply_limits(self, config: Config) -> None:
        pool_config = config.pool
        limits = PoolLimits(
            max_connections=pool_config.max_connections,
            max_connections_percent=pool_config.max_connections_percent,
            max_idle_connections_percent=pool_config.max_idle_connections_percent,
            server_lifetime=pool_config.server_lifetime,
            server_idle_timeout=pool_config.server_idle_timeout,
        )
        if limits == self.limits:
            return
        self.limits = limits
        budget = self.budget
        budget.limits = limits
        if limits.max_connections > 0 or budget.server_max is not None:
            budget.cap, budget.max_idle = derive_max_size(limits, budget.server_max or 1)
            budget.sized = True
        else:
            budget.sized = False  # the next new server connection reads max_connections
        logger.info(
            "pool limits now: %d server connections in all, %d idle per pool",
            budget.cap,
            budget.max_idle,
        )
        for member in budget.members():
            member.resize(budget.cap, budget.max_idle)
        budget.poke()


#: Settings that need a restart (bound sockets, loaded certificates, the server address).
_RESTART_PROXY_KEYS = (
    "listen",
    "tls_cert_file",
    "tls_key_file",
    "metrics_listen",
    "workers",
    "peer_id",
)
_RESTART_BACKEND_KEYS = ("host", "port", "backend_tls", "backend_tls_ca_file")


def _load_for_reload(
    source: Path | None, previous: CredentialStore, config: Config | None
) -> tuple[Config, SecretRefresher, CredentialStore]:
    """(In a worker thread.) The new configuration (read from *source* unless *config* is
    given), its secret refresher and credential store. Raises ConfigError."""
    if config is None:
        assert source is not None
        config = load_config(source)
    refresher = SecretRefresher(config)
    return config, refresher, refresher.load_initial(previous=previous)


async def _child_nursery(
    *, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


def iam_registry(iam: IamConfig) -> tuple[dict[str, AccessKey], TokenPolicy | None]:
    """The key registry and token policy the IAM check uses, from ``[iam]``."""
    keys = {
        key_id: AccessKey(
            access_key_id=key_id,
            secret_access_key=key.secret_access_key,
            allowed_users=key.allowed_users,
        )
        for key_id, key in iam.keys.items()
    }
    policy = (
        TokenPolicy(endpoints=iam.endpoints, regions=iam.regions, max_clock_skew=iam.max_clock_skew)
        if iam.endpoints
        else None
    )
    return keys, policy


def listen_roles(config: Config) -> list[tuple[ListenAddress, EndpointRole]]:
    """Every address to listen on, with its endpoint role ([proxy] listen is read-write)."""
    out = [(address, EndpointRole.READ_WRITE) for address in config.proxy.listen]
    for endpoint in config.endpoints:
        out.extend((address, endpoint.role) for address in endpoint.listen)
    return out


def open_listeners(
    config: Config, *, ports: Sequence[int] | None = None, listen: bool = True
) -> list[socket.socket]:
    """Listening sockets, in the order of ``listen_roles(config)``.

    ``ports`` (workers): bind these resolved ports with SO_REUSEPORT, as every worker of
    the instance does. ``listen=False`` (the supervisor): only bind, with SO_REUSEPORT,
    which reserves the ports (and resolves port 0) without taking any connection.
    """
    listeners: list[socket.socket] = []
    shared = ports is not None or not listen
    try:
        for index, (address, _role) in enumerate(listen_roles(config)):
            port = ports[index] if ports is not None else address.port
            infos = socket.getaddrinfo(
                address.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, type_, proto, _canon, sockaddr = infos[0]
            sock = socket.socket(family, type_, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if shared:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            if listen:
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


@contextlib.asynccontextmanager
async def open_proxy(config: Config) -> AsyncIterator[Proxy]:
    """Run a proxy for the duration of the block::

        async with open_proxy(config) as proxy:
            print(proxy.addresses[0].port, proxy.stats)
            ...

    When the block ends normally the proxy drains (as SIGTERM: transactions in flight may
    finish, up to ``shutdown_timeout``); when it ends with an exception or a cancellation
    the proxy stops at once. ``proxy.reload(config)``, ``proxy.pause()`` and
    ``proxy.drain(timeout)`` are available inside the block.
    """
    proxy = Proxy(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        try:
            yield proxy
        except BaseException:
            proxy.stop()
            raise
        await proxy.drain()
