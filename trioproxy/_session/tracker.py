"""When may a server connection leave its client? The transaction-boundary tracker.

[core] Fed the type of every message a linked client sends and every message its
server answers (the relay's ``StreamScanner`` gives them), it keeps the ledger of what
the server still owes:

* each Query, Sync and FunctionCall is answered by exactly one ReadyForQuery, so
  ``owed`` counts them sent minus ReadyForQuery received (pipelining-safe);
* extended-protocol messages sent without their Sync yet (Parse/Bind/Describe/Execute/
  Close) leave the server mid-batch: ``unsynced`` until the next Sync;
* ReadyForQuery's status byte says whether a transaction is open.

``releasable`` is true only at ReadyForQuery('I') with nothing owed and nothing unsynced:
then the server connection is exactly as clean as a fresh one, transaction-wise.
Session state (pinning) is a separate concern; see ``pinning.py``.
"""

from __future__ import annotations

from typing import Final

import attrs

from trioproxy._protocol.codes import Backend, Frontend, TxStatus
from trioproxy.errors import RemoteProtocolError

#: Client messages each answered by exactly one ReadyForQuery.
ANSWERED_BY_READY: Final = frozenset({Frontend.QUERY, Frontend.SYNC, Frontend.FUNCTION_CALL})
#: Extended-protocol messages that put the server mid-batch until a Sync.
EXTENDED: Final = frozenset(
    {Frontend.PARSE, Frontend.BIND, Frontend.DESCRIBE, Frontend.EXECUTE, Frontend.CLOSE}
)
#: Messages the proxy accepts from a client after login.
KNOWN_CLIENT_TYPES: Final = (
    ANSWERED_BY_READY
    | EXTENDED
    | frozenset(
        {
            Frontend.FLUSH,
            Frontend.TERMINATE,
            Frontend.COPY_DATA,
            Frontend.COPY_DONE,
            Frontend.COPY_FAIL,
        }
    )
)

#: The only server messages ``server_message`` acts on; it ignores every other type, so
#: a caller may skip them (DataRow, RowDescription, ...: most of the server's stream).
SERVER_TYPES: Final = frozenset(
    {Backend.READY_FOR_QUERY, Backend.COPY_BOTH_RESPONSE, Backend.ERROR_RESPONSE}
)
#: ReadyForQuery's status byte -> TxStatus (a dict lookup: once per transaction).
_TX_STATUS: Final = {status.value: status for status in TxStatus}


@attrs.define
class TransactionTracker:
    owed: int = 0
    unsynced: bool = False
    tx_status: TxStatus = TxStatus.IDLE
    #: The server switched to COPY BOTH (replication): never release.
    copy_both: bool = False
    #: ErrorResponses seen (the session ledger trusts no unpin across an error).
    errors: int = 0

    def client_message(self, type_: int) -> None:
        if type_ in ANSWERED_BY_READY:
            self.owed += 1
            if type_ == Frontend.SYNC:
                self.unsynced = False
        elif type_ in EXTENDED:
            self.unsynced = True
        elif type_ not in KNOWN_CLIENT_TYPES:
            raise RemoteProtocolError(f"invalid frontend message type {type_} ({chr(type_)!r})")

    def server_ready(self, status: TxStatus) -> None:
        if self.owed <= 0:
            raise RemoteProtocolError("server sent ReadyForQuery that nothing asked for")
        self.owed -= 1
        self.tx_status = status

    def server_message(self, type_: int, body: bytes | None) -> None:
        if type_ == Backend.READY_FOR_QUERY:
            if body is None or len(body) != 1:
                raise RemoteProtocolError("malformed ReadyForQuery from server")
            status = _TX_STATUS.get(body)
            if status is None:
                raise RemoteProtocolError(f"invalid transaction status {body!r}")
            self.server_ready(status)
        elif type_ == Backend.COPY_BOTH_RESPONSE:
            self.copy_both = True
        elif type_ == Backend.ERROR_RESPONSE:
            self.errors += 1

    @property
    def in_transaction(self) -> bool:
        return self.tx_status is not TxStatus.IDLE

    @property
    def waiting_for_server(self) -> bool:
        return self.owed > 0

    @property
    def releasable(self) -> bool:
        return (
            self.owed == 0
            and not self.unsynced
            and self.tx_status is TxStatus.IDLE
            and not self.copy_both
        )
