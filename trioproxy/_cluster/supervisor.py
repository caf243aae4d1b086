"""``workers = N``: a supervisor process and N worker processes, one proxy to the outside.

[shell] The supervisor owns what the workers share and nothing on the hot path:

* the listening ports: bound once (not listening) with SO_REUSEPORT, so ``port = 0``
  resolves to a single port and nobody else can take it while workers come and go;
  each worker binds and listens on the same ports, and the kernel spreads connections;
* the run directory (private, 0700): ``spec.json`` (ports, worker count), the shared
  budget ledger (``trioproxy/_cluster/ledger.py``) and each worker's cancel socket;
* the workers' lives: one task per worker slot starts ``python -m trioproxy --worker I``,
  waits for it, and restarts it with back-off if it dies (its budget units are taken
  back first: its server connections died with it);
* signals: SIGHUP is passed to every worker (each reloads the file), SIGTERM/SIGINT
  start a graceful shutdown of every worker (a second one stops them at once), and the
  supervisor exits once all of them have.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trioproxy._cluster.ledger import SharedLedger
from trioproxy._cluster.worker import LEDGER_FILE, InstanceSpec
from trioproxy._server.proxy import listen_roles, open_listeners

if TYPE_CHECKING:
    from collections.abc import Callable

    from trioproxy.config import Config

logger = logging.getLogger("trioproxy.supervisor")

#: Restart back-off for a worker that keeps dying: doubles from the first to the last.
RESTART_DELAY_FIRST = 0.5
RESTART_DELAY_MAX = 30.0
#: A worker that ran this long before dying is restarted without delay.
HEALTHY_RUN = 60.0


class Supervisor:
    def __init__(self, config: Config) -> None:
        if config.source is None:
            raise ValueError("workers need a configuration file (the workers read it)")
        self.config = config
        self.workers = config.proxy.workers
        self.stopping = False
        self._stop_requested = trio.Event()
        self.processes: dict[int, trio.Process] = {}

    def worker_command(self, worker: int, directory: Path) -> list[str]:
        assert self.config.source is not None
        return [
            sys.executable,
            "-m",
            "trioproxy",
            "--config",
            str(self.config.source),
            "--worker",
            str(worker),
            "--run-dir",
            str(directory),
        ]

    async def run(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="trioproxy-"))
        reserved = open_listeners(self.config, listen=False)
        ledger = SharedLedger(directory / LEDGER_FILE, None, create=True)
        try:
            ports = tuple(sock.getsockname()[1] for sock in reserved)
            InstanceSpec(
                workers=self.workers, listen_ports=ports, supervisor_pid=os.getpid()
            ).write(directory)
            addresses = ", ".join(
                f"{address.host}:{port}"
                for (address, _role), port in zip(listen_roles(self.config), ports, strict=True)
            )
            logger.info("supervisor: %d workers sharing %s", self.workers, addresses)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                async with trio.open_nursery() as keepers:
                    for worker in range(self.workers):
                        keepers.start_soon(self._keep, worker, directory, ledger)
                nursery.cancel_scope.cancel()  # every worker is gone: stop watching
            logger.info("supervisor: all workers stopped")
        finally:
            for sock in reserved:
                sock.close()
            ledger.close()
            shutil.rmtree(directory, ignore_errors=True)

    async def _keep(self, worker: int, directory: Path, ledger: SharedLedger) -> None:
        """Run worker ``worker`` until the supervisor stops, restarting it if it dies."""
        delay = RESTART_DELAY_FIRST
        while not self.stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(self.worker_command(worker, directory))
            self.processes[worker] = process
            try:
                await process.wait()
            finally:
                if process.returncode is None:  # the supervisor itself is being cancelled
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
                self.processes.pop(worker, None)
                held = ledger.reset(worker)
            if self._stop_requested.is_set():  # (not self.stopping: mypy narrows it)
                logger.info("supervisor: worker %d exited (%s)", worker, process.returncode)
                return
            if trio.current_time() - started >= HEALTHY_RUN:
                delay = RESTART_DELAY_FIRST
            logger.error(
                "supervisor: worker %d (pid %d) died (exit status %s; it held %d server "
                "connections); restarting in %g s",
                worker,
                process.pid,
                process.returncode,
                held,
                delay,
            )
            with trio.move_on_after(delay):
                await self._stop_requested.wait()  # a shutdown during the back-off ends it
            delay = min(delay * 2, RESTART_DELAY_MAX)

    def _signal_all(self, signum: int) -> None:
        for process in list(self.processes.values()):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    logger.info("supervisor: SIGHUP, every worker reloads")
                    self._signal_all(signal.SIGHUP)
                    continue
                if not self.stopping:
                    logger.info(
                        "supervisor: %s, shutting down every worker", signal.Signals(signum).name
                    )
                else:
                    logger.warning(
                        "supervisor: %s again, workers stop now", signal.Signals(signum).name
                    )
                self.stopping = True
                self._stop_requested.set()
                # Workers treat a second SIGTERM as "stop now", as the single process does.
                self._signal_all(signal.SIGTERM)


async def watch_supervisor(supervisor_pid: int, on_gone: Callable[[], None]) -> None:
    """(In a worker.) Call ``on_gone`` once if the supervisor dies, however it dies (the
    worker is then re-parented). Polled: PR_SET_PDEATHSIG would fire when the *thread*
    that started the worker ends, and trio starts processes from a worker thread."""
    while os.getppid() == supervisor_pid:  # noqa: ASYNC110 - no event exists for this
        await trio.sleep(SUPERVISOR_POLL)
    logger.error("the supervisor (pid %d) is gone: shutting down", supervisor_pid)
    on_gone()


SUPERVISOR_POLL = 0.5
