"""The proxy's TLS context for clients (trioproxy/_server/tls.py)."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

from trioproxy._server.tls import server_context
from trioproxy.testing.certs import make_self_signed_ca_and_server

if TYPE_CHECKING:
    from pathlib import Path


def test_no_session_tickets_and_a_working_handshake(tmp_path: Path) -> None:
    """Like PostgreSQL: no TLS 1.3 session tickets (libpq never resumes a session, so
    making them is work for nothing); the handshake itself still verifies."""
    files = make_self_signed_ca_and_server(tmp_path)
    context = server_context(files.server_cert, files.server_key)
    assert context.num_tickets == 0
    assert context.options & ssl.OP_NO_TICKET
    client_context = ssl.create_default_context(cafile=str(files.ca_cert))
    client_sock, server_sock = socket.socketpair()
    server = context.wrap_socket(server_sock, server_side=True, do_handshake_on_connect=False)
    client = client_context.wrap_socket(
        client_sock, server_hostname="localhost", do_handshake_on_connect=False
    )
    with server, client:
        server.setblocking(False)
        client.setblocking(False)
        done = {"client": False, "server": False}
        for _ in range(100):  # a bounded, in-memory handshake
            for name, side in (("client", client), ("server", server)):
                if not done[name]:
                    try:
                        side.do_handshake()
                        done[name] = True
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
            if all(done.values()):
                break
        assert all(done.values())
        assert client.version() in ("TLSv1.2", "TLSv1.3")
