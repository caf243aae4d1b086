"""Cancel-key routing and the shared server-connection budget of ``workers = N``."""

from __future__ import annotations

import multiprocessing
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._cluster.keys import MAX_PEER_ID, MAX_WORKERS, KeyLayout, Owner, Route, worker_of
from trioproxy._cluster.ledger import SharedLedger

if TYPE_CHECKING:
    from pathlib import Path

peers = st.integers(0, MAX_PEER_ID)
workers = st.integers(0, MAX_WORKERS - 1)


@given(peers, workers, st.integers(0, 2**32 - 1))
def test_a_key_routes_to_its_issuer(peer: int, worker: int, serial: int) -> None:
    issuer = KeyLayout(peer, worker)
    process_id = issuer.process_id(serial)
    assert 0 <= process_id < 2**31  # positive as a signed int32
    assert issuer.route(process_id) == Route(Owner.HERE)
    assert worker_of(process_id) == worker


@given(peers, workers, workers, st.integers(0, 2**32 - 1))
def test_another_worker_of_the_same_instance(
    peer: int, worker: int, other: int, serial: int
) -> None:
    process_id = KeyLayout(peer, other).process_id(serial)
    expected = Route(Owner.HERE) if other == worker else Route(Owner.WORKER, other)
    assert KeyLayout(peer, worker).route(process_id) == expected


@given(peers, peers, workers, workers, st.integers(0, 2**32 - 1))
def test_another_instance_wins_over_the_worker(
    peer: int, other_peer: int, worker: int, other_worker: int, serial: int
) -> None:
    process_id = KeyLayout(other_peer, other_worker).process_id(serial)
    route = KeyLayout(peer, worker).route(process_id)
    if other_peer != peer:
        assert route == Route(Owner.PEER, other_peer)
    else:
        assert route.owner is not Owner.PEER


def test_layout_bounds() -> None:
    with pytest.raises(ValueError, match="peer_id"):
        KeyLayout(MAX_PEER_ID + 1, 0)
    with pytest.raises(ValueError, match="worker id"):
        KeyLayout(0, MAX_WORKERS)


def test_ledger_caps_the_sum_over_workers(tmp_path: Path) -> None:
    path = tmp_path / "budget"
    supervisor = SharedLedger(path, None, create=True)
    one, two = SharedLedger(path, 0), SharedLedger(path, 1)
    try:
        assert [one.try_take(3), two.try_take(3), two.try_take(3)] == [True, True, True]
        assert not one.try_take(3)
        assert not two.try_take(3)
        assert supervisor.total_used() == 3
        one.give_back()
        assert two.try_take(3)
        assert (supervisor.used_by(0), supervisor.used_by(1)) == (0, 3)
        # A worker dies: its units went with its connections.
        assert supervisor.reset(1) == 3
        assert supervisor.total_used() == 0
        assert one.try_take(3)
    finally:
        for ledger in (one, two, supervisor):
            ledger.close()


def test_ledger_shares_the_cap_and_who_is_waiting(tmp_path: Path) -> None:
    path = tmp_path / "budget"
    supervisor = SharedLedger(path, None, create=True)
    one, two = SharedLedger(path, 0), SharedLedger(path, 1)
    try:
        assert two.cap == 0
        one.cap = 17
        assert two.cap == 17
        one.set_wanting(2)
        assert two.wanting_elsewhere() == 2
        assert one.wanting_elsewhere() == 0
    finally:
        for ledger in (one, two, supervisor):
            ledger.close()


def test_ledger_sums_every_slot_and_counts_active_workers(tmp_path: Path) -> None:
    """The sums read every slot at once: the last worker's counts as much as the first's,
    and a worker's own wanting is never 'elsewhere'."""
    path = tmp_path / "budget"
    supervisor = SharedLedger(path, None, create=True)
    first, last = SharedLedger(path, 0), SharedLedger(path, MAX_WORKERS - 1)
    idle = SharedLedger(path, 5)
    try:
        assert supervisor.active_workers() == 0
        assert first.try_take(10)
        assert last.try_take(10)
        assert last.try_take(10)
        last.set_wanting(4)
        first.set_wanting(1)
        assert supervisor.total_used() == 3
        assert (first.wanting_elsewhere(), last.wanting_elsewhere()) == (4, 1)
        assert idle.wanting_elsewhere() == 5
        assert supervisor.wanting_elsewhere() == 5
        assert supervisor.active_workers() == 2
        first.give_back()
        first.set_wanting(0)
        assert supervisor.active_workers() == 1
        assert supervisor.used_by(MAX_WORKERS - 1) == 2
    finally:
        for ledger in (first, last, idle, supervisor):
            ledger.close()


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "budget"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a trioproxy budget ledger"):
        SharedLedger(path, 0)


def _take_many(path: str, worker: int, attempts: int, results: multiprocessing.Queue[int]) -> None:
    from pathlib import Path

    ledger = SharedLedger(Path(path), worker)
    taken = sum(ledger.try_take(50) for _ in range(attempts))
    ledger.close()
    results.put(taken)


def test_processes_racing_for_units_never_exceed_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "budget"
    supervisor = SharedLedger(path, None, create=True)
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[int] = context.Queue()
    procs = [
        context.Process(target=_take_many, args=(str(path), worker, 40, results))
        for worker in range(4)
    ]
    try:
        for proc in procs:
            proc.start()
        taken = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        assert sum(taken) == 50  # 160 attempts, a cap of 50: exactly 50 granted
        assert supervisor.total_used() == 50
    finally:
        supervisor.close()
