"""TLS contexts: the proxy's server side (clients) and its client side (backends).

[shell] Contexts are built once at start (and on reload) and shared by every connection.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from trioproxy.config import BackendTLS
from trioproxy.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The context for client connections: TLS 1.2+, our certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {cert_file} / key {key_file}: {exc}"
        ) from exc
    # PostgreSQL clients negotiate ALPN "postgresql" only for direct TLS (PG17+);
    # offering it is harmless for the SSLRequest flow.
    context.set_alpn_protocols(["postgresql"])
    # No session tickets, as PostgreSQL itself: libpq never resumes a session, so each
    # TLS 1.3 login would pay for two tickets (made, encrypted, sent) nobody uses.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


def backend_context(mode: BackendTLS, ca_file: Path | None) -> ssl.SSLContext | None:
    """The context for server connections, or None when TLS is disabled."""
    if mode is BackendTLS.DISABLE:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode is BackendTLS.VERIFY_FULL:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        if ca_file is not None:
            try:
                context.load_verify_locations(str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load backend CA file {ca_file}: {exc}") from exc
        else:
            context.load_default_certs()
    else:
        # prefer/require: encryption without identity checks, as libpq's sslmode=require.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
