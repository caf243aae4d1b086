"""A sans-IO SQL scanner: split a query string into statements and say what each one does
to the server *session*.

[core] Pure functions over ``str``: no trio, socket, ssl or clock, and no input makes them
raise. The cost is linear in the text: one regex match per significant token (whole string
literals, quoted identifiers and dollar quotes are single matches), and about a microsecond
of Python per token.

Why a lexer. Transaction pooling must know when a client's statement leaves state in the
session (a temp table, LISTEN, a prepared statement, a session SET, ...). Words inside string
literals, dollar quotes, quoted identifiers and comments are not statements, and a ``;`` inside
any of them does not end one. Regexes and ``split(";")`` get this wrong in both directions,
so this module tokenises the text the way PostgreSQL's own scanner does
(``src/backend/parser/scan.l``) and then classifies each statement from its significant
tokens.

Rules.

1. ``split_statements`` never raises and never loses text. An unterminated quote or comment
   swallows the rest of the input into the last statement, which is then marked
   ``incomplete``; callers treat that conservatively (PostgreSQL itself rejects the whole
   query string, but a lexer that disagrees with the server must not hide a statement).
2. The token boundaries follow ``scan.l``:

   * whitespace is ``[ \\t\\n\\r\\f\\v]``; ``--`` comments run to a newline; ``/* */`` comments
     nest;
   * ``'...'`` strings double their quotes (``''``). With ``standard_conforming_strings=off``
     a backslash escapes the next character too; ``E'...'`` always works that way;
     ``U&'...'``, ``B'...'``, ``X'...'`` and ``N'...'`` are strings as well;
   * ``$tag$ ... $tag$`` is a dollar quote when the tag is empty or an identifier without
     ``$`` that does not start with a digit; ``$1`` is a parameter. An identifier may
     *contain* ``$`` (``a$b$``), so a ``$`` right after an identifier character never opens
     a dollar quote;
   * ``"..."`` identifiers double their quotes and keep their case; ``U&"..."`` identifiers
     have their Unicode escapes decoded (``UESCAPE`` included), because
     ``U&"pg_advisory\\005flock"(1)`` calls the same function as ``pg_advisory_lock(1)``;
   * unquoted words are ASCII-lowercased only, as PostgreSQL does for keywords.

3. Every top-level ``;`` ends a statement. PostgreSQL also accepts ``;`` inside
   ``CREATE FUNCTION ... BEGIN ATOMIC ... END`` bodies; splitting there too can only make the
   classifier see *more* statements, which errs on the side of pinning.
4. The classifier is tables first (``_HEADS`` dispatches on the first word, ``_CALLS`` lists
   the functions that matter anywhere in a statement) and says ``PIN`` whenever it cannot
   parse something that might change the session.

What it cannot see: statements run by functions, procedures, ``DO`` blocks or dynamic SQL
(``EXECUTE`` in PL/pgSQL). Neither can RDS Proxy or PgBouncer; see docs/pinning.md.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import attrs

# --------------------------------------------------------------------------------------------
# Tokens


class TokenKind(enum.Enum):
    #: An unquoted keyword or identifier, ASCII-lowercased.
    WORD = "word"
    #: A ``"quoted"`` (or ``U&"..."``) identifier: quotes removed, case kept.
    IDENT = "quoted identifier"
    #: A string, bit string, dollar-quoted string or number. ``text`` is the source text.
    LITERAL = "literal"
    #: ``$1``, ``$2``, ...
    PARAM = "parameter"
    #: One operator or punctuation character: ``( ) , . = * :`` and the rest.
    OP = "operator"


class Token(NamedTuple):
    """One significant token. ``start``/``end`` are offsets into the scanned string.

    A NamedTuple rather than an attrs class: the lexer makes one per token on every client
    query, and tuple construction is the cheapest immutable record Python has.
    """

    kind: TokenKind
    text: str
    start: int
    end: int


@attrs.frozen(kw_only=True)
class Statement:
    """One statement of a query string: its significant tokens and where it lies."""

    tokens: tuple[Token, ...]
    #: The whole scanned string (token offsets index into it).
    source: str = attrs.field(repr=False)
    start: int
    end: int
    #: An unterminated quote or comment swallowed the rest of the input.
    incomplete: bool = False

    @property
    def text(self) -> str:
        return self.source[self.start : self.end].strip()


_WORD: Final = TokenKind.WORD
_IDENT: Final = TokenKind.IDENT
_LITERAL: Final = TokenKind.LITERAL
_PARAM: Final = TokenKind.PARAM
_OP: Final = TokenKind.OP

_IDENT_START: Final = r"A-Za-z_\x80-\U0010ffff"
_IDENT_CONT: Final = r"A-Za-z_0-9\x80-\U0010ffff"
#: Whitespace and ``--`` comments, skipped after every token. Possessive: never backtracks.
_SKIP: Final = r"(?:[ \t\n\r\f\v]++|--[^\n\r]*+)*+"
#: String bodies after the opening quote, closing quote included. Possessive quantifiers,
#: so a doubled quote can never be split to end a string early and nothing backtracks.
_STANDARD_BODY: Final = r"[^']*+(?:''[^']*+)*+'"
_ESCAPE_BODY: Final = r"[^'\\]*+(?:(?:\\.|'')[^'\\]*+)*+'"
_IDENT_BODY: Final = r'[^"]*+(?:""[^"]*+)*+"'


def _token_pattern(plain_string_body: str) -> re.Pattern[str]:
    """The lexer: one match per significant token, whole quoted tokens included, then the
    whitespace and line comments after it.

    The common tokens come first (words, then punctuation). A word may not start a prefixed
    string (``E'...'`` is a string, not the identifier ``e``; ``word`` is greedy, so
    ``type'...'`` stays the word ``type`` and then a string). The ``open`` alternative
    catches an opening quote whose token never ends; it comes after the complete forms.
    No token starts with ``--``: the skip after the previous token has eaten it.
    """
    return re.compile(
        rf"""
        (?:
          (?P<word>(?![eEbBxXnN]'|[uU]&['"])[{_IDENT_START}][{_IDENT_CONT}$]*+)
        | (?P<punct>[(),=*<>+\-:\[\]|%^~!@#&?`])
        | (?P<number>0[xX][0-9A-Fa-f_]++|0[oO][0-7_]++|0[bB][01_]++
            |(?:[0-9][0-9_]*+(?:\.[0-9_]*+)?|\.[0-9][0-9_]*+)(?:[eE][+-]?[0-9]++)?)
        | (?P<str>'{plain_string_body})
        | (?P<ident>"{_IDENT_BODY})
        | (?P<semi>;)
        | (?P<estr>[eE]'{_ESCAPE_BODY})
        | (?P<ustr>[uU]&'{_STANDARD_BODY})
        | (?P<uident>[uU]&"{_IDENT_BODY})
        | (?P<bstr>[bBxX]'{_STANDARD_BODY})
        | (?P<nstr>[nN]'{plain_string_body})
        | (?P<block>/\*)
        | (?P<dollar>\$(?P<tag>(?:[{_IDENT_START}][{_IDENT_CONT}]*+)?)\$.*?\$(?P=tag)\$)
        | (?P<param>\$[0-9]++)
        | (?P<open>[eEbBxXnN]'|[uU]&['"]|['"]|\$(?:[{_IDENT_START}][{_IDENT_CONT}]*+)?\$)
        | (?P<op>.)
        )
        {_SKIP}
        """,
        re.VERBOSE | re.DOTALL,
    )


_TOKEN: Final = _token_pattern(_STANDARD_BODY)
_TOKEN_NONSTANDARD: Final = _token_pattern(_ESCAPE_BODY)
assert _TOKEN.groupindex == _TOKEN_NONSTANDARD.groupindex
# Group numbers: the lexer dispatches on ``Match.lastindex`` (an int compare is cheaper than
# a group-name lookup). ``tag`` is nested in ``dollar``, which closes last, so ``lastindex``
# is always one of these.
_G_WORD: Final = _TOKEN.groupindex["word"]
_G_PUNCT: Final = _TOKEN.groupindex["punct"]
_G_SEMI: Final = _TOKEN.groupindex["semi"]
_G_IDENT: Final = _TOKEN.groupindex["ident"]
_G_UIDENT: Final = _TOKEN.groupindex["uident"]
_G_BLOCK: Final = _TOKEN.groupindex["block"]
_G_PARAM: Final = _TOKEN.groupindex["param"]
_G_OPEN: Final = _TOKEN.groupindex["open"]
_G_OP: Final = _TOKEN.groupindex["op"]
_SKIP_RE: Final = re.compile(_SKIP)
_COMMENT_MARK: Final = re.compile(r"/\*|\*/")

_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
#: Builds a Token without NamedTuple's Python-level ``__new__`` (the lexer's hottest line).
_new_token: Final = tuple.__new__


def _ascii_lower(text: str) -> str:
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def _skip(sql: str, pos: int) -> int:
    """Past the whitespace and line comments at ``pos``."""
    m = _SKIP_RE.match(sql, pos)
    assert m is not None  # _SKIP matches the empty string
    return m.end()


def _end_of_block_comment(sql: str, pos: int) -> int | None:
    """Where the comment opened just before ``pos`` ends (comments nest), or None."""
    depth = 1
    search = _COMMENT_MARK.search
    while True:
        mark = search(sql, pos)
        if mark is None:
            return None
        pos = mark.end()
        if mark.group() == "/*":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos


def split_statements(sql: str, *, standard_conforming_strings: bool = True) -> list[Statement]:
    """Split ``sql`` into statements, in one pass. Empty statements are dropped.

    ``standard_conforming_strings`` is the server setting: when it is off, a backslash
    escapes the next character inside plain ``'...'`` (and ``N'...'``) strings.
    """
    statements: list[Statement] = []
    tokens: list[Token] = []
    append = tokens.append
    match = (_TOKEN if standard_conforming_strings else _TOKEN_NONSTANDARD).match
    new = _new_token
    word, op, literal = _WORD, _OP, _LITERAL
    has_uident = incomplete = False
    n = len(sql)
    start = 0
    pos = _skip(sql, 0)
    while pos < n:
        m = match(sql, pos)
        assert m is not None  # "op" matches any character
        group = m.lastindex
        if group == _G_WORD:
            text = m.group(group)
            text = text.lower() if text.isascii() else text.translate(_ASCII_LOWER)
            append(new(Token, (word, text, pos, pos + len(text))))
        elif group in (_G_PUNCT, _G_OP):
            append(new(Token, (op, sql[pos], pos, pos + 1)))
        elif group == _G_SEMI:
            if tokens:
                statements.append(_statement(tokens, sql, start, pos, has_uident, False))
                tokens = []
                append = tokens.append
                has_uident = False
            start = pos + 1
        elif group in (_G_IDENT, _G_UIDENT):
            end = m.end(group)
            body = sql[pos + (1 if group == _G_IDENT else 3) : end - 1].replace('""', '"')
            append(new(Token, (_IDENT, body, pos, end)))
            has_uident = has_uident or group == _G_UIDENT
        elif group == _G_PARAM:
            append(new(Token, (_PARAM, m.group(group), pos, m.end(group))))
        elif group == _G_BLOCK:
            close = _end_of_block_comment(sql, pos + 2)
            if close is None:
                incomplete = True
                break
            pos = _skip(sql, close)
            continue
        elif group == _G_OPEN:
            # An opening quote that never closes: the rest of the input is inside it.
            is_ident = sql[pos] == '"' or sql[pos : pos + 3] in ('U&"', 'u&"')
            append(new(Token, (_IDENT if is_ident else literal, sql[pos:], pos, n)))
            incomplete = True
            break
        else:  # number, str, estr, ustr, bstr, nstr, dollar
            assert group is not None
            append(new(Token, (literal, m.group(group), pos, m.end(group))))
        pos = m.end()
    if tokens or incomplete:
        statements.append(_statement(tokens, sql, start, n, has_uident, incomplete))
    return statements


def _statement(
    tokens: list[Token], sql: str, start: int, end: int, has_uident: bool, incomplete: bool
) -> Statement:
    final = _decode_unicode_identifiers(tokens, sql) if has_uident else tokens
    return Statement(tokens=tuple(final), source=sql, start=start, end=end, incomplete=incomplete)


_HEX: Final = frozenset("0123456789abcdefABCDEF")


def _unicode_unescape(body: str, escape: str) -> str | None:
    """Decode ``U&"..."`` escapes (``\\XXXX``, ``\\+XXXXXX``, doubled escape), or None if
    PostgreSQL would reject them."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch != escape:
            out.append(ch)
            i += 1
            continue
        if body[i + 1 : i + 2] == escape:
            out.append(escape)
            i += 2
            continue
        digits = 6 if body[i + 1 : i + 2] == "+" else 4
        first = i + 2 if digits == 6 else i + 1
        code = body[first : first + digits]
        if len(code) != digits or not all(c in _HEX for c in code):
            return None
        value = int(code, 16)
        if value > 0x10FFFF:
            return None
        out.append(chr(value))
        i = first + digits
    return "".join(out)


def _plain_string_value(token: Token) -> str | None:
    """The value of a plain ``'...'`` literal token (quotes undoubled), else None."""
    text = token.text
    if token.kind is not _LITERAL or len(text) < 2 or text[0] != "'" or text[-1] != "'":
        return None
    return text[1:-1].replace("''", "'")


def _decode_unicode_identifiers(tokens: list[Token], sql: str) -> list[Token]:
    out: list[Token] = []
    i, n = 0, len(tokens)
    while i < n:
        token = tokens[i]
        if token.kind is _IDENT and sql[token.start] in "uU":
            escape, end, skip = "\\", token.end, 0
            if i + 2 < n and tokens[i + 1].kind is _WORD and tokens[i + 1].text == "uescape":
                chosen = _plain_string_value(tokens[i + 2])
                if chosen is not None and len(chosen) == 1:
                    escape, end, skip = chosen, tokens[i + 2].end, 2
            decoded = _unicode_unescape(token.text, escape)
            out.append(Token(_IDENT, token.text if decoded is None else decoded, token.start, end))
            i += 1 + skip
            continue
        out.append(token)
        i += 1
    return out


# --------------------------------------------------------------------------------------------
# Effects


class EffectKind(enum.Enum):
    #: Leaves nothing in the session that transaction pooling must care about.
    OTHER = "other"
    #: Leaves session state that cannot move to another server connection: pin.
    PIN = "pin"
    #: Removes session state (``unpin`` says which, ``name`` which object or None for all).
    UNPIN = "unpin"
    #: Changes a run-time parameter for the session (``setting``): SET, RESET, SET TIME ZONE,
    #: SET NAMES, SET SCHEMA, SET XML OPTION, RESET ALL.
    SESSION_SET = "session set"
    #: Changes a setting for the current transaction only (SET LOCAL, SET TRANSACTION,
    #: SET CONSTRAINTS, RESET TRANSACTION ISOLATION LEVEL): no session effect.
    LOCAL_SET = "local set"
    #: Transaction control (``transaction`` says which).
    TRANSACTION = "transaction control"


class PinReason(enum.Enum):
    """Why a statement pins. The values are the words the proxy logs."""

    TEMP_OBJECT = "temporary object"
    CURSOR_WITH_HOLD = "cursor WITH HOLD"
    LISTEN = "LISTEN"
    ADVISORY_LOCK = "advisory lock"
    LOAD = "LOAD"
    PREPARE = "SQL PREPARE"
    ROLE = "SET ROLE"
    SESSION_AUTHORIZATION = "SET SESSION AUTHORIZATION"
    SESSION_CHARACTERISTICS = "SET SESSION CHARACTERISTICS"
    SET_CONFIG = "set_config"
    SET_FROM_CURRENT = "SET ... FROM CURRENT"
    UNRECOGNISED_SET = "unrecognised SET/RESET"


class StateKind(enum.Enum):
    """Kinds of session state a statement can remove."""

    #: ``DISCARD ALL``: everything, and ``RESET ALL`` of the parameters as well.
    ALL = "all session state"
    LISTEN = "LISTEN registrations"
    PREPARED_STATEMENT = "prepared statements"
    CURSOR = "cursors"
    ADVISORY_LOCK = "session advisory locks"
    TEMP_OBJECT = "temporary objects"
    #: ``DISCARD PLANS`` / ``DISCARD SEQUENCES``: caches no statement pins on.
    CACHED_PLANS = "cached plans"
    SEQUENCE_STATE = "sequence state"


class TxCommand(enum.Enum):
    BEGIN = "BEGIN"
    COMMIT = "COMMIT"
    ROLLBACK = "ROLLBACK"
    SAVEPOINT = "SAVEPOINT"
    RELEASE_SAVEPOINT = "RELEASE SAVEPOINT"
    ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT"
    PREPARE_TRANSACTION = "PREPARE TRANSACTION"
    COMMIT_PREPARED = "COMMIT PREPARED"
    ROLLBACK_PREPARED = "ROLLBACK PREPARED"


@attrs.frozen(kw_only=True)
class Setting:
    """A session-level parameter change.

    ``name`` is the lowercased parameter name (``timezone`` for ``SET TIME ZONE``,
    ``client_encoding`` for ``SET NAMES``, ``search_path`` for ``SET SCHEMA``), or None for
    ``RESET ALL``. ``value`` is the value's source text as written (``'UTC'``,
    ``app, public``), or None for "back to the default" (``RESET x``, ``SET x TO DEFAULT``,
    ``SET TIME ZONE LOCAL``).
    """

    name: str | None
    value: str | None


@attrs.frozen(kw_only=True)
class StatementEffect:
    kind: EffectKind
    pin: PinReason | None = None
    unpin: StateKind | None = None
    #: The object a pin or unpin is about (LISTEN channel, prepared statement or cursor
    #: name), when there is one; None with ``unpin`` means "all of them".
    name: str | None = None
    setting: Setting | None = None
    transaction: TxCommand | None = None


OTHER: Final = StatementEffect(kind=EffectKind.OTHER)
LOCAL_SET: Final = StatementEffect(kind=EffectKind.LOCAL_SET)


def _pin(reason: PinReason, name: str | None = None) -> StatementEffect:
    return StatementEffect(kind=EffectKind.PIN, pin=reason, name=name)


def _unpin(state: StateKind, name: str | None = None) -> StatementEffect:
    return StatementEffect(kind=EffectKind.UNPIN, unpin=state, name=name)


def _tx(command: TxCommand) -> StatementEffect:
    return StatementEffect(kind=EffectKind.TRANSACTION, transaction=command)


# --------------------------------------------------------------------------------------------
# Token helpers


def _word(tokens: Sequence[Token], i: int) -> str | None:
    """The keyword at ``i`` (unquoted only), or None."""
    if i < len(tokens) and tokens[i].kind is _WORD:
        return tokens[i].text
    return None


def _is_op(tokens: Sequence[Token], i: int, op: str) -> bool:
    return i < len(tokens) and tokens[i].kind is _OP and tokens[i].text == op


def _name(tokens: Sequence[Token], i: int) -> str | None:
    """An identifier (quoted or not) at ``i``, or None."""
    if i < len(tokens) and tokens[i].kind in (_WORD, _IDENT):
        return tokens[i].text
    return None


def _var_name(tokens: Sequence[Token], i: int) -> tuple[str | None, int]:
    """A possibly dotted parameter name at ``i``: (lowercased name, next index)."""
    first = _name(tokens, i)
    if first is None:
        return None, i
    parts = [first]
    i += 1
    while _is_op(tokens, i, ".") and _name(tokens, i + 1) is not None:
        parts.append(tokens[i + 1].text)
        i += 2
    # Parameter names are matched case-insensitively by the server, quoted or not.
    return _ascii_lower(".".join(parts)), i


def _depth_zero(tokens: Sequence[Token], start: int) -> list[int]:
    """Indexes of the tokens from ``start`` that are outside all parentheses."""
    depth, found = 0, []
    for i in range(start, len(tokens)):
        token = tokens[i]
        if token.kind is _OP and token.text == "(":
            depth += 1
        elif token.kind is _OP and token.text == ")":
            depth -= 1
        elif depth == 0:
            found.append(i)
    return found


# --------------------------------------------------------------------------------------------
# Statement heads (first keyword -> handler)


def _create(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    i = 1
    if _word(tokens, 1) == "or" and _word(tokens, 2) == "replace":
        i = 3
    if _word(tokens, i) in ("global", "local"):
        i += 1
    if _word(tokens, i) not in ("temp", "temporary"):
        return OTHER
    i += 1
    if _word(tokens, i) == "unlogged":
        i += 1
    if _word(tokens, i) == "table" and _on_commit_drop(tokens, i + 1):
        # Dropped at the end of its own transaction: nothing outlives it (PgBouncer lists
        # ON COMMIT DROP temp tables as compatible with transaction pooling).
        return OTHER
    return _pin(PinReason.TEMP_OBJECT)


def _on_commit_drop(tokens: Sequence[Token], start: int) -> bool:
    """``ON COMMIT DROP`` among the table options, i.e. outside parentheses and before a
    CREATE TABLE AS query."""
    outside = _depth_zero(tokens, start)
    for position, i in enumerate(outside):
        word = _word(tokens, i)
        if word == "as":
            return False
        if (
            word == "on"
            and position + 2 < len(outside)
            and _word(tokens, outside[position + 1]) == "commit"
            and _word(tokens, outside[position + 2]) == "drop"
        ):
            return True
    return False


def _declare(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    # DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [{WITH|WITHOUT} HOLD]
    # FOR query: only the options before FOR count (a CTE in the query may be named "hold").
    for i in range(2, len(tokens)):
        word = _word(tokens, i)
        if word == "for":
            break
        if word == "with" and _word(tokens, i + 1) == "hold":
            return _pin(PinReason.CURSOR_WITH_HOLD, _name(tokens, 1))
    return OTHER


def _listen(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _pin(PinReason.LISTEN, _name(tokens, 1))


def _unlisten(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    if _is_op(tokens, 1, "*"):
        return _unpin(StateKind.LISTEN)
    name = _name(tokens, 1)
    return _unpin(StateKind.LISTEN, name) if name is not None else OTHER


def _load(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _pin(PinReason.LOAD)


def _prepare(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    # PREPARE TRANSACTION 'gid' hands the transaction to the server; the session keeps
    # nothing. A statement may itself be called "transaction": PREPARE transaction AS ...
    if _word(tokens, 1) == "transaction" and len(tokens) > 2 and tokens[2].kind is _LITERAL:
        return _tx(TxCommand.PREPARE_TRANSACTION)
    return _pin(PinReason.PREPARE, _name(tokens, 1))


def _deallocate(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    i = 2 if _word(tokens, 1) == "prepare" else 1
    if _word(tokens, i) == "all":
        return _unpin(StateKind.PREPARED_STATEMENT)
    name = _name(tokens, i)
    return _unpin(StateKind.PREPARED_STATEMENT, name) if name is not None else OTHER


def _close(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    if _word(tokens, 1) == "all":
        return _unpin(StateKind.CURSOR)
    name = _name(tokens, 1)
    return _unpin(StateKind.CURSOR, name) if name is not None else OTHER


_DISCARDS: Final = {
    "all": StateKind.ALL,
    "temp": StateKind.TEMP_OBJECT,
    "temporary": StateKind.TEMP_OBJECT,
    "plans": StateKind.CACHED_PLANS,
    "sequences": StateKind.SEQUENCE_STATE,
}


def _discard(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    state = _DISCARDS.get(_word(tokens, 1) or "")
    return _unpin(state) if state is not None else OTHER


#: Parameters whose SET is really SET ROLE / SET SESSION AUTHORIZATION.
_IDENTITY_PARAMETERS: Final = {
    "role": PinReason.ROLE,
    "session_authorization": PinReason.SESSION_AUTHORIZATION,
}


def _session_set(
    statement: Statement, name: str, tokens: Sequence[Token], i: int, *, defaults: tuple[str, ...]
) -> StatementEffect:
    identity = _IDENTITY_PARAMETERS.get(name)
    if identity is not None:
        return _pin(identity)
    if i >= len(tokens):
        if "" in defaults:  # SET NAMES with no encoding
            return StatementEffect(
                kind=EffectKind.SESSION_SET, setting=Setting(name=name, value=None)
            )
        return _pin(PinReason.UNRECOGNISED_SET)
    if i == len(tokens) - 1 and _word(tokens, i) in defaults:
        value = None
    else:
        value = statement.source[tokens[i].start : tokens[-1].end]
    return StatementEffect(kind=EffectKind.SESSION_SET, setting=Setting(name=name, value=value))


def _set(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    first = _word(tokens, 1)
    if first == "local":
        return LOCAL_SET
    i = 1
    if first == "session" and _word(tokens, 2) not in ("authorization", "characteristics"):
        i = 2  # the SESSION scope, which is the default anyway
    word = _word(tokens, i)
    generic = _word(tokens, i + 1) == "to" or _is_op(tokens, i + 1, "=")
    if not generic:
        following = _word(tokens, i + 1)
        if word == "role":
            return _pin(PinReason.ROLE)
        if word == "session" and following == "authorization":
            return _pin(PinReason.SESSION_AUTHORIZATION)
        if word == "session" and following == "characteristics":
            return _pin(PinReason.SESSION_CHARACTERISTICS)
        if word in ("transaction", "constraints"):
            return LOCAL_SET  # SET TRANSACTION ..., SET TRANSACTION SNAPSHOT, SET CONSTRAINTS
        if word == "time" and following == "zone":
            return _session_set(statement, "timezone", tokens, i + 2, defaults=("local", "default"))
        if word == "names":
            return _session_set(
                statement, "client_encoding", tokens, i + 1, defaults=("default", "")
            )
        if word == "schema":
            return _session_set(statement, "search_path", tokens, i + 1, defaults=())
        if word == "xml" and following == "option":
            return _session_set(statement, "xmloption", tokens, i + 2, defaults=())
    name, j = _var_name(tokens, i)
    if name is None:
        return _pin(PinReason.UNRECOGNISED_SET)
    if _word(tokens, j) == "to" or _is_op(tokens, j, "="):
        return _session_set(statement, name, tokens, j + 1, defaults=("default",))
    if _word(tokens, j) == "from" and _word(tokens, j + 1) == "current":
        # Copies the current value, which may be a SET LOCAL one, into the session.
        return _pin(PinReason.SET_FROM_CURRENT)
    return _pin(PinReason.UNRECOGNISED_SET)


def _reset(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    first = _word(tokens, 1)
    if first == "all" and len(tokens) == 2:
        return StatementEffect(kind=EffectKind.SESSION_SET, setting=Setting(name=None, value=None))
    if first == "session" and _word(tokens, 2) == "authorization":
        return _pin(PinReason.SESSION_AUTHORIZATION)
    if first == "time" and _word(tokens, 2) == "zone":
        return StatementEffect(
            kind=EffectKind.SESSION_SET, setting=Setting(name="timezone", value=None)
        )
    if first == "transaction":
        return LOCAL_SET  # RESET TRANSACTION ISOLATION LEVEL
    name, j = _var_name(tokens, 1)
    if name is None or j != len(tokens):
        return _pin(PinReason.UNRECOGNISED_SET)
    identity = _IDENTITY_PARAMETERS.get(name)
    if identity is not None:
        return _pin(identity)
    return StatementEffect(kind=EffectKind.SESSION_SET, setting=Setting(name=name, value=None))


def _begin(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _tx(TxCommand.BEGIN)


def _start(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _tx(TxCommand.BEGIN) if _word(tokens, 1) == "transaction" else OTHER


def _commit(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    if _word(tokens, 1) == "prepared":
        return _tx(TxCommand.COMMIT_PREPARED)
    return _tx(TxCommand.COMMIT)


def _rollback(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    if _word(tokens, 1) == "prepared":
        return _tx(TxCommand.ROLLBACK_PREPARED)
    i = 2 if _word(tokens, 1) in ("work", "transaction") else 1
    if _word(tokens, i) == "to":
        return _tx(TxCommand.ROLLBACK_TO_SAVEPOINT)
    return _tx(TxCommand.ROLLBACK)


def _savepoint(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _tx(TxCommand.SAVEPOINT)


def _release(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    return _tx(TxCommand.RELEASE_SAVEPOINT)


_EXPLAIN_OPTIONS: Final = frozenset({"analyze", "analyse", "verbose"})


def _explain(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    # EXPLAIN ANALYZE runs its statement (CREATE TEMP TABLE ... AS, say): classify that
    # statement. Without ANALYZE nothing runs, but erring towards a pin is fine.
    i = 1
    if _is_op(tokens, 1, "("):
        depth = 0
        while i < len(tokens):
            if _is_op(tokens, i, "("):
                depth += 1
            elif _is_op(tokens, i, ")"):
                depth -= 1
                if depth == 0:
                    i += 1
                    break
            i += 1
    else:
        while _word(tokens, i) in _EXPLAIN_OPTIONS:
            i += 1
    return _classify_head(statement, tokens[i:])


_Handler = Callable[[Statement, Sequence[Token]], StatementEffect]

#: The first keyword of a statement -> what decides its effect. Anything else: OTHER.
_HEADS: Final[dict[str, _Handler]] = {
    "create": _create,
    "declare": _declare,
    "listen": _listen,
    "unlisten": _unlisten,
    "load": _load,
    "prepare": _prepare,
    "deallocate": _deallocate,
    "close": _close,
    "discard": _discard,
    "set": _set,
    "reset": _reset,
    "begin": _begin,
    "start": _start,
    "commit": _commit,
    "end": _commit,
    "rollback": _rollback,
    "abort": _rollback,
    "savepoint": _savepoint,
    "release": _release,
    "explain": _explain,
}


def _classify_head(statement: Statement, tokens: Sequence[Token]) -> StatementEffect:
    if not tokens or tokens[0].kind is not _WORD:
        return OTHER
    handler = _HEADS.get(tokens[0].text)
    return OTHER if handler is None else handler(statement, tokens)


# --------------------------------------------------------------------------------------------
# Anywhere in a statement: function calls, SELECT ... INTO TEMP, pg_temp.name

_ADVISORY_LOCKS: Final = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
    }
)
_UNLOCK_ALL: Final = "pg_advisory_unlock_all"
_SET_CONFIG: Final = "set_config"
#: The names the scan stops at (function names may be quoted: "set_config"(...) is a call).
_CALLS: Final = _ADVISORY_LOCKS | {_SET_CONFIG, _UNLOCK_ALL}
_PG_TEMP: Final = re.compile(r"pg_temp(?:_[0-9]+)?")
#: After INTO TEMP, words that show "temp" was a table name (INSERT INTO temp VALUES ...).
_NOT_A_TABLE_NAME: Final = frozenset(
    {"values", "select", "default", "overriding", "using", "as", "with", "on"}
)


def _into_temp(tokens: Sequence[Token], i: int) -> bool:
    """SELECT ... INTO [GLOBAL|LOCAL] TEMP|TEMPORARY [TABLE] name, from just after INTO."""
    if _word(tokens, i) in ("global", "local"):
        i += 1
    if _word(tokens, i) not in ("temp", "temporary") or i + 1 >= len(tokens):
        return False
    after = tokens[i + 1]
    if after.kind is _IDENT:
        return True
    return after.kind is _WORD and after.text not in _NOT_A_TABLE_NAME


def _is_true(tokens: Sequence[Token]) -> bool:
    """Is this argument the boolean constant true (``true``, ``'on'``, ``'t'``, ...)?"""
    if len(tokens) != 1:
        return False
    if tokens[0].kind is _WORD:
        return tokens[0].text == "true"
    value = _plain_string_value(tokens[0])
    if value is None:
        return False
    value = _ascii_lower(value.strip(" \t\n\r\f\v"))
    if not value:
        return False
    # PostgreSQL's boolin: "on", "1", or any prefix of "true" or "yes".
    return value in ("on", "1") or "true".startswith(value) or "yes".startswith(value)


def _set_config_is_local(tokens: Sequence[Token], i: int) -> bool:
    """From just after ``set_config(``: is the third argument the constant true?"""
    args: list[list[Token]] = [[]]
    depth = 0
    for token in tokens[i:]:
        if token.kind is _OP:
            if token.text == "(":
                depth += 1
            elif token.text == ")":
                if depth == 0:
                    return len(args) == 3 and _is_true(args[2])
                depth -= 1
            elif token.text == "," and depth == 0:
                args.append([])
                continue
        args[-1].append(token)
    return False  # no closing parenthesis: unsure


def _set_config_name(tokens: Sequence[Token], i: int) -> str | None:
    """From just after ``set_config(``: the parameter name, when it is a plain literal."""
    if i + 1 < len(tokens) and tokens[i].kind is TokenKind.LITERAL and _is_op(tokens, i + 1, ","):
        value = _plain_string_value(tokens[i])
        return _ascii_lower(value) if value else None
    return None


def _scan_anywhere(tokens: Sequence[Token]) -> tuple[PinReason | None, bool, str | None]:
    """(a pin found anywhere in the statement, whether it calls pg_advisory_unlock_all,
    the parameter name of a session ``set_config`` when it is the statement's only pin and
    its name is a literal)."""
    unlock_all = False
    set_config_names: list[str | None] = []
    n = len(tokens)
    for i, token in enumerate(tokens):
        kind = token.kind
        if kind is not _WORD and kind is not _IDENT:
            continue
        text = token.text
        if text.startswith("pg_temp") and _is_op(tokens, i + 1, ".") and _PG_TEMP.fullmatch(text):
            return PinReason.TEMP_OBJECT, unlock_all, None
        if text == "into" and kind is _WORD:
            if _into_temp(tokens, i + 1):
                return PinReason.TEMP_OBJECT, unlock_all, None
            continue
        if text not in _CALLS or i + 1 >= n or not _is_op(tokens, i + 1, "("):
            continue
        if text in _ADVISORY_LOCKS:
            return PinReason.ADVISORY_LOCK, unlock_all, None
        if text == _SET_CONFIG:
            if not _set_config_is_local(tokens, i + 2):
                set_config_names.append(_set_config_name(tokens, i + 2))
        else:
            unlock_all = True
    if set_config_names:
        name = set_config_names[0] if len(set_config_names) == 1 else None
        return PinReason.SET_CONFIG, unlock_all, name
    return None, unlock_all, None


def classify(statement: Statement) -> StatementEffect:
    """What ``statement`` does to the session. Never raises.

    A pin found by the head keyword wins (its reason is the most precise); otherwise a pin
    found anywhere in the statement (an advisory-lock call, a session ``set_config``,
    ``INTO TEMP``, a ``pg_temp.`` name) overrides whatever the head said.
    """
    tokens = statement.tokens
    effect = _classify_head(statement, tokens)
    if effect.kind is EffectKind.PIN:
        return effect
    reason, unlock_all, name = _scan_anywhere(tokens)
    if reason is not None:
        return _pin(reason, name)
    if unlock_all and effect.kind is EffectKind.OTHER:
        return _unpin(StateKind.ADVISORY_LOCK)
    return effect


def fingerprint(statement: Statement, *, limit: int = 200) -> str:
    """The statement with every literal replaced by ``?``: safe to log (no values, no
    secrets typed in a query), stable across executions."""
    parts: list[str] = []
    for token in statement.tokens:
        if token.kind is TokenKind.LITERAL:
            parts.append("?")
        elif token.kind is TokenKind.IDENT:
            parts.append('"' + token.text.replace('"', '""') + '"')
        else:
            parts.append(token.text)
    text = " ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan(sql: str, *, standard_conforming_strings: bool = True) -> list[StatementEffect]:
    """The effect of every statement in ``sql`` (``split_statements`` then ``classify``)."""
    return [
        classify(s)
        for s in split_statements(sql, standard_conforming_strings=standard_conforming_strings)
    ]
