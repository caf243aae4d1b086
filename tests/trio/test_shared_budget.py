"""``workers = N``: two pools in two "workers" (two budgets over one shared ledger).

Both workers run in this process, each a ``BackendPool`` with its own ``ServerBudget``
over one ``SharedLedger`` file, against the fake connector of test_pool_shell.py, in
virtual time. A sampler checks the instance cap on every scheduler tick it gets: the sum
of server connections alive in both workers never exceeds it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest
import trio

from tests.trio.test_pool_shell import (
    STEP,
    FakeServer,
    Ledger,
    make_limits,
    make_pool,
    use,
)
from trioproxy._cluster.ledger import SharedLedger
from trioproxy._pool import pool as pool_module
from trioproxy._pool.budget import ServerBudget

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trioproxy._pool.pool import BackendPool

CAP = 4


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()
    monkeypatch.setattr(pool_module, "connect_server", server.connect)
    return server


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[tuple[BackendPool, BackendPool]]:
    path = tmp_path / "budget"
    supervisor = SharedLedger(path, None, create=True)
    ledgers = [SharedLedger(path, 0), SharedLedger(path, 1)]
    pools = [
        make_pool(CAP, budget=ServerBudget(make_limits(CAP), shared=ledger)) for ledger in ledgers
    ]
    try:
        async with trio.open_nursery() as nursery:
            for pool in pools:
                await nursery.start(pool.run)
                nursery.start_soon(pool.budget.share)
            yield pools[0], pools[1]
            nursery.cancel_scope.cancel()
    finally:
        for ledger in (*ledgers, supervisor):
            ledger.close()


def alive(server: FakeServer) -> int:
    return sum(1 for conn in server.conns if conn.alive)


async def sample_cap(server: FakeServer, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], alive(server))
        await trio.sleep(STEP / 4)


async def test_units_move_to_the_worker_whose_clients_wait(
    tmp_path: Path, fake: FakeServer, autojump_clock: object
) -> None:
    ledger = Ledger()
    peak = [0]
    async with two_workers(tmp_path) as (one, two), trio.open_nursery() as nursery:
        nursery.start_soon(sample_cap, fake, peak)
        # Worker one takes the whole cap, then its clients go home: 4 idle connections.
        held = [await one.borrow(10) for _ in range(CAP)]
        for conn in held:
            one.release(conn, clean=True)
        assert one.budget.used == CAP
        # Worker two's client must get a connection: one gives idle units back.
        with trio.fail_after(5):
            await use(two, ledger, "client of worker two")
        assert two.budget.used >= 1
        assert one.budget.used <= CAP - two.budget.used
        nursery.cancel_scope.cancel()
    assert peak[0] <= CAP


async def test_busy_workers_share_the_cap_fairly(
    tmp_path: Path, fake: FakeServer, autojump_clock: object
) -> None:
    ledger = Ledger()
    peak = [0]
    served = {"one": 0, "two": 0}
    async with two_workers(tmp_path) as (one, two), trio.open_nursery() as nursery:
        nursery.start_soon(sample_cap, fake, peak)

        async def client(pool: BackendPool, name: str, i: int) -> None:
            while True:
                await use(pool, ledger, f"{name}-{i}", hold=STEP, borrow_timeout=30)
                served[name] += 1

        async with trio.open_nursery() as clients:
            # Worker one is busy first, with more clients than the cap...
            for i in range(6):
                clients.start_soon(client, one, "one", i)
            await trio.sleep(1)
            assert one.budget.used == CAP
            # ... then worker two's clients arrive and must not starve.
            for i in range(6):
                clients.start_soon(client, two, "two", i)
            await trio.sleep(5)
            before = dict(served)
            await trio.sleep(5)
            clients.cancel_scope.cancel()
        assert served["two"] > before["two"], served
        assert served["one"] > before["one"], served
        # Fair share of a cap of 4 over two busy workers: 2 each.
        assert (one.budget.used, two.budget.used) == (2, 2)
        nursery.cancel_scope.cancel()
    assert peak[0] <= CAP
