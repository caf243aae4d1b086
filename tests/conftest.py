"""Shared pytest configuration for the trioproxy test suite.

Rules of the suite
------------------
Three tiers, by directory:

* ``tests/unit`` - synchronous, sans-IO: feed bytes/events into the protocol, auth, session and
  pool state machines and check what comes out. No sockets, no threads, no clocks.
* ``tests/trio`` - in-process async tests under trio (``trio_mode``): the proxy's I/O layer wired
  to ``trio.testing`` memory streams and fake peers, with ``autojump_clock`` for anything that
  waits, so timeouts are tested in virtual time.
* ``tests/integration`` - real PostgreSQL servers started by ``tests/fix_pg.py`` (fixtures
  ``pg`` and ``pg_factory``) and real clients (psycopg, asyncpg, psql, pgbench) talking through
  the proxy. Marked ``integration`` automatically; skipped locally if PostgreSQL is missing,
  but an error under ``CI=true``.

Everywhere: listen on loopback only (127.0.0.1 / ::1), on free ports chosen by the OS (bind port
0), never on fixed ports; every loop that waits is bounded (a deadline or an iteration count);
every process and server a test starts is stopped by the test or its fixture, even on failure.
Warnings are errors (see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Sequence

# Fixture modules, imported as plugins. Add new ones here, one per line.
pytest_plugins: list[str] = [
    "tests.fix_pg",
    "tests.fix_proxy",
    "tests.fix_node",
]

TESTS_DIR = Path(__file__).resolve().parent
INTEGRATION_DIR = TESTS_DIR / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: Sequence[pytest.Item]) -> None:
    """Mark everything under tests/integration with ``integration``."""
    for item in items:
        if INTEGRATION_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


# Hypothesis: the machines that run this suite are shared and noisy (2 cores, PostgreSQL and
# load generators beside the tests). Slow input generation or one slow example is not a
# failure of the code under test; every property still runs its full number of examples.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "trioproxy",
    suppress_health_check=[HealthCheck.too_slow],
    deadline=None,
)
settings.load_profile("trioproxy")
