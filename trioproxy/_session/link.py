"""May the server connection leave this client? The link's states, as tables.

[core] At every point where a linked period could end (after each send), the relay asks
``link_state(...)`` which state the link is in; ``DECISION`` says whether the connection
goes back to the pool now, and, when a link ends for another reason (the client left,
timed out, broke the protocol), ``DISPOSITION`` says what the pool does with the
connection. The state is derived from the transaction tracker (what the server owes),
the session ledger (pins) and the relay (half messages, sends in flight); it is never
stored, so it cannot drift from them.

docs/architecture.md shows these two tables; tests/unit/test_link.py checks them.
"""

from __future__ import annotations

import enum
from typing import Final

from trioproxy._protocol.codes import TxStatus


class LinkState(enum.Enum):
    #: A pump is in the middle of a send: nothing can change hands now.
    SENDING = "a send in flight"
    #: The client sent part of a message; the rest is still to come.
    MID_MESSAGE = "half a client message"
    #: Query/Sync/FunctionCall sent, its ReadyForQuery not received yet.
    AWAITING_ANSWERS = "answers owed"
    #: Extended-protocol messages sent without their Sync.
    MID_BATCH = "extended batch without Sync"
    #: Prepared-statement answers still to be matched (message mode).
    MAPPING = "statement answers pending"
    #: The server switched to COPY BOTH (replication protocol).
    COPY_BOTH = "copy both"
    #: ReadyForQuery said 'T' or 'E': a transaction is open.
    IN_TRANSACTION = "in transaction"
    #: Idle, but the session holds state that cannot move (temp table, LISTEN, ...).
    PINNED = "idle, pinned"
    #: Idle in session pooling mode: the client keeps its connection until it leaves.
    SESSION_MODE = "idle, session mode"
    #: Idle, nothing owed, nothing held: exactly as clean as a fresh connection.
    IDLE = "idle"


class Decision(enum.Enum):
    KEEP = "keep the connection linked"
    RELEASE = "give the connection back to the pool"


class Disposition(enum.Enum):
    """What becomes of a server connection whose link ends in a given state."""

    REUSE = "reuse as is"
    ROLLBACK = "the pool rolls it back, then reuses it"
    RESET = "the pool runs ROLLBACK if needed and DISCARD ALL, then reuses it"
    CLOSE = "close it"


#: At a possible boundary: keep or release. Only IDLE releases.
DECISION: Final[dict[LinkState, Decision]] = {
    LinkState.SENDING: Decision.KEEP,
    LinkState.MID_MESSAGE: Decision.KEEP,
    LinkState.AWAITING_ANSWERS: Decision.KEEP,
    LinkState.MID_BATCH: Decision.KEEP,
    LinkState.MAPPING: Decision.KEEP,
    LinkState.COPY_BOTH: Decision.KEEP,
    LinkState.IN_TRANSACTION: Decision.KEEP,
    LinkState.PINNED: Decision.KEEP,
    LinkState.SESSION_MODE: Decision.KEEP,
    LinkState.IDLE: Decision.RELEASE,
}

#: When the link ends anyway (client gone, timeout, error): what the pool does.
DISPOSITION: Final[dict[LinkState, Disposition]] = {
    LinkState.SENDING: Disposition.CLOSE,
    LinkState.MID_MESSAGE: Disposition.CLOSE,
    LinkState.AWAITING_ANSWERS: Disposition.CLOSE,
    LinkState.MID_BATCH: Disposition.CLOSE,
    LinkState.MAPPING: Disposition.CLOSE,
    LinkState.COPY_BOTH: Disposition.CLOSE,
    LinkState.IN_TRANSACTION: Disposition.ROLLBACK,
    LinkState.PINNED: Disposition.RESET,
    LinkState.SESSION_MODE: Disposition.RESET,
    LinkState.IDLE: Disposition.REUSE,
}


def link_state(
    *,
    sending: bool,
    client_at_boundary: bool,
    owed: int,
    unsynced: bool,
    mapping_idle: bool,
    copy_both: bool,
    tx_status: TxStatus,
    pinned: bool,
    session_mode: bool,
) -> LinkState:
    """The link's state; earlier rows win (a pinned client with answers owed is
    AWAITING_ANSWERS: the connection is busy whatever else holds)."""
    if sending:
        return LinkState.SENDING
    if not client_at_boundary:
        return LinkState.MID_MESSAGE
    if owed > 0:
        return LinkState.AWAITING_ANSWERS
    if unsynced:
        return LinkState.MID_BATCH
    if not mapping_idle:
        return LinkState.MAPPING
    if copy_both:
        return LinkState.COPY_BOTH
    if tx_status is not TxStatus.IDLE:
        return LinkState.IN_TRANSACTION
    if pinned:
        return LinkState.PINNED
    if session_mode:
        return LinkState.SESSION_MODE
    return LinkState.IDLE
