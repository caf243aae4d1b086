"""The `soak` benchmark: thousands of clients and steady load for minutes; memory must not grow.

    .venv/bin/python bench/soak.py                 # 2,000 idle + 50 busy clients, 120 s
    .venv/bin/python bench/soak.py --quick         # 300 idle + 10 busy, 20 s

A throwaway PostgreSQL (max_connections 100) and the real CLI (`python -m trioproxy`,
transaction mode, TLS required) as in `make demo`. The load generator (asyncpg, this
process) opens the idle clients (each authenticated over TLS, then silent), then runs the
busy clients: each loops over `select $1::int, $2::text` with its own values and checks
every row. The proxy's resident memory (VmRSS) is sampled once the clients are connected
and warm, and at the end. Writes bench/results/soak.md and soak.json. Exit status 1 when a
result was wrong, a query failed, or RSS grew beyond the stated bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from trioproxy.demo import (
    APP,
    Cluster,
    ProxyProcess,
    chown_to_owner,
    find_bindir,
    free_port,
    raise_nofile_limit,
    uninterruptible,
)
from trioproxy.testing.certs import make_self_signed_ca_and_server

RESULTS = Path(__file__).resolve().parent / "results"
#: RSS may grow by at most this much between the warm sample and the end (allocator noise
#: and caches that settle; a leak of even 1 kB per request would exceed it many times over).
GROWTH_BOUND_MB = 32.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def config_text(port: int, pg_port: int, clients: int) -> str:
    return f"""\
[proxy]
listen = "127.0.0.1:{port}"
require_tls = true
tls_cert_file = "tls/server.pem"
tls_key_file = "tls/server.key"
max_client_connections = {clients + 500}

[backend]
host = "127.0.0.1"
port = {pg_port}

[pool]
pool_mode = "transaction"
max_connections = 20

[users.{APP}]
password_env = "SHOP_PASSWORD"
"""


async def load(
    port: int, password: str, ca: Path, args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(ca))

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(
            host="localhost",
            port=port,
            user=APP,
            password=password,
            database=APP,
            ssl=context,
            timeout=60,
        )

    idle: list[asyncpg.Connection] = []
    for start in range(0, args.idle, 100):
        batch = await asyncio.gather(*(connect() for _ in range(min(100, args.idle - start))))
        idle.extend(batch)
    counts = {"queries": 0, "wrong": 0, "errors": 0}
    stop = time.monotonic() + args.duration

    async def busy(n: int) -> None:
        conn = await connect()
        i = 0
        try:
            while time.monotonic() < stop:
                i += 1
                try:
                    row = await conn.fetchrow("select $1::int, $2::text", i, f"c{n}")
                except (asyncpg.PostgresError, OSError):
                    counts["errors"] += 1
                    continue
                counts["queries"] += 1
                if row is None or row[0] != i or row[1] != f"c{n}":
                    counts["wrong"] += 1
        finally:
            await conn.close()

    await asyncio.sleep(2)  # let the proxy settle with everyone connected
    rss_start = rss_kb(pid)
    samples = [(0.0, rss_start)]
    began = time.monotonic()

    async def sampler() -> None:
        while time.monotonic() < stop:
            await asyncio.sleep(max(1.0, args.duration / 20))
            samples.append((time.monotonic() - began, rss_kb(pid)))

    await asyncio.gather(sampler(), *(busy(n) for n in range(args.busy)))
    rss_end = rss_kb(pid)
    for conn in idle:  # the idle ones must still work after all that
        if await conn.fetchval("select 1") != 1:
            counts["wrong"] += 1
        await conn.close()
    return {**counts, "rss_start_kb": rss_start, "rss_end_kb": rss_end, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=2000, help="idle clients (default 2000)")
    parser.add_argument("--busy", type=int, default=50, help="busy clients (default 50)")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--quick", action="store_true", help="300 idle, 10 busy, 20 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.idle, args.busy, args.duration = 300, 10, 20.0
    raise_nofile_limit()
    base = Path(tempfile.mkdtemp(prefix="trioproxy-soak-"))
    chown_to_owner(base)
    cluster = Cluster(find_bindir(), base)
    password = secrets.token_urlsafe(12)
    proxy: ProxyProcess | None = None
    try:
        cluster.create()
        cluster.start()
        with cluster.connect() as admin:
            admin.execute(f"create role {APP} login password '{password}'")
            admin.execute(f"create database {APP} owner {APP}")
        tls = make_self_signed_ca_and_server(base / "tls")
        port = free_port()
        config = base / "proxy.toml"
        config.write_text(config_text(port, cluster.port, args.idle + args.busy))
        proxy = ProxyProcess(config, port, password)
        proxy.start()
        assert proxy.proc is not None
        result = asyncio.run(load(port, password, tls.ca_cert, args, proxy.proc.pid))
    finally:
        with uninterruptible():
            if proxy is not None:
                proxy.stop()
            cluster.stop()
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    growth_mb = (result["rss_end_kb"] - result["rss_start_kb"]) / 1024
    ok = result["wrong"] == 0 and result["errors"] == 0 and growth_mb <= GROWTH_BOUND_MB
    report = {
        "command": " ".join([sys.executable, "bench/soak.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "idle_clients": args.idle,
        "busy_clients": args.busy,
        "duration_s": args.duration,
        **result,
        "growth_mb": round(growth_mb, 2),
        "bound_mb": GROWTH_BOUND_MB,
        "ok": ok,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    per_client_kb = result["rss_start_kb"] / max(1, args.idle + args.busy)
    md = (
        "# soak\n\n"
        f"`{report['command']}` on {report['date']}\n\n"
        f"| idle clients | busy clients | seconds | queries | wrong rows | errors | "
        "proxy RSS start | proxy RSS end | growth (bound) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.idle:,} | {args.busy} | {args.duration:g} | {result['queries']:,} | "
        f"{result['wrong']} | {result['errors']} | {result['rss_start_kb'] / 1024:.1f} MB | "
        f"{result['rss_end_kb'] / 1024:.1f} MB | {growth_mb:+.1f} MB ({GROWTH_BOUND_MB:g} MB) |\n\n"
        f"RSS per connected client at the start (whole process / clients, TLS included): "
        f"{per_client_kb:.0f} kB.\n"
    )
    (RESULTS / "soak.md").write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
