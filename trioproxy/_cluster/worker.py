"""What a worker process knows about its instance (given by the supervisor).

[shell] The supervisor binds every listening address once (so ``port = 0`` resolves to
one port for all workers, and nobody else can take it), writes the resolved ports to
``spec.json`` in a private run directory, and starts each worker with
``--worker ID --run-dir DIR``. A worker binds the same ports with SO_REUSEPORT; the
kernel spreads new connections over the workers' accept queues.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs

from trioproxy._cluster.ledger import SharedLedger

SPEC_FILE = "spec.json"
LEDGER_FILE = "budget"


@attrs.frozen(kw_only=True)
class InstanceSpec:
    """Written by the supervisor, read by every worker."""

    workers: int
    #: The resolved port of each address in ``listen_roles(config)``, in that order.
    listen_ports: tuple[int, ...]
    supervisor_pid: int

    def write(self, directory: Path) -> None:
        data = {
            "workers": self.workers,
            "listen_ports": list(self.listen_ports),
            "supervisor_pid": self.supervisor_pid,
        }
        tmp = directory / (SPEC_FILE + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, directory / SPEC_FILE)

    @classmethod
    def read(cls, directory: Path) -> InstanceSpec:
        data = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
        return cls(
            workers=int(data["workers"]),
            listen_ports=tuple(int(p) for p in data["listen_ports"]),
            supervisor_pid=int(data["supervisor_pid"]),
        )


@attrs.define(kw_only=True, eq=False)
class WorkerRuntime:
    """One worker's place in its instance."""

    worker_id: int
    directory: Path
    spec: InstanceSpec
    ledger: SharedLedger

    @classmethod
    def attach(cls, directory: Path, worker_id: int) -> WorkerRuntime:
        spec = InstanceSpec.read(directory)
        if not 0 <= worker_id < spec.workers:
            raise ValueError(f"worker id {worker_id} is not below workers = {spec.workers}")
        return cls(
            worker_id=worker_id,
            directory=directory,
            spec=spec,
            ledger=SharedLedger(directory / LEDGER_FILE, worker_id),
        )
