"""The Black Friday demo (``make demo`` / ``trioproxy demo`` / ``python -m trioproxy.demo``).

The slow tests run the demo as a user does, in a subprocess: once to the end (``--quick``,
200 clients), once interrupted with SIGINT in the middle of the storm through the proxy, to
check that it stops every process it started and removes its temp dir. The fast ones check
the ``trioproxy demo`` wiring and the verdict (table and sentence) on made-up numbers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fix_pg import _clean_env, _unavailable, find_bindir
from trioproxy import cli, demo

REPO = Path(__file__).resolve().parents[2]
TABLE_TITLE = "Black Friday, side by side"


def _require_postgres() -> None:
    if find_bindir() is None:
        _unavailable("PostgreSQL server binaries not found (run `make postgres`)")


def _demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "trioproxy.demo", *args]


def _table(output: str) -> dict[str, tuple[str, str]]:
    """The side-by-side table: row label -> (direct, through the proxy)."""
    assert TABLE_TITLE in output, output[-3000:]
    rows: dict[str, tuple[str, str]] = {}
    for line in output[output.index(TABLE_TITLE) :].splitlines()[3:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != 3:
            break
        rows[cells[0]] = (cells[1], cells[2])
    return rows


def _processes_in(directory: Path) -> list[str]:
    """Processes whose working directory is ``directory`` or below it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_demo_serves_every_client_through_the_proxy() -> None:
    _require_postgres()
    proc = subprocess.run(
        _demo_argv("--clients", "200", "--quick"),
        capture_output=True,
        text=True,
        timeout=200,
        env=_clean_env(),
        cwd=REPO,
        check=False,
    )
    output = proc.stdout
    assert proc.returncode == 0, output[-5000:] + proc.stderr[-3000:]
    table = _table(output)
    assert table["clients (one checkout each)"] == ("200", "200")
    assert table["errors: too many clients already"][1] == "0"
    assert table["errors: slots reserved (53300)"][1] == "0"
    assert table["errors: other"][1] == "0"
    direct_ok, proxy_ok = (int(v.replace(",", "")) for v in table["checkouts completed"])
    assert direct_ok <= 200
    assert proxy_ok == 200
    direct_peak, proxy_peak = (int(v.split()[0]) for v in table["peak server connections"])
    assert 0 < direct_peak <= demo.MAX_CONNECTIONS - demo.RESERVED
    assert 0 < proxy_peak <= demo.POOL_SIZE
    assert "demo passed" in output
    assert "proxy (SIGTERM)            exit status 0" in output
    match = re.search(r"temp dir\s+(/\S+)", output)
    assert match, output[:3000]
    assert not Path(match.group(1)).exists()
    assert "temp dir                   removed" in output


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_interrupted_demo_stops_everything_and_removes_its_temp_dir() -> None:
    _require_postgres()
    proc = subprocess.Popen(
        _demo_argv("--clients", "600", "--quick"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_clean_env(),
        cwd=REPO,
    )
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    lines: list[str] = []
    base: Path | None = None
    interrupted_with: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if base is None and (match := re.search(r"temp dir\s+(/\S+)", line)):
                base = Path(match.group(1))
            if line.startswith("  proxy ") and " attempts " in line and not interrupted_with:
                interrupted_with = _processes_in(base) if base else []
                os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    output = "".join(lines)
    assert interrupted_with, f"never saw the storm through the proxy:\n{output[-3000:]}"
    assert base is not None
    # PostgreSQL, the proxy and the load generator all ran in the temp dir.
    assert any("postgres" in cmd for cmd in interrupted_with), interrupted_with
    assert any("trioproxy --config" in cmd for cmd in interrupted_with), interrupted_with
    assert any("trioproxy.demo --loadgen" in cmd for cmd in interrupted_with), interrupted_with
    assert code == 130, output[-3000:]
    assert "interrupted: everything was stopped and removed" in output
    deadline = time.monotonic() + 10  # exited backends may take a moment to be reaped
    while (left := _processes_in(base)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, left
    assert not base.exists()


# ------------------------------------------------------------------------ fast: no PostgreSQL


def test_trioproxy_demo_subcommand_dispatches_to_the_demo(capsys) -> None:
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: trioproxy demo")
    assert "--clients N" in out
    assert cli.main(["demo", "--clients", "0"]) == 2
    assert "--clients must be at least 1" in capsys.readouterr().err


def _run(label: str, ok: int, errors: dict[str, int], latencies: list[float], peak: int):
    return demo.RunResult(
        label=label,
        clients=2000,
        attempts=2000,
        ok=ok,
        errors=Counter(errors),
        latencies_ms=latencies,
        wall=5.0,
        peak_server=peak,
        samples=100,
        sampler_error=None,
        loadgen_cpu=1.0,
        proxy_cpu=None,
        postgres_cpu=None,
    )


def test_table_groups_errors_and_the_sentence_reads_the_numbers() -> None:
    direct = _run(
        "direct",
        96,
        {
            "FATAL 53300: sorry, too many clients already": 1890,
            "FATAL 53300: remaining connection slots are reserved for superusers": 10,
            "ConnectionResetError: [Errno 104] Connection reset by peer": 4,
        },
        [100.0] * 96,
        97,
    )
    proxied = _run("proxy", 2000, {}, [float(v) for v in range(1, 2001)], 87)
    assert direct.too_many == 1890
    assert direct.refused == 1900
    assert direct.other_errors == 4
    table = demo.side_by_side(direct, proxied)
    assert re.search(r"errors: too many clients already\s+1,890\s+0\n", table)
    assert re.search(r"errors: slots reserved \(53300\)\s+10\s+0\n", table)
    assert re.search(r"errors: other\s+4\s+0\n", table)
    assert re.search(r"latency p50 \(completed\)\s+100 ms\s+1.00 s\n", table)
    assert re.search(r"latency p99 \(completed\)\s+100 ms\s+1.98 s\n", table)
    assert re.search(r"peak server connections\s+97 of 100\s+87 of 100\n", table)
    sentence = demo.meaning(direct, proxied)
    assert sentence.count(".") == 1
    assert sentence.endswith(".")
    assert "1,900 of 2,000 checkouts (95%) were refused" in sentence
    assert "all 2,000 completed on at most 87 server connections" in sentence
    failing = _run("proxy", 1990, {"TimeoutError: x": 10}, [1.0], 87)
    assert "10 still failed" in demo.meaning(direct, failing)
