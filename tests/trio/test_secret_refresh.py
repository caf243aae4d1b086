"""The secret refresher's swap rules, and the pool taking the login in force at connect time.

In-process, with secret files in tmp_path (no network) and ``autojump_clock`` for the
periodic loop: the refresh interval passes in virtual time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import attrs
import trio

from trioproxy._auth.credentials import CredentialStore
from trioproxy._pool.budget import PoolLimits
from trioproxy._pool.pool import BackendPool
from trioproxy._server.backend import BackendTarget
from trioproxy._server.secret_refresh import SecretRefresher
from trioproxy.config import Config, parse_config

if TYPE_CHECKING:
    from pathlib import Path


@attrs.define
class _Holder:
    """What the refresher needs of a Proxy."""

    credentials: CredentialStore
    secrets: SecretRefresher


def _setup(tmp_path: Path, interval: float = 10) -> tuple[Path, Config, _Holder]:
    path = tmp_path / "db.json"
    path.write_text(json.dumps({"username": "rw", "password": "one"}))
    config = parse_config(
        {
            "proxy": {"secret_refresh_interval": interval},
            "users": {"u": {"secret_file": "db.json"}, "p": {"password": "static"}},
        },
        base_dir=tmp_path,
    )
    refresher = SecretRefresher(config)
    return path, config, _Holder(refresher.load_initial(), refresher)


async def test_refresh_swaps_only_on_change(tmp_path: Path) -> None:
    path, _config, holder = _setup(tmp_path)
    first = holder.credentials
    assert first.backend_login("u") == ("rw", "one")
    assert not await holder.secrets.refresh(holder)
    assert holder.credentials is first  # nothing changed: no new store

    path.write_text(json.dumps({"username": "rw2", "password": "two"}))
    assert await holder.secrets.refresh(holder)
    assert holder.credentials is not first
    assert holder.credentials.backend_login("u") == ("rw2", "two")
    # The static user's verifier is carried over, not derived again.
    old, new = first.lookup("p"), holder.credentials.lookup("p")
    assert old is not None
    assert new is not None
    assert new.verifier is old.verifier
    assert holder.secrets.refreshes == 1


async def test_failed_refresh_keeps_the_store(tmp_path: Path) -> None:
    path, _config, holder = _setup(tmp_path)
    first = holder.credentials
    path.write_text("{not json")
    assert not await holder.secrets.refresh(holder)
    path.unlink()
    assert not await holder.secrets.refresh(holder)
    assert holder.credentials is first
    assert holder.secrets.failures == 2


async def test_replaced_refresher_does_not_swap(tmp_path: Path) -> None:
    path, config, holder = _setup(tmp_path)
    old_refresher = holder.secrets
    holder.secrets = SecretRefresher(config)  # as a reload does
    path.write_text(json.dumps({"password": "two"}))
    store = holder.credentials
    assert not await old_refresher.refresh(holder)
    assert holder.credentials is store


async def test_periodic_refresh(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    path, _config, holder = _setup(tmp_path, interval=300)
    async with trio.open_nursery() as nursery:
        holder.secrets.start_once(nursery, holder)
        holder.secrets.start_once(nursery, holder)  # idempotent
        await trio.sleep(1)
        path.write_text(json.dumps({"password": "rotated"}))
        await trio.sleep(298)  # t = 299: the first refresh is due at t = 300
        assert holder.credentials.backend_login("u") == ("rw", "one")
        # The refresh reads in a worker thread (real time): poll, bounded.
        for _ in range(10_000):
            if holder.credentials.backend_login("u") == ("u", "rotated"):
                break
            await trio.sleep(0.01)
        assert holder.credentials.backend_login("u") == ("u", "rotated")
        assert trio.current_time() < 400
        nursery.cancel_scope.cancel()


async def test_no_refresh_task_without_secrets_or_interval(tmp_path: Path) -> None:
    _path, _config, holder = _setup(tmp_path, interval=0)
    async with trio.open_nursery() as nursery:
        holder.secrets.start_once(nursery, holder)
        assert not nursery.child_tasks


_LIMITS = PoolLimits(
    max_connections=2,
    max_connections_percent=100,
    max_idle_connections_percent=50,
    server_lifetime=0,
    server_idle_timeout=0,
)


def test_pool_uses_the_login_in_force_at_connect_time() -> None:
    login: list[tuple[str, str | None] | None] = [("rw", "one")]
    target = BackendTarget(host="db", port=5432, database="app", user="old", password="stale")
    pool = BackendPool(
        name="app/u",
        target=target,
        limits=_LIMITS,
        backend_login=lambda: login[0],
    )
    assert (pool._current_target().user, pool._current_target().password) == ("rw", "one")
    login[0] = ("rw2", "two")
    assert (pool._current_target().user, pool._current_target().password) == ("rw2", "two")
    login[0] = None  # user gone from the store: keep the target's
    assert pool._current_target() is target
    assert BackendPool(name="x", target=target, limits=_LIMITS)._current_target() is target
