"""Embed trioproxy in your own trio program.

    python examples/embed.py proxy.toml

The proxy runs as one more task of the program: it shares the program's event loop, its
cancellation and its lifetime. Here the program also prints the proxy's live figures every
few seconds, and on Ctrl-C or SIGTERM leaves the ``open_proxy`` block, which drains the
proxy (transactions in flight may finish, up to ``shutdown_timeout``) before returning.

The two entry points:

* ``await nursery.start(trioproxy.serve, config)`` -> the bound addresses; runs until the
  nursery is cancelled (clients are disconnected at once).
* ``async with open_proxy(config) as proxy:`` -> a live ``Proxy``: ``proxy.addresses``,
  ``proxy.stats``, ``proxy.pools``, ``await proxy.reload(config)``, ``proxy.pause()`` /
  ``proxy.resume()``, ``await proxy.drain(timeout)``; a graceful drain when the block ends.
"""

from __future__ import annotations

import signal
import sys

import trio

import trioproxy
from trioproxy._server.proxy import Proxy, open_proxy


def summary(proxy: Proxy) -> str:
    """One line of live figures, as a dashboard would show them."""
    stats = proxy.stats
    servers = sum(p.statistics().borrowed + p.statistics().idle for p in proxy.pools.values())
    return (
        f"clients open={proxy.open_clients} accepted={stats.clients_accepted} "
        f"failed_logins={stats.failed_logins} servers={servers} pinned={proxy.pinned_count()}"
    )


async def run_until(
    config: trioproxy.Config,
    stop: trio.Event,
    *,
    report_every: float = 5.0,
    task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED,
) -> str:
    """Serve until *stop* is set, then drain; return the last summary line."""
    async with open_proxy(config) as proxy:
        task_status.started(proxy)
        for address in proxy.addresses:
            print(f"trioproxy embedded, listening on {address.host}:{address.port}")
        while not stop.is_set():
            with trio.move_on_after(report_every):
                await stop.wait()
            print(summary(proxy))
    # Leaving the block drained the proxy: every client has gone.
    return summary(proxy)


async def main(path: str) -> None:
    config = trioproxy.load_config(path)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_until, config, stop)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _signum in signals:
                stop.set()
                break


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/embed.py proxy.toml")
    trio.run(main, sys.argv[1])
