"""Tests of the sans-IO pool core: unit tests per method and a hypothesis state machine."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from trioproxy._pool.core import Assignment, Effects, Grant, Open, PoolCore, Wait

_ids = itertools.count()


class Conn:
    """A stand-in server connection: hashed by identity."""

    def __init__(self) -> None:
        self.n = next(_ids)

    def __repr__(self) -> str:
        return f"Conn#{self.n}"


class Waiter:
    def __init__(self) -> None:
        self.n = next(_ids)

    def __repr__(self) -> str:
        return f"Waiter#{self.n}"


Core = PoolCore[Conn, Waiter]
NOTHING: Effects[Conn, Waiter] = Effects()


def make(
    max_size: int = 2, max_idle: int = 2, lifetime: float = 0, idle_timeout: float = 0
) -> Core:
    return PoolCore(
        max_size=max_size,
        max_idle=max_idle,
        server_lifetime=lifetime,
        server_idle_timeout=idle_timeout,
    )


def borrow_new(core: Core, now: float = 0.0) -> Conn:
    """request() that must answer Open; open the connection."""
    assert core.request(Waiter()) == Open()
    conn = Conn()
    core.opened(conn, now)
    return conn


# --------------------------------------------------------------------------- request


def test_request_opens_then_waits_when_full() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w = Waiter()
    assert core.request(w) == Wait()
    s = core.statistics()
    assert (s.borrowed, s.waiting, s.slots, s.total_opened) == (1, 1, 1, 1)
    assert list(core.borrowed()) == [c]


def test_request_grants_idle_lifo() -> None:
    core = make(max_size=3, max_idle=3)
    a, b = borrow_new(core), borrow_new(core)
    core.checkin(a, 1, reusable=True)
    core.checkin(b, 2, reusable=True)
    assert list(core.idle()) == [b, a]
    assert core.request(Waiter()) == Grant(b)
    assert core.request(Waiter()) == Grant(a)
    assert core.request(Waiter()) == Open()


def test_request_newcomer_does_not_overtake_queue() -> None:
    core = make(max_size=1)
    borrow_new(core)
    w1, w2 = Waiter(), Waiter()
    assert core.request(w1) == Wait()
    assert core.request(w2) == Wait()
    assert core.resize(max_size=2, max_idle=2) == Effects(assigned=(Assignment(w1, Open()),))
    w3 = Waiter()
    assert core.request(w3) == Wait()  # w1's pending Open holds the new slot
    fx = core.resize(max_size=4, max_idle=4)
    assert fx == Effects(assigned=(Assignment(w2, Open()), Assignment(w3, Open())))


def test_request_duplicate_waiter_rejected() -> None:
    core = make(max_size=0)
    w = Waiter()
    assert core.request(w) == Wait()
    with pytest.raises(ValueError, match="already"):
        core.request(w)


def test_max_size_zero_always_waits() -> None:
    core = make(max_size=0, max_idle=0)
    assert core.request(Waiter()) == Wait()
    assert core.statistics().slots == 0


# --------------------------------------------------------------------------- opened / open_failed


def test_opened_and_open_failed_need_an_open() -> None:
    core = make()
    with pytest.raises(ValueError, match="opened"):
        core.opened(Conn(), 0)
    with pytest.raises(ValueError, match="open_failed"):
        core.open_failed()


def test_opened_rejects_known_connection() -> None:
    core = make()
    c = borrow_new(core)
    assert core.request(Waiter()) == Open()
    with pytest.raises(ValueError, match="already"):
        core.opened(c, 0)


def test_open_failed_passes_slot_to_head_waiter() -> None:
    core = make(max_size=1)
    assert core.request(Waiter()) == Open()
    w1, w2 = Waiter(), Waiter()
    core.request(w1)
    core.request(w2)
    fx = core.open_failed()
    assert fx == Effects(assigned=(Assignment(w1, Open()),))
    assert core.take(w2) is None  # still queued
    assert core.take(w1) == Open()
    assert core.take(w1) is None
    s = core.statistics()
    assert (s.opening, s.waiting, s.pending, s.slots) == (1, 1, 0, 1)


def test_open_failed_without_waiters_frees_slot() -> None:
    core = make(max_size=1)
    assert core.request(Waiter()) == Open()
    assert core.open_failed() == NOTHING
    assert core.statistics().slots == 0


# --------------------------------------------------------------------------- checkin


def test_checkin_hands_to_head_waiter_not_idle() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w1, w2 = Waiter(), Waiter()
    core.request(w1)
    core.request(w2)
    fx = core.checkin(c, 1, reusable=True)
    assert fx == Effects(assigned=(Assignment(w1, Grant(c)),))
    s = core.statistics()
    assert (s.idle, s.pending, s.waiting, s.borrowed) == (0, 1, 1, 0)
    assert core.take(w1) == Grant(c)
    assert core.statistics().borrowed == 1


def test_checkin_to_idle_without_waiters() -> None:
    core = make()
    c = borrow_new(core)
    assert core.checkin(c, 1, reusable=True) == NOTHING
    assert list(core.idle()) == [c]
    assert list(core.borrowed()) == []


def test_take_idle_is_the_waiterless_fast_path_of_request() -> None:
    core = make(max_size=2)
    assert core.take_idle() is None  # nothing idle: nothing changes
    assert core.statistics().slots == 0
    a, b = borrow_new(core), borrow_new(core)
    assert core.checkin(a, 1, reusable=True) is core.checkin(b, 2, reusable=True)  # no effects
    assert core.take_idle() is b  # LIFO, as request()
    assert list(core.borrowed()) == [b]
    assert core.take_idle() is a
    w = Waiter()
    assert core.request(w) == Wait()
    assert core.checkin(b, 3, reusable=True) == Effects(assigned=(Assignment(w, Grant(b)),))
    assert core.take_idle() is None  # the handoff is pending for w


def test_take_idle_never_overtakes_queued_waiters() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w = Waiter()
    assert core.request(w) == Wait()
    assert core.take_idle() is None
    assert core.cancel(w) == NOTHING
    core.checkin(c, 1, reusable=True)
    assert core.take_idle() is c
    s = core.statistics()
    assert (s.idle, s.borrowed, s.waiting) == (0, 1, 0)


def test_checkin_not_reusable_closes_and_gives_open() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w = Waiter()
    core.request(w)
    fx = core.checkin(c, 1, reusable=False)
    assert fx == Effects(assigned=(Assignment(w, Open()),), close=(c,))
    assert core.statistics().total_closed == 1


def test_checkin_past_lifetime_closes() -> None:
    core = make(lifetime=10)
    c = borrow_new(core, now=0)
    assert core.checkin(c, 10, reusable=True) == Effects(close=(c,))
    d = borrow_new(core, now=20)
    assert core.checkin(d, 29.9, reusable=True) == NOTHING


def test_checkin_unknown_or_pending_rejected() -> None:
    core = make(max_size=1)
    with pytest.raises(ValueError, match="not borrowed"):
        core.checkin(Conn(), 0, reusable=True)
    c = borrow_new(core)
    core.request(Waiter())
    core.checkin(c, 0, reusable=True)  # now a pending Grant
    with pytest.raises(ValueError, match="not borrowed"):
        core.checkin(c, 0, reusable=True)


def test_checkin_over_limit_after_shrink_closes_without_reuse() -> None:
    core = make(max_size=2)
    a, b = borrow_new(core), borrow_new(core)
    assert core.resize(max_size=1, max_idle=1) == NOTHING  # borrowed ones stay out
    w = Waiter()
    assert core.request(w) == Wait()
    assert core.checkin(a, 1, reusable=True) == Effects(close=(a,))  # 2 > 1: dropped
    assert core.statistics().slots == 1
    assert core.checkin(b, 1, reusable=True) == Effects(assigned=(Assignment(w, Grant(b)),))


# --------------------------------------------------------------------------- take / cancel


def test_cancel_queued_waiter() -> None:
    core = make(max_size=0)
    w = Waiter()
    core.request(w)
    assert core.cancel(w) == NOTHING
    assert core.statistics().waiting == 0
    assert core.cancel(w) == NOTHING


def test_cancel_unknown_and_after_take_is_noop() -> None:
    core = make()
    assert core.cancel(Waiter()) == NOTHING
    w = Waiter()
    assert core.request(w) == Open()
    assert core.cancel(w) == NOTHING  # it owns the Open; it reports via opened/open_failed
    assert core.statistics().opening == 1


def test_cancel_pending_grant_passes_conn_to_next_waiter() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w1, w2 = Waiter(), Waiter()
    core.request(w1)
    core.request(w2)
    core.checkin(c, 1, reusable=True)  # -> w1 (pending)
    fx = core.cancel(w1)  # cancelled before it woke up
    assert fx == Effects(assigned=(Assignment(w2, Grant(c)),))
    assert core.cancel(w1) == NOTHING
    assert core.take(w1) is None
    assert core.take(w2) == Grant(c)


def test_cancel_pending_grant_goes_idle_keeping_idle_since() -> None:
    core = make(max_size=1, max_idle=0, idle_timeout=5)
    c = borrow_new(core)
    w = Waiter()
    core.request(w)
    core.checkin(c, 3, reusable=True)
    assert core.cancel(w) == NOTHING
    assert list(core.idle()) == [c]
    assert core.next_deadline() == 8


def test_cancel_pending_open_passes_slot_or_releases() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w1, w2 = Waiter(), Waiter()
    core.request(w1)
    core.request(w2)
    core.checkin(c, 1, reusable=False)  # w1 gets Open
    assert core.cancel(w1) == Effects(assigned=(Assignment(w2, Open()),))
    assert core.cancel(w2) == NOTHING
    assert core.statistics().slots == 0


def test_cancel_pending_grant_over_limit_closes() -> None:
    core = make(max_size=2)
    a, b = borrow_new(core), borrow_new(core)
    w = Waiter()
    core.request(w)
    core.checkin(a, 1, reusable=True)  # pending for w
    core.resize(max_size=1, max_idle=1)
    assert core.cancel(w) == Effects(close=(a,))
    assert core.statistics().slots == 1
    del b


def test_take_after_wake_may_be_none_after_requeue() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w = Waiter()
    core.request(w)
    core.checkin(c, 1, reusable=True)  # pending Grant(c) for w, w is being woken
    core.resize(max_size=0, max_idle=0)
    assert core.forget(c) == NOTHING  # c died; no capacity: w back at the queue head
    assert core.take(w) is None
    assert core.statistics().waiting == 1


# --------------------------------------------------------------------------- forget


def test_forget_borrowed_gives_open_to_waiter() -> None:
    core = make(max_size=1)
    c = borrow_new(core)
    w = Waiter()
    core.request(w)
    assert core.forget(c) == Effects(assigned=(Assignment(w, Open()),))
    assert core.forget(c) == NOTHING  # idempotent
    assert core.statistics().total_closed == 1


def test_forget_idle() -> None:
    core = make()
    c = borrow_new(core)
    core.checkin(c, 0, reusable=True)
    assert core.forget(c) == NOTHING
    assert core.statistics().slots == 0


def test_forget_pending_grant_reassigns_same_waiter_first() -> None:
    core = make(max_size=2)
    a, b = borrow_new(core), borrow_new(core)
    w1, w2 = Waiter(), Waiter()
    core.request(w1)
    core.request(w2)
    core.checkin(a, 1, reusable=True)  # -> w1 pending
    fx = core.forget(a)
    assert fx == Effects(assigned=(Assignment(w1, Open()),))
    assert core.take(w1) == Open()
    assert core.statistics().waiting == 1
    del b


def test_forget_pending_grant_prefers_idle_connection() -> None:
    core = make(max_size=2)
    a, b = borrow_new(core), borrow_new(core)
    w = Waiter()
    core.request(w)
    core.checkin(a, 1, reusable=True)  # -> w pending
    core.checkin(b, 1, reusable=True)  # no waiter: idle
    assert core.forget(a) == Effects(assigned=(Assignment(w, Grant(b)),))


# --------------------------------------------------------------------------- expire / deadline


def test_expire_idle_timeout_only_above_max_idle() -> None:
    core = make(max_size=3, max_idle=1, idle_timeout=10)
    a, b, c = borrow_new(core), borrow_new(core), borrow_new(core)
    core.checkin(a, 1, reusable=True)
    core.checkin(b, 2, reusable=True)
    core.checkin(c, 3, reusable=True)
    # a, b are beyond max_idle (bottom of the stack); c is kept forever.
    assert core.next_deadline() == 11
    assert core.expire(10.9) == NOTHING
    assert core.expire(11) == Effects(close=(a,))
    assert core.next_deadline() == 12
    assert core.expire(100) == Effects(close=(b,))
    assert core.next_deadline() is None
    assert list(core.idle()) == [c]


def test_expire_zero_idle_timeout_closes_excess_at_once() -> None:
    core = make(max_size=2, max_idle=0, idle_timeout=0)
    a = borrow_new(core)
    core.checkin(a, 5, reusable=True)
    assert core.next_deadline() == 5
    assert core.expire(5) == Effects(close=(a,))


def test_expire_lifetime_closes_any_idle() -> None:
    core = make(max_size=2, max_idle=2, lifetime=100, idle_timeout=10)
    a = borrow_new(core, now=0)
    b = borrow_new(core, now=50)
    core.checkin(a, 60, reusable=True)
    core.checkin(b, 60, reusable=True)
    assert core.next_deadline() == 100
    assert core.expire(100) == Effects(close=(a,))
    assert core.next_deadline() == 150
    assert core.expire(150) == Effects(close=(b,))
    assert core.next_deadline() is None


def test_no_lifetime_no_deadline() -> None:
    core = make(max_size=2, max_idle=2, lifetime=0, idle_timeout=0)
    a = borrow_new(core, now=0)
    core.checkin(a, 1e9, reusable=True)
    assert core.next_deadline() is None
    assert core.expire(1e12) == NOTHING


def test_borrowed_lifetime_not_in_deadline() -> None:
    core = make(lifetime=10)
    borrow_new(core, now=0)
    assert core.next_deadline() is None


# --------------------------------------------------------------------------- resize


def test_resize_shrink_closes_lru_idle() -> None:
    core = make(max_size=3, max_idle=3)
    a, b, c = borrow_new(core), borrow_new(core), borrow_new(core)
    for i, conn in enumerate((a, b, c)):
        core.checkin(conn, i, reusable=True)
    assert core.resize(max_size=1, max_idle=1) == Effects(close=(a, b))
    assert list(core.idle()) == [c]
    assert core.statistics().max_size == 1


def test_resize_grow_serves_waiters_in_order() -> None:
    core = make(max_size=0, max_idle=0)
    w1, w2, w3 = Waiter(), Waiter(), Waiter()
    for w in (w1, w2, w3):
        core.request(w)
    fx = core.resize(max_size=2, max_idle=0)
    assert fx == Effects(assigned=(Assignment(w1, Open()), Assignment(w2, Open())))


def test_invalid_limits() -> None:
    with pytest.raises(ValueError, match="max_size"):
        make(max_size=-1)
    with pytest.raises(ValueError, match="max_idle"):
        make(max_idle=-1)
    with pytest.raises(ValueError, match=">= 0"):
        make(lifetime=-1)
    with pytest.raises(ValueError, match="max_size"):
        make().resize(max_size=-1, max_idle=0)


# --------------------------------------------------------------------------- state machine


class PoolMachine(RuleBasedStateMachine):
    """Drives PoolCore like the shell would, against a model of who holds what."""

    core: Core

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.seq: dict[Waiter, int] = {}  # request order
        self.queue: list[Waiter] = []
        self.pending: dict[Waiter, Grant[Conn] | Open] = {}
        self.holding: dict[Waiter, Conn] = {}
        self.opening: set[Waiter] = set()
        self.created: set[Conn] = set()
        self.gone: set[Conn] = set()
        self.limit = 0

    @initialize(
        max_size=st.integers(0, 4),
        max_idle=st.integers(0, 4),
        lifetime=st.sampled_from([0.0, 10.0, 40.0]),
        idle_timeout=st.sampled_from([0.0, 3.0, 15.0]),
    )
    def init(self, max_size: int, max_idle: int, lifetime: float, idle_timeout: float) -> None:
        self.core = make(max_size, max_idle, lifetime, idle_timeout)
        self.limit = max_size

    # ---- helpers

    def pending_conns(self) -> set[Conn]:
        return {r.conn for r in self.pending.values() if isinstance(r, Grant)}

    def apply(self, fx: Effects[Conn, Waiter]) -> None:
        for conn in fx.close:
            assert conn in self.created
            assert conn not in self.gone
            assert conn not in self.holding.values()
            assert conn not in self.pending_conns()
            self.gone.add(conn)
        for a in fx.assigned:
            assert self.queue, "assigned a waiter that is not queued"
            assert a.waiter is self.queue[0], "FIFO violated"
            self.queue.pop(0)
            if isinstance(a.result, Grant):
                conn = a.result.conn
                assert conn in self.created
                assert conn not in self.gone
                assert conn not in self.holding.values()
                assert conn not in self.pending_conns(), "given to two waiters"
            self.pending[a.waiter] = a.result

    def pick(self, data: st.DataObject, items: list[Waiter]) -> Waiter:
        return data.draw(st.sampled_from(items))

    # ---- rules

    @rule()
    def request(self) -> None:
        w = Waiter()
        self.seq[w] = len(self.seq)
        before = self.core.statistics()
        top = next(self.core.idle(), None)
        r = self.core.request(w)
        if self.queue:
            assert r == Wait()
        if isinstance(r, Grant):
            assert r.conn is top
            self.holding[w] = r.conn
        elif isinstance(r, Open):
            assert top is None
            assert before.slots < before.max_size
            self.opening.add(w)
        else:
            assert self.queue or (top is None and before.slots >= before.max_size)
            self.queue.append(w)

    @rule()
    def take_idle(self) -> None:
        w = Waiter()  # the shell's fast path has no token: the model gets one to hold
        self.seq[w] = len(self.seq)
        top = next(self.core.idle(), None)
        conn = self.core.take_idle()
        if self.queue or top is None:
            assert conn is None, "took an idle connection past queued waiters, or none idle"
        else:
            assert conn is top, "not the most recently used idle connection"
            self.holding[w] = conn

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        w = self.pick(data, list(self.pending))
        r = self.core.take(w)
        assert r == self.pending.pop(w)
        if isinstance(r, Grant):
            self.holding[w] = r.conn
        else:
            self.opening.add(w)
        assert self.core.take(w) is None

    @precondition(lambda self: self.queue)
    @rule(data=st.data())
    def take_while_queued(self, data: st.DataObject) -> None:
        assert self.core.take(self.pick(data, self.queue)) is None

    @precondition(lambda self: self.opening)
    @rule(data=st.data())
    def opened(self, data: st.DataObject) -> None:
        w = self.pick(data, sorted(self.opening, key=self.seq.__getitem__))
        self.opening.remove(w)
        conn = Conn()
        self.created.add(conn)
        self.core.opened(conn, self.now)
        self.holding[w] = conn

    @precondition(lambda self: self.opening)
    @rule(data=st.data())
    def open_failed(self, data: st.DataObject) -> None:
        w = self.pick(data, sorted(self.opening, key=self.seq.__getitem__))
        self.opening.remove(w)
        self.apply(self.core.open_failed())

    @precondition(lambda self: self.holding)
    @rule(data=st.data(), reusable=st.booleans())
    def checkin(self, data: st.DataObject, reusable: bool) -> None:
        w = self.pick(data, list(self.holding))
        conn = self.holding.pop(w)
        had_waiters = bool(self.queue)
        fx = self.core.checkin(conn, self.now, reusable=reusable)
        self.apply(fx)
        if not reusable:
            assert conn in fx.close
        if conn not in fx.close:
            if had_waiters:  # straight to the head waiter, never idle
                assert fx.assigned
                assert fx.assigned[0].result == Grant(conn)
            else:
                assert next(self.core.idle()) is conn

    @precondition(lambda self: self.seq)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        w = self.pick(data, list(self.seq))
        if w in self.queue:
            self.queue.remove(w)
            assert self.core.cancel(w) == NOTHING
        elif w in self.pending:
            r = self.pending.pop(w)
            fx = self.core.cancel(w)
            self.apply(fx)
            if isinstance(r, Grant):
                # Not leaked: closed, passed on, or idle.
                assert (
                    r.conn in fx.close
                    or r.conn in self.pending_conns()
                    or r.conn in set(self.core.idle())
                )
        else:  # holding, opening, or finished: no-op
            assert self.core.cancel(w) == NOTHING
        assert self.core.cancel(w) == NOTHING  # idempotent
        assert self.core.take(w) is None

    @precondition(lambda self: self.created - self.gone)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.created - self.gone, key=lambda c: c.n)))
        for w, c in list(self.holding.items()):
            if c is conn:
                del self.holding[w]
        for w, r in list(self.pending.items()):
            if r == Grant(conn):
                del self.pending[w]
                self.queue.insert(0, w)  # re-queued at the head, served first
        self.gone.add(conn)
        self.apply(self.core.forget(conn))
        assert self.core.forget(conn) == NOTHING

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 15.0, 40.0]))
    def expire(self, dt: float) -> None:
        deadline = self.core.next_deadline()
        idle_before = set(self.core.idle())
        self.now += dt
        fx = self.core.expire(self.now)
        if deadline is None or self.now < deadline:
            assert fx == NOTHING
        else:
            assert fx.close
        assert set(fx.close) <= idle_before
        self.apply(fx)
        after = self.core.next_deadline()
        assert after is None or after > self.now

    @rule(dt=st.sampled_from([1.0, 5.0, 20.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(max_size=st.integers(0, 5), max_idle=st.integers(0, 5))
    def resize(self, max_size: int, max_idle: int) -> None:
        self.limit = max(max_size, self.core.statistics().slots)
        idle_before = set(self.core.idle())
        fx = self.core.resize(max_size=max_size, max_idle=max_idle)
        assert set(fx.close) <= idle_before
        self.apply(fx)

    # ---- invariants

    @invariant()
    def accounting(self) -> None:
        if not hasattr(self, "core"):
            return
        s = self.core.statistics()
        idle = list(self.core.idle())
        assert s.idle == len(idle) == len(set(idle))
        assert s.waiting == len(self.queue)
        assert s.pending == len(self.pending)
        assert s.borrowed == len(self.holding)
        assert s.opening == len(self.opening)
        assert list(self.core._waiters) == self.queue
        # Queue is always in request order (re-queued waiters were requested first).
        assert self.queue == sorted(self.queue, key=self.seq.__getitem__)
        # Every connection is in exactly one place.
        held = list(self.holding.values())
        pend = [r.conn for r in self.pending.values() if isinstance(r, Grant)]
        places = [set(idle), set(held), set(pend), self.gone]
        assert sum(len(p) for p in places) == len(self.created)
        assert set().union(*places) == self.created
        assert len(held) == len(set(held))
        assert set(self.core.borrowed()) == set(held) | set(pend)
        assert s.total_opened == len(self.created)
        assert s.total_closed == len(self.gone)

    @invariant()
    def capacity_and_liveness(self) -> None:
        if not hasattr(self, "core"):
            return
        s = self.core.statistics()
        # Never above max_size, except after a shrink; then slots never grows.
        assert s.slots <= self.limit
        self.limit = max(s.max_size, s.slots)
        if s.idle:
            assert s.slots <= s.max_size
        if s.waiting:
            assert s.idle == 0
            assert s.slots >= s.max_size


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestPoolMachine = PoolMachine.TestCase
