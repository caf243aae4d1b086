"""Which client statements leave state in the server session (interim detector).

[core] Transaction pooling hands a server connection to another client at every
transaction boundary, so state a statement leaves in the *session* (a prepared statement,
a temp table, LISTEN, an advisory lock, a non-reported SET) would leak to that client or be
lost. Until the full SQL scanner and unpinning arrive, this detector is deliberately
conservative: it pins the client to its server connection for the rest of its session
whenever a statement *might* leave such state (correct beats clever). Reported parameters
(application_name, TimeZone, ...) are not pinned: the server announces their changes with
ParameterStatus and the proxy replays them on whichever connection serves the client.
"""

from __future__ import annotations

import re
from typing import Final

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

_COMMENT = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.S)
_ADVISORY = re.compile(r"pg_(?:try_)?advisory_lock(?:_shared)?\s*\(", re.I)
_WITH_HOLD = re.compile(r"\bwith\s+hold\b", re.I)
_TEMP = re.compile(r"\Acreate\s+(?:(?:global|local)\s+)?(?:temp|temporary)\b", re.I)
_SET = re.compile(r"\A(?:set|reset)\s+(?:(session|local)\s+)?(\"?[\w.]+\"?)", re.I)


def _statements(sql: str) -> list[str]:
    # Split on semicolons; a semicolon inside a literal only yields extra fragments,
    # which can only make the detector pin more, never less.
    return [_COMMENT.sub("", part, count=1) for part in sql.split(";")]


def pin_reason_for_query(sql: str) -> str | None:
    """Why a simple-protocol query pins its client, or None."""
    if _ADVISORY.search(sql):
        return "advisory lock"
    for statement in _statements(sql):
        head = statement[:40].lower()
        if not head:
            continue
        word = head.split(None, 1)[0] if head.split() else ""
        if word in ("prepare",):
            return "SQL PREPARE"
        if word in ("listen",):
            return "LISTEN"
        if word == "load":
            return "LOAD"
        if word == "declare" and _WITH_HOLD.search(statement):
            return "cursor WITH HOLD"
        if _TEMP.match(statement):
            return "temporary object"
        if word in ("set", "reset"):
            match = _SET.match(statement)
            if match is None:
                return "SET"
            scope, name = match.group(1), match.group(2).strip('"').lower()
            if scope is not None and scope.lower() == "local":
                continue
            if name in ("role", "session") or name not in TRACKED_PARAMETERS:
                return f"SET {name}"
        if word == "discard":
            return "DISCARD"
        if "set_config" in statement.lower():
            return "set_config"
    return None


def pin_reason_for_parse(statement_name: str) -> str | None:
    """A named protocol-level prepared statement lives in the session."""
    return "named prepared statement" if statement_name else None
