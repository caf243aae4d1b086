"""trioproxy benchmarks: ``make bench`` (``python bench/run.py``). A benchmark, not a test.

Every run measures trioproxy *and* its references on the same machine, in the same run, with
the same client: direct PostgreSQL and PgBouncer (transaction mode, the same pool size).
Numbers from different machines or runs cannot be compared; the ratios in one run can.

What one invocation does:

1. creates a throw-away PostgreSQL cluster in a temp dir (``max_connections = 100``,
   scram-sha-256, ``fsync = off``), a role and a database ``bench``;
2. for each client count, repetition and target, in that interleaved order (direct,
   pgbouncer, trioproxy, direct, ...): starts the target cold (PgBouncer or
   ``python -m trioproxy --config bench.toml`` as a subprocess, each with a pool of
   ``--pool-size`` server connections), waits until PostgreSQL has no connection to the
   benchmark database (and, up to ``--wait-idle`` s, until other programs on the machine
   are quiet), then runs the scenario's load generator in a *separate process*
   (``python bench/run.py --loadgen SPEC``, asyncio + asyncpg) while a superuser connection
   samples ``pg_stat_activity`` every 100 ms; then stops the target by PID. A run during
   which other programs used more than 10% of the CPU is measured again (``--retries``);
3. prints a table and writes ``bench/results/<scenario>.md`` and ``.json`` (``--quick`` runs
   go to ``bench/results/tmp/``, which git ignores), and ``<scenario>.png`` with
   ``python -m bench.plots`` (matplotlib: the ``bench`` extra; the plots can be redrawn from
   the JSON at any time);
4. stops and removes everything in a ``finally``, also after Ctrl-C or SIGTERM.

Scenarios (``--scenario``, default all of them; one registry, ``SCENARIOS``):

* ``storm``: N clients at once (default 1,000 and 3,000) for ``--duration`` seconds, each in
  a loop: connect (SCRAM), ``select pg_sleep(0.05)``, disconnect. Direct PostgreSQL refuses
  most of them (``sorry, too many clients already``); a pooler queues them.
* ``tps``: pgbench select-only (``-S``) with ``-M simple``, ``extended`` and ``prepared``,
  and the TPC-B-like default script, at 10 and 50 clients (``-j 2``), 15 s per run: tps,
  latency average and stddev, and the pooler's CPU µs per transaction (summed over all its
  processes). ``-M prepared`` also runs against PgBouncer in *session* mode (one server
  connection per client): the report gives trioproxy's ``-M prepared`` tps (transaction
  mode) divided by it, the issue's target being >= 1. trioproxy runs once per
  ``--workers`` count (``[proxy] workers``; targets ``trioproxy w=N``; w>1 skipped when
  the build rejects the key).
* ``churn``: ``pgbench -C -S`` (a new connection per transaction), plain and TLS; trioproxy
  once per ``--workers`` count, as in tps.
* ``connect_latency``: 200 sequential psycopg connections (connect, ``select 1``, close),
  plain and TLS: p50/p95/p99 of connect-to-first-row.
* ``memory``: 2,000 (``--idle-clients``, e.g. 10000) idle authenticated asyncpg clients;
  the pooler's VmRSS before and after, in all and in kB per client (poolers only).

All but storm are a list of cases, each run ``--repeat`` times per target, interleaved; the
reports give medians and trioproxy's ratios to PgBouncer and to direct.

PgBouncer 1.18 comes from Debian's package; when it is missing and we are root it is
installed with apt-get (the system service is never started). As root, PostgreSQL and
PgBouncer run as the ``postgres`` system user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Sequence
    from types import FrameType

    from trioproxy.demo import Cluster

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

DB = "bench"  # role and database
PASSWORD_ENV = "BENCH_PASSWORD"  # noqa: S105 - the variable's name, not a password
TARGETS = ("direct", "pgbouncer", "trioproxy")  # what --targets accepts
# More targets, run by some scenarios only: PgBouncer in session mode (tps, -M prepared: the
# reference trioproxy's transaction mode is measured against), and trioproxy with N worker
# processes (tps, churn: one target per --workers count, named by TRIOPROXY_W).
PGBOUNCER_SESSION = "pgbouncer session"
TRIOPROXY_W = "trioproxy w={}"
#: (--no-data-plane) trioproxy with `[proxy] data_plane = false`: the A/B reference of the
#: batched data plane, in tps and churn, divided by w=1 in the ratios.
TRIOPROXY_NO_DP = "trioproxy no data plane"
SAMPLE_INTERVAL = 0.1  # seconds between pg_stat_activity samples
PG_SETTINGS = {  # appended after the demo cluster's own settings, so these win
    "max_connections": "100",
    "password_encryption": "'scram-sha-256'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",  # pgbench's tables (scale 10: about 160 MB) stay in memory
    "ssl": "on",  # for the TLS variants of churn and connect_latency; plain clients too
}
WIDTH = 100


class BenchError(Exception):
    """Something the benchmark depends on failed; the message says what."""


class StartError(BenchError):
    """A pooler did not start (or not with all its processes)."""


def say(text: str = "") -> None:
    print(text, flush=True)


# ============================================================================================
# Settings and the scenario registry


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one invocation measures; everything the results depend on."""

    scenario: str
    clients: tuple[int, ...]
    duration: float
    repeat: int
    targets: tuple[str, ...]
    pool_size: int
    sleep: float  # seconds of pg_sleep per transaction
    client_timeout: float  # one attempt (connect + query) gives up after this
    retry_pause: float  # a client pauses this long after a failed attempt
    loadgen_processes: int
    retries: int  # measure a run again (at most this often) when other programs were busy
    wait_idle: float  # before each run, wait at most this long for other programs to calm down
    quick: bool
    output: Path
    pgbench_scale: int = 10
    workers: tuple[int, ...] = (1, 2)  # trioproxy `[proxy] workers` counts (tps, churn)
    no_data_plane: bool = False  # also trioproxy with data_plane = false (tps, churn)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    workload: str  # key in WORKLOADS (storm) or the helper workload; see SCENARIO_RUNNERS
    clients: tuple[int, ...]  # connect_latency: samples; memory: idle clients
    duration: float
    quick_clients: tuple[int, ...]
    quick_duration: float
    pool_size: int = 20


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            name="storm",
            summary="N clients at once, each looping: connect, select pg_sleep(0.05), disconnect",
            workload="connect-query-disconnect",
            clients=(1000, 3000),
            duration=20.0,
            quick_clients=(300,),
            quick_duration=5.0,
            pool_size=90,
        ),
        Scenario(
            name="tps",
            summary="pgbench select-only (-S) with -M simple, extended and prepared, and the "
            "TPC-B-like default script, at a fixed number of clients (-j 2) for a fixed time",
            workload="pgbench",
            clients=(10, 50),
            duration=15.0,
            quick_clients=(10,),
            quick_duration=3.0,
        ),
        Scenario(
            name="churn",
            summary="pgbench -C -S: a new connection (login) for every transaction, the Lambda "
            "pattern; plain and TLS",
            workload="pgbench",
            clients=(10,),
            duration=15.0,
            quick_clients=(10,),
            quick_duration=3.0,
        ),
        Scenario(
            name="connect_latency",
            summary="time from connect to the first result (psycopg, sequential: connect, "
            "select 1, close), plain and TLS",
            workload="connect-latency",
            clients=(200,),
            duration=0.0,
            quick_clients=(50,),
            quick_duration=0.0,
        ),
        Scenario(
            name="memory",
            summary="resident memory per idle authenticated client connection of the pooler "
            "(asyncpg clients held open; VmRSS before and after)",
            workload="idle-clients",
            clients=(2000,),
            duration=0.0,
            quick_clients=(200,),
            quick_duration=0.0,
        ),
    )
}


# ============================================================================================
# The load generator: separate processes (`run.py --loadgen SPEC.json`), result on stdout


@dataclasses.dataclass
class LoadStats:
    attempts: int = 0
    successes: int = 0
    successes_in_window: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    close_errors: Counter[str] = dataclasses.field(default_factory=Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)  # connect + query
    connect_latencies: list[float] = dataclasses.field(default_factory=list)
    ok_per_second: Counter[int] = dataclasses.field(default_factory=Counter)


def error_key(exc: BaseException) -> str:
    """Group errors by class and first line, with ports and process ids left in."""
    if isinstance(exc, TimeoutError):
        return "TimeoutError: attempt exceeded the client timeout"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


@dataclasses.dataclass
class Window:
    """The measurement window, fixed at the moment every client is parked and released."""

    start: float = 0.0
    deadline: float = 0.0
    go: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


async def connect_query_disconnect(spec: dict[str, Any], stats: LoadStats, window: Window) -> None:
    """One storm client: loop connect, one simple query, disconnect until the deadline."""
    import asyncpg

    await window.go.wait()
    start, deadline = window.start, window.deadline
    sql = f"select pg_sleep({float(spec['sleep'])})"
    while time.monotonic() < deadline:
        stats.attempts += 1
        began = time.monotonic()
        conn: Any = None
        try:
            async with asyncio.timeout(spec["client_timeout"]):
                conn = await asyncpg.connect(
                    host=spec["host"],
                    port=spec["port"],
                    user=spec["user"],
                    password=spec["password"],
                    database=spec["database"],
                    ssl=False,
                    statement_cache_size=0,  # PgBouncer in transaction mode: no named statements
                    timeout=spec["client_timeout"],
                )
                connected = time.monotonic()
                await conn.execute(sql)  # no arguments: the simple query protocol
        except Exception as exc:  # counted, not raised: the tally is the point
            stats.errors[error_key(exc)] += 1
            if conn is not None:
                conn.terminate()
            await asyncio.sleep(spec["retry_pause"])
            continue
        done = time.monotonic()
        stats.successes += 1
        if done <= deadline:
            stats.successes_in_window += 1
        stats.ok_per_second[int(done - start)] += 1
        stats.latencies.append(done - began)
        stats.connect_latencies.append(connected - began)
        try:
            await conn.close(timeout=5)
        except Exception as exc:
            stats.close_errors[error_key(exc)] += 1
            conn.terminate()


WORKLOADS: dict[str, Callable[[dict[str, Any], LoadStats, Window], Coroutine[Any, Any, None]]] = {
    "connect-query-disconnect": connect_query_disconnect,
}


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 and max, in milliseconds (None when there is no value)."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 1)

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": round(ordered[-1] * 1000, 1) if ordered else None,
    }


async def loadgen_async(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["clients"]`` clients of one workload; release them all at ``start_at``."""
    stats = LoadStats()
    workload = WORKLOADS[spec["workload"]]
    window = Window()
    tasks = [
        asyncio.create_task(workload(spec, stats, window)) for _ in range(int(spec["clients"]))
    ]
    # Every client parks on `go`; the load-generator processes all release theirs at the same
    # wall-clock moment, chosen by the bench with time to spare for the interpreter start.
    await asyncio.sleep(max(0.0, float(spec["start_at"]) - time.time()))
    start = window.start = time.monotonic()
    window.deadline = start + float(spec["duration"])
    window.go.set()
    lags: list[float] = []
    monitor = asyncio.create_task(loop_lag_monitor(lags))
    # Attempts started before the deadline finish on their own within client_timeout.
    grace = float(spec["client_timeout"]) + 10
    _done, pending = await asyncio.wait(tasks, timeout=float(spec["duration"]) + grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.monotonic() - start
    monitor.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "clients": spec["clients"],
        "attempts": stats.attempts,
        "successes": stats.successes,
        "successes_in_window": stats.successes_in_window,
        "errors": dict(stats.errors),
        "close_errors": dict(stats.close_errors),
        "unfinished_clients": len(pending),
        "latencies_ms": [round(v * 1000, 2) for v in stats.latencies],
        "connect_latencies_ms": [round(v * 1000, 2) for v in stats.connect_latencies],
        "ok_per_second": [stats.ok_per_second.get(i, 0) for i in range(int(wall) + 1)],
        "wall_s": round(wall, 2),
        "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "loop_lag_ms": [round(v * 1000, 1) for v in lags],
    }


async def loop_lag_monitor(lags: list[float], interval: float = 0.1) -> None:
    """Record how late a 100 ms timer fires: the load generator's own stalls (for example
    a burst of SCRAM PBKDF2 computations, which run on the event loop)."""
    while True:
        began = time.monotonic()
        await asyncio.sleep(interval)
        lags.append(max(0.0, time.monotonic() - began - interval))


def merge_loadgen(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the results of the load-generator processes into one."""
    errors: Counter[str] = Counter()
    close_errors: Counter[str] = Counter()
    latencies: list[float] = []
    connect: list[float] = []
    per_second: list[int] = []
    lags = [v / 1000 for part in parts for v in part["loop_lag_ms"]]
    for part in parts:
        errors.update(part["errors"])
        close_errors.update(part["close_errors"])
        latencies += part["latencies_ms"]
        connect += part["connect_latencies_ms"]
        for i, n in enumerate(part["ok_per_second"]):
            per_second += [0] * (i + 1 - len(per_second))
            per_second[i] += n
    return {
        "clients": sum(p["clients"] for p in parts),
        "loadgen_processes": len(parts),
        "attempts": sum(p["attempts"] for p in parts),
        "successes": sum(p["successes"] for p in parts),
        "successes_in_window": sum(p["successes_in_window"] for p in parts),
        "errors": dict(errors.most_common()),
        "close_errors": dict(close_errors.most_common()),
        "unfinished_clients": sum(p["unfinished_clients"] for p in parts),
        "latency_ms": percentiles_ms([v / 1000 for v in latencies]),
        "connect_ms": percentiles_ms([v / 1000 for v in connect]),
        "ok_per_second": per_second,
        "wall_s": max(p["wall_s"] for p in parts),
        "loadgen_cpu_s": round(sum(p["loadgen_cpu_s"] for p in parts), 2),
        "loadgen_loop_lag_ms": {
            "p50": percentiles_ms(lags)["p50"],
            "p99": percentiles_ms(lags)["p99"],
            "max": percentiles_ms(lags)["max"],
            "over_500ms": sum(1 for v in lags if v > 0.5),
        },
    }


def connect_latency_helper(spec: dict[str, Any]) -> dict[str, Any]:
    """``samples`` sequential connections with psycopg (libpq): connect, ``select 1``, close.
    The time measured is from the start of connect to the first row (TLS: verify-full
    against the bench CA; plain: sslmode=disable)."""
    import psycopg

    params: dict[str, Any] = {
        "host": spec["host"],
        "port": spec["port"],
        "user": spec["user"],
        "password": spec["password"],
        "dbname": spec["database"],
        "connect_timeout": 30,
        "autocommit": True,
    }
    if spec["tls"]:
        params.update(sslmode="verify-full", sslrootcert=spec["ca"])
    else:
        params["sslmode"] = "disable"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tls_seen: set[bool] = set()
    began = time.monotonic()
    for _ in range(int(spec["samples"])):
        start = time.monotonic()
        try:
            with psycopg.connect(**params) as conn:
                row = conn.execute("select 1").fetchone()
                latencies.append(time.monotonic() - start)
                tls_seen.add(bool(conn.pgconn.ssl_in_use))
                assert row == (1,)
        except Exception as exc:  # counted: the tally is the point
            errors[error_key(exc)] += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "samples": int(spec["samples"]),
        "successes": len(latencies),
        "errors": dict(errors.most_common()),
        "latencies_ms": [round(v * 1000, 3) for v in latencies],
        "tls_in_use": sorted(tls_seen),
        "wall_s": round(time.monotonic() - began, 2),
        "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


async def idle_clients_helper(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``clients`` authenticated asyncpg connections (at most ``concurrency`` logins at
    a time, each within ``connect_timeout`` s, all within ``connect_deadline`` s: what is not
    connected by then is given up and counted), report ``ready`` on stdout, hold them idle
    until a line arrives on stdin, then close them."""
    import asyncpg

    began = time.monotonic()
    errors: Counter[str] = Counter()
    conns: list[Any] = []
    gate = asyncio.Semaphore(int(spec.get("concurrency", 50)))
    per_connect = float(spec.get("connect_timeout", 60))

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(per_connect):
                    conns.append(
                        await asyncpg.connect(
                            host=spec["host"],
                            port=spec["port"],
                            user=spec["user"],
                            password=spec["password"],
                            database=spec["database"],
                            ssl=False,
                            statement_cache_size=0,
                            timeout=per_connect,
                        )
                    )
            except Exception as exc:
                errors[error_key(exc)] += 1

    tasks = [asyncio.create_task(one()) for _ in range(int(spec["clients"]))]
    _done, pending = await asyncio.wait(tasks, timeout=float(spec.get("connect_deadline", 600)))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        errors[f"not connected within the {spec.get('connect_deadline', 600)} s deadline"] += len(
            pending
        )
    connected_s = time.monotonic() - began
    sys.stdout.write("ready " + json.dumps({"connected": len(conns)}) + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for conn in conns:
        conn.terminate()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "clients": int(spec["clients"]),
        "connected": len(conns),
        "errors": dict(errors.most_common()),
        "connect_all_s": round(connected_s, 2),
        "wall_s": round(time.monotonic() - began, 2),
        "loadgen_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def loadgen_main(spec_file: Path) -> int:
    raise_nofile_limit()
    spec = json.loads(spec_file.read_text())
    if spec["workload"] == "connect-latency":
        result = connect_latency_helper(spec)
    elif spec["workload"] == "idle-clients":
        result = asyncio.run(idle_clients_helper(spec))
    else:
        result = asyncio.run(loadgen_async(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# ============================================================================================
# Processes and measurements


def raise_nofile_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int, *, children: bool = False) -> float | None:
    """User + system CPU seconds of ``pid`` (plus its reaped children's with ``children``)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    ticks = utime + stime + (cutime + cstime if children else 0)
    return ticks / clock_ticks()


def child_pids(pid: int) -> list[int] | None:
    """The children of ``pid``, from ``/proc/<pid>/task/*/children`` (None when the kernel
    does not provide that file)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []  # gone
    for task in tasks:
        try:
            children += [int(v) for v in (task / "children").read_text().split()]
        except FileNotFoundError:
            if not (task / "stat").exists():
                continue  # the thread ended meanwhile
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return children


def process_family(root: int) -> list[int]:
    """``root`` and its live descendants, breadth first (children files, or a /proc scan)."""
    family = [root]
    table: ProcessTable | None = None
    for pid in family:  # grows while iterating
        children = child_pids(pid)
        if children is None:
            table = table if table is not None else process_table()
            children = [child for child, row in table.items() if row[0] == pid]
        family += [child for child in children if child not in family]
        if len(family) > 4096:  # bounded, whatever happens in /proc
            break
    return family


# pid -> (start time in ticks, CPU seconds: own user + system and its reaped children's, name)
CpuSnapshot = dict[int, tuple[int, float, str]]


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """The CPU used so far by each of ``pids``, including its exited and reaped children, so
    that the sum over a process family only grows, also when a worker exits and its parent
    reaps it."""
    snapshot: CpuSnapshot = {}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        snapshot[pid] = (int(fields[19]), ticks / clock_ticks(), name)
    return snapshot


def cpu_delta(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float, list[dict[str, Any]]]:
    """CPU seconds a process family used between two snapshots (the total: its sum after
    minus its sum before, exited members counted through their parents), and per process
    (members born meanwhile: everything they used)."""
    total = sum(v[1] for v in after.values()) - sum(v[1] for v in before.values())
    per_process: list[dict[str, Any]] = []
    for pid, (started, cpu, name) in after.items():
        previous = before.get(pid)
        used = cpu - previous[1] if previous and previous[0] == started else cpu
        per_process.append({"pid": pid, "name": name, "cpu_s": round(used, 2)})
    gone = [pid for pid, row in before.items() if after.get(pid, (None,))[0] != row[0]]
    if gone:
        per_process.append({"exited_during_run": gone})
    return round(total, 2), per_process


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (steal counts as busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user/nice
    return total - idle, total


def machine_cpu_parts() -> dict[str, int]:
    """Jiffies since boot by kind: process time, interrupts (softirq: loopback TCP), steal."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]] + [0] * 8
    return {"processes": v[0] + v[1] + v[2], "interrupts": v[5] + v[6], "steal": v[7]}


ProcessTable = dict[int, tuple[int, int, int, str]]  # pid -> (parent, start time, ticks, name)


def process_table() -> ProcessTable:
    """Every process's parent, start time, own user + system CPU ticks (not its children's)
    and name."""
    table: ProcessTable = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])
        table[int(entry.name)] = (int(fields[1]), int(fields[19]), ticks, name)
    return table


def foreign_cpu_by_name(before: ProcessTable, after: ProcessTable, ours: set[int]) -> Counter[str]:
    """CPU seconds, by process name, used between two snapshots by processes that are
    neither ``ours`` nor their descendants: other programs sharing the machine, and kernel
    threads (ksoftirqd, kworker). A lower bound: processes that exited meanwhile are missed."""

    def is_ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in ours:
                return True
            pid = after[pid][0] if pid in after else 0
            seen += 1
        return False

    used: Counter[str] = Counter()  # name -> CPU seconds
    for pid, (_parent, started, cpu, name) in after.items():
        if is_ours(pid):
            continue
        previous = before.get(pid)
        ticks = cpu - (previous[2] if previous and previous[1] == started else 0)
        if ticks:
            used[re.sub(r"[/:].*", "", name)] += ticks / clock_ticks()  # type: ignore[assignment]
    return used


def rss_kb(pids: Sequence[int]) -> int | None:
    """Sum of VmRSS (kB) of ``pids``, from /proc/<pid>/status; None if none could be read."""
    total, seen = 0, False
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    seen = True
                    break
    return total if seen else None


def foreign_cpu(before: ProcessTable, after: ProcessTable, ours: set[int]) -> float:
    """Total CPU seconds of :func:`foreign_cpu_by_name`."""
    return sum(foreign_cpu_by_name(before, after, ours).values())


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    from trioproxy.demo import indent, tail

    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise BenchError(f"exited with status {code} at startup; log:\n{indent(tail(log))}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"not accepting within {timeout:g} s; log:\n{indent(tail(log))}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """SIGTERM by PID, wait; SIGKILL if it does not exit in time (the demo's helper)."""
    from trioproxy.demo import stop_process as demo_stop_process

    return demo_stop_process(proc, timeout)


_NUMBERS = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?")


def log_problems(path: Path, markers: Sequence[str]) -> dict[str, int]:
    """Count the log lines containing one of ``markers``, grouped with numbers masked."""
    counts: Counter[str] = Counter()
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        for marker in markers:
            if marker in line:
                message = line[line.index(marker) :].strip()
                counts[_NUMBERS.sub("N", message)[:200]] += 1
                break
    return dict(counts.most_common(15))


class Target(Protocol):
    name: str
    port: int

    def start(self) -> None: ...

    def stop(self) -> int | None: ...

    def cpu_snapshot(self) -> CpuSnapshot | None: ...

    def problems(self) -> dict[str, int]: ...

    def exit_problem(self, code: int | None) -> str | None: ...

    def pids(self) -> list[int]: ...


class DirectTarget:
    """PostgreSQL itself: nothing to start."""

    name = "direct"

    def __init__(self, port: int) -> None:
        self.port = port

    def start(self) -> None:
        pass

    def stop(self) -> int | None:
        return None

    def cpu_snapshot(self) -> CpuSnapshot | None:
        return None

    def problems(self) -> dict[str, int]:
        return {}

    def exit_problem(self, code: int | None) -> str | None:
        return None

    def pids(self) -> list[int]:
        return []


class ServiceTarget:
    """A pooler run as a child process; started cold for every run, stopped by PID."""

    markers: tuple[str, ...] = ()
    clean_exit: frozenset[int] = frozenset({0})  # exit statuses after our SIGTERM

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        port: int,
        workdir: Path,
        *,
        processes: int = 1,
    ):
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.workdir = workdir
        self.processes = processes  # at least this many processes once started (workers)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.logfile = workdir / f"{name.replace(' ', '-').replace('=', '')}.log"
        self.leftovers: list[int] = []  # descendants that outlived the last stop

    def start(self) -> None:
        self.runs += 1
        stem = self.name.replace(" ", "-").replace("=", "")
        self.logfile = self.workdir / f"{stem}-{self.runs}.log"
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built here from absolute paths
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C goes to the bench, which stops us by PID
            )
        try:
            wait_for_port(self.port, self.proc, self.logfile, timeout=20)
            self.wait_settled(timeout=15)
        except BenchError as exc:
            self.stop()
            raise StartError(f"{self.name} {exc}") from None

    def wait_settled(self, timeout: float) -> None:
        """Wait until the pooler runs its ``processes`` (a supervisor's workers may still be
        starting when the port accepts) and their number has not changed for 0.5 s, so that
        the run's CPU is not their start-up. Bounded by ``timeout``."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        seen, stable_since = len(self.pids()), time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"exited with status {self.proc.returncode} after start-up")
            time.sleep(0.1)
            count = len(self.pids())
            if count != seen:
                seen, stable_since = count, time.monotonic()
            elif count >= self.processes and time.monotonic() - stable_since >= 0.5:
                return
        if seen < self.processes:
            raise BenchError(
                f"runs {seen} process(es) {timeout:g} s after start-up, expected at least "
                f"{self.processes}"
            )

    def stop(self) -> int | None:
        """SIGTERM the pooler by PID; then stop, by PID, any of its descendants that outlived
        it (worker processes must exit with their supervisor)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        family = cpu_snapshot(process_family(proc.pid)[1:])
        code = stop_process(proc)
        self.leftovers = []
        for pid, (started, _cpu, _name) in family.items():
            if cpu_snapshot([pid]).get(pid, (None,))[0] != started:
                continue  # gone (or the PID was reused: not ours)
            self.leftovers.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for pid in self.leftovers:
            while time.monotonic() < deadline and cpu_snapshot([pid]):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # not our child: usually raises at once
                time.sleep(0.05)
            started = family[pid][0]
            if cpu_snapshot([pid]).get(pid, (None,))[0] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return code

    def pids(self) -> list[int]:
        """The pooler's process and its live descendants (worker processes, if any)."""
        return [] if self.proc is None else process_family(self.proc.pid)

    def cpu_snapshot(self) -> CpuSnapshot | None:
        """CPU so far of each of the pooler's processes (the supervisor and its workers)."""
        return None if self.proc is None else cpu_snapshot(self.pids())

    def problems(self) -> dict[str, int]:
        return log_problems(self.logfile, self.markers)

    def exit_problem(self, code: int | None) -> str | None:
        problems = []
        if code is not None and code not in self.clean_exit:
            expected = sorted(self.clean_exit)
            problems.append(f"exit status {code} after SIGTERM (expected {expected})")
        if self.leftovers:
            problems.append(
                f"{len(self.leftovers)} descendant process(es) outlived it and were stopped "
                f"by PID: {self.leftovers}"
            )
        return "; ".join(problems) or None


class PgBouncerTarget(ServiceTarget):
    markers = (" WARNING ", " ERROR ", " FATAL ", "FATAL:", "ERROR:")
    clean_exit = frozenset({0, 1})  # SIGTERM is PgBouncer's "fast exit": die() -> status 1


class TrioproxyTarget(ServiceTarget):
    markers = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


# ============================================================================================
# The environment: cluster, PgBouncer, trioproxy


def find_pgbouncer(install: bool) -> str:
    """The pgbouncer binary; installed from Debian's package when missing and allowed."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found:
        return found
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            "pgbouncer not found; install it (Debian: apt-get install pgbouncer) or leave it "
            "out with --targets direct,trioproxy"
        )
    say("  pgbouncer is missing: installing Debian's package (the service is not started)")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = False
    if not policy.exists():  # keep invoke-rc.d from starting the system service
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        added_policy = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for argv in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "pgbouncer"],
        ):
            proc = subprocess.run(  # noqa: S603 - fixed argv
                argv, env=env, capture_output=True, text=True, timeout=600, check=False
            )
            if proc.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    found = shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if not found:
        raise BenchError("pgbouncer still not found after apt-get install pgbouncer")
    return found


def as_service_user(argv: list[str]) -> list[str]:
    """As root, exec ``argv`` as the postgres user (setpriv execs: the PID stays the child's)."""
    if os.geteuid() != 0:
        return argv
    from trioproxy.testing.postgres import RUN_AS

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise BenchError("running as root, but setpriv (util-linux) is missing")
    return [setpriv, f"--reuid={RUN_AS}", f"--regid={RUN_AS}", "--init-groups", "--", *argv]


def tool_version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv
            list(argv), capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return "unknown"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else ""


class Environment:
    """The throw-away cluster and the targets; ``close()`` removes everything."""

    def __init__(self, settings: Settings) -> None:
        from trioproxy.demo import Cluster, find_bindir
        from trioproxy.testing.postgres import chown_to_owner

        self.settings = settings
        self.bindir = find_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="trioproxy-bench-"))
        chown_to_owner(self.base)
        self.cluster: Cluster = Cluster(self.bindir, self.base)
        self.password = secrets.token_urlsafe(18)
        self.targets: dict[str, Target] = {}
        self.pgbouncer: str | None = None
        self.loadgens: list[subprocess.Popen[bytes]] = []
        self.nofile = raise_nofile_limit()
        self.tls_ca: Path | None = None
        self.config_files: dict[str, Path] = {}
        self.config_writers: dict[str, Callable[[int], str]] = {}
        self.verifier = ""
        self.tls_files: tuple[Path, Path] | None = None
        self.workers_supported = False
        self.workers_check = "not checked"
        self.workers_start_failure: str | None = None
        self.pgbench_scale: int | None = None  # set once pgbench -i has run
        self.trioproxy_tls: tuple[Path | str, Path | str] = ("", "")

    # -- set-up ------------------------------------------------------------------------------

    def setup(self) -> None:
        from trioproxy.testing.certs import make_self_signed_ca_and_server
        from trioproxy.testing.postgres import install_server_tls

        if "pgbouncer" in self.settings.targets:
            self.pgbouncer = find_pgbouncer(install=True)

        cluster = self.cluster
        cluster.create()
        # TLS material for every target: PostgreSQL (ssl = on: direct TLS clients), PgBouncer
        # (client_tls_sslmode = allow) and trioproxy (tls_cert_file): each accepts plain and
        # TLS clients, so one configuration serves both variants. Server connections: plain.
        tls = make_self_signed_ca_and_server(self.base / "tls")
        self.tls_ca = tls.ca_cert
        self.trioproxy_tls = (tls.server_cert, tls.server_key)
        self.tls_ca.chmod(0o644)
        install_server_tls(cluster.datadir, tls.server_cert, tls.server_key)
        with (cluster.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n# --- trioproxy bench ---\n")
            conf.writelines(f"{name} = {value}\n" for name, value in PG_SETTINGS.items())
        cluster.start()
        with cluster.connect() as admin:
            from psycopg import sql

            admin.execute(
                sql.SQL("create role {} login password {}").format(
                    sql.Identifier(DB), sql.Literal(self.password)
                )
            )
            admin.execute(
                sql.SQL("create database {} owner {}").format(
                    sql.Identifier(DB), sql.Identifier(DB)
                )
            )
            row = admin.execute(
                "select rolpassword from pg_authid where rolname = %s", [DB]
            ).fetchone()
            verifier = str(row[0]) if row else ""
        if not verifier.startswith("SCRAM-SHA-256$"):
            raise BenchError(f"unexpected password verifier for role {DB}: {verifier[:14]}...")

        self.targets["direct"] = DirectTarget(cluster.port)
        self.verifier = verifier
        self.tls_files = (tls.server_cert, tls.server_key)
        if "pgbouncer" in self.settings.targets:
            self.add_pgbouncer("pgbouncer", "transaction")
            # The reference for -M prepared, which PgBouncer 1.18 cannot pool per transaction.
            self.add_pgbouncer(PGBOUNCER_SESSION, "session")
        if "trioproxy" in self.settings.targets:
            self.add_trioproxy("trioproxy", 1)
            if any(n > 1 for n in self.settings.workers):
                self.check_workers_support(max(self.settings.workers))
            for n in self.settings.workers:
                if n == 1 or self.workers_supported:
                    self.add_trioproxy(TRIOPROXY_W.format(n), n)
            if self.settings.no_data_plane:
                self.add_trioproxy(TRIOPROXY_NO_DP, 1, data_plane=False)

    def add_pgbouncer(self, name: str, pool_mode: str) -> None:
        from trioproxy.testing.postgres import RUN_AS

        assert self.pgbouncer is not None
        workdir = self.base / name.replace(" ", "-")
        workdir.mkdir()
        port = free_port_checked()
        ini = workdir / "pgbouncer.ini"
        self.config_files[name] = ini
        self.config_writers[name] = lambda port: self.pgbouncer_ini(port, pool_mode)
        ini.write_text(self.pgbouncer_ini(port, pool_mode))
        assert self.tls_files is not None
        for source, copy in zip(self.tls_files, ("server.crt", "server.key"), strict=True):
            shutil.copyfile(source, workdir / copy)
            (workdir / copy).chmod(0o600)
        # The SCRAM verifier, not the password: PgBouncer then checks clients without
        # running PBKDF2 per login (as trioproxy, which derives it once at start), and
        # logs in to PostgreSQL with the client's SCRAM keys (pass-through).
        (workdir / "userlist.txt").write_text(f'"{DB}" "{self.verifier}"\n')
        (workdir / "userlist.txt").chmod(0o600)
        if os.geteuid() == 0:
            for path in (workdir, ini, workdir / "userlist.txt"):
                shutil.chown(path, user=RUN_AS, group=RUN_AS)
            for copy in ("server.crt", "server.key"):
                shutil.chown(workdir / copy, user=RUN_AS, group=RUN_AS)
        command = f"ulimit -n {self.nofile} && exec {shlex.quote(self.pgbouncer)} {ini}"
        argv = as_service_user(["/bin/sh", "-c", command])
        self.targets[name] = PgBouncerTarget(name, argv, clean_env(), port, workdir)

    def add_trioproxy(self, name: str, workers: int, *, data_plane: bool = True) -> None:
        workdir = self.base / name.replace(" ", "-").replace("=", "")
        workdir.mkdir()
        port = free_port_checked()
        config = workdir / "bench.toml"
        self.config_files[name] = config
        self.config_writers[name] = lambda port: self.trioproxy_toml(
            port, workers, data_plane=data_plane
        )
        config.write_text(self.trioproxy_toml(port, workers, data_plane=data_plane))
        argv = [sys.executable, "-m", "trioproxy", "--config", str(config)]
        env = clean_env(**{PASSWORD_ENV: self.password})
        self.targets[name] = TrioproxyTarget(name, argv, env, port, workdir, processes=workers)

    def check_workers_support(self, workers: int) -> None:
        """Does this build accept ``[proxy] workers``? ``trioproxy --check-config`` on a
        configuration with it; when it is rejected, the w>1 targets are skipped."""
        path = self.base / "workers-check.toml"
        path.write_text(self.trioproxy_toml(free_port_checked(), workers))
        argv = [sys.executable, "-m", "trioproxy", "--check-config", str(path)]
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module
            argv,
            env=clean_env(**{PASSWORD_ENV: self.password}),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.workers_supported = proc.returncode == 0
        answer = (proc.stderr or proc.stdout).strip().splitlines()
        self.workers_check = (
            f"`trioproxy --check-config` with `workers = {workers}`: exit {proc.returncode}"
            + (f", `{answer[-1][:200]}`" if answer else "")
        )
        if not self.workers_supported:
            say(f"  workers not supported by this build ({self.workers_check}): w>1 skipped")

    def pgbouncer_ini(self, port: int, pool_mode: str = "transaction") -> str:
        pool = self.settings.pool_size
        if pool_mode == "session":
            # Session mode holds a server connection per client for the whole session:
            # serving N concurrent clients takes N (with fewer, pgbench's blocking
            # prepare stalls a whole thread until query_wait_timeout). That cost is what
            # the -M prepared target compares against.
            pool = max(pool, max(self.settings.clients))
        most = max(10000, max(self.settings.clients) + 100)
        return f"""\
;; Written by bench/run.py: {pool_mode} pooling, {pool} server connections, like trioproxy.
[databases]
{DB} = host=127.0.0.1 port={self.cluster.port} dbname={DB}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = userlist.txt
pool_mode = {pool_mode}
default_pool_size = {pool}
max_db_connections = {pool}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {most}
listen_backlog = 4096
query_wait_timeout = 120
server_login_retry = 1
ignore_startup_parameters = extra_float_digits
client_tls_sslmode = allow
client_tls_cert_file = server.crt
client_tls_key_file = server.key
"""

    def trioproxy_toml(self, port: int, workers: int = 1, *, data_plane: bool = True) -> str:
        most = max(10000, max(self.settings.clients) + 100)
        # workers = 1 is the default: left out, so that builds without the key still start
        # (and data_plane = true likewise).
        workers_line = f"workers = {workers}\n" if workers > 1 else ""
        if not data_plane:
            workers_line += "data_plane = false\n"
        return f"""\
# Written by bench/run.py: transaction pooling, {self.settings.pool_size} server connections.
[proxy]
listen = "127.0.0.1:{port}"
{workers_line}max_client_connections = {most}
tls_cert_file = "{self.trioproxy_tls[0]}"   # TLS for clients that ask; plain ones too
tls_key_file = "{self.trioproxy_tls[1]}"

[backend]
host = "127.0.0.1"
port = {self.cluster.port}

[pool]
pool_mode = "transaction"
max_connections = {self.settings.pool_size}
connection_borrow_timeout = 120     # like PgBouncer's query_wait_timeout

[users.{DB}]
password_env = "{PASSWORD_ENV}"
"""

    def configure(self, settings: Settings) -> None:
        """Switch to another scenario's settings (pool size): rewrite the poolers' configuration
        files, which they read at their next (cold) start."""
        self.settings = settings
        for name, path in self.config_files.items():
            path.write_text(self.config_writers[name](self.targets[name].port))

    def trioproxy_variants(self) -> list[str]:
        """The trioproxy targets of the scenarios that compare worker counts (tps, churn)."""
        if "trioproxy" not in self.settings.targets:
            return []
        names = [
            TRIOPROXY_W.format(n)
            for n in self.settings.workers
            if TRIOPROXY_W.format(n) in self.targets
        ]
        if TRIOPROXY_NO_DP in self.targets:
            names.append(TRIOPROXY_NO_DP)
        return names

    def workers_note(self) -> str | None:
        """A line for the report when the w>1 targets could not run."""
        if "trioproxy" not in self.settings.targets:
            return None
        skipped = [n for n in self.settings.workers if n > 1 and not self.workers_supported]
        if skipped:
            names = ", ".join(TRIOPROXY_W.format(n) for n in skipped)
            return f"{names}: skipped, workers not supported by this build ({self.workers_check})"
        if self.workers_start_failure:
            return (
                "trioproxy with several workers: workers not supported by this build (the "
                f"configuration is accepted, but the proxy {self.workers_start_failure})"
            )
        return None

    def pgbench_env(self, *, tls: bool) -> dict[str, str]:
        """libpq's environment for pgbench: the password, and TLS either required (verified
        against the bench CA) or off (libpq's default, ``prefer``, would pick TLS)."""
        extra = {"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "30"}
        if tls:
            assert self.tls_ca is not None
            extra.update(PGSSLMODE="verify-full", PGSSLROOTCERT=str(self.tls_ca))
        else:
            extra["PGSSLMODE"] = "disable"
        return clean_env(**extra)

    def pgbench_binary(self) -> str:
        path = self.bindir / "pgbench"
        found = str(path) if path.exists() else shutil.which("pgbench")
        if not found:
            raise BenchError("pgbench not found (Debian: postgresql-client)")
        return found

    def pgbench_init(self, scale: int) -> None:
        """``pgbench -i`` once per invocation, directly against PostgreSQL."""
        if self.pgbench_scale is not None:
            return
        say(f"  pgbench -i -s {scale} (once, directly against PostgreSQL) ...")
        began = time.monotonic()
        argv = [self.pgbench_binary(), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1"]
        argv += ["-p", str(self.cluster.port), "-U", DB, DB]
        proc = subprocess.run(  # noqa: S603 - our own argv
            argv,
            env=self.pgbench_env(tls=False),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if proc.returncode != 0:
            raise BenchError(f"pgbench -i failed:\n{proc.stderr[-2000:]}")
        self.pgbench_scale = scale
        say(f"        done in {time.monotonic() - began:.0f} s")

    # -- measurement helpers -----------------------------------------------------------------

    def bench_connections(self) -> int:
        with self.cluster.connect() as conn:
            row = conn.execute(
                "select count(*) from pg_stat_activity where datname = %s", [DB]
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_quiet(self, timeout: float = 30) -> None:
        """Wait until no connection to the benchmark database is left (terminate stragglers)."""
        deadline = time.monotonic() + timeout
        while self.bench_connections() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.bench_connections():
            with self.cluster.connect() as conn:
                conn.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                    [DB],
                )
            time.sleep(1)

    def postmaster_pid(self) -> int | None:
        from trioproxy.testing.postgres import postmaster_pid

        return postmaster_pid(self.cluster.datadir)

    def postgres_cpu(self) -> float | None:
        """CPU seconds of the postmaster and its exited (reaped) backends."""
        pid = self.postmaster_pid()
        return None if pid is None else process_cpu(pid, children=True)

    def our_processes(self) -> set[int]:
        """This process (parent of the load generator and the poolers) and the postmaster."""
        return {os.getpid()} | ({pid} if (pid := self.postmaster_pid()) else set())

    def wait_idle(self) -> tuple[float, float]:
        """Wait (at most ``--wait-idle`` s) until other programs use under 0.15 CPU.

        This machine may be shared; a run measured while something else is busy is noisy.
        Returns (seconds waited, foreign CPUs in use over the last second).
        """
        began = time.monotonic()
        while True:
            before = process_table()
            time.sleep(1.0)
            rate = foreign_cpu(before, process_table(), self.our_processes())
            waited = time.monotonic() - began
            if rate < 0.15 or waited >= self.settings.wait_idle:
                if rate >= 0.15:
                    say(f"        (other programs still use {rate:.2f} CPUs; measuring anyway)")
                return waited, rate

    def run_loadgen(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run the clients in ``--loadgen-processes`` processes; return the merged result."""
        n = max(1, min(self.settings.loadgen_processes, int(spec["clients"])))
        shares = [spec["clients"] // n + (1 if i < spec["clients"] % n else 0) for i in range(n)]
        spec = {**spec, "start_at": time.time() + 2.0}
        log = self.base / "loadgen.log"
        for i, share in enumerate(shares):
            spec_file = self.base / f"loadgen-{i}.json"
            spec_file.write_text(json.dumps({**spec, "clients": share}))
            spec_file.chmod(0o600)  # it holds the password
            with log.open("ab") as err:
                self.loadgens.append(
                    subprocess.Popen(  # noqa: S603 - our own interpreter and script
                        [
                            sys.executable,
                            str(Path(__file__).resolve()),
                            "--loadgen",
                            str(spec_file),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        env=clean_env(),
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        parts: list[dict[str, Any]] = []
        try:
            for proc in self.loadgens:
                try:
                    out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise BenchError(
                        f"the load generator did not finish within {timeout:g} s"
                    ) from None
                if proc.returncode != 0 or not out.strip():
                    from trioproxy.demo import indent, tail

                    raise BenchError(
                        f"the load generator failed (exit {proc.returncode}):\n{indent(tail(log))}"
                    )
                parts.append(json.loads(out))
        finally:
            procs, self.loadgens = self.loadgens, []
            for proc in procs:
                stop_process(proc, timeout=5)
        return merge_loadgen(parts)

    def run_helper(
        self,
        spec: dict[str, Any],
        timeout: float,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Run one helper process (``run.py --loadgen SPEC``) and return its result. A helper
        that prints ``ready {...}`` first is held until ``on_ready`` has returned."""
        spec_file = self.base / "helper.json"
        spec_file.write_text(json.dumps(spec))
        spec_file.chmod(0o600)  # it holds the password
        log = self.base / "loadgen.log"
        with log.open("ab") as err:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and script
                [sys.executable, str(Path(__file__).resolve()), "--loadgen", str(spec_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=clean_env(),
                start_new_session=True,
            )
        self.loadgens.append(proc)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            assert proc.stdin is not None
            result: dict[str, Any] | None = None
            for line in proc.stdout:
                if line.startswith(b"ready "):
                    if on_ready is not None:
                        on_ready(json.loads(line[6:]))
                    proc.stdin.write(b"go\n")
                    proc.stdin.flush()
                elif line.strip():
                    result = json.loads(line)
            proc.wait()
            if proc.returncode != 0 or result is None:
                from trioproxy.demo import indent, tail

                raise BenchError(
                    f"the helper failed (exit {proc.returncode}; killed after {timeout:g} s "
                    f"if negative):\n{indent(tail(log))}"
                )
            return result
        finally:
            timer.cancel()
            self.loadgens.remove(proc)
            stop_process(proc, timeout=5)

    # -- tear-down ---------------------------------------------------------------------------

    def close(self) -> None:
        from trioproxy.demo import uninterruptible

        with uninterruptible():
            for proc in self.loadgens:
                stop_process(proc, timeout=5)
            self.loadgens = []
            for target in self.targets.values():
                with contextlib.suppress(Exception):
                    target.stop()
            try:
                self.cluster.stop()
            except Exception as exc:
                say(f"  PostgreSQL could not be stopped cleanly: {exc}")
            shutil.rmtree(self.base, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    from trioproxy.testing.postgres import clean_env as pg_clean_env

    return pg_clean_env(**extra)


def free_port_checked() -> int:
    from trioproxy.testing.postgres import free_port

    return free_port()


class Sampler:
    """Samples the server connections to the benchmark database every 100 ms, as superuser."""

    QUERY = (
        "select count(*), count(*) filter (where state = 'active') from pg_stat_activity "
        "where datname = %s and backend_type = 'client backend' and pid <> pg_backend_pid()"
    )

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.totals: list[int] = []
        self.active: list[int] = []
        self.error: str | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="sampler", daemon=True)

    def run(self) -> None:
        try:
            with self.cluster.connect() as conn:
                while not self.stopping.is_set():
                    began = time.monotonic()
                    row = conn.execute(self.QUERY, [DB]).fetchone()
                    if row:
                        self.totals.append(int(row[0]))
                        self.active.append(int(row[1]))
                    self.stopping.wait(max(0.0, SAMPLE_INTERVAL - (time.monotonic() - began)))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


# ============================================================================================
# Running a scenario


def measure(
    env: Environment, target: Target, work: Callable[[Target], dict[str, Any]]
) -> dict[str, Any]:
    """One measured run of any scenario: wait for a quiet machine, start ``target`` cold, run
    ``work(target)`` (which returns the workload's own figures, including ``wall_s``) while
    the server connections are sampled, stop the target, and add the CPU accounting of every
    party (load generator, pooler, PostgreSQL, other programs) to the result."""
    env.wait_quiet()
    waited, foreign_rate = env.wait_idle()
    load_before = os.getloadavg()[0]
    target.start()
    try:
        pg_cpu_before = env.postgres_cpu()
        proxy_cpu_before = target.cpu_snapshot()
        busy_before, total_before = machine_cpu()
        parts_before = machine_cpu_parts()
        table_before = process_table()
        with Sampler(env.cluster) as sampler:
            result = work(target)
        busy_after, total_after = machine_cpu()
        parts_after = machine_cpu_parts()
        foreign_by_name = foreign_cpu_by_name(table_before, process_table(), env.our_processes())
        foreign = sum(foreign_by_name.values())
        # At the end of the run, before the stop: every process of the pooler (a supervisor
        # and its workers), each as a delta over the run.
        proxy_cpu_after = target.cpu_snapshot()
    finally:
        exit_code = target.stop()
    proxy_cpu: float | None = None
    proxy_processes: list[dict[str, Any]] = []
    if proxy_cpu_before is not None and proxy_cpu_after is not None:
        proxy_cpu, proxy_processes = cpu_delta(proxy_cpu_before, proxy_cpu_after)
    env.wait_quiet()
    pg_cpu_after = env.postgres_cpu()

    def delta(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None else round(after - before, 2)

    result.update(
        target=target.name,
        peak_server_connections=max(sampler.totals, default=None),
        peak_active_server_connections=max(sampler.active, default=None),
        mean_server_connections=round(sum(sampler.totals) / len(sampler.totals), 1)
        if sampler.totals
        else None,
        samples=len(sampler.totals),
        sampler_error=sampler.error,
        server_connections_series=sampler.totals,
        active_server_connections_series=sampler.active,
        proxy_cpu_s=proxy_cpu,
        proxy_processes=proxy_processes,
        proxy_process_count=len([p for p in proxy_processes if "pid" in p]) or None,
        postgres_cpu_s=delta(pg_cpu_before, pg_cpu_after),
        machine_cpu_busy=round((busy_after - busy_before) / (total_after - total_before), 3)
        if total_after > total_before
        else None,
        machine_cpu_s=round((busy_after - busy_before) / clock_ticks(), 2),
        load_average_before=round(load_before, 2),
        waited_for_idle_s=round(waited, 1),
        foreign_cpu_rate_at_start=round(foreign_rate, 2),
        foreign_cpu_s=round(foreign, 2),
        foreign_cpu_top={name: round(sec, 2) for name, sec in foreign_by_name.most_common(8)},
        machine_cpu_parts_s={
            kind: round((parts_after[kind] - parts_before[kind]) / clock_ticks(), 2)
            for kind in parts_after
        },
        proxy_exit_code=exit_code,
        proxy_log_problems=target.problems(),
        proxy_exit_problem=target.exit_problem(exit_code),
    )
    # CPU the bench cannot attribute to the load generator, the pooler or PostgreSQL: kernel
    # work outside process context, the sampler, and anything else running on the machine.
    known = [result.get("loadgen_cpu_s"), result["proxy_cpu_s"], result["postgres_cpu_s"]]
    result["other_cpu_s"] = round(result["machine_cpu_s"] - sum(v or 0 for v in known), 2)
    return result


def measure_with_retries(
    env: Environment, target: Target, work: Callable[[Target], dict[str, Any]]
) -> dict[str, Any]:
    """:func:`measure`, again (up to ``--retries`` times) when other programs took more than
    MAX_FOREIGN_SHARE of the CPU meanwhile; the cleanest measurement is kept."""
    result = measure(env, target, work)
    measured = 1
    while foreign_share(result) > MAX_FOREIGN_SHARE and measured <= env.settings.retries:
        say(f"        other programs used {foreign_share(result):.0%} of the CPU: measuring again")
        again = measure(env, target, work)
        measured += 1
        if foreign_share(again) < foreign_share(result):
            result = again
    result["times_measured"] = measured
    return result


def run_once(env: Environment, target: Target, clients: int, repetition: int) -> dict[str, Any]:
    settings = env.settings
    scenario = SCENARIOS[settings.scenario]
    spec = {
        "workload": scenario.workload,
        "host": "127.0.0.1",
        "port": target.port,
        "user": DB,
        "password": env.password,
        "database": DB,
        "clients": clients,
        "duration": settings.duration,
        "sleep": settings.sleep,
        "client_timeout": settings.client_timeout,
        "retry_pause": settings.retry_pause,
    }
    result = measure(
        env,
        target,
        lambda t: env.run_loadgen(
            {**spec, "port": t.port}, timeout=settings.duration + settings.client_timeout + 90
        ),
    )
    result.update(
        repetition=repetition,
        tps=round(result["successes_in_window"] / settings.duration, 1),
        error_rate=round(sum(result["errors"].values()) / result["attempts"], 4)
        if result["attempts"]
        else None,
    )
    if result["proxy_cpu_s"] is not None and result["successes"]:
        result["proxy_cpu_us_per_success"] = round(
            result["proxy_cpu_s"] / result["successes"] * 1e6, 1
        )
    return result


def run_scenario(env: Environment) -> list[dict[str, Any]]:
    settings = env.settings
    runs: list[dict[str, Any]] = []
    total = len(settings.clients) * settings.repeat * len(settings.targets)
    for clients in settings.clients:
        for repetition in range(1, settings.repeat + 1):
            for name in settings.targets:
                say(
                    f"  [{len(runs) + 1}/{total}] {name:<9} {clients:>5} clients, "
                    f"{settings.duration:g} s, repetition {repetition} ..."
                )
                result = run_once(env, env.targets[name], clients, repetition)
                say("        " + one_line(result))
                measured = 1
                # On a shared machine, measure a run again when other programs took more
                # than MAX_FOREIGN_SHARE of the CPU meanwhile; keep the cleanest measurement.
                while foreign_share(result) > MAX_FOREIGN_SHARE and measured <= settings.retries:
                    say(
                        f"        other programs used {foreign_share(result):.0%} of the CPU: "
                        "measuring again"
                    )
                    again = run_once(env, env.targets[name], clients, repetition)
                    say("        " + one_line(again))
                    measured += 1
                    if foreign_share(again) < foreign_share(result):
                        result = again
                result["times_measured"] = measured
                runs.append(result)
    return runs


MAX_FOREIGN_SHARE = 0.10


def foreign_share(run: dict[str, Any]) -> float:
    """The share of the machine's CPU capacity that other programs used during a run."""
    capacity = (os.cpu_count() or 1) * max(float(run["wall_s"]), 0.001)
    foreign = float(run.get("foreign_cpu_s") or 0.0)
    return foreign / capacity


def one_line(run: dict[str, Any]) -> str:
    errors = sum(run["errors"].values())
    lat = run["latency_ms"]
    return (
        f"attempts {run['attempts']}, ok {run['successes']}, errors {errors}, "
        f"{run['tps']} tx/s, p50 {fmt(lat['p50'])} / p99 {fmt(lat['p99'])} ms, "
        f"peak server conns {run['peak_server_connections']}"
    )


# ============================================================================================
# tps, churn, connect_latency, memory: cases x repetitions x targets, interleaved


PGBENCH_FIGURES = {  # pgbench 15's summary lines
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
    "latency_avg_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "latency_stddev_ms": re.compile(r"^latency stddev = ([\d.]+) ms", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "initial_connection_ms": re.compile(r"^initial connection time = ([\d.]+) ms", re.M),
    "average_connection_ms": re.compile(r"^average connection time = ([\d.]+) ms", re.M),
}


def run_pgbench(
    env: Environment, target: Target, options: Sequence[str], clients: int, *, tls: bool
) -> dict[str, Any]:
    """One pgbench run for ``--duration`` seconds; its figures, CPU and errors."""
    seconds = max(1, round(env.settings.duration))
    argv = [env.pgbench_binary(), "-n", "-h", "127.0.0.1", "-p", str(target.port), "-U", DB]
    argv += ["-c", str(clients), "-j", str(min(2, clients)), "-T", str(seconds)]
    argv += ["-P", str(5 if seconds >= 10 else 1), *options, DB]  # -P: latency stddev
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    try:
        proc = subprocess.run(  # noqa: S603 - our own argv
            argv,
            env=env.pgbench_env(tls=tls),
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=False,
        )
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = str(exc.stdout or ""), str(exc.stderr or ""), None
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures: dict[str, Any] = {}
    for key, pattern in PGBENCH_FIGURES.items():
        match = pattern.search(out)
        if match:
            figures[key] = float(match.group(1)) if "." in match.group(1) else int(match.group(1))
    errors: Counter[str] = Counter()
    for line in err.splitlines():
        if line.startswith("progress:") or not line.strip():
            continue
        errors[_NUMBERS.sub("N", line.strip())[:240]] += 1
    aborted = code != 0 or "aborted" in out or not figures.get("transactions")
    result: dict[str, Any] = {
        "command": shlex.join(argv[1:]),
        "exit_code": code,
        "status": "failed" if aborted else "ok",
        "errors": dict(errors.most_common(10)),
        "wall_s": round(wall, 2),
        "loadgen_cpu_s": round(
            after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2
        ),
        **figures,
    }
    if aborted:
        first = next(iter(errors), "") or out.strip().splitlines()[-1:] or ["no output"]
        result["failure"] = first if isinstance(first, str) else first[0]
    return result


def run_cases(
    env: Environment,
    cases: Sequence[dict[str, Any]],
    targets: Sequence[str] | Callable[[dict[str, Any]], Sequence[str]],
    work: Callable[[dict[str, Any], Target], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
    per: tuple[str, str],
) -> list[dict[str, Any]]:
    """Each case, each repetition, each target, interleaved; every run measured. ``targets``:
    the same for every case, or per case. ``per``: (count key, result key) for the pooler's
    CPU µs per counted unit (transaction, login).

    A trioproxy target with several workers that does not start (a build without working
    ``workers``) is recorded as failed once and skipped from then on; any other target that
    does not start fails the scenario."""
    settings = env.settings

    def of(case: dict[str, Any]) -> Sequence[str]:
        return targets(case) if callable(targets) else targets

    runs: list[dict[str, Any]] = []
    broken: dict[str, str] = {}  # target -> why it did not start
    total = sum(len(of(case)) for case in cases) * settings.repeat
    for case in cases:
        for repetition in range(1, settings.repeat + 1):
            for name in of(case):
                say(f"  [{len(runs) + 1}/{total}] {name:<9} {case['case']}, rep {repetition} ...")
                if name in broken:
                    result = not_started(name, broken[name])
                else:
                    try:
                        result = measure_with_retries(
                            env, env.targets[name], functools.partial(work, case)
                        )
                    except StartError as exc:
                        if not is_multi_worker(name):
                            raise
                        broken[name] = f"did not start: {str(exc)[:300]}"
                        env.workers_start_failure = broken[name]
                        result = not_started(name, broken[name])
                result.update({**case, "repetition": repetition})
                per_tx(result, *per)
                say("        " + line(result))
                runs.append(result)
    return runs


def not_started(name: str, why: str) -> dict[str, Any]:
    """The result of a run that could not take place (its target did not start)."""
    return {
        "target": name,
        "status": "failed",
        "failure": why,
        "not_started": True,
        "errors": {},
        "wall_s": 0.0,
        "proxy_cpu_s": None,
        "proxy_log_problems": {},
        "proxy_exit_problem": None,
        "times_measured": 0,
    }


def is_multi_worker(name: str) -> bool:
    return name.startswith("trioproxy w=") and name != TRIOPROXY_W.format(1)


def per_tx(result: dict[str, Any], count_key: str, out_key: str) -> None:
    count = result.get(count_key)
    if result.get("proxy_cpu_s") is not None and count:
        result[out_key] = round(result["proxy_cpu_s"] / count * 1e6, 1)


def pgbench_line(run: dict[str, Any]) -> str:
    if run["status"] != "ok":
        return f"{failure_word(run['target'])} ({run.get('failure')})"
    return (
        f"{fmt(run.get('tps'))} tps, latency {fmt(run.get('latency_avg_ms'), 3)} ms "
        f"(stddev {fmt(run.get('latency_stddev_ms'), 3)}), "
        f"pooler CPU {fmt(run.get('proxy_cpu_us_per_tx'), 1)} µs/tx"
    )


TPS_MODES = (
    ("select-only, simple", ("-S", "-M", "simple")),
    ("select-only, extended", ("-S", "-M", "extended")),
    ("select-only, prepared", ("-S", "-M", "prepared")),
    ("TPC-B-like, simple", ("-M", "simple")),
)


def run_tps(env: Environment) -> list[dict[str, Any]]:
    env.pgbench_init(env.settings.pgbench_scale)
    cases = [
        {
            "case": f"{label}, {clients} clients",
            "mode": label,
            "clients": clients,
            "options": list(options),
        }
        for clients in env.settings.clients
        for label, options in TPS_MODES
    ]

    def targets(case: dict[str, Any]) -> list[str]:
        names: list[str] = [n for n in ("direct", "pgbouncer") if n in env.settings.targets]
        # -M prepared: PgBouncer 1.18 cannot run it in transaction mode (still run, shown as
        # "cannot run"); its session mode is the reference, with one server connection per client.
        if "prepared" in case["options"] and PGBOUNCER_SESSION in env.targets:
            names.append(PGBOUNCER_SESSION)
        return names + env.trioproxy_variants()

    def work(case: dict[str, Any], target: Target) -> dict[str, Any]:
        return run_pgbench(env, target, case["options"], case["clients"], tls=False)

    per = ("transactions", "proxy_cpu_us_per_tx")
    return run_cases(env, cases, targets, work, pgbench_line, per)


def run_churn(env: Environment) -> list[dict[str, Any]]:
    env.pgbench_init(env.settings.pgbench_scale)
    cases = [
        {
            "case": f"-C -S, {'TLS' if tls else 'plain'}, {clients} clients",
            "clients": clients,
            "tls": tls,
            "options": ["-C", "-S", "-M", "simple"],
        }
        for clients in env.settings.clients
        for tls in (False, True)
    ]

    def work(case: dict[str, Any], target: Target) -> dict[str, Any]:
        return run_pgbench(env, target, case["options"], case["clients"], tls=case["tls"])

    per = ("transactions", "proxy_cpu_us_per_tx")
    targets = [name for name in ("direct", "pgbouncer") if name in env.settings.targets]
    return run_cases(env, cases, targets + env.trioproxy_variants(), work, pgbench_line, per)


def helper_spec(env: Environment, target: Target, workload: str) -> dict[str, Any]:
    return {
        "workload": workload,
        "host": "127.0.0.1",
        "port": target.port,
        "user": DB,
        "password": env.password,
        "database": DB,
        "ca": str(env.tls_ca),
    }


def run_connect_latency(env: Environment) -> list[dict[str, Any]]:
    cases = [
        {"case": f"{'TLS' if tls else 'plain'}, {n} samples", "samples": n, "tls": tls}
        for n in env.settings.clients
        for tls in (False, True)
    ]

    def work(case: dict[str, Any], target: Target) -> dict[str, Any]:
        spec = {**helper_spec(env, target, "connect-latency"), **case}
        result = env.run_helper(spec, timeout=case["samples"] * 2 + 60)
        pct = percentiles_ms([v / 1000 for v in result["latencies_ms"]])
        result.update({f"{k}_ms": v for k, v in pct.items()})
        result["error_count"] = sum(result["errors"].values())
        result["status"] = "ok" if result["successes"] else "failed"
        if result["errors"]:
            result["failure"] = next(iter(result["errors"]))
        return result

    def line(run: dict[str, Any]) -> str:
        return (
            f"p50 {fmt(run['p50_ms'], 2)} / p95 {fmt(run['p95_ms'], 2)} / p99 "
            f"{fmt(run['p99_ms'], 2)} ms, errors {run['error_count']}, tls {run['tls_in_use']}, "
            f"pooler CPU {fmt(run.get('proxy_cpu_us_per_connect'), 1)} µs/connect"
        )

    per = ("successes", "proxy_cpu_us_per_connect")
    return run_cases(env, cases, env.settings.targets, work, line, per)


def run_memory(env: Environment) -> list[dict[str, Any]]:
    targets = [name for name in env.settings.targets if name != "direct"]
    if not targets:
        raise BenchError("memory measures the poolers only: add pgbouncer or trioproxy")
    most = max(env.settings.clients)
    if env.nofile < most + 100:  # the helper's own limit: the same hard limit as ours
        raise BenchError(
            f"{most:,} idle clients need more open files than the limit allows ({env.nofile:,},"
            f" the hard limit): raise it (ulimit -Hn, or LimitNOFILE= for a service), or use "
            "fewer --idle-clients"
        )
    cases = [{"case": f"{n:,} idle clients", "clients": n} for n in env.settings.clients]

    def work(case: dict[str, Any], target: Target) -> dict[str, Any]:
        time.sleep(0.5)
        before = rss_kb(target.pids())
        seen: dict[str, Any] = {}

        def on_ready(state: dict[str, Any]) -> None:
            time.sleep(1.0)  # let the pooler settle after the last login
            pids = target.pids()
            seen["rss_after_kb"] = rss_kb(pids)
            seen["processes"] = len(pids)
            seen.update(state)

        deadline = case["clients"] * 0.05 + 60  # 10,000 clients: 560 s at most to connect
        result = env.run_helper(
            {
                **helper_spec(env, target, "idle-clients"),
                "clients": case["clients"],
                "concurrency": 50,
                "connect_timeout": 60,
                "connect_deadline": deadline,
            },
            timeout=deadline + 120,
            on_ready=on_ready,
        )
        after = seen.get("rss_after_kb")
        result.update(rss_before_kb=before, rss_after_kb=after)
        result["processes"] = seen.get("processes")
        if after is not None:
            result["rss_total_mib"] = round(after / 1024, 1)
        if before is not None and after is not None and result["connected"]:
            result["kb_per_client"] = round((after - before) / result["connected"], 2)
            result["total_kb_per_client"] = round(after / result["connected"], 2)
        result["status"] = "ok" if result["connected"] == case["clients"] else "failed"
        if result["errors"]:
            result["failure"] = next(iter(result["errors"]))
        return result

    def line(run: dict[str, Any]) -> str:
        if run.get("not_started"):
            return f"FAILED ({run.get('failure')})"
        return (
            f"{run['connected']} connected in {fmt(run.get('connect_all_s'), 1)} s, RSS "
            f"{fmt(run['rss_before_kb'])} -> {fmt(run['rss_after_kb'])} kB "
            f"({fmt(run.get('rss_total_mib'), 1)} MiB), {fmt(run.get('kb_per_client'), 1)} "
            f"kB/client above idle, {fmt(run.get('total_kb_per_client'), 1)} kB/client in all, "
            f"pooler CPU {fmt(run.get('proxy_cpu_us_per_login'), 1)} µs/login"
        )

    return run_cases(env, cases, targets, work, line, ("connected", "proxy_cpu_us_per_login"))


@dataclasses.dataclass(frozen=True)
class CaseReport:
    """How a case-based scenario is tabulated: (header, key, digits) per figure, and the
    figures compared as ratios (trioproxy / reference)."""

    setup: str
    columns: tuple[tuple[str, str, int], ...]
    ratios: tuple[tuple[str, str], ...]


PGBENCH_SETUP = (
    "pgbench {scale_note}(`-n`, `-j 2`, `-T {duration:g}`, `-P` for the latency stddev), "
    "as the `bench` role with SCRAM; its summary lines give tps (without the initial "
    "connection time, except with -C), latency average and stddev. Pooler CPU: user + "
    "system time of the pooler's processes (/proc/<pid>/stat) during the run, divided by "
    "the transactions pgbench processed; for several processes (workers), the sum over all "
    "of them, each measured as a delta over the run"
)

CASE_REPORTS = {
    "tps": CaseReport(
        setup=PGBENCH_SETUP,
        columns=(
            ("tps", "tps", 0),
            ("latency avg ms", "latency_avg_ms", 3),
            ("latency stddev ms", "latency_stddev_ms", 3),
            ("pooler CPU µs/tx", "proxy_cpu_us_per_tx", 1),
        ),
        ratios=(
            ("tps", "tps"),
            ("latency avg", "latency_avg_ms"),
            ("CPU/tx", "proxy_cpu_us_per_tx"),
        ),
    ),
    "churn": CaseReport(
        setup=PGBENCH_SETUP + ". With -C every transaction is a new connection: startup, "
        "SCRAM login (and the TLS handshake, verify-full against the bench CA, for TLS), "
        "one select, close",
        columns=(
            ("tps", "tps", 0),
            ("latency avg ms", "latency_avg_ms", 3),
            ("connection ms", "average_connection_ms", 3),
            ("pooler CPU µs/tx", "proxy_cpu_us_per_tx", 1),
        ),
        ratios=(
            ("tps", "tps"),
            ("latency avg", "latency_avg_ms"),
            ("CPU/tx", "proxy_cpu_us_per_tx"),
        ),
    ),
    "connect_latency": CaseReport(
        setup="one helper process (psycopg 3 on libpq) connects sequentially: connect, "
        "`select 1`, fetch the row, close; the time from the start of connect to the row. "
        "TLS: sslmode=verify-full against the bench CA; plain: sslmode=disable. Pooler "
        "CPU: per successful connection",
        columns=(
            ("p50 ms", "p50_ms", 2),
            ("p95 ms", "p95_ms", 2),
            ("p99 ms", "p99_ms", 2),
            ("errors", "error_count", 0),
            ("pooler CPU µs/connect", "proxy_cpu_us_per_connect", 1),
        ),
        ratios=(("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")),
    ),
    "memory": CaseReport(
        setup="one helper process (asyncio + asyncpg, no TLS) opens the clients, at most 50 "
        "logins at a time (each within 60 s, all within 60 s + 0.05 s per client), and holds "
        "them idle and authenticated; the pooler's VmRSS "
        "(/proc/<pid>/status, all its processes) is read after start-up and 1 s after the "
        "last login. kB per client = (after - before) / clients. Pooler CPU: per login. "
        "Direct PostgreSQL is not measured (max_connections = 100)",
        columns=(
            ("connected", "connected", 0),
            ("RSS before kB", "rss_before_kb", 0),
            ("RSS after kB", "rss_after_kb", 0),
            ("RSS total MiB", "rss_total_mib", 1),
            ("kB per client (above idle)", "kb_per_client", 1),
            ("kB per client (total RSS / clients)", "total_kb_per_client", 1),
            ("seconds to connect all", "connect_all_s", 1),
            ("pooler CPU µs/login", "proxy_cpu_us_per_login", 1),
        ),
        ratios=(
            ("RSS total", "rss_total_mib"),
            ("kB per client", "kb_per_client"),
            ("CPU/login", "proxy_cpu_us_per_login"),
        ),
    ),
}


GIB_KB = 1024 * 1024


def memory_summary(results: list[dict[str, Any]]) -> list[str]:
    """One line per case and pooler: RSS in all and per client, against the issue's budget
    (10,000 idle clients well under 1 GB)."""
    lines: list[str] = []
    for row in results:
        if "failure" in row:
            lines.append(f"{row['target']}, {row['case']}: {failure_word(row['target'])}")
            continue
        total = row.get("rss_after_kb")
        if total is None:
            continue
        share = total / GIB_KB
        lines.append(
            f"{row['target']}, {row['case']} ({fmt(row.get('connected'))} connected): RSS "
            f"{total / 1024:,.1f} MiB in all, {fmt(row.get('total_kb_per_client'), 1)} kB per "
            f"client in all, {fmt(row.get('kb_per_client'), 1)} kB per client above its idle "
            f"RSS; {share:.1%} of 1 GiB"
        )
    return lines


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def case_results(runs: list[dict[str, Any]], spec: CaseReport) -> list[dict[str, Any]]:
    """Per case and target (in the order they ran): the median of each figure over the
    successful repetitions, or the failure when no repetition succeeded."""
    rows: list[dict[str, Any]] = []
    for case in dict.fromkeys(r["case"] for r in runs):
        for target in dict.fromkeys(r["target"] for r in runs if r["case"] == case):
            mine = [r for r in runs if r["case"] == case and r["target"] == target]
            ok = [r for r in mine if r.get("status", "ok") == "ok"]
            row: dict[str, Any] = {"case": case, "target": target, "repetitions": len(mine)}
            row["ok_repetitions"] = len(ok)
            for key in ("mode", "clients"):
                if key in mine[0]:
                    row[key] = mine[0][key]
            for _header, key, _digits in spec.columns:
                row[key] = median([r.get(key) for r in ok])
            if ok:
                row["proxy_process_count"] = median([r.get("proxy_process_count") for r in ok])
            else:
                row["failure"] = mine[0].get("failure") or "failed"
            rows.append(row)
    return rows


REFERENCES = ("pgbouncer", PGBOUNCER_SESSION, "direct")


def is_trioproxy(name: str) -> bool:
    return name in ("trioproxy", TRIOPROXY_NO_DP) or name.startswith("trioproxy w=")


def failure_word(target: str) -> str:
    """A reference that fails could not run the workload; trioproxy failing is a bug."""
    return "cannot run" if target.startswith("pgbouncer") else "FAILED"


def case_ratios(results: list[dict[str, Any]], spec: CaseReport) -> list[dict[str, Any]]:
    """Each trioproxy target's medians divided by each reference's, per case; with several
    worker counts, also w=N against w=1."""
    by_key = {(r["case"], r["target"]): r for r in results}
    rows: list[dict[str, Any]] = []
    for case in dict.fromkeys(r["case"] for r in results):
        mine_targets = [r["target"] for r in results if r["case"] == case]
        for name in filter(is_trioproxy, mine_targets):
            mine = by_key[(case, name)]
            others: list[str] = [*REFERENCES]
            if is_multi_worker(name) or name == TRIOPROXY_NO_DP:
                others.append(TRIOPROXY_W.format(1))
            for other in others:
                ref = by_key.get((case, other))
                if ref is None:
                    continue
                row: dict[str, Any] = {"case": case, "target": name, "versus": other}
                for header, key in spec.ratios:
                    if "failure" in ref:
                        row[header] = "n/a"  # the results table says why
                    elif "failure" in mine:
                        row[header] = "FAILED"
                    else:
                        row[header] = ratio(mine.get(key), ref.get(key))
                rows.append(row)
    return rows


def ratio_cells(row: dict[str, Any], spec: CaseReport) -> list[str]:
    return [row["case"], row.get("target", "trioproxy"), row["versus"]] + [
        str(row[h]) for h, _k in spec.ratios
    ]


def prepared_target(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's target: trioproxy's ``-M prepared`` in transaction mode reaches at least
    PgBouncer's tps in session mode. One row per client count and trioproxy target."""
    rows: list[dict[str, Any]] = []
    by_key = {(r["case"], r["target"]): r for r in results}
    for case in dict.fromkeys(r["case"] for r in results if r.get("mode", "").endswith("prepared")):
        session = by_key.get((case, PGBOUNCER_SESSION))
        if session is None:
            continue
        names = [r["target"] for r in results if r["case"] == case]
        for name in filter(is_trioproxy, names):
            mine = by_key[(case, name)]
            value: float | None = None
            if "failure" not in mine and "failure" not in session and session.get("tps"):
                value = round(float(mine["tps"]) / float(session["tps"]), 2)
            rows.append(
                {
                    "case": case,
                    "clients": mine.get("clients"),
                    "target": name,
                    "trioproxy_tps": mine.get("tps"),
                    "trioproxy_failure": mine.get("failure"),
                    "pgbouncer_session_tps": session.get("tps"),
                    "pgbouncer_session_failure": session.get("failure"),
                    "ratio": value,
                    "met": None if value is None else value >= 1.0,
                }
            )
    return rows


def prepared_target_markdown(rows: list[dict[str, Any]], pool_size: int) -> list[str]:
    if not rows:
        return []
    table = [
        [
            fmt(r["clients"]),
            r["target"],
            fmt(r["trioproxy_tps"]) if not r["trioproxy_failure"] else "FAILED",
            fmt(r["pgbouncer_session_tps"]) if not r["pgbouncer_session_failure"] else "failed",
            fmt(r["ratio"], 2),
            "-" if r["met"] is None else ("**met**" if r["met"] else "**not met**"),
        ]
        for r in rows
    ]
    return [
        "## Target: `-M prepared`, trioproxy (transaction mode) / PgBouncer (session mode)",
        "",
        "The issue's target: trioproxy's `pgbench -S -M prepared` in transaction mode reaches "
        "at least PgBouncer's tps in session mode (ratio >= 1.00). PgBouncer 1.18 in transaction "
        "mode cannot run `-M prepared` at all. Session mode holds one server connection per "
        "client for the whole session, so its pool is as large as the client count (at "
        f"least {pool_size}): that many server connections is what serving those clients "
        "in session mode costs, where trioproxy uses its pool of "
        f"{pool_size}.",
        "",
        *(
            [
                "Session mode *cannot run* here: PgBouncer ended the queued clients with "
                "`query_wait_timeout` (120 s). pgbench (15) prepares a client's statements "
                "with a synchronous `PQprepare` at its first transaction, so a client queued "
                "for a session blocks its whole pgbench thread (`-j 2`), including the clients "
                "that hold the sessions, until the timeout: with more clients than the pool, "
                "`-M prepared` against session mode stalls instead of queueing.",
                "",
            ]
            if any("query_wait_timeout" in str(r["pgbouncer_session_failure"] or "") for r in rows)
            else []
        ),
        md_table(
            [
                "clients",
                "trioproxy",
                "trioproxy tps",
                "PgBouncer session tps",
                "ratio",
                "target >= 1.00",
            ],
            table,
        ),
        "",
    ]


def result_cells(row: dict[str, Any], spec: CaseReport) -> list[str]:
    if "failure" in row:
        first = f"{failure_word(row['target'])}: `{str(row['failure'])[:150]}`"
        return [first] + ["-"] * (len(spec.columns) - 1)
    return [fmt(row.get(key), digits) for _header, key, digits in spec.columns]


def run_cpu_row(run: dict[str, Any]) -> list[str]:
    parts = run.get("machine_cpu_parts_s") or {}
    return [
        run["case"],
        run["target"],
        str(run["repetition"]),
        run.get("status", "ok"),
        fmt(run.get("loadgen_cpu_s"), 1),
        fmt(run.get("proxy_cpu_s"), 2),
        fmt(run.get("postgres_cpu_s"), 1),
        f"{fmt(run.get('foreign_cpu_s'), 1)} ({foreign_share(run):.0%})",
        fmt(run.get("times_measured")),
        fmt(parts.get("interrupts"), 1),
        fmt(run.get("machine_cpu_s"), 1),
        fmt(run.get("peak_server_connections")),
    ]


RUN_CPU_HEADERS = (
    "case",
    "target",
    "rep",
    "status",
    "load generator CPU s",
    "pooler CPU s",
    "PostgreSQL CPU s",
    "other programs",
    "times measured",
    "softirq + irq",
    "machine busy s",
    "peak server conns",
)


def md_header(report: dict[str, Any], setup: str) -> list[str]:
    """The title and the run's context: date, command, machine, versions, set-up."""
    settings = report["settings"]
    machine = report["machine"]
    scenario = SCENARIOS[report["scenario"]]
    return [
        f"# Benchmark: {report['scenario']}",
        "",
        f"{scenario.summary}. Written by `bench/run.py`; the raw data is in "
        f"`{report['scenario']}.json` next to this file.",
        "",
        f"* Date: {machine['date']}",
        f"* Command: `{report['command']}`",
        f"* Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; PostgreSQL, the poolers "
        "and the load generator share these CPUs",
        f"* Versions: Python {machine['python']}, {machine['postgresql']}, "
        f"{machine['pgbouncer'].splitlines()[0]}, trioproxy {machine['packages']['trioproxy']} "
        f"(git {machine['git'] or '?'}), trio {machine['packages']['trio']}, "
        f"asyncpg {machine['packages']['asyncpg']}, psycopg {machine['packages']['psycopg']}",
        f"* Setup: PostgreSQL `max_connections = 100`, scram-sha-256, `fsync = off`, "
        f"`ssl = on`; PgBouncer and trioproxy in transaction mode with "
        f"{settings['pool_size']} server connections each (plain TCP to PostgreSQL), TLS "
        "offered to clients (PgBouncer `client_tls_sslmode = allow`); each pooler started "
        "cold for each run; targets interleaved (direct, PgBouncer, trioproxy, direct, ...)",
        f"* Clients: {setup}",
        *extra_targets_lines(report),
        "",
    ]


def extra_targets_lines(report: dict[str, Any]) -> list[str]:
    """What the report says about the session-mode reference and the worker counts."""
    names = {r["target"] for r in report["runs"]}
    lines: list[str] = []
    if PGBOUNCER_SESSION in names:
        lines.append(
            f"* `{PGBOUNCER_SESSION}`: a second PgBouncer, `pool_mode = session`, one server "
            "connection per client (trioproxy and the transaction-mode PgBouncer: "
            f"{report['settings']['pool_size']}), run for `-M prepared` only: the reference "
            "for trioproxy's `-M prepared` in transaction mode"
        )
    workers = sorted(n for n in names if n.startswith("trioproxy w="))
    if workers:
        lines.append(
            f"* {', '.join(f'`{n}`' for n in workers)}: trioproxy with `[proxy] workers = N` "
            "(N processes sharing the port with SO_REUSEPORT; w=1 leaves the key out). Its CPU "
            "is the sum over all its processes, the supervisor and every worker, each measured "
            "as a delta over the run (processes in the run's median: "
            + ", ".join(f"{n} {fmt(proc_count(report, n))}" for n in workers)
            + ")"
        )
    if TRIOPROXY_NO_DP in names:
        lines.append(
            f"* `{TRIOPROXY_NO_DP}` (`--no-data-plane`): trioproxy w=1 with `[proxy] data_plane "
            "= false`, each client's own task moving its bytes: the A/B reference for the "
            "batched data plane (its ratio to w=1 is that A/B)"
        )
    note = report["settings"].get("workers_note")
    if note:
        lines.append(f"* **{note}**")
    return lines


def proc_count(report: dict[str, Any], target: str) -> float | None:
    counts = [r.get("proxy_process_count") for r in report["runs"] if r["target"] == target]
    value = median(counts)
    return None if value is None else round(value)


RATIO_CASE_HEADERS = ("case", "trioproxy", "vs")


def render_cases_text(report: dict[str, Any]) -> str:
    spec = CASE_REPORTS[report["scenario"]]
    headers = ["case", "target", *(h for h, _k, _d in spec.columns)]
    rows = [[r["case"], r["target"], *result_cells(r, spec)] for r in report["results"]]
    ratio_headers = [*RATIO_CASE_HEADERS, *(h for h, _k in spec.ratios)]
    ratio_rows = [ratio_cells(r, spec) for r in report["ratios"]]
    out = [
        f"{report['scenario']}: medians of {report['settings']['repeat']} repetition(s)",
        text_table(headers, [[c.replace("`", "")[:70] for c in row] for row in rows]),
        "",
        "ratios (trioproxy / reference)",
        text_table(ratio_headers, ratio_rows),
    ]
    if report.get("prepared_target"):
        out += ["", "target: -M prepared, trioproxy (transaction) / PgBouncer (session) tps >= 1"]
        out += [
            f"  {r['case']}, {r['target']}: "
            + (
                f"{fmt(r['trioproxy_tps'])} / {fmt(r['pgbouncer_session_tps'])} = "
                f"{fmt(r['ratio'], 2)} ({'met' if r['met'] else 'NOT met'})"
                if r["ratio"] is not None
                else f"n/a (trioproxy: {r['trioproxy_failure'] or 'ok'}; PgBouncer session: "
                f"{r['pgbouncer_session_failure'] or 'ok'})"
            )
            for r in report["prepared_target"]
        ]
    out += [f"  {line}" for line in report.get("summary_lines", [])]
    if report["settings"].get("workers_note"):
        out += ["", report["settings"]["workers_note"]]
    return "\n".join(out)


def render_cases_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    spec = CASE_REPORTS[report["scenario"]]
    scale = settings.get("pgbench_scale")
    setup = spec.setup.format(
        duration=settings["duration"],
        scale_note=f"on `pgbench -i -s {scale}` tables " if scale else "",
    )
    out = md_header(report, setup)
    out += [
        f"## Results: medians of {settings['repeat']} repetition(s)",
        "",
        md_table(
            ["case", "target", *(h for h, _k, _d in spec.columns)],
            [[r["case"], r["target"], *result_cells(r, spec)] for r in report["results"]],
        ),
        "",
        *summary_markdown(report),
        *prepared_target_markdown(report.get("prepared_target") or [], settings["pool_size"]),
        "## Ratios",
        "",
        "trioproxy's median divided by the reference's (tps: higher is better; latency, "
        "CPU and memory: lower is better). With several worker counts, w=N is also divided "
        "by w=1.",
        "",
        md_table(
            [*RATIO_CASE_HEADERS, *(h for h, _k in spec.ratios)],
            [ratio_cells(r, spec) for r in report["ratios"]],
        ),
        "",
        "## Runs",
        "",
        "CPU seconds during each run. Load generator: pgbench or the helper process. "
        "PostgreSQL: the postmaster and its exited backends. Other programs: processes on "
        "the machine that are not the benchmark's (a lower bound; above "
        f"{MAX_FOREIGN_SHARE:.0%} of the machine a run is measured again, up to --retries "
        "times, and the cleanest kept).",
        "",
        md_table(RUN_CPU_HEADERS, [run_cpu_row(r) for r in report["runs"]]),
        "",
    ]
    for run in report["runs"]:
        notes = [f"{n:,} x `{m}`" for m, n in (run.get("errors") or {}).items()]
        notes += [f"{n:,} x in its log: `{m}`" for m, n in run["proxy_log_problems"].items()]
        if run.get("proxy_exit_problem"):
            notes.append(run["proxy_exit_problem"])
        if not notes:
            continue
        out += [f"{run['target']}, {run['case']} (repetition {run['repetition']}):", ""]
        out += [f"* {note}" for note in notes] + [""]
    if report["runs"] and report["runs"][0].get("command"):
        out += ["pgbench command lines (port and target differ):", ""]
        for command in dict.fromkeys(r["command"] for r in report["runs"]):
            out.append(f"* `pgbench {command}`")
        out.append("")
    return "\n".join(out)


def summary_markdown(report: dict[str, Any]) -> list[str]:
    lines = report.get("summary_lines") or []
    return ["## Summary", "", *(f"* {line}" for line in lines), ""] if lines else []


WORKER_SCENARIOS = ("tps", "churn")  # run trioproxy once per --workers count

SCENARIO_RUNNERS: dict[str, Callable[[Environment], list[dict[str, Any]]]] = {
    "storm": run_scenario,
    "tps": run_tps,
    "churn": run_churn,
    "connect_latency": run_connect_latency,
    "memory": run_memory,
}


# ============================================================================================
# Report


def fmt(value: object, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def machine_info(settings: Settings, bindir: Path, pgbouncer: str | None) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for package in ("trioproxy", "trio", "asyncpg", "psycopg"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(  # noqa: S603 - fixed argv
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": tool_version([str(bindir / "postgres"), "--version"]),
        "pgbouncer": tool_version([pgbouncer, "--version"]) if pgbouncer else "not used",
        "packages": versions,
        "git": commit,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def command_line(argv: Sequence[str]) -> str:
    python = os.path.relpath(sys.executable) if sys.executable.startswith(str(REPO)) else "python"
    script = os.path.relpath(Path(__file__).resolve())
    command = shlex.join([python, script, *argv])
    if os.environ.get("MAKELEVEL") and not argv:
        command = f"make bench  ({command})"
    return command


def summarize(runs: list[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """Per client count and repetition: trioproxy against PgBouncer and against direct."""
    by_key = {(r["clients"], r["repetition"], r["target"]): r for r in runs}
    rows: list[dict[str, Any]] = []
    for clients in settings.clients:
        for repetition in range(1, settings.repeat + 1):
            tp = by_key.get((clients, repetition, "trioproxy"))
            if tp is None:
                continue
            for other in ("pgbouncer", "direct"):
                ref = by_key.get((clients, repetition, other))
                if ref is None:
                    continue
                rows.append(
                    {
                        "clients": clients,
                        "repetition": repetition,
                        "versus": other,
                        "tps": ratio(tp["tps"], ref["tps"]),
                        "successes": ratio(tp["successes"], ref["successes"]),
                        "p50": ratio(tp["latency_ms"]["p50"], ref["latency_ms"]["p50"]),
                        "p99": ratio(tp["latency_ms"]["p99"], ref["latency_ms"]["p99"]),
                        "error_rate": (
                            f"{fmt_pct(tp['error_rate'])} vs {fmt_pct(ref['error_rate'])}"
                        ),
                        "proxy_cpu": ratio(
                            tp.get("proxy_cpu_us_per_success"), ref.get("proxy_cpu_us_per_success")
                        ),
                    }
                )
    return rows


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


RUN_HEADERS = (
    "target",
    "rep",
    "attempts",
    "ok",
    "errors",
    "error %",
    "ok tx/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "peak server conns",
    "proxy CPU µs/ok",
    "machine CPU",
)


def run_row(run: dict[str, Any]) -> list[str]:
    lat = run["latency_ms"]
    return [
        run["target"],
        str(run["repetition"]),
        fmt(run["attempts"]),
        fmt(run["successes"]),
        fmt(sum(run["errors"].values())),
        fmt_pct(run["error_rate"]),
        fmt(run["tps"]),
        fmt(lat["p50"]),
        fmt(lat["p95"]),
        fmt(lat["p99"]),
        fmt(run["peak_server_connections"]),
        fmt(run.get("proxy_cpu_us_per_success")),
        fmt_pct(run["machine_cpu_busy"]),
    ]


CPU_HEADERS = (
    "target",
    "rep",
    "load generator",
    "load generator busy",
    "load generator lag p99 ms",
    "pooler",
    "PostgreSQL",
    "other programs",
    "times measured",
    "softirq + irq",
    "steal",
    "machine busy",
)


def cpu_row(run: dict[str, Any]) -> list[str]:
    parts = run.get("machine_cpu_parts_s") or {}
    return [
        run["target"],
        str(run["repetition"]),
        fmt(run["loadgen_cpu_s"], 1),
        fmt_pct(
            run["loadgen_cpu_s"] / run["wall_s"] / run.get("loadgen_processes", 1)
            if run["wall_s"]
            else None
        ),
        fmt((run.get("loadgen_loop_lag_ms") or {}).get("p99")),
        fmt(run["proxy_cpu_s"], 1),
        fmt(run["postgres_cpu_s"], 1),
        f"{fmt(run.get('foreign_cpu_s'), 1)} ({foreign_share(run):.0%})",
        fmt(run.get("times_measured")),
        fmt(parts.get("interrupts"), 1),
        fmt(parts.get("steal"), 1),
        fmt(run["machine_cpu_s"], 1),
    ]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


RATIO_HEADERS = (
    "clients",
    "rep",
    "trioproxy vs",
    "ok tx/s",
    "p50",
    "p99",
    "error rate",
    "proxy CPU/ok",
)


def ratio_row(row: dict[str, Any]) -> list[str]:
    return [
        fmt(row["clients"]),
        str(row["repetition"]),
        row["versus"],
        row["tps"],
        row["p50"],
        row["p99"],
        row["error_rate"],
        row["proxy_cpu"],
    ]


def render_text(report: dict[str, Any]) -> str:
    settings = report["settings"]
    out: list[str] = []
    for clients in settings["clients"]:
        runs = [r for r in report["runs"] if r["clients"] == clients]
        out.append(f"{report['scenario']}: {clients} clients, {settings['duration']:g} s")
        out.append(text_table(RUN_HEADERS, [run_row(r) for r in runs]))
        out.append("")
    out.append("ratios (trioproxy / reference; tx/s higher is better, latency lower is better)")
    out.append(text_table(RATIO_HEADERS, [ratio_row(r) for r in report["ratios"]]))
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    machine = report["machine"]
    scenario = SCENARIOS[report["scenario"]]
    out = [
        f"# Benchmark: {report['scenario']}",
        "",
        f"{scenario.summary}. Written by `bench/run.py`; the raw data, including the server",
        f"connection samples, is in `{report['scenario']}.json` next to this file.",
        "",
        f"* Date: {machine['date']}",
        f"* Command: `{report['command']}`",
        f"* Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; PostgreSQL, the poolers "
        "and the load generator share these CPUs",
        f"* Versions: Python {machine['python']}, {machine['postgresql']}, "
        f"{machine['pgbouncer'].splitlines()[0]}, trioproxy {machine['packages']['trioproxy']} "
        f"(git {machine['git'] or '?'}), trio {machine['packages']['trio']}, "
        f"asyncpg {machine['packages']['asyncpg']}",
        f"* Setup: PostgreSQL `max_connections = 100`, scram-sha-256, `fsync = off`; "
        f"PgBouncer and trioproxy in transaction mode with {settings['pool_size']} server "
        "connections each, SCRAM for clients, no TLS (offered, not used); each pooler "
        "started cold for each run",
        f"* Clients: one asyncpg load-generator process (asyncio), all clients released at "
        f"once; a loop is connect, `select pg_sleep({settings['sleep']:g})`, disconnect; "
        f"an attempt gives up after {settings['client_timeout']:g} s; after a failed attempt "
        f"a client pauses {settings['retry_pause']:g} s",
        "* Latency: connect + query of successful attempts. Peak server connections: "
        "`pg_stat_activity` sampled every 100 ms. Proxy CPU: the CPU time of the pooler's "
        "processes per successful loop (login + query + logout)",
        "",
    ]
    for clients in settings["clients"]:
        runs = [r for r in report["runs"] if r["clients"] == clients]
        out += [f"## {clients:,} clients, {settings['duration']:g} s", ""]
        out += [md_table(RUN_HEADERS, [run_row(r) for r in runs]), ""]
        out += [
            "CPU seconds during each run. PostgreSQL: the postmaster and its exited backends. "
            "Other programs: processes on the machine that are not the benchmark's, and their "
            "share of the machine's capacity (a lower bound; near 0 unless the machine was "
            f"shared; above {MAX_FOREIGN_SHARE:.0%} a run is measured again, up to --retries "
            "times, and the cleanest kept). Load-generator lag: p99 of how late its 100 ms "
            "timer fired (its own stalls, e.g. bursts of SCRAM PBKDF2). Softirq: mostly "
            "loopback TCP. Steal: taken by the hypervisor.",
            "",
            md_table(CPU_HEADERS, [cpu_row(r) for r in runs]),
            "",
        ]
        for run in runs:
            errors = run["errors"]
            problems = run.get("proxy_log_problems") or {}
            exit_problem = run.get("proxy_exit_problem")
            notes = (
                [
                    f"unfinished: {run['unfinished_clients']} clients still in an attempt "
                    "after the grace period (cancelled)"
                ]
                if run.get("unfinished_clients")
                else []
            )
            if exit_problem:
                notes.append(exit_problem)
            if foreign_share(run) > MAX_FOREIGN_SHARE / 2:
                top = ", ".join(
                    f"{name} {sec:.1f} s"
                    for name, sec in (run.get("foreign_cpu_top") or {}).items()
                )
                notes.append(
                    f"the machine was shared: other programs used {foreign_share(run):.0%} "
                    f"of its CPU ({top})"
                )
            if not errors and not problems and not run.get("close_errors") and not notes:
                continue
            out.append(f"{run['target']} (repetition {run['repetition']}):")
            out.append("")
            for message, count in errors.items():
                out.append(f"* {count:,} x `{message}`")
            for message, count in run.get("close_errors", {}).items():
                out.append(f"* {count:,} x on close: `{message}`")
            for message, count in problems.items():
                out.append(f"* {count:,} x in its log: `{message}`")
            out += [f"* {note}" for note in notes]
            out.append("")
    out += [
        "## Ratios",
        "",
        "trioproxy divided by the reference, per repetition (tx/s: higher is better; "
        "latency and CPU: lower is better).",
        "",
        md_table(RATIO_HEADERS, [ratio_row(r) for r in report["ratios"]]),
        "",
    ]
    return "\n".join(out)


# ============================================================================================
# Command line


def parse_clients(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("client counts must be >= 1")
    return values


def parse_targets(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [v for v in values if v not in TARGETS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"targets are a subset of {','.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in values)  # always in the interleaving order


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark trioproxy against direct PostgreSQL and PgBouncer, in one run.",
    )
    p.add_argument(
        "--scenario",
        choices=["all", *SCENARIOS],
        default="all",
        help="one scenario, or all of them in one run (default: all)",
    )
    p.add_argument("--clients", type=parse_clients, help="client counts, e.g. 1000,3000")
    p.add_argument(
        "--idle-clients",
        type=parse_clients,
        metavar="N",
        help="memory: idle clients, comma-separated (default 2000; --quick 200); 10000 needs "
        "an open-files hard limit above 10,100 (ulimit -Hn), the bench raises the soft one",
    )
    p.add_argument(
        "--workers",
        type=parse_clients,
        default=(1, 2),
        metavar="N,M",
        help="tps and churn: run trioproxy once per worker count ([proxy] workers), as targets "
        "'trioproxy w=N' (default 1,2; counts above 1 are skipped when the build rejects the "
        "key)",
    )
    p.add_argument(
        "--no-data-plane",
        action="store_true",
        help=f"tps and churn: also run '{TRIOPROXY_NO_DP}' ([proxy] data_plane = false), the "
        "A/B reference for the batched data plane; the ratios divide it by w=1",
    )
    p.add_argument("--duration", type=float, help="seconds of load per run")
    p.add_argument("--repeat", type=int, default=1, help="repetitions (interleaved; default 1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: few clients, a few seconds; results go to bench/results/tmp/",
    )
    p.add_argument(
        "--targets",
        type=parse_targets,
        default=TARGETS,
        help="subset of direct,pgbouncer,trioproxy",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        help="server connections per pooler (default: storm 90, the others 20)",
    )
    p.add_argument(
        "--pgbench-scale", type=int, default=10, help="pgbench -i scale factor (default 10)"
    )
    p.add_argument("--sleep", type=float, default=0.05, help="pg_sleep seconds per query")
    p.add_argument("--client-timeout", type=float, default=30.0, help="seconds per attempt")
    p.add_argument(
        "--retry-pause", type=float, default=0.05, help="seconds a client waits after an error"
    )
    p.add_argument(
        "--loadgen-processes",
        type=int,
        default=1,
        help="load-generator processes sharing the clients (default 1)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="measure a run again, at most this often, when other programs used more than "
        f"{MAX_FOREIGN_SHARE * 100:.0f}%% of the CPU during it (default 1)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for other programs on the machine "
        "to use under 0.15 CPU (default 20)",
    )
    p.add_argument("--output", type=Path, help="directory for <scenario>.md/.json")
    p.add_argument("--loadgen", type=Path, metavar="SPEC", help=argparse.SUPPRESS)
    return p


def settings_from(args: argparse.Namespace, name: str) -> Settings:
    scenario = SCENARIOS[name]
    clients = args.clients or (scenario.quick_clients if args.quick else scenario.clients)
    if name == "memory" and args.idle_clients:
        clients = args.idle_clients
    duration = args.duration or (scenario.quick_duration if args.quick else scenario.duration)
    output = args.output or (RESULTS / "tmp" if args.quick else RESULTS)
    return Settings(
        scenario=scenario.name,
        clients=clients,
        duration=duration,
        repeat=max(1, args.repeat),
        targets=args.targets,
        pool_size=args.pool_size or scenario.pool_size,
        pgbench_scale=args.pgbench_scale,
        sleep=args.sleep,
        client_timeout=args.client_timeout,
        retry_pause=args.retry_pause,
        wait_idle=args.wait_idle,
        loadgen_processes=max(1, args.loadgen_processes),
        retries=max(0, args.retries),
        quick=args.quick,
        output=output,
        workers=tuple(dict.fromkeys(args.workers)),
        no_data_plane=args.no_data_plane,
    )


def _sigterm(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.loadgen:
        return loadgen_main(args.loadgen)
    from trioproxy.demo import DemoError

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    every = [settings_from(args, name) for name in names]
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    began = time.monotonic()
    env: Environment | None = None
    failed: list[str] = []
    try:
        env = Environment(every[0])
        env.setup()
        say(
            f"  PostgreSQL on port {env.cluster.port}; "
            + ", ".join(
                f"{name} on {target.port}"
                for name, target in env.targets.items()
                if name != "direct"
            )
        )
        for settings in every:
            say(
                f"trioproxy bench: scenario {settings.scenario}, clients {settings.clients}, "
                f"{settings.duration:g} s each, targets {','.join(settings.targets)}, "
                f"repeat {settings.repeat}, pool size {settings.pool_size}"
            )
            env.configure(settings)
            try:
                runs = SCENARIO_RUNNERS[settings.scenario](env)
            except (BenchError, DemoError) as exc:
                say(f"\nscenario {settings.scenario} failed: {exc}")
                failed.append(settings.scenario)
                continue
            write_report(env, settings, argv, runs)
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything")
        return 130
    except (BenchError, DemoError) as exc:
        say(f"\nbench failed: {exc}")
        return 1
    finally:
        if env is not None:
            env.close()
            say(f"  cleaned up ({'removed' if not env.base.exists() else 'left'} {env.base})")
    say(f"done in {time.monotonic() - began:.0f} s" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def write_report(
    env: Environment, settings: Settings, argv: Sequence[str], runs: list[dict[str, Any]]
) -> None:
    """Print the tables and write ``<scenario>.md`` and ``.json`` at once, so that what was
    measured survives a later scenario's failure."""
    report: dict[str, Any] = {
        "scenario": settings.scenario,
        "command": command_line(argv),
        "machine": machine_info(settings, env.bindir, env.pgbouncer),
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "output"},
            "postgresql": PG_SETTINGS,
            "pgbouncer_ini": env.pgbouncer_ini(0) if env.pgbouncer else None,
            "pgbouncer_session_ini": env.pgbouncer_ini(0, "session") if env.pgbouncer else None,
            "trioproxy_toml": env.trioproxy_toml(0),
            "trioproxy_workers_toml": env.trioproxy_toml(0, max(settings.workers))
            if max(settings.workers) > 1
            else None,
            "workers_supported": env.workers_supported,
            "workers_check": env.workers_check,
            "workers_note": env.workers_note() if settings.scenario in WORKER_SCENARIOS else None,
            "open_files_limit": env.nofile,
        },
        "runs": runs,
    }
    if settings.scenario == "storm":
        report["ratios"] = summarize(runs, settings)
        text, markdown = render_text(report), render_markdown(report)
    else:
        spec = CASE_REPORTS[settings.scenario]
        report["results"] = case_results(runs, spec)
        report["ratios"] = case_ratios(report["results"], spec)
        if settings.scenario == "tps":
            report["prepared_target"] = prepared_target(report["results"])
        if settings.scenario == "memory":
            report["summary_lines"] = memory_summary(report["results"])
        text, markdown = render_cases_text(report), render_cases_markdown(report)
    say()
    say(text)
    settings.output.mkdir(parents=True, exist_ok=True)
    md = settings.output / f"{settings.scenario}.md"
    md.write_text(markdown)
    data = settings.output / f"{settings.scenario}.json"
    data.write_text(json.dumps(report, indent=1, default=str) + "\n")
    say()
    say(f"wrote {os.path.relpath(md)} and {os.path.relpath(data)}")
    say(plot(data))
    say()


def plot(data: Path) -> str:
    """Draw ``<scenario>.png`` next to the JSON and link it from the markdown, with
    ``python -m bench.plots`` in a process of its own (matplotlib is an optional extra:
    ``pip install -e '.[bench]'``, which ``make bench`` does)."""
    try:
        proc = subprocess.run(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "bench.plots", str(data.resolve())],
            cwd=REPO,
            env=clean_env(MPLBACKEND="Agg"),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "no plot: bench.plots took more than 300 s"
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        return f"no plot (bench.plots exit {proc.returncode}): {text[-600:]}"
    return text


if __name__ == "__main__":
    sys.exit(main())
