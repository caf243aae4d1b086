"""Which target is the writer: the last one found first, then the others in order."""

from __future__ import annotations

import pytest

from trioproxy._pool.targets import TargetSet


def test_single_target_needs_no_writer_check() -> None:
    targets = TargetSet([("db1", 5432)])
    assert not targets.needs_writer_check
    assert targets.candidates() == [("db1", 5432)]


def test_the_last_writer_is_tried_first_and_the_rest_follow_in_order() -> None:
    targets = TargetSet([("db1", 5432), ("db2", 5432), ("db3", 5432)])
    assert targets.needs_writer_check
    assert targets.candidates() == [("db1", 5432), ("db2", 5432), ("db3", 5432)]
    assert targets.found_writer(("db2", 5432)) is True  # a failover
    assert targets.writer == ("db2", 5432)
    assert targets.candidates() == [("db2", 5432), ("db3", 5432), ("db1", 5432)]
    assert targets.found_writer(("db2", 5432)) is False


def test_at_least_one_target() -> None:
    with pytest.raises(ValueError, match="at least one"):
        TargetSet([])


def test_readers_start_one_further_each_time() -> None:
    targets = TargetSet([("a", 1), ("b", 2), ("c", 3)])
    firsts = [targets.reader_candidates()[0] for _ in range(4)]
    assert firsts == [("a", 1), ("b", 2), ("c", 3), ("a", 1)]
