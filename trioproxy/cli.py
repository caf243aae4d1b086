"""Command line: ``trioproxy --config proxy.toml`` / ``--check-config`` / ``--version``, and
``trioproxy demo [--clients N] [--quick]`` (the Black Friday demo, ``trioproxy.demo``).

Signals: SIGTERM or SIGINT starts a graceful shutdown (stop accepting, let transactions in
flight finish for up to ``shutdown_timeout``, then close every client with FATAL 57P01); a
second one stops at once. SIGHUP re-reads the configuration file (see docs/operations.md).

Exit status: 0 on a clean shutdown (SIGINT/SIGTERM) or a valid ``--check-config``; 1 if the
proxy stopped on an error; 2 for an invalid configuration or bad usage; 130 on a
KeyboardInterrupt. Never prints a traceback for those expected cases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trioproxy._server.limits import raise_fd_limit
from trioproxy.config import Config, LogFormat, load_config
from trioproxy.errors import ConfigError, TrioproxyError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trioproxy._cluster.worker import WorkerRuntime
    from trioproxy._server.proxy import Proxy

logger = logging.getLogger("trioproxy")


def _version() -> str:
    try:
        return importlib.metadata.version("trioproxy")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        import trioproxy

        return str(getattr(trioproxy, "__version__", "unknown"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioproxy",
        description="PostgreSQL connection proxy and pooler on trio.",
        epilog="trioproxy demo [--clients N] [--quick]: replay a Black Friday connection storm "
        "against a throw-away PostgreSQL, without and with the proxy (trioproxy demo --help).",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--config", metavar="FILE", help="run the proxy with this TOML file")
    action.add_argument("--check-config", metavar="FILE", help="validate this TOML file and exit")
    parser.add_argument("--version", action="version", version=f"trioproxy {_version()}")
    # Set by the supervisor when it starts a worker (workers = N); not for people.
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    return parser


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception, if any);
    with ``workers = N``, which worker wrote it."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(config: Config, worker: int | None = None) -> None:
    handler = logging.StreamHandler()
    if config.proxy.log_format is LogFormat.JSON:
        handler.setFormatter(JSONFormatter(worker))
    else:
        tag = f"[worker {worker}]" if worker is not None else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
        )
    level = logging.DEBUG if config.proxy.debug_logging else logging.INFO
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # A log line per login is a measurable share of a login's CPU (pgbench -C): skip what
    # no format here uses, as the logging HOWTO's "Optimization" section suggests: the
    # caller's file and line (a stack walk per record), thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


async def _watch_signals(
    proxy: Proxy, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGTERM/SIGINT: graceful shutdown (a second one: stop at once). SIGHUP: reload.

    A worker ignores SIGINT: Ctrl-C reaches the whole process group, and the supervisor
    passes it on as SIGTERM (a worker must not count it twice)."""
    watched = [signal.SIGTERM, signal.SIGHUP]
    if proxy.runtime is None:
        watched.append(signal.SIGINT)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with trio.open_signal_receiver(*watched) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                logger.info("received SIGHUP, reloading %s", proxy.config.source)
                with contextlib.suppress(TrioproxyError):  # logged; the running config stays
                    await proxy.reload()
            elif not proxy.draining:
                logger.info("received %s, shutting down", name)
                proxy.shutdown()
            else:
                logger.warning("received %s again, stopping now", name)
                proxy.stop()


async def _run(config: Config, runtime: WorkerRuntime | None = None) -> None:
    from trioproxy._server.proxy import Proxy  # lazy: --check-config needs no server code

    proxy = Proxy(config, runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, proxy)
        if runtime is not None:
            from trioproxy._cluster.supervisor import watch_supervisor

            nursery.start_soon(watch_supervisor, runtime.spec.supervisor_pid, proxy.shutdown)
        await proxy.run()  # returns after a drain, or raises
        nursery.cancel_scope.cancel()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _serve(config: Config, worker: int | None = None, run_dir: str | None = None) -> int:
    # A proxy holds two descriptors per linked client: use all the kernel allows. Done here,
    # not in Proxy.run, so embedding never changes a process-wide limit behind the app.
    raise_fd_limit()
    configure_logging(config, worker)
    try:
        if worker is not None and run_dir is not None:
            from trioproxy._cluster.worker import WorkerRuntime

            trio.run(_run, config, WorkerRuntime.attach(Path(run_dir), worker))
        elif config.proxy.workers > 1:
            from trioproxy._cluster.supervisor import Supervisor

            trio.run(Supervisor(config).run)
        else:
            trio.run(_run, config)
    except BaseException as exc:
        leaves = _leaves(exc)
        if any(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 130
        if not all(isinstance(leaf, (OSError, TrioproxyError)) for leaf in leaves):
            raise  # a bug: keep the traceback
        for leaf in leaves:
            logger.critical("trioproxy stopped: %s", leaf)
        return 1
    return 0


def _summary(config: Config) -> str:
    n = len(config.users)
    listen = ", ".join(str(address) for address in config.proxy.listen)
    workers = config.proxy.workers
    extra = f", {workers} workers" if workers > 1 else ""
    return f"configuration OK: {n} user{'' if n == 1 else 's'}, listen {listen}{extra}"


def _demo(argv: Sequence[str]) -> int:
    from trioproxy.demo import main as demo_main  # lazy: it needs psycopg and asyncpg

    try:
        return demo_main(argv, prog="trioproxy demo")
    except SystemExit as exc:  # --help, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        return _demo(arguments[1:])
    try:
        args = _parser().parse_args(argv)
        config = load_config(args.config or args.check_config)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"trioproxy: {exc.message}", file=sys.stderr)
        return 2
    if args.check_config:
        print(_summary(config))
        return 0
    if (args.worker is None) != (args.run_dir is None):
        print("trioproxy: --worker and --run-dir go together", file=sys.stderr)
        return 2
    return _serve(config, args.worker, args.run_dir)
