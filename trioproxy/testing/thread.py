"""Run a proxy in a background thread, for synchronous programs and tests.

The proxy gets its own ``trio.run`` in a daemon thread; ``stop()`` cancels it and joins
the thread, so nothing outlives the ``with`` block.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING

import trio

from trioproxy._server.proxy import Proxy, ProxyAddress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trioproxy.config import Config

__all__ = ["ProxyThread", "proxy_in_thread"]


class ProxyThread:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.proxy: Proxy | None = None
        self.addresses: list[ProxyAddress] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="trioproxy", daemon=True)

    @property
    def host(self) -> str:
        return self.addresses[0].host

    @property
    def port(self) -> int:
        return self.addresses[0].port

    def _main(self) -> None:
        async def body() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    self.proxy = Proxy(self.config)
                    self.addresses = await nursery.start(self.proxy.run)
                    self._started.set()

        try:
            trio.run(body)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._started.set()

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("proxy did not start")
        if self._error is not None:
            raise RuntimeError("proxy failed to start") from self._error

    def drain(self, timeout: float | None = None) -> None:
        """Graceful shutdown (as SIGTERM); returns when the proxy has stopped."""
        assert self._token is not None
        assert self.proxy is not None
        with suppress(trio.RunFinishedError):
            trio.from_thread.run(self.proxy.drain, timeout, trio_token=self._token)
        self._thread.join(30)

    def reload(self, config: Config | None = None) -> list[str]:
        """Re-read the configuration file (or apply *config*), as SIGHUP does."""
        assert self._token is not None
        assert self.proxy is not None
        return trio.from_thread.run(self.proxy.reload, config, trio_token=self._token)

    def stop(self, timeout: float = 30) -> None:
        if self._token is not None and self._scope is not None:
            scope = self._scope
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        self._thread.join(timeout)
        if self._error is not None and not isinstance(self._error, trio.Cancelled):
            raise RuntimeError("proxy stopped with an error") from self._error


@contextmanager
def proxy_in_thread(config: Config) -> Iterator[ProxyThread]:
    thread = ProxyThread(config)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
