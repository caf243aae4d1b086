"""``workers = N``: one supervisor and N worker processes acting as one proxy.

The real CLI (``python -m trioproxy``) runs with ``workers = 2`` against the real
PostgreSQL. Which worker served a client is read from the process id it got in
BackendKeyData (the worker id is written into it, trioproxy/_cluster/keys.py).

What is checked: connections reach both workers; the server-connection cap holds for
the whole instance (pg_stat_activity, sampled while clients from both workers compete);
a cancel lands on whichever worker the kernel picks and still cancels the right query;
a killed worker is restarted and serves again; SIGHUP reaches every worker; SIGTERM
stops them all with exit status 0 and removes the run directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import psycopg
import pytest
from psycopg import errors

from tests.fix_pg import APP_PASSWORD, APP_USER, PostgresServer
from trioproxy._cluster.keys import worker_of

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
CAP = 4


@attrs.define
class CliInstance:
    proc: subprocess.Popen[str]
    port: int = 0
    lines: list[str] = attrs.field(factory=list)
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def log(self) -> str:
        with self.lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"no {count} x {pattern!r} in the log:\n{self.log()[-4000:]}")

    def dsn(self, **extra: str) -> str:
        options = " ".join(f"{k}={v}" for k, v in extra.items())
        return (
            f"host=127.0.0.1 port={self.port} dbname=app user={APP_USER} "
            f"password={APP_PASSWORD} sslmode=disable connect_timeout=10 {options}"
        )

    def worker_pids(self) -> set[int]:
        children: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            text = (task / "children").read_text()
            children.update(int(pid) for pid in text.split())
        return children


def _write_config(tmp_path: Path, pg: PostgresServer) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[proxy]
listen = "127.0.0.1:0"
workers = 2
shutdown_timeout = 10
admin_users = ["{APP_USER}"]

[backend]
host = "{pg.host}"
port = {pg.port}

[pool]
pool_mode = "transaction"
max_connections = {CAP}
connection_borrow_timeout = 60

[users.{APP_USER}]
password_env = "TRIOPROXY_TEST_APP_PASSWORD"
"""
    )
    return path


@pytest.fixture
def instance(tmp_path: Path, pg: PostgresServer) -> Iterator[CliInstance]:
    env = {**os.environ, "TRIOPROXY_TEST_APP_PASSWORD": APP_PASSWORD}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "--config", str(_write_config(tmp_path, pg))],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running = CliInstance(proc)

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with running.lock:
                running.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        (port,) = running.wait_for(r"2 workers sharing 127\.0\.0\.1:(\d+)")
        running.port = int(port)
        running.wait_for(r"trioproxy\[worker \d\]: trioproxy worker \d listening", count=2)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reader.join(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        (tmp_path / "proxy.log").write_text(running.log())  # kept by pytest for a look


def _proxy_backends(pg: PostgresServer) -> int:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where usename = %s "
            "and backend_type = 'client backend' and pid <> pg_backend_pid()",
            (APP_USER,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_both_workers_serve_and_the_cap_holds_for_the_instance(
    instance: CliInstance, pg: PostgresServer
) -> None:
    workers_seen: set[int] = set()
    errors_seen: list[BaseException] = []
    done = threading.Event()
    peak = 0

    def client() -> None:
        try:
            with psycopg.connect(instance.dsn(), autocommit=True) as conn:
                workers_seen.add(worker_of(conn.info.backend_pid))
                for _ in range(3):
                    row = conn.execute("select pg_sleep(0.1), pg_backend_pid()").fetchone()
                    assert row is not None
        except BaseException as exc:
            errors_seen.append(exc)

    def monitor() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _proxy_backends(pg))
            time.sleep(0.05)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    clients = [threading.Thread(target=client) for _ in range(30)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=120)
    done.set()
    watcher.join(timeout=30)
    assert not any(t.is_alive() for t in clients)
    assert not errors_seen, errors_seen[:3]
    assert workers_seen == {0, 1}
    # The cap is the instance's: two workers together never exceed it.
    assert 0 < peak <= CAP, peak


def test_cancel_reaching_another_worker_cancels_the_right_query(instance: CliInstance) -> None:
    forwarded = 0
    for _attempt in range(16):
        with psycopg.connect(instance.dsn(), autocommit=True) as conn:
            outcome: list[BaseException | None] = []

            def sleep(
                conn: psycopg.Connection[tuple[object, ...]] = conn,
                outcome: list[BaseException | None] = outcome,
            ) -> None:
                try:
                    conn.execute("select pg_sleep(30)")
                    outcome.append(None)
                except psycopg.Error as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=sleep)
            started = time.monotonic()
            thread.start()
            time.sleep(0.3)  # the query is running on its server connection
            # A new connection: the kernel picks a worker by its address hash.
            conn.cancel_safe(timeout=10)
            thread.join(timeout=15)
            assert not thread.is_alive()
            assert isinstance(outcome[0], errors.QueryCanceled), outcome
            assert time.monotonic() - started < 10
            # The session goes on after the cancel.
            row = conn.execute("select 1").fetchone()
            assert row == (1,)
        forwarded = len(re.findall(r"cancel request forwarded to worker", instance.log()))
        if forwarded:
            break
    # 16 cancels all landing on the client's own worker: probability 2 * 2**-16.
    assert forwarded >= 1, instance.log()[-3000:]


def test_a_killed_worker_is_restarted_and_serves_again(instance: CliInstance) -> None:
    before = instance.worker_pids()
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    instance.wait_for(r"supervisor: worker \d \(pid \d+\) died")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = instance.worker_pids()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.1)
    instance.wait_for(r"trioproxy worker \d listening", count=3)
    seen: set[int] = set()
    for _ in range(40):
        with psycopg.connect(instance.dsn(), autocommit=True) as conn:
            seen.add(worker_of(conn.info.backend_pid))
            assert conn.execute("select 41 + 1").fetchone() == (42,)
        if seen == {0, 1}:
            break
    assert seen == {0, 1}


def test_sighup_reaches_every_worker_and_sigterm_stops_them_all(instance: CliInstance) -> None:
    pids = instance.worker_pids()
    run_dirs = {Path(p) for p in re.findall(r"--run-dir (\S+)", _cmdlines(pids))}
    assert len(run_dirs) == 1
    instance.proc.send_signal(signal.SIGHUP)
    instance.wait_for(r"\[worker \d\]: received SIGHUP, reloading", count=2)
    instance.proc.send_signal(signal.SIGTERM)
    assert instance.proc.wait(timeout=30) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not next(iter(run_dirs)).exists()
    assert "Traceback" not in instance.log()


def _cmdlines(pids: set[int]) -> str:
    return "\n".join(
        Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids
    )


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_workers_stop_when_the_supervisor_dies(instance: CliInstance) -> None:
    pids = instance.worker_pids()
    assert len(pids) == 2
    instance.proc.send_signal(signal.SIGKILL)
    instance.proc.wait(timeout=10)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in pids):
                break
            time.sleep(0.1)
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
        assert not alive, f"workers outlived their supervisor: {alive}"
        assert "the supervisor (pid" in instance.log()
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_admin_reload_and_shutdown_act_on_the_whole_instance(instance: CliInstance) -> None:
    admin_dsn = instance.dsn().replace("dbname=app", "dbname=trioproxy")
    with psycopg.connect(admin_dsn, autocommit=True, prepare_threshold=None) as console:
        console.execute("RELOAD")
    instance.wait_for(r"\[worker \d\]: received SIGHUP, reloading", count=2)
    assert len(set(re.findall(r"\[worker (\d)\]: received SIGHUP", instance.log()))) == 2
    with psycopg.connect(admin_dsn, autocommit=True, prepare_threshold=None) as console:
        console.execute("SHUTDOWN")
    assert instance.proc.wait(timeout=30) == 0
    log = instance.log()
    assert len(set(re.findall(r"\[worker (\d)\]: shutting down", log))) == 2
    assert "stopping now" not in log  # every worker drained; none took it as a 2nd signal
