"""Protocol-level prepared statements in transaction mode, shared without pinning."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess

import asyncpg
import psycopg
import pytest
from psycopg import _connection_base

TRANSACTION = {"pool_mode": "transaction"}


def test_asyncpg_statement_cache_50_clients_on_2_server_connections(proxy_factory) -> None:
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 2})
    context = ssl.create_default_context(cafile=str(proxy.tls.ca_cert))

    async def client(n: int) -> int:
        conn = await asyncpg.connect(
            host="localhost",
            port=proxy.port,
            user="app",
            password="app-secret",
            database="app",
            ssl=context,
        )
        try:
            total = 0
            for i in range(10):
                total += await conn.fetchval("select $1::int + $2::int", n, i)
                row = await conn.fetchrow("select $1::text as t, $2::int * 2 as d", f"c{n}", i)
                assert row["t"] == f"c{n}"
                assert row["d"] == i * 2
            async with conn.transaction():
                assert await conn.fetchval("select count(*) from generate_series(1, $1)", n) == n
            return total
        finally:
            await conn.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(50)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert results == [n * 10 + 45 for n in range(50)]
    assert proxy.proxy.pinned_count() == 0
    stats = [pool.statistics() for pool in proxy.proxy.pools.values()]
    assert sum(s.total_opened for s in stats) <= 2


def test_psycopg_prepare_threshold_zero(proxy_factory) -> None:
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 1})
    a = psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0)
    b = psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0)
    try:
        for i in range(20):
            assert a.execute("select %s::int * 3", (i,)).fetchone() == (i * 3,)
            assert b.execute("select %s::text || 'b'", (str(i),)).fetchone() == (f"{i}b",)
            assert b.execute("select %s::int * 3", (i,)).fetchone() == (i * 3,)
        assert proxy.proxy.pinned_count() == 0
    finally:
        a.close()
        b.close()


def test_statement_errors_do_not_confuse_the_mapping(proxy_factory) -> None:
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 1})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from no_such_table where x = %s", (1,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1 / %s::int", (0,))
        assert conn.execute("select 1 / %s::int", (1,)).fetchone() == (1,)
        assert conn.execute("select %s::int + 1", (1,)).fetchone() == (2,)


def test_psycopg_evicting_with_sql_deallocate(proxy_factory, monkeypatch) -> None:
    """psycopg with libpq < 17 evicts a prepared statement with SQL ``DEALLOCATE name``
    (protocol Close needs libpq 17): the proxy answers it for the client's name, in and
    out of transaction blocks, and the evicted statement is prepared again when needed.
    A DEALLOCATE of a name the client never prepared fails as PostgreSQL fails it."""
    monkeypatch.setattr(_connection_base, "_HAS_SEND_CLOSE", False)
    sent: list[bytes] = []
    exec_command = _connection_base.BaseConnection._exec_command

    def spy(self, command, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(bytes(command))
        return exec_command(self, command, *args, **kwargs)

    monkeypatch.setattr(_connection_base.BaseConnection, "_exec_command", spy)
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for i in range(30):
            n = i % 5  # five statements through a cache of two: evictions all along
            assert conn.execute(f"select {n}::int + %s::int", (i,)).fetchone() == (n + i,)
        with conn.transaction():
            for i in range(10):
                n = i % 4
                assert conn.execute(f"select {n}::int * %s::int", (i,)).fetchone() == (n * i,)
        assert sum(c.startswith(b"DEALLOCATE _pg3_") for c in sent) >= 20
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("deallocate never_prepared")
        assert conn.execute("select 1").fetchone() == (1,)


def test_small_statement_cache_evicts_and_reprepares(proxy_factory) -> None:
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 1, "max_prepared_statements": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for round_ in range(3):
            for k in range(5):
                query = f"select %s::int + {k}"
                assert conn.execute(query, (round_,)).fetchone() == (round_ + k,)
    assert proxy.proxy.pinned_count() == 0


def test_pgbench_prepared_50_clients_on_a_pool_of_5(proxy_factory, pg) -> None:
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 5})
    env = {**os.environ, **proxy.env()}
    pgbench = shutil.which("pgbench") or "pgbench"
    subprocess.run(
        [pgbench, "-i", "-s", "1", "-q"], env=env, check=True, capture_output=True, timeout=120
    )
    proc = subprocess.run(
        [pgbench, "-M", "prepared", "-c", "50", "-j", "2", "-t", "20", "-S"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "number of transactions actually processed: 1000/1000" in proc.stdout
    failed = re.search(r"number of failed transactions: (\d+)", proc.stdout)
    assert failed is None or failed.group(1) == "0"
    assert proxy.proxy.pinned_count() == 0


NODE_NAMED_QUERIES = r"""
const fs = require('fs');
const { Client } = require('pg');
(async () => {
  const clients = [];
  for (let c = 0; c < 20; c++) {
    clients.push((async () => {
      const client = new Client({
        host: 'localhost', port: Number(process.env.PROXY_PORT), database: 'app',
        user: 'app', password: 'app-secret',
        ssl: { rejectUnauthorized: true, ca: fs.readFileSync(process.env.PROXY_CA) },
      });
      await client.connect();
      let sum = 0;
      for (let i = 0; i < 10; i++) {
        const r = await client.query(
          { name: 'double-it', text: 'select $1::int * 2 as v', values: [c * 100 + i] });
        sum += r.rows[0].v;
        const t = await client.query(
          { name: 'tag-it', text: 'select $1::text as t', values: ['c' + c] });
        if (t.rows[0].t !== 'c' + c) throw new Error('wrong row: ' + t.rows[0].t);
      }
      await client.end();
      return sum;
    })());
  }
  console.log(JSON.stringify(await Promise.all(clients)));
})().catch((err) => { console.error(err); process.exit(1); });
"""


def test_node_postgres_named_queries(proxy_factory, node_modules, tmp_path) -> None:
    import json

    from tests.fix_node import run_node

    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 2})
    env = {"PROXY_PORT": str(proxy.port), "PROXY_CA": str(proxy.tls.ca_cert)}
    sums = json.loads(run_node(NODE_NAMED_QUERIES, node_modules, env, tmp_path).splitlines()[-1])
    assert sums == [sum(2 * (c * 100 + i) for i in range(10)) for c in range(20)]
    assert proxy.proxy.pinned_count() == 0


def test_asyncpg_login_costs_no_server_round_trip(proxy_factory) -> None:
    """asyncpg asks for client_encoding 'utf-8'; the server says UTF8: the same encoding,
    so logging in must not borrow a server connection to SET it."""
    proxy = proxy_factory(pool={**TRANSACTION, "max_connections": 2})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")  # the pool now knows the server's parameters
    pool = next(iter(proxy.proxy.pools.values()))
    before = pool.borrow_latency.count
    context = ssl.create_default_context(cafile=str(proxy.tls.ca_cert))

    async def login() -> str:
        conn = await asyncpg.connect(
            host="localhost",
            port=proxy.port,
            user="app",
            password="app-secret",
            database="app",
            ssl=context,
        )
        try:
            return conn.get_settings().client_encoding
        finally:
            await conn.close()

    assert asyncio.run(login()) == "UTF8"
    assert pool.borrow_latency.count == before
