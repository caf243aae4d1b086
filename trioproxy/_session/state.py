"""What one client has left in its server session: the pin ledger and the SET ledger.

[core] Fed the SQL a client sends (Query text, Parse), it keeps:

* ``pins``: state that cannot move to another server connection (temp objects, LISTEN,
  WITH HOLD cursors, SQL PREPARE, session advisory locks, SET ROLE, LOAD, ...), by
  reason, with the object names where the statement names one. While any pin is held the
  client keeps its server connection across transactions.
* ``named_statements``: protocol-level prepared statements (Parse with a name). They pin
  too until the client closes them all (statement virtualisation is future work).
* ``touched``: untracked parameters changed by a session-level SET/RESET/set_config. They
  do *not* pin: at the end of the transaction the shell reads their values back from the
  server and replays them on whichever connection serves the client next.

Unpinning statements (UNLISTEN, DISCARD, DEALLOCATE, CLOSE, pg_advisory_unlock_all) are
held as *pending* and applied at the next transaction boundary only if no error happened
in between: when the proxy cannot be sure the state is gone, it stays pinned.

State transitions (the table docs/pinning.md shows):

    UNPINNED --pinning statement--> PINNED --pending unpins settle, nothing left--> UNPINNED
    PINNED   --error before the boundary--> PINNED (pending unpins dropped)
"""

from __future__ import annotations

from typing import Final

import attrs

from trioproxy._session.pinning import TRACKED_PARAMETERS, pin_reason
from trioproxy._session.sqlscan import (
    EffectKind,
    PinReason,
    StateKind,
    TxCommand,
    classify,
    fingerprint,
    split_statements,
)

#: Words without which a statement cannot change session state (cheap pre-filter).
TRIGGER_WORDS: Final = (
    "set",
    "temp",
    "listen",
    "prepare",
    "hold",
    "load",
    "advisory_",
    "discard",
    "deallocate",
    "close",
    "&",
)


def has_trigger_word(lowered: str) -> bool:
    """Does lower-cased SQL hold a word without which it cannot change session state?"""
    for word in TRIGGER_WORDS:  # noqa: SIM110 - a loop, not any(): per statement
        if word in lowered:
            return True
    return False


UNTERMINATED: Final = "unterminated quote or comment"
#: Marker in ``pending``: a rollback happened after some unpins (they may be undone).
_ROLLED_BACK: Final = "\0rolled back"
_UNDOING: Final = frozenset({TxCommand.ROLLBACK, TxCommand.ROLLBACK_TO_SAVEPOINT})
NAMED_STATEMENT: Final = "named prepared statement"

#: Which pins an unpinning statement can remove.
_UNPINS: Final[dict[StateKind, str]] = {
    StateKind.LISTEN: PinReason.LISTEN.value,
    StateKind.PREPARED_STATEMENT: PinReason.PREPARE.value,
    StateKind.CURSOR: PinReason.CURSOR_WITH_HOLD.value,
    StateKind.ADVISORY_LOCK: PinReason.ADVISORY_LOCK.value,
    StateKind.TEMP_OBJECT: PinReason.TEMP_OBJECT.value,
}


@attrs.define
class SessionState:
    exclude_variable_sets: bool = False
    #: pin reason -> names of the objects behind it (None: an unnamed one)
    pins: dict[str, set[str | None]] = attrs.field(factory=dict)
    named_statements: set[str] = attrs.field(factory=set)
    touched: set[str] = attrs.field(factory=set)
    reset_all: bool = False
    #: Unpins awaiting the next boundary, in order with the pins taken meanwhile (so
    #: ``UNLISTEN *; LISTEN b`` leaves ``b``).
    pending: list[tuple[StateKind | str, str | None]] = attrs.field(factory=list)
    #: Literal-free text of the statement that took the latest pin (for the pin log).
    last_pin_statement: str = ""

    @property
    def pinned(self) -> bool:
        return bool(self.pins) or bool(self.named_statements)

    @property
    def reasons(self) -> list[str]:
        reasons = list(self.pins)
        if self.named_statements:
            reasons.append(NAMED_STATEMENT)
        return reasons

    def _pin(self, reason: str, name: str | None) -> str | None:
        """Record a pin; return the reason if the client was not pinned for it before."""
        if self.pending:
            self.pending.append((reason, name))
        names = self.pins.get(reason)
        if names is None:
            self.pins[reason] = {name}
            return reason
        names.add(name)
        return None

    def on_sql(self, sql: str) -> list[str]:
        """A Query's text (or a Parse's SQL). Returns the pin reasons newly taken."""
        lowered = sql.lower()
        if not has_trigger_word(lowered) and not (
            self.pending and ("rollback" in lowered or "abort" in lowered)
        ):
            return []
        new: list[str] = []
        if "\\" in sql:
            # With standard_conforming_strings off a backslash escapes a quote, so the
            # same text splits differently; a pin either reading finds, counts.
            for statement in split_statements(sql, standard_conforming_strings=False):
                effect = classify(statement)
                if effect.kind is EffectKind.PIN or statement.incomplete:
                    reason = (
                        UNTERMINATED
                        if statement.incomplete
                        else pin_reason(effect, exclude_variable_sets=self.exclude_variable_sets)
                    )
                    if reason is not None and (added := self._pin(reason, effect.name)):
                        new.append(added)
        for statement in split_statements(sql):
            if statement.incomplete:
                if (reason := self._pin(UNTERMINATED, None)) is not None:
                    new.append(reason)
                continue
            effect = classify(statement)
            kind = effect.kind
            if kind is EffectKind.SESSION_SET:
                setting = effect.setting
                assert setting is not None
                if setting.name is None:
                    self.reset_all = True
                elif setting.name not in TRACKED_PARAMETERS and not self.exclude_variable_sets:
                    self.touched.add(setting.name)
            elif kind is EffectKind.TRANSACTION:
                if self.pending and effect.transaction in _UNDOING:
                    # BEGIN; UNLISTEN *; ROLLBACK undoes the unpin: trust none of them.
                    self.pending.append((_ROLLED_BACK, None))
            elif kind is EffectKind.UNPIN:
                assert effect.unpin is not None
                if effect.unpin is StateKind.ALL:
                    self.reset_all = True
                self.pending.append((effect.unpin, effect.name))
            elif (
                kind is EffectKind.PIN
                and effect.pin is PinReason.SET_CONFIG
                and effect.name is not None
            ):
                # set_config('name', ..., false) with a literal name: a session SET like
                # any other, replayed by read-back (nothing pins).
                if effect.name not in TRACKED_PARAMETERS and not self.exclude_variable_sets:
                    self.touched.add(effect.name)
            elif kind is EffectKind.PIN:
                reason = pin_reason(effect, exclude_variable_sets=self.exclude_variable_sets)
                if reason is not None and (added := self._pin(reason, effect.name)) is not None:
                    new.append(added)
                    self.last_pin_statement = fingerprint(statement)
        return new

    def on_parse(self, name: str, sql: str) -> list[str]:
        new = self.on_sql(sql)
        if name:
            if not self.named_statements:
                new.append(NAMED_STATEMENT)
            self.named_statements.add(name)
        return new

    def forgets_statements(self) -> bool:
        """Did the last statements deallocate every prepared statement (DISCARD ALL,
        DEALLOCATE ALL)?"""
        if not self.pending:  # the common case, once per Query
            return False
        return any(
            op is StateKind.ALL or (op is StateKind.PREPARED_STATEMENT and name is None)
            for op, name in self.pending
        )

    def on_close_statement(self, name: str) -> None:
        self.named_statements.discard(name)

    def settle(self, *, errors_seen: bool) -> list[str]:
        """At a transaction boundary: apply pending unpins (unless an error happened
        since they were sent). Returns the reasons released."""
        pending, self.pending = self.pending, []
        if errors_seen or not pending or any(op == _ROLLED_BACK for op, _ in pending):
            return []
        before = set(self.pins)
        for op, name in pending:
            if isinstance(op, str):  # a pin taken after an earlier unpin: keep it
                self.pins.setdefault(op, set()).add(name)
            elif op is StateKind.ALL:
                self.pins.clear()
                self.named_statements.clear()
            elif (reason := _UNPINS.get(op)) is not None and reason in self.pins:
                names = self.pins[reason]
                if name is None:
                    names.clear()
                else:
                    names.discard(name)
                if not names:
                    del self.pins[reason]
        return sorted(before - set(self.pins))
