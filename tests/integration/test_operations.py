"""Operating the proxy: Prometheus metrics, the admin console, live reload, embedding.

Rules: proxies run in a thread (``proxy_factory`` / ``ProxyThread``) except where a real
signal is the point (SIGHUP: a ``python -m trioproxy`` subprocess); ports are chosen by the
OS; every wait is bounded; metric values are compared with what the test itself did.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from tests.fix_pg import APP_PASSWORD, APP_USER, PostgresServer, _free_port
from tests.fix_proxy import build_config
from trioproxy.config import load_config
from trioproxy.testing.thread import ProxyThread

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

REPO = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own URL
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _labels), v in samples.items() if n == name)


def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


def metrics_url(proxy: Any) -> str:
    address = proxy.proxy.metrics_addresses[0]
    return f"http://{address.host}:{address.port}/metrics"


# --- metrics -------------------------------------------------------------------------------


def test_metrics_follow_what_clients_do(proxy_factory) -> None:
    proxy = proxy_factory(
        proxy={"metrics_listen": "127.0.0.1:0"},
        pool={"pool_mode": "transaction", "max_connections": 2, "connection_borrow_timeout": 2},
    )
    url = metrics_url(proxy)
    pool = {"database": "app", "user": APP_USER, "role": "read-write"}
    s = scrape(url)
    assert value(s, "trioproxy_client_connections_received_total") == 0
    assert total(s, "trioproxy_client_connections") == 0

    holders = [psycopg.connect(proxy.dsn()) for _ in range(2)]
    plain = psycopg.connect(proxy.dsn(sslmode="disable"), autocommit=True)
    try:
        for conn in holders:
            conn.execute("select 1")  # a transaction stays open: the server connection is held
        waiter = threading.Thread(target=lambda: plain.execute("select 1"))
        waiter.start()
        wait_until(
            lambda: (
                value(scrape(url), "trioproxy_database_connections_waiting_clients", **pool) == 1
            )
        )
        s = scrape(url)
        assert value(s, "trioproxy_client_connections", tls="true") == 2
        assert value(s, "trioproxy_client_connections", tls="false") == 1
        assert value(s, "trioproxy_client_connections_received_total") == 3
        assert value(s, "trioproxy_client_connections_closed_total") == 0
        assert value(s, "trioproxy_client_connections_linked") == 2
        assert value(s, "trioproxy_database_connections_borrowed", **pool) == 2
        assert value(s, "trioproxy_database_connections_idle", **pool) == 0
        assert value(s, "trioproxy_database_connections", **pool) == 2
        assert value(s, "trioproxy_database_connections_max_allowed", **pool) == 2
        assert value(s, "trioproxy_database_connections_setup_succeeded_total", **pool) == 2
        assert value(s, "trioproxy_server_connections_budget") == 2

        holders[0].commit()
        waiter.join(timeout=10)
        assert not waiter.is_alive()

        # A wrong password: one more connection received and closed, one auth failure.
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(password="wrong"))
        # A borrow timeout while both server connections are held again.
        holders[0].execute("select 1")
        with pytest.raises(errors.TooManyConnections):
            plain.execute("select 1")
        for conn in holders:
            conn.commit()
        # A pinned client.
        plain.execute("select pg_advisory_lock(42)")
        reasons = [c.pin_reason for c in proxy.proxy.sessions() if c.pin_reason is not None]
        assert len(reasons) == 1
        s = scrape(url)
        assert value(s, "trioproxy_client_auth_failures_total") == 1
        assert value(s, "trioproxy_client_connections_received_total") == 4
        assert value(s, "trioproxy_client_connections_closed_total") == 1
        assert value(s, "trioproxy_borrow_timeouts_total", **pool) == 1
        assert value(s, "trioproxy_pinned_clients", reason=reasons[0]) == 1
        assert value(s, "trioproxy_pins_total", reason=reasons[0]) == 1
        assert value(s, "trioproxy_client_bytes_received_total") > 0
        assert value(s, "trioproxy_server_bytes_received_total") > 0
        assert value(s, "trioproxy_draining") == 0
    finally:
        plain.close()
        for conn in holders:
            conn.close()
    wait_until(lambda: total(scrape(url), "trioproxy_client_connections") == 0)
    s = scrape(url)
    assert value(s, "trioproxy_client_connections_closed_total") == 4

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=5)  # noqa: S310
    assert caught.value.code == 404
    caught.value.close()


# --- admin console ----------------------------------------------------------------------------


def admin(proxy: Any, user: str = APP_USER) -> psycopg.Connection[Any]:
    return psycopg.connect(
        proxy.dsn(dbname="trioproxy", user=user), autocommit=True, prepare_threshold=None
    )


def rows(conn: psycopg.Connection[Any], command: str) -> list[dict[str, Any]]:
    cursor = conn.execute(command)
    assert cursor.description is not None
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_admin_console_show_commands(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"admin_users": [APP_USER]}, pool={"pool_mode": "transaction"})
    with (
        psycopg.connect(proxy.dsn(application_name="reporting")) as client,
        admin(proxy) as console,
    ):
        client.execute("select 1")  # holds a server connection (transaction open)
        pools = rows(console, "SHOW POOLS")
        assert len(pools) == 1
        assert pools[0]["database"] == "app"
        assert pools[0]["user"] == APP_USER
        assert pools[0]["sv_active"] == 1
        assert pools[0]["cl_active"] == 1
        assert pools[0]["pool_mode"] == "transaction"
        assert pools[0]["sv_max"] == 10

        clients = rows(console, "show clients;")
        mine = [c for c in clients if c["application_name"] == "reporting"]
        assert len(mine) == 1
        assert mine[0]["state"] == "active"
        assert mine[0]["tls"] == "on"
        assert mine[0]["database"] == "app"
        assert mine[0]["link"] is not None
        assert any(c["database"] == "trioproxy" and c["state"] == "admin" for c in clients)

        servers = rows(console, "SHOW SERVERS")
        assert [s["link"] for s in servers if s["state"] == "active"] == [mine[0]["id"]]
        assert servers[0]["tx_status"] == "T"

        stats = rows(console, "SHOW STATS")[0]
        assert stats["clients_accepted"] == 2
        assert stats["failed_logins"] == 0

        config = {r["key"]: r for r in rows(console, "SHOW CONFIG")}
        assert config["pool.max_connections"]["value"] == "10"
        assert config["pool.pool_mode"]["changeable"] == "no"
        assert config["proxy.idle_client_timeout"]["changeable"] == "yes"
        assert not any("secret" in str(r["value"]) for r in config.values())

        databases = rows(console, "SHOW DATABASES")
        assert [(d["name"], d["current_connections"]) for d in databases] == [("app", 1)]
        users = {u["name"]: u["admin"] for u in rows(console, "SHOW USERS")}
        assert users == {APP_USER: "yes", "alice": "no"}
        lists = {r["list"]: r["items"] for r in rows(console, "SHOW LISTS")}
        assert lists["pools"] == 1
        assert lists["used_clients"] == 2
        assert rows(console, "SHOW VERSION")[0]["version"].startswith("trioproxy ")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            console.execute("SHOW NONSENSE")
        assert rows(console, "SHOW VERSION")  # the console goes on after an error


def test_admin_console_with_psql(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"admin_users": [APP_USER]})
    env = {**os.environ, **proxy.env(), "PGDATABASE": "trioproxy"}
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SHOW VERSION", "-c", "SHOW POOLS"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.startswith("trioproxy ")


def test_admin_console_refuses_non_admins(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"admin_users": [APP_USER]})
    with pytest.raises(psycopg.OperationalError) as caught:
        admin(proxy, user="alice")
    assert "not allowed to use the admin console" in str(caught.value)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(proxy.dsn(dbname="trioproxy", password="wrong"))
    assert "password authentication failed" in str(caught.value)


def test_admin_pause_resume_and_kill(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"admin_users": [APP_USER]}, pool={"pool_mode": "transaction"})
    with (
        psycopg.connect(proxy.dsn(application_name="victim"), autocommit=True) as client,
        admin(proxy) as console,
    ):
        client.execute("select 1")
        console.execute("PAUSE")
        done = threading.Event()

        def query() -> None:
            client.execute("select 2")
            done.set()

        worker = threading.Thread(target=query)
        worker.start()
        assert not done.wait(0.5)  # held while paused
        assert rows(console, "SHOW POOLS")[0]["paused"] == 1
        console.execute("RESUME")
        assert done.wait(10)
        worker.join(timeout=10)

        # One database at a time: pausing another does not hold this one; resuming this
        # one while another stays paused lets it go.
        console.execute("PAUSE otherdb")
        assert client.execute("select 4").fetchone() == (4,)
        console.execute("PAUSE app")
        done.clear()
        worker = threading.Thread(target=query)
        worker.start()
        assert not done.wait(0.3)
        console.execute("RESUME app")
        assert done.wait(10)
        worker.join(timeout=10)
        console.execute("RESUME")

        victim = next(c for c in rows(console, "SHOW CLIENTS") if c["application_name"] == "victim")
        console.execute(f"KILL_CLIENT {victim['id']}")
        with pytest.raises(errors.AdminShutdown) as caught:
            client.execute("select 3")
        assert "KILL_CLIENT" in str(caught.value)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            console.execute("KILL_CLIENT 999999")


def test_admin_shutdown(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"admin_users": [APP_USER], "shutdown_timeout": 5})
    with admin(proxy) as console:
        with pytest.raises(psycopg.Error):  # no file to re-read: refused, config stays
            console.execute("RELOAD")
        console.execute("SHUTDOWN")
        with pytest.raises(errors.AdminShutdown):
            console.execute("SHOW VERSION")
    proxy.thread._thread.join(10)
    assert not proxy.thread._thread.is_alive()


# --- live reload -------------------------------------------------------------------------------

RELOAD_CONFIG = """
[proxy]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:{metrics_port}"
idle_client_timeout = {idle}

[backend]
host = "{pg.host}"
port = {pg.port}

[pool]
pool_mode = "transaction"
max_connections = {size}

[users.alice]
password = "{password}"
backend_user = "{app}"
backend_password = "{app_password}"
"""


def _write(path: Path, pg: PostgresServer, **values: Any) -> None:
    defaults = {
        "port": 0,
        "metrics_port": 0,
        "idle": 1800,
        "size": 2,
        "password": "old-pw",
        "app": APP_USER,
        "app_password": APP_PASSWORD,
        "pg": pg,
    }
    path.write_text(RELOAD_CONFIG.format(**{**defaults, **values}))


def _dsn(port: int, password: str) -> str:
    return f"host=127.0.0.1 port={port} dbname=app user=alice password={password} sslmode=disable"


@pytest.fixture
def file_proxy(tmp_path: Path, pg: PostgresServer) -> Iterator[tuple[ProxyThread, Path]]:
    path = tmp_path / "proxy.toml"
    _write(path, pg)
    thread = ProxyThread(load_config(path))
    thread.start()
    try:
        yield thread, path
    finally:
        thread.stop()


def test_reload_changes_passwords_pool_size_and_timeouts(file_proxy, pg, caplog) -> None:
    thread, path = file_proxy
    assert thread.proxy is not None
    url = metrics_url(thread)
    old = psycopg.connect(_dsn(thread.port, "old-pw"), autocommit=True)
    try:
        assert old.execute("select current_user").fetchone() == (APP_USER,)
        pool = {"database": "app", "user": "alice", "role": "read-write"}
        assert value(scrape(url), "trioproxy_database_connections_max_allowed", **pool) == 2

        _write(path, pg, password="new-pw", size=5, idle=900)
        notes = thread.reload()
        assert notes == []
        assert thread.proxy.config.proxy.idle_client_timeout == 900
        assert value(scrape(url), "trioproxy_database_connections_max_allowed", **pool) == 5
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(_dsn(thread.port, "old-pw"))
        with psycopg.connect(_dsn(thread.port, "new-pw"), autocommit=True) as new:
            assert new.execute("select 1").fetchone() == (1,)
        assert old.execute("select 2").fetchone() == (2,)  # logged in before: goes on

        # An invalid file is refused; the running configuration stays.
        path.write_text(path.read_text().replace("max_connections = 5", "max_connections = -1"))
        with pytest.raises(Exception, match="max_connections"):
            thread.reload()
        assert value(scrape(url), "trioproxy_database_connections_max_allowed", **pool) == 5
        assert value(scrape(url), "trioproxy_config_reload_failures_total") == 1

        # Settings that need a restart are reported and keep their running value.
        _write(path, pg, password="new-pw", size=5, port=thread.port + 1)
        notes = thread.reload()
        assert notes == ["[proxy] listen changed: requires restart"]
        assert thread.proxy.config.proxy.listen[0].port == 0  # as started
        assert old.execute("select 3").fetchone() == (3,)
    finally:
        old.close()


def test_sighup_reloads_the_cli(tmp_path: Path, pg: PostgresServer) -> None:
    path = tmp_path / "proxy.toml"
    port, metrics_port = _free_port(), _free_port()
    _write(path, pg, port=port, metrics_port=metrics_port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trioproxy", "--config", str(path)],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:

        def up() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                scrape(url)
            except OSError:
                return False
            return True

        wait_until(up, timeout=20)
        with psycopg.connect(_dsn(port, "old-pw"), autocommit=True) as conn:
            conn.execute("select 1")
        _write(path, pg, port=port, metrics_port=metrics_port, password="new-pw", size=3)
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: value(scrape(url), "trioproxy_config_reloads_total") == 1)
        with psycopg.connect(_dsn(port, "new-pw"), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        s = scrape(url)
        assert (
            value(
                s,
                "trioproxy_database_connections_max_allowed",
                database="app",
                user="alice",
                role="read-write",
            )
            == 3
        )
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "received SIGHUP, reloading" in err
        assert re.search(r"configuration reloaded \(1 users\)", err), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


# --- embedding -----------------------------------------------------------------------------------


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("embed_example", REPO / "examples" / "embed.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_embedding_example(pg: PostgresServer, tls_files: Any, capsys: Any) -> None:
    embed = _load_example()
    config = build_config(pg, tls_files, pool={"pool_mode": "transaction"})
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(
            functools.partial(embed.run_until, report_every=0.05), config, stop
        )
        port = proxy.addresses[0].port
        dsn = (
            f"host=127.0.0.1 port={port} dbname=app user={APP_USER} password={APP_PASSWORD}"
            " sslmode=disable"
        )

        def client() -> Any:
            with psycopg.connect(dsn, autocommit=True) as conn:
                return conn.execute("select 6 * 7").fetchone()

        assert await trio.to_thread.run_sync(client) == (42,)
        # A client left connected is closed by the drain when the block ends.
        idle = await trio.to_thread.run_sync(functools.partial(psycopg.connect, dsn))
        assert proxy.open_clients == 1
        assert proxy.stats.clients_accepted == 2
        stop.set()
    try:
        with pytest.raises(errors.AdminShutdown):
            await trio.to_thread.run_sync(idle.execute, "select 1")
    finally:
        await trio.to_thread.run_sync(idle.close)
    assert proxy.open_clients == 0
    assert proxy.draining
    out = capsys.readouterr().out
    assert f"listening on 127.0.0.1:{port}" in out
    assert "clients open=" in out


def test_grafana_dashboard_uses_only_exported_metrics(proxy_factory) -> None:
    proxy = proxy_factory(proxy={"metrics_listen": "127.0.0.1:0"})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 1")  # one pool, so the per-pool families are there too
        with urllib.request.urlopen(metrics_url(proxy), timeout=5) as response:  # noqa: S310
            text = response.read().decode()
    declared = set(re.findall(r"^# TYPE (\w+) ", text, re.MULTILINE))
    exported = declared | {
        f"{name}{suffix}" for name in declared for suffix in ("_total", "_bucket", "_sum", "_count")
    }
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"trioproxy_\w+", target["expr"])
    }
    assert used
    assert used <= exported, sorted(used - exported)
    documented = set(
        re.findall(r"`(trioproxy_\w+)`", (REPO / "docs" / "operations.md").read_text())
    )
    assert documented <= exported, sorted(documented - exported)
    # ... and every exported family is documented.
    assert all(n in documented or f"{n}_total" in documented for n in declared), sorted(
        n for n in declared if n not in documented and f"{n}_total" not in documented
    )


def test_borrow_latency_histogram_counts_every_borrow(proxy_factory) -> None:
    proxy = proxy_factory(
        proxy={"metrics_listen": "127.0.0.1:0"}, pool={"pool_mode": "transaction"}
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(7):
            conn.execute("select 1")
        with urllib.request.urlopen(metrics_url(proxy), timeout=5) as response:  # noqa: S310
            text = response.read().decode()
    count = re.search(r"^trioproxy_borrow_latency_seconds_count\{[^}]*\} (\S+)$", text, re.M)
    inf = re.search(
        r'^trioproxy_borrow_latency_seconds_bucket\{[^}]*le="\+Inf"[^}]*\} (\S+)$', text, re.M
    )
    assert count is not None
    assert inf is not None
    # every statement borrowed once (the login may add its own borrows)
    assert float(count.group(1)) == float(inf.group(1)) >= 7


def test_query_requests_and_response_latency(proxy_factory) -> None:
    proxy = proxy_factory(
        proxy={"metrics_listen": "127.0.0.1:0"}, pool={"pool_mode": "transaction"}
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(5):
            conn.execute("select pg_sleep(0.01)")
    time.sleep(0.2)
    with urllib.request.urlopen(metrics_url(proxy), timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    requests = re.search(r"^trioproxy_query_requests_total (\S+)$", text, re.M)
    count = re.search(r"^trioproxy_query_response_seconds_count (\S+)$", text, re.M)
    total = re.search(r"^trioproxy_query_response_seconds_sum (\S+)$", text, re.M)
    assert requests is not None
    assert count is not None
    assert total is not None
    assert float(requests.group(1)) >= 5
    # (TLS clients park in the data plane too: the five statements were served there)
    served = re.search(r"^trioproxy_data_plane_transactions_total (\S+)$", text, re.M)
    assert served is not None
    assert float(served.group(1)) >= 4
    assert float(count.group(1)) >= 5
    assert float(total.group(1)) >= 0.05  # five 10 ms sleeps at least


def test_debug_logging_has_statement_lines_without_literals(proxy_factory, caplog) -> None:
    proxy = proxy_factory(proxy={"debug_logging": True})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("select 'a-literal-value' as x, 42")
    lines = [r.getMessage() for r in caplog.records if ": query " in r.getMessage()]
    assert any("select ? as x , ?" in line for line in lines), lines
    assert not any("a-literal-value" in r.getMessage() for r in caplog.records)
