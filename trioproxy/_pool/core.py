"""Bookkeeping core of the server-connection pool.

[core] No I/O, no clock: time comes in as ``now`` (any monotonic float, e.g.
``trio.current_time()``). Every state change is one synchronous method call, so the trio
shell can never be cancelled half-way through one. The shell does the I/O the core asks
for: it opens connections (``Open``), wakes waiters (``Effects.assigned``) and closes
connections (``Effects.close``).

A *slot* is a server connection that exists or is being opened. Each slot is in exactly
one of five places::

    idle      in the idle stack, free to hand out
    borrowed  held by a caller (taken from a Grant, or opened by it)
    opening   being opened by a caller that holds an Open
    pending   assigned to a woken waiter that has not called take() yet
              (a pending Grant holds a connection, a pending Open a reserved slot)

    slots = idle + borrowed + opening + pending

Invariants (checked by tests/unit/test_pool_core.py):

* ``slots <= max_size``, except after ``resize()`` shrank ``max_size`` below the number of
  live slots. Then slots never grows: every slot released while ``slots >= max_size``
  is dropped, and over-limit connections are closed at checkin, until ``slots <=
  max_size`` again. Idle connections never sit above the limit (``idle > 0`` implies
  ``slots <= max_size``).
* Liveness: if a waiter is queued, then ``idle == 0`` and ``slots >= max_size``. In
  particular a connection returned while waiters queue goes straight to the head waiter
  (FIFO handoff), never through the idle stack.
* FIFO: waiters are assigned in request order, and a newcomer never overtakes a queued
  waiter.
* No leaks: every connection the core knows is in exactly one of idle, borrowed or
  pending, and leaves the core only through ``Effects.close`` (the shell must close it)
  or ``forget()`` (the shell says it is already gone).
* ``cancel(waiter)`` is idempotent and safe to call unconditionally in a ``finally``:
  it dequeues a waiting waiter, passes a pending assignment on, and is a no-op for a
  waiter that already took its assignment (or was never seen).

Idle policy (RDS Proxy semantics): up to ``max_idle`` idle connections are kept
indefinitely; idle connections beyond that are closed by ``expire()`` once idle for
``server_idle_timeout`` seconds (0: at once). Any connection older than
``server_lifetime`` (since opened; 0: no limit) is closed at checkin or, when idle, by
``expire()``. Idle connections are handed out LIFO (warmest first), so "beyond
``max_idle``" means the bottom of the stack, the ones used least recently.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

import attrs

__all__ = ["Assignment", "Effects", "Grant", "Open", "PoolCore", "PoolStatistics", "Wait"]

C = TypeVar("C", bound=Hashable)
W = TypeVar("W", bound=Hashable)


@attrs.frozen
class Grant(Generic[C]):
    """Use this existing connection."""

    conn: C


@attrs.frozen
class Open:
    """Open a new connection; a slot is reserved. Report with ``opened()`` or ``open_failed()``."""


@attrs.frozen
class Wait:
    """Queued: wait to be woken (``Effects.assigned``), then ``take()``."""


@attrs.frozen
class Assignment(Generic[C, W]):
    """``waiter`` was dequeued and given ``result``; wake it so it can ``take()`` it."""

    waiter: W
    result: Grant[C] | Open


@attrs.frozen
class Effects(Generic[C, W]):
    """What the shell must do after a state change.

    ``assigned``: wake these waiters (in order). ``close``: close these connections; the
    core has already forgotten them.
    """

    assigned: tuple[Assignment[C, W], ...] = ()
    close: tuple[C, ...] = ()


#: Field-less and frozen, so one instance each serves every answer.
_OPEN = Open()
_WAIT = Wait()
#: The effects of a change that asks nothing of the shell (shared: Effects is frozen).
_NO_EFFECTS: Effects[Any, Any] = Effects()


@attrs.frozen
class PoolStatistics:
    """A snapshot; ``slots = idle + borrowed + opening + pending``."""

    max_size: int
    max_idle: int
    idle: int
    borrowed: int
    opening: int
    pending: int
    waiting: int
    total_opened: int
    total_closed: int

    @property
    def slots(self) -> int:
        return self.idle + self.borrowed + self.opening + self.pending


@attrs.define(eq=False)
class _Conn:
    opened_at: float
    idle_since: float


def _check_limits(max_size: int, max_idle: int) -> None:
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, got {max_size}")
    if max_idle < 0:
        raise ValueError(f"max_idle must be >= 0, got {max_idle}")


class _Builder(Generic[C, W]):
    __slots__ = ("assigned", "close")

    def __init__(self) -> None:
        self.assigned: list[Assignment[C, W]] = []
        self.close: list[C] = []

    def build(self) -> Effects[C, W]:
        if not self.assigned and not self.close:
            return _NO_EFFECTS
        return Effects(tuple(self.assigned), tuple(self.close))


class PoolCore(Generic[C, W]):
    """Sans-IO state of one pool. ``C``: connection objects, ``W``: waiter tokens.

    Both are used as dict keys, so they must hash by identity (or be unique values).
    """

    def __init__(
        self, *, max_size: int, max_idle: int, server_lifetime: float, server_idle_timeout: float
    ) -> None:
        _check_limits(max_size, max_idle)
        if server_lifetime < 0 or server_idle_timeout < 0:
            raise ValueError("server_lifetime and server_idle_timeout must be >= 0")
        self._max_size = max_size
        self._max_idle = max_idle
        self._lifetime = server_lifetime
        self._idle_timeout = server_idle_timeout
        # Idle stack: insertion order, top (most recently idle) last.
        self._idle: dict[C, _Conn] = {}
        # Borrowed connections, including pending Grants.
        self._out: dict[C, _Conn] = {}
        # Pending Grants: connection -> waiter it is assigned to.
        self._granted: dict[C, W] = {}
        # Opens in progress (taken, or returned by request()).
        self._opening = 0
        # FIFO queue of waiters (dict: O(1) removal from the middle).
        self._waiters: dict[W, None] = {}
        # Assigned but not yet taken.
        self._pending: dict[W, Grant[C] | Open] = {}
        self._total_opened = 0
        self._total_closed = 0

    # ------------------------------------------------------------------ queries

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def max_idle(self) -> int:
        return self._max_idle

    def _slots(self) -> int:
        # len(_pending) - len(_granted) = pending Opens; pending Grants are in _out.
        return (
            len(self._idle)
            + len(self._out)
            + self._opening
            + len(self._pending)
            - len(self._granted)
        )

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            max_size=self._max_size,
            max_idle=self._max_idle,
            idle=len(self._idle),
            borrowed=len(self._out) - len(self._granted),
            opening=self._opening,
            pending=len(self._pending),
            waiting=len(self._waiters),
            total_opened=self._total_opened,
            total_closed=self._total_closed,
        )

    def borrowed(self) -> Iterator[C]:
        """Connections out of the idle stack: borrowed, and pending Grants."""
        return iter(list(self._out))

    def idle(self) -> Iterator[C]:
        """Idle connections, most recently used first."""
        return iter(list(reversed(self._idle)))

    def next_deadline(self) -> float | None:
        """When ``expire()`` next has work, given no other change; ``None``: never.

        May be in the past (call ``expire()`` now). Any other state change can move it,
        so the maintenance task should re-read it after each one.
        """
        deadlines: list[float] = []
        if self._lifetime > 0:
            deadlines.extend(rec.opened_at + self._lifetime for rec in self._idle.values())
        excess = len(self._idle) - self._max_idle
        if excess > 0:
            recs = list(self._idle.values())[:excess]
            deadlines.extend(rec.idle_since + self._idle_timeout for rec in recs)
        return min(deadlines, default=None)

    # --------------------------------------------------------------- borrowing

    def request(self, waiter: W) -> Grant[C] | Open | Wait:
        """A caller wants a connection. ``waiter`` must be new (``ValueError`` if known).

        Idle connections are not checked for lifetime here; ``expire()`` closes them.
        """
        if waiter in self._waiters or waiter in self._pending:
            raise ValueError("waiter already queued or assigned")
        if not self._waiters:
            if self._idle:
                conn, rec = self._idle.popitem()  # LIFO
                self._out[conn] = rec
                return Grant(conn)
            if self._slots() < self._max_size:
                self._opening += 1
                return _OPEN
        self._waiters[waiter] = None
        return _WAIT

    def take_idle(self) -> C | None:
        """The most recently used idle connection, borrowed at once (no waiter token, no
        effects), or ``None`` when there is none or waiters are queued (a newcomer never
        overtakes them). The cheap path of ``request()`` for a caller that can wait
        otherwise; ``None`` changes nothing."""
        if self._waiters or not self._idle:
            return None
        conn, rec = self._idle.popitem()  # LIFO
        self._out[conn] = rec
        return conn

    def take(self, waiter: W) -> Grant[C] | Open | None:
        """A woken waiter collects its assignment; ``None`` if it has none (still queued,
        or unknown). After a wake ``None`` is possible (rarely: its pending connection
        died and it was re-queued at the head), so a waiter that gets ``None`` before its
        timeout waits again."""
        result = self._pending.pop(waiter, None)
        if isinstance(result, Grant):
            del self._granted[result.conn]
        elif isinstance(result, Open):
            self._opening += 1
        return result

    def opened(self, conn: C, now: float) -> None:
        """An Open succeeded: its slot becomes ``conn``, borrowed by the opener."""
        if self._opening <= 0:
            raise ValueError("opened() without an Open in progress")
        if conn in self._out or conn in self._idle:
            raise ValueError("connection already in the pool")
        self._opening -= 1
        self._out[conn] = _Conn(opened_at=now, idle_since=now)
        self._total_opened += 1

    def open_failed(self) -> Effects[C, W]:
        """An Open failed (or was cancelled): release its slot; it may pass to the head
        waiter as a new Open."""
        if self._opening <= 0:
            raise ValueError("open_failed() without an Open in progress")
        self._opening -= 1
        fx: _Builder[C, W] = _Builder()
        self._dispatch(fx)
        return fx.build()

    def checkin(self, conn: C, now: float, *, reusable: bool) -> Effects[C, W]:
        """A borrowed connection comes back (``ValueError`` if it is not borrowed).

        Reusable and within lifetime and limit: to the head waiter, else to the idle
        stack. Otherwise it is in ``close`` and its slot is freed (it may pass to the
        head waiter as an Open)."""
        if conn not in self._out or conn in self._granted:
            raise ValueError("checkin() of a connection that is not borrowed")
        rec = self._out.pop(conn)
        reusable = reusable and not self._too_old(rec, now)
        if reusable:
            rec.idle_since = now
            if not self._waiters and self._slots() < self._max_size:
                # _put_back()'s idle case, once per transaction: nothing for the shell.
                self._idle[conn] = rec
                return _NO_EFFECTS
        fx: _Builder[C, W] = _Builder()
        if reusable:
            self._put_back(conn, rec, fx)
        else:
            self._close(conn, fx)
            self._dispatch(fx)
        return fx.build()

    def cancel(self, waiter: W) -> Effects[C, W]:
        """``waiter`` gives up. Idempotent; call it unconditionally in a ``finally``.

        Queued: dequeued. Pending Grant: the connection goes to the next waiter or the
        idle stack (or is closed if over the limit). Pending Open: the slot passes to the
        next waiter or is released. Taken or unknown: nothing (the caller then owns a
        connection or an Open, and reports it with checkin/forget/opened/open_failed)."""
        if waiter in self._waiters:
            del self._waiters[waiter]
            return _NO_EFFECTS
        result = self._pending.pop(waiter, None)
        if result is None:  # taken (the common case) or unknown
            return _NO_EFFECTS
        fx: _Builder[C, W] = _Builder()
        if isinstance(result, Grant):
            del self._granted[result.conn]
            rec = self._out.pop(result.conn)
            self._put_back(result.conn, rec, fx)
        elif isinstance(result, Open):
            self._dispatch(fx)
        return fx.build()

    def forget(self, conn: C) -> Effects[C, W]:
        """``conn`` died or was closed by the shell: free its slot (it may pass to the
        head waiter). Works for idle, borrowed and pending connections; a no-op for
        unknown ones. If ``conn`` was a pending Grant, its waiter goes back to the head of
        the queue and is served first."""
        fx: _Builder[C, W] = _Builder()
        if self._idle.pop(conn, None) is None and self._out.pop(conn, None) is None:
            return fx.build()
        self._total_closed += 1
        waiter = self._granted.pop(conn, None)
        if waiter is not None:
            del self._pending[waiter]
            self._waiters = {waiter: None} | self._waiters
        self._dispatch(fx)
        return fx.build()

    # ------------------------------------------------------------- maintenance

    def expire(self, now: float) -> Effects[C, W]:
        """Close idle connections past ``server_lifetime``, and those beyond ``max_idle``
        idle for ``server_idle_timeout``."""
        fx: _Builder[C, W] = _Builder()
        for conn, rec in list(self._idle.items()):
            if self._too_old(rec, now):
                del self._idle[conn]
                self._close(conn, fx)
        excess = len(self._idle) - self._max_idle
        if excess > 0:
            for conn, rec in list(self._idle.items())[:excess]:
                if now - rec.idle_since >= self._idle_timeout:
                    del self._idle[conn]
                    self._close(conn, fx)
        self._dispatch(fx)
        return fx.build()

    def resize(self, *, max_size: int, max_idle: int) -> Effects[C, W]:
        """Live reload of the limits. Shrinking closes idle connections (least recently
        used first) down to ``max_size``; borrowed ones over the limit are closed at
        checkin. Growing may give queued waiters an Open."""
        _check_limits(max_size, max_idle)
        self._max_size = max_size
        self._max_idle = max_idle
        fx: _Builder[C, W] = _Builder()
        while self._idle and self._slots() > max_size:
            conn = next(iter(self._idle))
            del self._idle[conn]
            self._close(conn, fx)
        self._dispatch(fx)
        return fx.build()

    # ----------------------------------------------------------------- helpers

    def _too_old(self, rec: _Conn, now: float) -> bool:
        return self._lifetime > 0 and now - rec.opened_at >= self._lifetime

    def _close(self, conn: C, fx: _Builder[C, W]) -> None:
        self._total_closed += 1
        fx.close.append(conn)

    def _put_back(self, conn: C, rec: _Conn, fx: _Builder[C, W]) -> None:
        """A usable connection, already removed from ``_out``, becomes free."""
        if self._slots() >= self._max_size:  # without conn: it was over the limit
            self._close(conn, fx)
        elif self._waiters:
            self._assign(Grant(conn), fx)
            self._out[conn] = rec
        else:
            self._idle[conn] = rec

    def _assign(self, result: Grant[C] | Open, fx: _Builder[C, W]) -> None:
        waiter = next(iter(self._waiters))
        del self._waiters[waiter]
        self._pending[waiter] = result
        if isinstance(result, Grant):
            self._granted[result.conn] = waiter
        fx.assigned.append(Assignment(waiter, result))

    def _dispatch(self, fx: _Builder[C, W]) -> None:
        """Serve queued waiters from idle connections and free capacity."""
        while self._waiters:
            if self._idle and self._slots() <= self._max_size:
                conn, rec = self._idle.popitem()
                self._out[conn] = rec
                self._assign(Grant(conn), fx)
            elif self._slots() < self._max_size:
                self._assign(_OPEN, fx)
            else:
                break
