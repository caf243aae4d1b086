"""A cumulative latency histogram (Prometheus-style buckets), bookkeeping only.

[core] Observations are seconds passed in by the shell; the metrics endpoint reads
``buckets()``. No clock, no I/O.
"""

from __future__ import annotations

import bisect
from typing import Final

#: Upper bounds in seconds: from a warm idle hand-off (sub-ms) to a full borrow timeout.
BORROW_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class LatencyHistogram:
    __slots__ = ("_bounds", "_counts", "count", "total")

    def __init__(self, bounds: tuple[float, ...] = BORROW_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative counts per upper bound, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(repr, self._bounds), "+Inf"), self._counts, strict=True):
            running += count
            out.append((bound, running))
        return out
