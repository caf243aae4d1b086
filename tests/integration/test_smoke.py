"""First light: psycopg through the proxy over TLS."""

from __future__ import annotations

import psycopg


def test_select_through_proxy(proxy) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        assert conn.info.pgconn.ssl_in_use
