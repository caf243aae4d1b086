"""Prometheus metrics: a collector over the live proxy, served over HTTP/1.0 by trio.

[shell] No global mutable metrics: ``ProxyCollector.collect()`` reads the proxy's counters
(``ProxyStats``), its sessions and its pools at scrape time, so a scrape always agrees with
``SHOW POOLS`` / ``SHOW STATS`` of the admin console. ``prometheus-client`` only renders the
exposition format. The HTTP side is deliberately tiny: one ``GET /metrics`` per connection,
answered and closed (HTTP/1.0), with a read deadline, so a slow scraper cannot hold a task.

Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trioproxy._server.proxy import Proxy, ProxyAddress

logger = logging.getLogger("trioproxy.metrics")

#: A scraper must send its request within this many seconds.
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192

_POOL_LABELS = ("database", "user", "role")


class ProxyCollector:
    """A ``prometheus_client`` collector reading one ``Proxy`` at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        stats = proxy.stats
        sessions = list(proxy.sessions())

        by_tls = GaugeMetricFamily(
            "trioproxy_client_connections",
            "Client connections open now, by whether they use TLS.",
            labels=["tls"],
        )
        tls = sum(1 for s in sessions if s.transport.is_tls)
        by_tls.add_metric(["true"], tls)
        by_tls.add_metric(["false"], len(sessions) - tls)
        yield by_tls
        yield CounterMetricFamily(
            "trioproxy_client_connections_received",
            "Client connections accepted since start.",
            value=stats.clients_accepted,
        )
        yield CounterMetricFamily(
            "trioproxy_client_connections_closed",
            "Client connections closed since start.",
            value=stats.clients_closed,
        )
        yield CounterMetricFamily(
            "trioproxy_client_auth_failures",
            "Client logins refused (wrong password, unknown user, rejected token).",
            value=stats.failed_logins,
        )
        yield GaugeMetricFamily(
            "trioproxy_client_connections_linked",
            "Clients holding a server connection now (in a transaction, or pinned).",
            value=sum(1 for s in sessions if s.server is not None),
        )
        pinned = GaugeMetricFamily(
            "trioproxy_pinned_clients",
            "Clients pinned to their server connection, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(
            Counter(s.pin_reason for s in sessions if s.pin_reason is not None).items()
        ):
            pinned.add_metric([reason], count)
        yield pinned
        for name, doc, counts in (
            ("trioproxy_pins", "Times a client was pinned, by reason.", stats.pins),
            ("trioproxy_unpins", "Times a pin was released, by reason.", stats.unpins),
        ):
            family = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, count in sorted(counts.items()):
                family.add_metric([reason], count)
            yield family
        yield CounterMetricFamily(
            "trioproxy_client_bytes_received",
            "Bytes received from clients and relayed to servers.",
            value=stats.bytes_from_clients,
        )
        yield CounterMetricFamily(
            "trioproxy_server_bytes_received",
            "Bytes received from servers and relayed to clients.",
            value=stats.bytes_from_servers,
        )
        yield CounterMetricFamily(
            "trioproxy_query_requests",
            "Client requests relayed (Query, Sync, FunctionCall: each ends in ReadyForQuery).",
            value=stats.query_requests,
        )
        yield CounterMetricFamily(
            "trioproxy_data_plane_transactions",
            "Transactions the batched data plane served from request to release.",
            value=proxy.dataplane.transactions,
        )
        yield CounterMetricFamily(
            "trioproxy_data_plane_express_transactions",
            "Of the data plane's transactions, those served express: one autocommit SELECT "
            "as a simple Query, answered whole.",
            value=proxy.dataplane.express,
        )
        yield CounterMetricFamily(
            "trioproxy_data_plane_handbacks",
            "Times the data plane handed a client back to its own task (anything but the "
            "common transaction).",
            value=proxy.dataplane.handbacks,
        )
        latency = HistogramMetricFamily(
            "trioproxy_query_response_seconds",
            "Time from a client's request to the server's ReadyForQuery.",
        )
        histogram = proxy.response_latency
        latency.add_metric([], histogram.buckets(), sum_value=histogram.total)
        yield latency
        yield from self._pools()
        budget = proxy.budget
        yield GaugeMetricFamily(
            "trioproxy_server_connections_budget",
            "Server connections allowed across all pools (max_connections / _percent).",
            value=budget.cap,
        )
        yield GaugeMetricFamily(
            "trioproxy_server_connections_budget_used",
            "Server connections open or opening across all pools.",
            value=budget.used,
        )
        yield GaugeMetricFamily(
            "trioproxy_draining",
            "1 while a graceful shutdown is in progress.",
            value=proxy.draining,
        )
        yield CounterMetricFamily(
            "trioproxy_config_reloads", "Successful configuration reloads.", value=stats.reloads
        )
        yield CounterMetricFamily(
            "trioproxy_config_reload_failures",
            "Reloads refused because the new configuration was invalid.",
            value=stats.reload_failures,
        )
        yield GaugeMetricFamily(
            "trioproxy_uptime_seconds",
            "Seconds since the proxy started.",
            value=max(0.0, trio.current_time() - stats.started_at),
        )

    def _pools(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(_POOL_LABELS))

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=list(_POOL_LABELS))

        current = gauge(
            "trioproxy_database_connections",
            "Server connections of the pool: idle + borrowed + opening.",
        )
        borrowed = gauge(
            "trioproxy_database_connections_borrowed",
            "Server connections lent to clients now.",
        )
        idle = gauge(
            "trioproxy_database_connections_idle",
            "Server connections idle in the pool.",
        )
        waiting = gauge(
            "trioproxy_database_connections_waiting_clients",
            "Clients waiting to borrow a server connection.",
        )
        max_allowed = gauge(
            "trioproxy_database_connections_max_allowed",
            "Most server connections this pool may hold.",
        )
        opened = counter(
            "trioproxy_database_connections_setup_succeeded",
            "Server connections opened.",
        )
        failed = counter(
            "trioproxy_database_connections_setup_failed",
            "Server connection attempts that failed.",
        )
        closed = counter(
            "trioproxy_database_connections_closed",
            "Server connections closed.",
        )
        timeouts = counter(
            "trioproxy_borrow_timeouts",
            "Borrows that gave up after connection_borrow_timeout.",
        )
        latency = HistogramMetricFamily(
            "trioproxy_borrow_latency_seconds",
            "How long clients waited for a server connection (successful borrows).",
            labels=list(_POOL_LABELS),
        )
        for database, user, role, pool in self.proxy.pool_list():
            labels = [database, user, role.value]
            s = pool.statistics()
            current.add_metric(labels, s.idle + s.borrowed + s.opening)
            borrowed.add_metric(labels, s.borrowed)
            idle.add_metric(labels, s.idle)
            waiting.add_metric(labels, s.waiting)
            max_allowed.add_metric(labels, s.max_size)
            opened.add_metric(labels, s.total_opened)
            failed.add_metric(labels, pool.setup_failures)
            closed.add_metric(labels, s.total_closed)
            timeouts.add_metric(labels, pool.borrow_timeouts)
            latency.add_metric(
                labels, pool.borrow_latency.buckets(), sum_value=pool.borrow_latency.total
            )
        yield from (current, borrowed, idle, waiting, max_allowed, opened, failed, closed, timeouts)
        yield latency


def render(proxy: Proxy) -> bytes:
    """The exposition text for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return generate_latest(registry)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _handle(proxy: Proxy, stream: trio.SocketStream) -> None:
    try:
        request = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in request and b"\n\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
                if len(request) > MAX_REQUEST:
                    break
        line = request.split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2:
            response = _response("400 Bad Request", b"bad request\n")
        elif line[0] not in ("GET", "HEAD"):
            response = _response("405 Method Not Allowed", b"only GET\n")
        elif line[1].split("?", 1)[0] not in ("/metrics", "/metrics/"):
            response = _response("404 Not Found", b"try /metrics\n")
        else:
            try:
                body = render(proxy)
            except Exception:  # a bug in a collector must never take the proxy down
                logger.exception("rendering metrics failed")
                response = _response("500 Internal Server Error", b"metrics failed\n")
            else:
                response = _response(
                    "200 OK", b"" if line[0] == "HEAD" else body, CONTENT_TYPE_LATEST
                )
        with trio.move_on_after(REQUEST_TIMEOUT):
            await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        logger.debug("metrics request failed: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    proxy: Proxy,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[ProxyAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on host:port until cancelled; ``started`` the bound addresses."""
    from trioproxy._server.proxy import ProxyAddress

    listeners = await trio.open_tcp_listeners(port, host=host or None)
    addresses = []
    for listener in listeners:
        bound_host, bound_port = listener.socket.getsockname()[:2]
        addresses.append(ProxyAddress(bound_host, bound_port))
    logger.info(
        "metrics on %s",
        ", ".join(f"http://{a.host}:{a.port}/metrics" for a in addresses),
    )

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(proxy, stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        task_status.started(addresses)
