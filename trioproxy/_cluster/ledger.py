"""The server-connection budget shared by the workers of one instance.

[shell, no trio] ``max_connections`` caps the *instance*, so N workers must not each open
the full cap. The supervisor creates a small file; every worker maps it (``mmap``) and
holds one slot in it::

    header   magic, cap (0 = not known yet)
    slot i   units worker i holds, clients worker i has waiting for a unit, its pid

A worker takes a unit only while the sum over all slots is below the cap. The check and
the increment happen under ``flock`` on the file: it is released by the kernel if the
holder dies, so a crashed worker can never wedge the others (a POSIX semaphore would).
The lock is held for a few microseconds, and only when a server connection opens or
closes, never per transaction.

A worker writes only its own slot (``wanting``, and ``used`` under the lock); the
supervisor zeroes the slot of a worker that died, whose server connections died with it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from operator import or_
from typing import TYPE_CHECKING

from trioproxy._cluster.keys import MAX_WORKERS

if TYPE_CHECKING:
    from pathlib import Path

_MAGIC = 0x7472696F_6C656467  # "triolegd"
_WORD = struct.Struct("=q")
_HEADER_WORDS = 2
_SLOT_WORDS = 4  # used, wanting, pid, spare
_USED, _WANTING, _PID = 0, 1, 2
SIZE = _WORD.size * (_HEADER_WORDS + _SLOT_WORDS * MAX_WORKERS)
#: Every slot's words in one read: the sums below are asked at each release of a server
#: connection (``ServerBudget.should_shed``), so one C call, not one per word.
_SLOTS = struct.Struct(f"={_SLOT_WORDS * MAX_WORKERS}q")


class SharedLedger:
    """One process's view of the shared budget file."""

    def __init__(self, path: Path, worker_id: int | None, *, create: bool = False) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.path = path
        self.worker_id = worker_id
        self._fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(self._fd, SIZE)
            self._map = mmap.mmap(self._fd, SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        if create:
            self._put(0, _MAGIC)
        elif self._get(0) != _MAGIC:
            self.close()
            raise ValueError(f"{path} is not a trioproxy budget ledger")
        if worker_id is not None:
            self._put(self._slot(worker_id, _PID), os.getpid())

    # --- words --------------------------------------------------------------------------

    def _get(self, word: int) -> int:
        value: int = _WORD.unpack_from(self._map, word * _WORD.size)[0]
        return value

    def _put(self, word: int, value: int) -> None:
        _WORD.pack_into(self._map, word * _WORD.size, value)

    @staticmethod
    def _slot(worker: int, field: int) -> int:
        return _HEADER_WORDS + worker * _SLOT_WORDS + field

    def _own(self, field: int) -> int:
        assert self.worker_id is not None, "the supervisor's view holds no slot"
        return self._slot(self.worker_id, field)

    # --- the cap ------------------------------------------------------------------------

    @property
    def cap(self) -> int:
        """The instance's cap, once a worker has learned it from the server (else 0)."""
        return self._get(1)

    @cap.setter
    def cap(self, value: int) -> None:
        self._put(1, value)

    def _slots(self) -> tuple[int, ...]:
        return _SLOTS.unpack_from(self._map, _HEADER_WORDS * _WORD.size)

    def total_used(self) -> int:
        return sum(self._slots()[_USED::_SLOT_WORDS])

    def used_by(self, worker: int) -> int:
        return self._get(self._slot(worker, _USED))

    # --- taking and giving back -----------------------------------------------------------

    def try_take(self, cap: int) -> bool:
        """Take one unit for this worker if the instance holds fewer than ``cap``."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            if self.total_used() >= cap:
                return False
            word = self._own(_USED)
            self._put(word, self._get(word) + 1)
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def give_back(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            word = self._own(_USED)
            self._put(word, max(0, self._get(word) - 1))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # --- who is short -----------------------------------------------------------------------

    def set_wanting(self, clients: int) -> None:
        """How many of this worker's pools wait for a unit (a hint for the others)."""
        self._put(self._own(_WANTING), clients)

    def active_workers(self) -> int:
        """Workers holding units or waiting for them (the fair share's divisor)."""
        slots = self._slots()
        # Counted in C (map/or_), not a generator: asked at releases while clients wait.
        held_or_wanted = map(or_, slots[_USED::_SLOT_WORDS], slots[_WANTING::_SLOT_WORDS])
        return sum(map(bool, held_or_wanted))

    def wanting_elsewhere(self) -> int:
        wanting = self._slots()[_WANTING::_SLOT_WORDS]
        own = wanting[self.worker_id] if self.worker_id is not None else 0
        return sum(wanting) - own

    # --- the supervisor ---------------------------------------------------------------------

    def reset(self, worker: int) -> int:
        """A worker died: its units went with its sockets. Returns how many there were."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            held = self._get(self._slot(worker, _USED))
            for field in (_USED, _WANTING, _PID):
                self._put(self._slot(worker, field), 0)
            return held
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
