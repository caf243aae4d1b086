"""Throw-away PostgreSQL clusters: the start-up and shutdown pieces shared by the test fixtures
(``tests/fix_pg.py``), the demo (``trioproxy.demo``) and the benchmark (``bench/run.py``).

* :func:`find_bindir`: the directory holding ``initdb``, ``pg_ctl`` and ``postgres``, looked up
  like scripts/ensure-postgres.sh does: ``$PG_BIN``, ``PATH``, then ``/usr/lib/postgresql/*/bin``
  (Debian's versioned lib dirs, newest first).
* :func:`run_tool`: run a tool; with ``as_owner=True`` and as root, run it as the ``postgres``
  system user via ``runuser -u postgres --`` (initdb and postgres refuse to run as root).
* :func:`chown_to_owner`, :func:`check_can_run_as_owner`: data-dir ownership when root.
* :func:`initdb`, :func:`pg_ctl`, :func:`append_conf`, :func:`start_on_free_port`: create a
  cluster, configure it, start it on a free 127.0.0.1 port (retrying when the port is taken).
* :func:`postmaster_pid`, :func:`kill_postmaster`: stop a leftover postmaster by PID.

No pytest here: the demo and the benchmark import this module too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "RUN_AS",
    "SERVER_TOOLS",
    "SUPERUSER",
    "PostgresSetupError",
    "append_conf",
    "as_owner",
    "check_can_run_as_owner",
    "chown_to_owner",
    "clean_env",
    "conf_value",
    "find_bindir",
    "free_port",
    "initdb",
    "install_server_tls",
    "kill_postmaster",
    "pg_ctl",
    "port_taken",
    "postmaster_pid",
    "run_tool",
    "start_on_free_port",
]

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
RUN_AS = "postgres"  # the system user that owns clusters when we run as root
SUPERUSER = "postgres"


class PostgresSetupError(RuntimeError):
    """A cluster could not be created, started or provisioned."""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus libpq/PG settings (PGHOST, ...) that could redirect our tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


def _is_tool_dir(directory: Path) -> bool:
    return all(os.access(directory / tool, os.X_OK) for tool in SERVER_TOOLS)


def find_bindir() -> Path | None:
    """Directory holding initdb, pg_ctl and postgres (newest version first), or None."""
    candidates: list[Path] = []
    if pg_bin := os.environ.get("PG_BIN"):
        candidates.append(Path(pg_bin))
    for tool in SERVER_TOOLS:
        if found := shutil.which(tool):
            # e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb
            candidates += [Path(found).resolve().parent, Path(found).parent]

    def version(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in path.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if _is_tool_dir(directory):
            return directory
    return None


def free_port() -> int:
    """A 127.0.0.1 TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def conf_value(value: object) -> str:
    """``value`` as a postgresql.conf literal (bools as on/off, numbers bare, else quoted)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def append_conf(datadir: Path, settings: Mapping[str, object], header: str | None = None) -> None:
    """Append ``settings`` (values through :func:`conf_value`) to ``datadir/postgresql.conf``."""
    with (datadir / "postgresql.conf").open("a") as f:
        if header is not None:
            f.write(f"\n# --- {header} ---\n")
        f.writelines(f"{name} = {conf_value(value)}\n" for name, value in settings.items())


def as_owner(argv: Sequence[str]) -> list[str]:
    """As root, ``argv`` prefixed to run as the cluster owner (``runuser -u postgres --``)."""
    if os.geteuid() != 0:
        return list(argv)
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresSetupError("running as root, but runuser (util-linux) is missing")
    return [runuser, "-u", RUN_AS, "--", *argv]


def run_tool(
    argv: Sequence[str],
    *,
    as_owner: bool = False,
    timeout: float = 120,
    check: bool = True,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a trusted local tool; as root with ``as_owner``, as the cluster owner via runuser.

    ``new_session`` gives the child its own session (``pg_ctl start`` then leaves the
    postmaster out of ours, so Ctrl-C reaches only us). Env defaults to :func:`clean_env`.
    """
    cmd = _owner_argv(argv) if as_owner else list(argv)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            check=False,
            start_new_session=new_session,
        )
    except subprocess.TimeoutExpired as exc:
        raise PostgresSetupError(f"timed out after {timeout}s: {' '.join(cmd)}") from exc
    if check and proc.returncode != 0:
        raise PostgresSetupError(
            f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


_owner_argv = as_owner  # run_tool's parameter of the same name shadows the function


def chown_to_owner(path: Path) -> None:
    """As root, give ``path`` to the cluster owner (PostgreSQL insists on owning its files)."""
    if os.geteuid() == 0:
        shutil.chown(path, user=RUN_AS, group=None)


def check_can_run_as_owner() -> None:
    """As root, fail early unless the ``postgres`` system user and runuser exist."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        raise PostgresSetupError(
            f"running as root but there is no {RUN_AS!r} system user to run initdb as "
            "(install PostgreSQL from Debian packages, or run the tests as a normal user)"
        ) from None
    if shutil.which("runuser") is None:
        raise PostgresSetupError("running as root but runuser (util-linux) is missing")


def initdb(
    bindir: Path,
    datadir: Path,
    *,
    password: str,
    superuser: str = SUPERUSER,
    cwd: Path,
    timeout: float = 120,
) -> None:
    """``initdb`` a new cluster (scram-sha-256, UTF8, C locale) with the superuser's password.

    The password goes through a file in ``cwd`` (owned by the cluster owner, removed after).
    """
    pwfile = cwd / "pwfile"
    pwfile.write_text(password + "\n")
    chown_to_owner(pwfile)
    try:
        run_tool(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                superuser,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            as_owner=True,
            cwd=cwd,
            timeout=timeout,
        )
    finally:
        pwfile.unlink(missing_ok=True)


def install_server_tls(datadir: Path, cert: Path | str, key: Path | str) -> None:
    """Copy a certificate and key into ``datadir`` as server.crt / server.key, mode 0600 and
    owned by the cluster owner (PostgreSQL insists on owning its key); ``ssl = on`` uses them."""
    for source, name in ((cert, "server.crt"), (key, "server.key")):
        copy = datadir / name
        shutil.copyfile(source, copy)
        copy.chmod(0o600)
        chown_to_owner(copy)


def pg_ctl(
    bindir: Path,
    datadir: Path,
    *args: str,
    timeout: float = 90,
    check: bool = True,
    new_session: bool = False,
) -> str:
    """Run ``pg_ctl -D datadir *args`` as the cluster owner; return its stdout + stderr."""
    proc = run_tool(
        [str(bindir / "pg_ctl"), "-D", str(datadir), *args],
        as_owner=True,
        timeout=timeout,
        check=check,
        cwd=datadir.parent,
        new_session=new_session,
    )
    return proc.stdout + proc.stderr


def port_taken(log: str) -> bool:
    """Whether a server log says the port was taken (probed free, bound by someone else)."""
    return "could not bind" in log or "already in use" in log


def start_on_free_port(
    datadir: Path,
    start: Callable[[int], None],
    log: Callable[[], str],
    *,
    attempts: int = 5,
) -> int:
    """Append a free ``port`` to postgresql.conf and ``start(port)``; return the port.

    ``start`` raises :class:`PostgresSetupError` when the server does not come up; if ``log()``
    then says the port was taken, a leftover postmaster is killed and a new port tried.
    """
    for attempt in range(attempts):
        port = free_port()
        with (datadir / "postgresql.conf").open("a") as f:
            f.write(f"port = {port}\n")
        try:
            start(port)
        except PostgresSetupError:
            if attempt < attempts - 1 and port_taken(log()):
                kill_postmaster(datadir)
                continue
            raise
        return port
    raise AssertionError("unreachable")  # pragma: no cover


def postmaster_pid(datadir: Path) -> int | None:
    """The PID in ``datadir/postmaster.pid``, or None."""
    try:
        return int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_postmaster(datadir: Path) -> None:
    """Last resort when pg_ctl cannot stop the server: SIGQUIT, then SIGKILL, by PID."""
    pid = postmaster_pid(datadir)
    if pid is None:
        return
    for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
