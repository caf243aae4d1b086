"""Reading the users' secrets, and re-reading them while the proxy runs.

[shell] The parsing and merging rules live in ``trioproxy._auth.secrets``; this module does
the I/O: it reads ``secret_file`` files and fetches ``secret_arn`` secrets from AWS Secrets
Manager through boto3 (the optional ``trioproxy[aws]`` extra), builds a new
``CredentialStore`` and swaps it in.

Theory of operation:

* At start (``SecretRefresher.load_initial``, called by ``Proxy.__init__``) every secret must
  be readable, or the proxy does not start: a configuration error, named.
* Every ``[proxy] secret_refresh_interval`` seconds (``run``), all secrets are read again in
  a worker thread (file reads and boto3 calls block). If nothing changed, nothing happens.
  If something changed, a new store is built (also in a thread: a changed password means
  a PBKDF2 derivation) and assigned to ``proxy.credentials`` in one statement. That
  assignment is the whole swap: logins read ``proxy.credentials`` once at their start,
  and pools look up the backend user and password again for every new server connection
  (``BackendPool.backend_login``). So a rotated password is used for the next server
  connection, and clients already logged in, or their server connections, are not
  touched.
* A refresh that fails (file unreadable, bad JSON, AWS unreachable) keeps the previous
  store, logs a warning naming the user and the source (never the content), and is tried
  again at the next interval.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from trioproxy._auth.credentials import CredentialStore
from trioproxy._auth.secrets import (
    SecretError,
    SecretKind,
    SecretValue,
    arn_region,
    effective_users,
    parse_secret,
    secret_ref,
)
from trioproxy.errors import ConfigError

if TYPE_CHECKING:
    from trioproxy.config import Config

__all__ = ["SecretRefresher"]

logger = logging.getLogger("trioproxy.secrets")

#: Bounds for one Secrets Manager call (seconds, attempts): a refresh must not hang.
_AWS_CONNECT_TIMEOUT = 5.0
_AWS_READ_TIMEOUT = 10.0
_AWS_MAX_ATTEMPTS = 3


class _HasCredentials(Protocol):
    credentials: CredentialStore
    secrets: SecretRefresher


class SecretRefresher:
    """Holds the last secrets read and turns changes into a new ``CredentialStore``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.interval = config.proxy.secret_refresh_interval
        self.refs = {name: ref for name, user in config.users.items() if (ref := secret_ref(user))}
        self.values: dict[str, SecretValue] = {}
        self.refreshes = 0
        self.failures = 0
        self._clients: dict[str, Any] = {}  # boto3 Secrets Manager clients, per region
        self._running = False
        self._lock = trio.Lock()

    # --- reading (blocking: run in a worker thread, except at start) ------------------

    def _read_one(self, name: str) -> SecretValue:
        ref = self.refs[name]
        data: str | bytes
        try:
            if ref.kind is SecretKind.FILE:
                try:
                    data = Path(ref.location).read_bytes()
                except OSError as exc:
                    raise SecretError(f"cannot read: {exc.strerror or exc}") from None
            else:
                data = self._fetch_arn(ref.location)
            return parse_secret(data)
        except SecretError as exc:
            raise SecretError(f"user {name!r}: {ref}: {exc}") from None

    def _fetch_arn(self, arn: str) -> str:
        try:
            boto3 = importlib.import_module("boto3")
            botocore_config = importlib.import_module("botocore.config")
            botocore_exceptions = importlib.import_module("botocore.exceptions")
        except ImportError:
            raise SecretError("secret_arn needs boto3: pip install 'trioproxy[aws]'") from None
        region = arn_region(arn)
        client = self._clients.get(region)
        if client is None:
            client = boto3.session.Session().client(
                "secretsmanager",
                region_name=region,
                endpoint_url=self.config.proxy.aws_endpoint_url,
                config=botocore_config.Config(
                    connect_timeout=_AWS_CONNECT_TIMEOUT,
                    read_timeout=_AWS_READ_TIMEOUT,
                    retries={"max_attempts": _AWS_MAX_ATTEMPTS},
                ),
            )
            self._clients[region] = client
        try:
            response = client.get_secret_value(SecretId=arn)
        except (botocore_exceptions.BotoCoreError, botocore_exceptions.ClientError) as exc:
            # botocore messages name the operation, the error code and the ARN; no secret.
            raise SecretError(f"Secrets Manager: {exc}") from None
        text = response.get("SecretString")
        if not isinstance(text, str):
            raise SecretError("the secret has no SecretString (binary secrets are not supported)")
        return text

    def read_all(self) -> dict[str, SecretValue]:
        """Every user's secret, read now. Raises SecretError on the first failure."""
        return {name: self._read_one(name) for name in self.refs}

    def build_store(
        self, values: dict[str, SecretValue], previous: CredentialStore | None
    ) -> CredentialStore:
        return CredentialStore(effective_users(self.config.users, values), previous=previous)

    # --- start ------------------------------------------------------------------------

    def load_initial(self, previous: CredentialStore | None = None) -> CredentialStore:
        """The first store for this configuration (at start, or on reload: then pass the
        running store as ``previous``). Blocking. A secret that cannot be read, or a user
        left without credentials, is a ConfigError: the proxy does not start (a reload
        keeps the running configuration).
        """
        source = self.config.source or "<config>"
        try:
            self.values = self.read_all()
            store = self.build_store(self.values, previous)
        except ValueError as exc:  # SecretError included
            raise ConfigError(f"{source}: {exc}") from None
        if self.refs:
            logger.info("read the secrets of %d user(s)", len(self.refs))
        return store

    # --- refreshing -------------------------------------------------------------------

    async def refresh(self, proxy: _HasCredentials) -> bool:
        """Read every secret again; install a new store if any changed. True if it did.

        Never raises for a bad secret: the previous credentials stay in force.
        """
        if not self.refs:
            return False
        async with self._lock:  # one refresh at a time (periodic vs. reload)
            try:
                # Abandoned if cancelled (shutdown): a slow AWS call must not hold the
                # proxy up; the thread's result is simply dropped.
                values = await trio.to_thread.run_sync(self.read_all, abandon_on_cancel=True)
            except SecretError as exc:
                self.failures += 1
                logger.warning("secret refresh failed, keeping the previous credentials: %s", exc)
                return False
            if values == self.values:
                return False
            changed = sorted(name for name in values if values[name] != self.values.get(name))
            previous = proxy.credentials
            try:
                store = await trio.to_thread.run_sync(self.build_store, values, previous)
            except (SecretError, ValueError) as exc:
                self.failures += 1
                logger.warning("secret refresh failed, keeping the previous credentials: %s", exc)
                return False
            if proxy.secrets is not self:
                return False  # a reload replaced the configuration meanwhile
            # The swap: one assignment. Logins in progress keep the store they started
            # with; everything after this line sees the new one.
            proxy.credentials = store
            self.values = values
            self.refreshes += 1
            logger.info("secrets changed for user(s) %s: new credentials in force", changed)
            return True

    async def run(self, proxy: _HasCredentials) -> None:
        """Refresh every ``secret_refresh_interval`` seconds until cancelled."""
        if self.interval <= 0 or not self.refs:
            return
        while proxy.secrets is self:  # a reload installs (and starts) a new refresher
            await trio.sleep(self.interval)
            await self.refresh(proxy)

    def start_once(self, nursery: trio.Nursery | None, proxy: _HasCredentials) -> None:
        """Start :meth:`run` in ``nursery`` unless it runs already (idempotent, sync)."""
        if self._running or nursery is None or self.interval <= 0 or not self.refs:
            return
        self._running = True
        nursery.start_soon(self.run, proxy)
