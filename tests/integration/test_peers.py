"""``[[peers]]``: a CancelRequest that reaches the wrong instance is forwarded to its owner.

Two proxies (peer 1 and peer 2) run in this process against the real PostgreSQL, each
listing the other, as two instances behind a TCP load balancer would. A client logged in
to peer 1 runs ``pg_sleep``; its cancel request goes to peer 2, which forwards it by the
peer id written into the key. Peer 1 listens on 127.0.0.2 so that the test's own cancel
connection (from 127.0.0.1) is not mistaken for one forwarded by a peer.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

import trio

from tests.fix_pg import APP_PASSWORD, APP_USER, PostgresServer, _free_port
from tests.fix_proxy import build_config
from trioproxy._cluster.keys import peer_of
from trioproxy._protocol.messages import CancelRequest
from trioproxy._server.backend import BackendTarget, connect_server
from trioproxy._server.proxy import open_proxy
from trioproxy.errors import BackendError

if TYPE_CHECKING:
    import pytest

    from tests.fix_proxy import TLSFiles


def _config(pg: PostgresServer, tls: TLSFiles, me: int, host: str, port: int, peer: Any) -> Any:
    return build_config(
        pg,
        tls,
        proxy={"listen": f"{host}:{port}", "peer_id": me},
        peers=[peer],
    )


async def _send_cancel(host: str, port: int, packet: bytes) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(packet)
            while await stream.receive_some(1024):  # the proxy closes when done
                pass


async def _cancelled_by_peer(
    pg: PostgresServer, tls_files: TLSFiles, *, cancel_key: str
) -> tuple[str | None, float]:
    port_a, port_b = _free_port(), _free_port()
    config_a = _config(
        pg, tls_files, 1, "127.0.0.2", port_a, {"peer_id": 2, "host": "127.0.0.1", "port": port_b}
    )
    config_b = _config(
        pg, tls_files, 2, "127.0.0.1", port_b, {"peer_id": 1, "host": "127.0.0.2", "port": port_a}
    )
    async with open_proxy(config_a) as proxy_a, open_proxy(config_b):
        client = await connect_server(
            BackendTarget(
                host="127.0.0.2", port=port_a, database="app", user=APP_USER, password=APP_PASSWORD
            ),
            now=trio.current_time(),
        )
        try:
            assert client.key is not None
            assert peer_of(client.key.process_id) == 1
            packet = CancelRequest(client.key.process_id, client.key.secret_key).encode()
            if cancel_key == "wrong":
                packet = packet[:-1] + bytes([packet[-1] ^ 1])
            elif cancel_key == "long":  # protocol 3.2 keys may be longer; ours never are
                packet = struct.pack("!i", 20) + packet[4:] + b"\0\0\0\0"
            error: str | None = None
            started = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def sleep() -> None:
                    nonlocal error
                    try:
                        await client.run("select pg_sleep(5)", timeout=20)
                    except BackendError as exc:
                        error = exc.message

                nursery.start_soon(sleep)
                await trio.sleep(0.3)
                await _send_cancel("127.0.0.1", port_b, packet)
            elapsed = trio.current_time() - started
            assert proxy_a.stats.failed_logins == 0
        finally:
            await client.terminate()
    return error, elapsed


async def test_cancel_at_the_wrong_instance_reaches_the_right_query(
    pg: PostgresServer, tls_files: TLSFiles
) -> None:
    error, elapsed = await _cancelled_by_peer(pg, tls_files, cancel_key="right")
    assert error is not None
    assert "canceling statement due to user request" in error
    assert elapsed < 4


async def test_a_wrong_secret_forwarded_by_a_peer_cancels_nothing(
    pg: PostgresServer, tls_files: TLSFiles
) -> None:
    error, elapsed = await _cancelled_by_peer(pg, tls_files, cancel_key="wrong")
    assert error is None  # the query ran its full 5 s
    assert elapsed >= 4.5


async def test_a_key_longer_than_ours_cancels_nothing_and_breaks_nothing(
    pg: PostgresServer, tls_files: TLSFiles, caplog: pytest.LogCaptureFixture
) -> None:
    error, elapsed = await _cancelled_by_peer(pg, tls_files, cancel_key="long")
    assert error is None
    assert elapsed >= 4.5
    assert "internal error" not in caplog.text
