"""Where a cancel key belongs: the instance and worker that issued it.

[core] A client cancels a query by opening a *new* connection and sending the
``process_id`` and ``secret_key`` it got in BackendKeyData. That connection may land on
another worker of this instance (SO_REUSEPORT spreads connections by address hash) or
on another instance behind a TCP load balancer. So the issuer is written into the
``process_id`` (PgBouncer's peering does the same); the ``secret_key`` stays 32 random
bits::

    bit 31      0 (process ids stay positive: some clients read them as signed)
    bits 30-24  peer_id (0 = no peering; 1..127)
    bits 23-18  worker id (0..63)
    bits 17-0   random, unique among this worker's live clients
"""

from __future__ import annotations

import enum

import attrs

MAX_PEER_ID = 127
MAX_WORKERS = 64
_PEER_SHIFT = 24
_WORKER_SHIFT = 18
SERIAL_BITS = _WORKER_SHIFT
_SERIAL_MASK = (1 << SERIAL_BITS) - 1


class Owner(enum.Enum):
    #: Issued by this very process.
    HERE = "here"
    #: Issued by another worker of this instance.
    WORKER = "worker"
    #: Issued by another instance (a peer).
    PEER = "peer"


@attrs.frozen
class Route:
    owner: Owner
    #: The worker id (Owner.WORKER) or peer id (Owner.PEER); 0 for HERE.
    target: int = 0


@attrs.frozen
class KeyLayout:
    """The cancel-key layout of one worker of one instance."""

    peer_id: int = 0
    worker_id: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.peer_id <= MAX_PEER_ID:
            raise ValueError(f"peer_id must be 0..{MAX_PEER_ID}, got {self.peer_id}")
        if not 0 <= self.worker_id < MAX_WORKERS:
            raise ValueError(f"worker id must be 0..{MAX_WORKERS - 1}, got {self.worker_id}")

    def process_id(self, serial: int) -> int:
        """The process id for a client, from ``serial`` (random; only its low 18 bits count)."""
        return (
            (self.peer_id << _PEER_SHIFT)
            | (self.worker_id << _WORKER_SHIFT)
            | (serial & _SERIAL_MASK)
        )

    def route(self, process_id: int) -> Route:
        """Who can check (and act on) a cancel request carrying ``process_id``."""
        peer = (process_id >> _PEER_SHIFT) & MAX_PEER_ID
        worker = (process_id >> _WORKER_SHIFT) & (MAX_WORKERS - 1)
        if peer != self.peer_id:
            return Route(Owner.PEER, peer)
        if worker != self.worker_id:
            return Route(Owner.WORKER, worker)
        return Route(Owner.HERE)


def worker_of(process_id: int) -> int:
    """The worker id written into a process id (for tests and the admin console)."""
    return (process_id >> _WORKER_SHIFT) & (MAX_WORKERS - 1)


def peer_of(process_id: int) -> int:
    return (process_id >> _PEER_SHIFT) & MAX_PEER_ID
