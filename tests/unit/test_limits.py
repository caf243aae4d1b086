"""``raise_fd_limit()`` (``trioproxy._server.limits``): soft RLIMIT_NOFILE up to the hard limit.

The real limit of the test process is never changed here: the logic runs against a fake
``resource`` module, and one test runs the real call in a child interpreter whose soft
limit was lowered first.
"""

from __future__ import annotations

import logging
import resource
import subprocess
import sys
import textwrap

import attrs
import pytest

from trioproxy._server import limits

INF = resource.RLIM_INFINITY


@attrs.define
class FakeResource:
    """Enough of ``resource`` for raise_fd_limit; refuses soft values above ``kernel_max``."""

    soft: int
    hard: int
    kernel_max: int | None = None
    calls: list[tuple[int, int]] = attrs.field(factory=list)
    RLIMIT_NOFILE: int = resource.RLIMIT_NOFILE
    RLIM_INFINITY: int = INF

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        self.calls.append(limits)
        soft, hard = limits
        if hard != self.hard:
            raise ValueError("not allowed to change the hard limit")
        if self.hard != INF and (soft == INF or soft > self.hard):
            raise ValueError("soft above hard")
        if self.kernel_max is not None and (soft == INF or soft > self.kernel_max):
            raise ValueError("above the kernel's maximum")
        self.soft = soft


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeResource:
    fake = FakeResource(soft=1024, hard=65536)
    monkeypatch.setattr(limits, "resource", fake)
    return fake


def test_soft_raised_to_hard(fake: FakeResource, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trioproxy"):
        assert limits.raise_fd_limit() == (65536, 65536)
    assert fake.calls == [(65536, 65536)]
    assert "open-file limit raised from 1024 to 65536 (hard limit 65536)" in caplog.text


def test_already_at_hard_is_left_alone(fake: FakeResource) -> None:
    fake.soft = fake.hard = 4096
    assert limits.raise_fd_limit() == (4096, 4096)
    assert fake.calls == []


def test_never_lowers(fake: FakeResource) -> None:
    # A soft limit above the hard one cannot happen on Linux, but an infinite soft limit
    # can; neither may be touched.
    fake.soft, fake.hard = INF, INF
    assert limits.raise_fd_limit() == (INF, INF)
    fake.soft, fake.hard = 8192, 4096
    assert limits.raise_fd_limit() == (8192, 4096)
    assert fake.calls == []


def test_infinite_hard_limit(fake: FakeResource) -> None:
    fake.soft, fake.hard = 256, INF
    assert limits.raise_fd_limit() == (INF, INF)
    assert fake.calls == [(INF, INF)]


def test_infinite_hard_limit_refused_falls_back(fake: FakeResource) -> None:
    """macOS: hard "unlimited" but the kernel caps the soft limit (OPEN_MAX)."""
    fake.soft, fake.hard, fake.kernel_max = 256, INF, limits.OPEN_MAX_FALLBACK
    assert limits.raise_fd_limit() == (limits.OPEN_MAX_FALLBACK, INF)
    assert fake.calls == [(INF, INF), (limits.OPEN_MAX_FALLBACK, INF)]


def test_refusal_is_logged_not_raised(fake: FakeResource, caplog: pytest.LogCaptureFixture) -> None:
    fake.kernel_max = 2048
    with caplog.at_level(logging.WARNING, logger="trioproxy"):
        assert limits.raise_fd_limit() == (1024, 65536)
    assert "could not raise the open-file limit from 1024 to 65536" in caplog.text


def test_real_limit_never_lowered() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = limits.raise_fd_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == before[1]
    assert soft in (hard, INF) or before[0] == INF
    assert before[0] == INF or soft == INF or soft >= before[0]


def test_real_limit_raised_in_a_child_process() -> None:
    """A child lowers its own soft limit, then raise_fd_limit() brings it back to hard."""
    script = textwrap.dedent(
        """
        import resource
        from trioproxy._server.limits import raise_fd_limit
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        print(low, *raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE), hard)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    low, soft, hard, real_soft, real_hard, original_hard = map(int, out)
    assert (soft, hard) == (real_soft, real_hard)
    assert hard == original_hard
    assert soft >= low
    if original_hard != INF:
        assert soft == original_hard
