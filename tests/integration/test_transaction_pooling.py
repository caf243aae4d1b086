"""Transaction pooling against a real PostgreSQL with a small max_connections."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time

import psycopg
import pytest

from tests.fix_pg import APP_DB, PostgresServer

pytestmark = pytest.mark.slow


def _count_server_connections(pg: PostgresServer) -> int:
    out = pg.psql(
        "-At",
        "-c",
        f"select count(*) from pg_stat_activity where datname = '{APP_DB}' "
        "and backend_type = 'client backend' and pid <> pg_backend_pid()",
    )
    return int(out.strip())


def test_300_clients_on_a_server_allowing_20(pg_factory, proxy_factory) -> None:
    small = pg_factory(max_connections=20)
    proxy = proxy_factory(
        small,
        pool={"pool_mode": "transaction", "max_connections": 0, "max_connections_percent": 50},
    )
    usable = 20 - 3  # max_connections - superuser_reserved_connections
    cap = usable // 2
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _count_server_connections(small))
            time.sleep(0.05)

    context = ssl.create_default_context(cafile=str(proxy.tls.ca_cert))

    async def one_client(n: int) -> int:
        conn = await psycopg.AsyncConnection.connect(
            proxy.dsn(), prepare_threshold=None, autocommit=True
        )
        try:
            done = 0
            for i in range(3):
                async with conn.transaction():
                    cur = await conn.execute("select %s::int * 2, pg_backend_pid()", (n * 10 + i,))
                    row = await cur.fetchone()
                    assert row is not None
                    assert row[0] == (n * 10 + i) * 2
                cur = await conn.execute("select %s::text", (f"client-{n}",))
                assert await cur.fetchone() == (f"client-{n}",)
                done += 1
            return done
        finally:
            await conn.close()

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(one_client(n) for n in range(300)), return_exceptions=True)

    del context
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = asyncio.run(asyncio.wait_for(main(), timeout=240))
    finally:
        stop.set()
        watcher.join(10)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]
    assert results == [3] * 300
    assert 0 < peak <= cap, (peak, cap)
