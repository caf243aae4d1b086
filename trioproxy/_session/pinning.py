"""Which client statements pin a client to its server connection.

[core] Transaction pooling hands a server connection to another client at every transaction
boundary, so state a statement leaves in the *session* (a prepared statement, a temp table,
LISTEN, an advisory lock, a SET the proxy does not replay) would leak to that client or be
lost. This module is the pinning *policy*; ``sqlscan`` does the lexing and says what each
statement does (docs/pinning.md has the full table).

Rules.

1. When unsure, pin. A statement the scanner cannot parse, a session SET of a parameter the
   proxy does not replay, and an unterminated quote or comment whose text could hide a
   statement all pin; so does text that pins under either setting of
   standard_conforming_strings. Correct beats clever.
2. Reported parameters (``TRACKED_PARAMETERS``: application_name, TimeZone, ...) do not pin:
   the server announces their changes with ParameterStatus and the proxy replays them on
   whichever connection serves the client next.
3. Pins last for the rest of the client's session today. The scanner already reports the
   statements that remove state (UNLISTEN, DEALLOCATE, CLOSE, DISCARD,
   pg_advisory_unlock_all); acting on them safely needs the server's confirmation that they
   succeeded, which belongs to the link state machine (planned).

Two cheap steps keep this off the hot path: a substring pre-filter (every pin needs one of
a few words somewhere in the text, so most SELECT/INSERT/DELETE traffic never reaches the
lexer), and a small cache of recent answers for short query texts (drivers repeat the same
statement text, above all in the extended protocol's Parse).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

from trioproxy._session.sqlscan import (
    EffectKind,
    PinReason,
    StateKind,
    StatementEffect,
    classify,
    split_statements,
)

#: Parameters the server reports with ParameterStatus; the proxy tracks and replays them.
TRACKED_PARAMETERS: Final = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "intervalstyle",
        "timezone",
        "standard_conforming_strings",
    }
)


def tracked_by_name(parameters: Mapping[str, str]) -> dict[str, str]:
    """The tracked ones among ``parameters`` (as a server reports them: ``TimeZone``),
    by lower-case name, as a client's session holds them."""
    tracked: dict[str, str] = {}
    for name, value in parameters.items():
        lower = name.lower()
        if lower in TRACKED_PARAMETERS:
            tracked.setdefault(lower, value)
    return tracked


#: Every pin needs one of these in the text (case-insensitively): ``temp`` (TEMP,
#: TEMPORARY, pg_temp), ``hold``, ``listen``, ``advisory_lock``, ``prepare``, ``load``,
#: ``set`` (SET, RESET, set_config), ``discard``, and ``&`` for ``U&"..."`` identifiers,
#: whose escapes can spell any name. ``test_pinning.py`` checks the filter against the
#: unfiltered path.
_TRIGGERS: Final = ("set", "temp", "listen", "prepare", "hold", "load", "advisory_lock", "discard")

#: Query texts up to this size have their answer cached (the cache holds the text).
_CACHED_TEXT_MAX: Final = 4096

UNTERMINATED: Final = "unterminated quote or comment"


def _may_pin(sql: str) -> bool:
    """Could any reading of ``sql`` hold a statement that pins? (Cheap: no lexing.)"""
    if "&" in sql:
        return True
    lowered = sql.lower()
    return any(word in lowered for word in _TRIGGERS)


def pin_reason(effect: StatementEffect, *, exclude_variable_sets: bool = False) -> str | None:
    """The pinning policy for one classified statement: why it pins, or None.

    ``exclude_variable_sets`` is RDS Proxy's ``EXCLUDE_VARIABLE_SETS`` session pinning
    filter: session SET/RESET of untracked parameters and ``set_config`` do not pin (the
    application promises it does not depend on them surviving a transaction boundary).
    SET ROLE and SET SESSION AUTHORIZATION always pin.
    """
    kind = effect.kind
    if kind is EffectKind.PIN:
        assert effect.pin is not None
        if exclude_variable_sets and effect.pin is PinReason.SET_CONFIG:
            return None
        return effect.pin.value
    if kind is EffectKind.SESSION_SET:
        setting = effect.setting
        assert setting is not None
        if setting.name in TRACKED_PARAMETERS or exclude_variable_sets:
            return None
        if setting.name is None:
            # RESET ALL also resets the parameters the proxy applied itself (startup
            # options), so its bookkeeping would be wrong: pin until replay handles it.
            return "RESET ALL"
        return f"{'RESET' if setting.value is None else 'SET'} {setting.name}"
    if kind is EffectKind.UNPIN and effect.unpin is StateKind.ALL:
        # DISCARD ALL removes state (nothing to pin for that), but it is also RESET ALL.
        return None if exclude_variable_sets else "DISCARD ALL"
    return None


def _reason_in(
    sql: str, standard_conforming_strings: bool, exclude_variable_sets: bool
) -> str | None:
    for statement in split_statements(sql, standard_conforming_strings=standard_conforming_strings):
        if statement.incomplete and _may_pin(statement.source[statement.start :]):
            # PostgreSQL rejects the whole query string, but if this lexer disagrees with
            # the server about where a quote ends, the rest may hold a real statement.
            return UNTERMINATED
        reason = pin_reason(classify(statement), exclude_variable_sets=exclude_variable_sets)
        if reason is not None:
            return reason
    return None


def _pin_reason_unfiltered(sql: str, exclude_variable_sets: bool = False) -> str | None:
    """``pin_reason_for_query`` without the pre-filter and the cache (tests compare them)."""
    reason = _reason_in(sql, True, exclude_variable_sets)
    if reason is None and "\\" in sql:
        # With standard_conforming_strings=off a backslash escapes a quote inside '...', so
        # the same text splits differently. The proxy does not know the server's setting
        # for sure (a client can change it), so a statement that either reading finds, pins.
        reason = _reason_in(sql, False, exclude_variable_sets)
    return reason


_pin_reason_cached: Final = functools.lru_cache(maxsize=1024)(_pin_reason_unfiltered)


def pin_reason_for_query(sql: str, *, exclude_variable_sets: bool = False) -> str | None:
    """Why a simple-protocol query (or the SQL of a Parse) pins its client, or None."""
    if not _may_pin(sql):
        return None
    if len(sql) <= _CACHED_TEXT_MAX:
        return _pin_reason_cached(sql, exclude_variable_sets)
    return _pin_reason_unfiltered(sql, exclude_variable_sets)


def pin_reason_for_parse(statement_name: str) -> str | None:
    """A named protocol-level prepared statement lives in the session."""
    return "named prepared statement" if statement_name else None
