"""The link tables: when a server connection may leave its client, and what happens to it.

Property tests drive the real tracker and session ledger with random client/server
message sequences and check the invariants of the design: never released inside a
transaction, with answers outstanding, mid-batch, mid-message or while pinned.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy._session.link import (
    DECISION,
    DISPOSITION,
    Decision,
    Disposition,
    LinkState,
    link_state,
)
from trioproxy._session.state import SessionState
from trioproxy._session.tracker import TransactionTracker


def test_tables_cover_every_state() -> None:
    assert set(DECISION) == set(LinkState)
    assert set(DISPOSITION) == set(LinkState)
    assert [s for s, d in DECISION.items() if d is Decision.RELEASE] == [LinkState.IDLE]
    assert DISPOSITION[LinkState.IDLE] is Disposition.REUSE
    assert DISPOSITION[LinkState.IN_TRANSACTION] is Disposition.ROLLBACK
    assert DISPOSITION[LinkState.PINNED] is Disposition.RESET


def test_idle_exactly_when_every_condition_holds() -> None:
    for combo in itertools.product([False, True], repeat=8):
        sending, boundary, owed, unsynced, mapping_idle, copy_both, pinned, session = combo
        for tx in TxStatus:
            state = link_state(
                sending=sending,
                client_at_boundary=boundary,
                owed=int(owed),
                unsynced=unsynced,
                mapping_idle=mapping_idle,
                copy_both=copy_both,
                tx_status=tx,
                pinned=pinned,
                session_mode=session,
            )
            clean = (
                not sending
                and boundary
                and not owed
                and not unsynced
                and mapping_idle
                and not copy_both
                and tx is TxStatus.IDLE
                and not pinned
                and not session
            )
            assert (state is LinkState.IDLE) == clean
            if DISPOSITION[state] in (Disposition.REUSE, Disposition.ROLLBACK, Disposition.RESET):
                # Reused only when nothing is owed and no half message is on the wire.
                assert not sending
                assert boundary
                assert not owed
                assert not unsynced


SQL = st.sampled_from(
    [
        "select 1",
        "begin",
        "commit",
        "rollback",
        "listen ch",
        "unlisten *",
        "create temp table t(x int)",
        "discard temp",
        "set search_path = a",
        "prepare p as select 1",
        "deallocate p",
        "select pg_advisory_lock(1)",
        "select pg_advisory_unlock_all()",
        "discard all",
    ]
)


@given(st.lists(st.tuples(SQL, st.booleans(), st.booleans()), max_size=40))
def test_random_sessions_are_never_released_unsafely(steps) -> None:
    tracker, session = TransactionTracker(), SessionState()
    in_block = False
    errors_checked = 0
    for sql, fails, pipelined in steps:
        tracker.client_message(Frontend.QUERY)
        session.on_sql(sql)
        if pipelined:  # a second query before the first answer: nothing may move now
            tracker.client_message(Frontend.QUERY)
            assert DECISION[_state(tracker, session)] is Decision.KEEP
            tracker.server_ready(TxStatus.IN_TRANSACTION if in_block else TxStatus.IDLE)
        if fails:
            tracker.server_message(Backend.ERROR_RESPONSE, None)
        if sql == "begin":
            in_block = True
        elif sql in ("commit", "rollback"):
            in_block = False
        status = TxStatus.IDLE
        if in_block:
            status = TxStatus.FAILED if fails else TxStatus.IN_TRANSACTION
        tracker.server_ready(status)
        if _state(tracker, session) is not LinkState.PINNED and not tracker.in_transaction:
            session.settle(errors_seen=tracker.errors != errors_checked)
            errors_checked = tracker.errors
        state = _state(tracker, session)
        if DECISION[state] is Decision.RELEASE:
            assert tracker.tx_status is TxStatus.IDLE
            assert tracker.owed == 0
            assert not session.pinned


def _state(tracker: TransactionTracker, session: SessionState) -> LinkState:
    return link_state(
        sending=False,
        client_at_boundary=True,
        owed=tracker.owed,
        unsynced=tracker.unsynced,
        mapping_idle=True,
        copy_both=tracker.copy_both,
        tx_status=tracker.tx_status,
        pinned=session.pinned,
        session_mode=False,
    )
