"""TransactionTracker: when a server connection may leave its client.

Scenarios are message scripts: ``"> X"`` is a client message of type X, ``"< X"`` a server
message of type X (``"< Z I"`` a ReadyForQuery with status I). A ``"!"`` step asserts that
the connection is releasable at that point, a ``"-"`` step that it is not.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy._session.tracker import (
    ANSWERED_BY_READY,
    EXTENDED,
    KNOWN_CLIENT_TYPES,
    TransactionTracker,
)
from trioproxy.errors import RemoteProtocolError


def run(script: str, tracker: TransactionTracker | None = None) -> TransactionTracker:
    """Play ``script`` (steps separated by ';' or newlines) and check releasable points."""
    tracker = tracker if tracker is not None else TransactionTracker()
    steps = [s.strip() for s in script.replace("\n", ";").split(";") if s.strip()]
    for step in steps:
        if step == "!":
            assert tracker.releasable, f"expected releasable, got {tracker}"
            continue
        if step == "-":
            assert not tracker.releasable, f"expected not releasable, got {tracker}"
            continue
        direction, type_, *rest = step.split()
        if direction == ">":
            tracker.client_message(ord(type_))
        else:
            body = rest[0].encode() if rest else None
            tracker.server_message(ord(type_), body)
    return tracker


def test_fresh_tracker_is_releasable() -> None:
    tracker = TransactionTracker()
    assert tracker.releasable
    assert not tracker.in_transaction
    assert not tracker.waiting_for_server


def test_simple_query() -> None:
    tracker = run("""
        !
        > Q; -
        < T; < D; < D; < C; -
        < Z I; !
    """)
    assert tracker.owed == 0
    assert tracker.tx_status is TxStatus.IDLE


def test_waiting_for_server() -> None:
    tracker = run("> Q")
    assert tracker.waiting_for_server
    assert tracker.owed == 1


def test_transaction_block_until_idle() -> None:
    tracker = run("""
        > Q; < C; < Z T; -
    """)
    assert tracker.owed == 0
    assert tracker.in_transaction
    assert tracker.tx_status is TxStatus.IN_TRANSACTION
    run(
        """
        > Q; < T; < D; < C; < Z T; -
        > Q; < C; < Z I; !
        """,
        tracker,
    )
    assert not tracker.in_transaction


def test_failed_transaction_until_rollback() -> None:
    tracker = run("""
        > Q; < C; < Z T; -
        > Q; < E; < Z E; -
    """)
    assert tracker.tx_status is TxStatus.FAILED
    assert tracker.in_transaction
    run("> Q; < C; < Z I; !", tracker)


def test_extended_pipeline_three_batches() -> None:
    tracker = run("""
        > P; -; > B; > E; > S; -
        > P; > B; > E; > S; -
        > P; > B; > E; -
    """)
    assert (tracker.owed, tracker.unsynced) == (2, True)
    run("> S", tracker)
    assert (tracker.owed, tracker.unsynced) == (3, False)
    run(
        """
        < 1; < 2; < D; < C; < Z I; -
        < 1; < 2; < C; < Z I; -
        < 1; < 2; < C; -
        < Z I; !
        """,
        tracker,
    )


def test_error_mid_pipeline() -> None:
    # The second batch fails: the server skips to its Sync, which still gets one RFQ.
    tracker = run("""
        > P; > B; > E; > S
        > P; > B; > E; > S
        > P; > B; > E; > S
        < 1; < 2; < C; < Z I; -
        < E; < Z I; -
        < 1; < 2; < C; -
        < Z I; !
    """)
    assert tracker.owed == 0


def test_error_mid_pipeline_inside_transaction() -> None:
    run("""
        > Q; < C; < Z T
        > P; > B; > E; > S
        > P; > B; > E; > S
        < E; < Z E; -
        < E; < Z E; -
        > Q; < C; < Z I; !
    """)


def test_copy_in_via_query() -> None:
    tracker = run("> Q; < G; > d; > d; -")
    assert tracker.owed == 1
    run("> d; > c; -", tracker)
    assert tracker.owed == 1
    run("< C; -; < Z I; !", tracker)


def test_copy_in_failed_by_client() -> None:
    run("> Q; < G; > d; > f; -; < E; -; < Z I; !")


def test_copy_out() -> None:
    run("> Q; < H; < d; < d; < c; < C; -; < Z I; !")


def test_unsynced_after_parse_without_sync() -> None:
    tracker = run("> P; -")
    assert tracker.unsynced
    assert tracker.owed == 0
    run("> H; < 1; -", tracker)  # Flush answers, but the batch is still open
    assert tracker.unsynced
    run("> D; > H; < t; < T; -; > S; -; < Z I; !", tracker)


@pytest.mark.parametrize("type_", sorted(EXTENDED), ids=chr)
def test_every_extended_message_unsyncs(type_: int) -> None:
    tracker = TransactionTracker()
    tracker.client_message(type_)
    assert tracker.unsynced
    assert not tracker.releasable


def test_function_call() -> None:
    run("> F; -; < V; -; < Z I; !")


def test_ready_for_query_when_nothing_owed() -> None:
    with pytest.raises(RemoteProtocolError):
        run("< Z I")
    tracker = run("> Q; < Z I")
    with pytest.raises(RemoteProtocolError):
        tracker.server_ready(TxStatus.IDLE)


@pytest.mark.parametrize("type_", [ord("p"), ord("Z"), ord("?"), 0, 255, Frontend.PASSWORD])
def test_unknown_client_type(type_: int) -> None:
    with pytest.raises(RemoteProtocolError):
        TransactionTracker().client_message(type_)


@pytest.mark.parametrize("body", [None, b"", b"X", b"II", b"i"])
def test_malformed_ready_for_query(body: bytes | None) -> None:
    tracker = run("> Q")
    with pytest.raises(RemoteProtocolError):
        tracker.server_message(Backend.READY_FOR_QUERY, body)


def test_copy_both_is_never_releasable() -> None:
    tracker = run("> Q; < W; > d; < d; -")
    assert tracker.copy_both
    run("> c; < c; < C; < Z I; -", tracker)
    assert tracker.owed == 0
    assert not tracker.releasable


def test_terminate_and_flush_are_accepted() -> None:
    run("> H; !; > X; !")


# --- property ---------------------------------------------------------------------------

CLIENT_TYPES = sorted(KNOWN_CLIENT_TYPES)


@given(data=st.data())
def test_random_interleavings(data: st.DataObject) -> None:
    """Random valid client messages and server RFQs (never more than owed).

    A simple model tracks what must hold; ``releasable`` implies owed == 0, nothing
    unsynced and an idle transaction status, and is exactly that (with no COPY BOTH).
    """
    tracker = TransactionTracker()
    sent = received = 0
    unsynced = False
    status = TxStatus.IDLE
    steps = data.draw(st.integers(0, 60))
    for _ in range(steps):
        owed = sent - received
        server_turn = owed > 0 and data.draw(st.booleans())
        if server_turn:
            status = data.draw(st.sampled_from(TxStatus))
            if data.draw(st.booleans()):
                tracker.server_message(Backend.READY_FOR_QUERY, status.value)
            else:
                tracker.server_ready(status)
            received += 1
        else:
            type_ = data.draw(st.sampled_from(CLIENT_TYPES))
            tracker.client_message(type_)
            if type_ in ANSWERED_BY_READY:
                sent += 1
            if type_ == Frontend.SYNC:
                unsynced = False
            elif type_ in EXTENDED:
                unsynced = True
        # Non-RFQ server messages are ignored (CopyBoth excepted, not generated here).
        tracker.server_message(
            data.draw(st.sampled_from([Backend.DATA_ROW, Backend.COMMAND_COMPLETE])), None
        )

        assert tracker.owed == sent - received >= 0
        assert tracker.unsynced == unsynced
        assert tracker.tx_status is status
        if tracker.releasable:
            assert tracker.owed == 0
            assert not tracker.unsynced
            assert tracker.tx_status is TxStatus.IDLE
        assert tracker.releasable == (sent == received and not unsynced and status is TxStatus.IDLE)
        assert tracker.waiting_for_server == (sent > received)
        assert tracker.in_transaction == (status is not TxStatus.IDLE)
