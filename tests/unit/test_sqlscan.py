"""sqlscan: the SQL lexer/splitter and the statement classifier.

Rules for this module: plain synchronous tests, no database. Lexer behaviour is checked
against what PostgreSQL's scanner does (scan.l); the Hypothesis tests use generated SQL
built from benign statements, "dangerous" payloads and every kind of quoting, and must be
deterministic for a given seed.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._session.sqlscan import (
    OTHER,
    EffectKind,
    PinReason,
    Setting,
    StateKind,
    Statement,
    StatementEffect,
    Token,
    TokenKind,
    TxCommand,
    classify,
    scan,
    split_statements,
)

WORD, IDENT, LIT, PARAM, OP = (
    TokenKind.WORD,
    TokenKind.IDENT,
    TokenKind.LITERAL,
    TokenKind.PARAM,
    TokenKind.OP,
)


def kinds_and_texts(sql: str, **kwargs: bool) -> list[list[tuple[TokenKind, str]]]:
    return [[(t.kind, t.text) for t in s.tokens] for s in split_statements(sql, **kwargs)]


def only(sql: str) -> Statement:
    statements = split_statements(sql)
    assert len(statements) == 1, statements
    return statements[0]


def effect(sql: str) -> StatementEffect:
    return classify(only(sql))


def pin(reason: PinReason, name: str | None = None) -> StatementEffect:
    return StatementEffect(kind=EffectKind.PIN, pin=reason, name=name)


def unpin(state: StateKind, name: str | None = None) -> StatementEffect:
    return StatementEffect(kind=EffectKind.UNPIN, unpin=state, name=name)


def session_set(name: str | None, value: str | None) -> StatementEffect:
    return StatementEffect(kind=EffectKind.SESSION_SET, setting=Setting(name=name, value=value))


def tx(command: TxCommand) -> StatementEffect:
    return StatementEffect(kind=EffectKind.TRANSACTION, transaction=command)


LOCAL = StatementEffect(kind=EffectKind.LOCAL_SET)


# --- the lexer -----------------------------------------------------------------------------


def test_tokens_of_a_plain_statement() -> None:
    assert kinds_and_texts("SELECT a, \"B\"\"c\" FROM t WHERE x = $1 AND y = 'it''s' -- c") == [
        [
            (WORD, "select"),
            (WORD, "a"),
            (OP, ","),
            (IDENT, 'B"c'),
            (WORD, "from"),
            (WORD, "t"),
            (WORD, "where"),
            (WORD, "x"),
            (OP, "="),
            (PARAM, "$1"),
            (WORD, "and"),
            (WORD, "y"),
            (OP, "="),
            (LIT, "'it''s'"),
        ]
    ]


def test_token_offsets_point_into_the_source() -> None:
    sql = "  select  'x' ;\n LISTEN \"Ch\""
    for statement in split_statements(sql):
        for token in statement.tokens:
            raw = sql[token.start : token.end]
            assert raw.lower().strip('"') == token.text.lower().strip('"')
    assert [s.text for s in split_statements(sql)] == ["select  'x'", 'LISTEN "Ch"']


def test_words_are_ascii_lowercased_only() -> None:
    # PostgreSQL folds only A-Z; a Kelvin sign is not a "k".
    assert kinds_and_texts("SeLeCt ÄBC, pg_advisory_loc\u212a") == [
        [(WORD, "select"), (WORD, "Äbc"), (OP, ","), (WORD, "pg_advisory_loc\u212a")]
    ]


@pytest.mark.parametrize(
    ("sql", "count"),
    [
        ("select 1; select 2", 2),
        ("select 1;", 1),
        (";;; select 1 ;;", 1),
        ("", 0),
        ("  \n\t ", 0),
        ("-- only a comment", 0),
        ("/* only /* a nested */ comment */", 0),
        ("select ';'; select 2", 2),
        ("select 'a'';b'; select 2", 2),
        ("select E'a\\';b'; select 2", 2),
        ("select U&'a;b'; select 2", 2),
        ("select B'0;1', X'a;b', N'x;y'; select 2", 2),
        ('select ";" from t; select 2', 2),
        ('select U&";"; select 2', 2),
        ("select $$;$$; select 2", 2),
        ("select $a$ $$ ; $b$ $a$; select 2", 2),
        ("select $_1$;$_1$; select 2", 2),
        ("select 1 -- ;\n; select 2", 2),
        ("select 1 /* ; /* ; */ ; */; select 2", 2),
        ("select $1; select 2", 2),
        ("select a$b$; select 2 as c$b$", 2),  # an identifier may contain '$': no dollar quote
    ],
)
def test_split_counts(sql: str, count: int) -> None:
    statements = split_statements(sql)
    assert len(statements) == count
    assert not any(s.incomplete for s in statements)


def test_nested_comments_hide_everything() -> None:
    assert kinds_and_texts("/* a /* b */ LISTEN x; */ select 1") == [[(WORD, "select"), (LIT, "1")]]


def test_comment_markers_inside_operators() -> None:
    # scan.l cuts an operator at "/*" or "--".
    assert kinds_and_texts("select 2*/*c*/3, 4+--c\n5") == [
        [
            (WORD, "select"),
            (LIT, "2"),
            (OP, "*"),
            (LIT, "3"),
            (OP, ","),
            (LIT, "4"),
            (OP, "+"),
            (LIT, "5"),
        ]
    ]


def test_comment_closing_runs() -> None:
    assert kinds_and_texts("/* x **/ a /*/ b */ c") == [[(WORD, "a"), (WORD, "c")]]


@pytest.mark.parametrize(
    ("sql", "literal"),
    [
        ("select 'a''b'", "'a''b'"),
        ("select E'a\\'b'", "E'a\\'b'"),
        ("select e'a\\\\'", "e'a\\\\'"),
        ("select E'a''b'", "E'a''b'"),
        ("select U&'d\\0061t'", "U&'d\\0061t'"),
        ("select B'101'", "B'101'"),
        ("select x'1F'", "x'1F'"),
        ("select N'abc'", "N'abc'"),
        ("select $$a'b$$", "$$a'b$$"),
        ("select $tag$a$b$$tag$", "$tag$a$b$$tag$"),
        ("select $é$x$é$", "$é$x$é$"),
        ("select 1.5e-3", "1.5e-3"),
        ("select .5", ".5"),
        ("select 0x1F", "0x1F"),
        ("select 1_000", "1_000"),
    ],
)
def test_literals_are_one_opaque_token(sql: str, literal: str) -> None:
    assert kinds_and_texts(sql) == [[(WORD, "select"), (LIT, literal)]]


def test_prefix_letters_inside_words_do_not_start_strings() -> None:
    # "type'x'" is the word type and then a string; "xe" is a word, not E'...'.
    assert kinds_and_texts("select type'x', xe'y'") == [
        [(WORD, "select"), (WORD, "type"), (LIT, "'x'"), (OP, ","), (WORD, "xe"), (LIT, "'y'")]
    ]


def test_dollar_rules() -> None:
    assert kinds_and_texts("select $1, $12, $a$x$a$, a$1, $") == [
        [
            (WORD, "select"),
            (PARAM, "$1"),
            (OP, ","),
            (PARAM, "$12"),
            (OP, ","),
            (LIT, "$a$x$a$"),
            (OP, ","),
            (WORD, "a$1"),
            (OP, ","),
            (OP, "$"),
        ]
    ]
    # A tag cannot start with a digit: "$1$" is a parameter and then a lone "$".
    assert kinds_and_texts("select $1$") == [[(WORD, "select"), (PARAM, "$1"), (OP, "$")]]
    # A dollar quote ends only at the same tag; tags are case-sensitive.
    assert kinds_and_texts("select $A$ $a$ ; $A$") == [[(WORD, "select"), (LIT, "$A$ $a$ ; $A$")]]


def test_unicode_identifier_escapes_are_decoded() -> None:
    assert kinds_and_texts('select U&"pg\\005fadvisory_lock"(1)') == [
        [(WORD, "select"), (IDENT, "pg_advisory_lock"), (OP, "("), (LIT, "1"), (OP, ")")]
    ]
    assert kinds_and_texts("select u&\"a!0062\\\" UESCAPE '!'") == [
        [(WORD, "select"), (IDENT, "ab\\")]
    ]
    assert kinds_and_texts('select U&"\\+01F600\\\\"') == [
        [(WORD, "select"), (IDENT, "\U0001f600\\")]
    ]
    # Invalid escapes (PostgreSQL rejects the query) keep the raw text.
    assert kinds_and_texts('select U&"\\zz"') == [[(WORD, "select"), (IDENT, "\\zz")]]


@pytest.mark.parametrize(
    "sql",
    [
        "select 'abc; LISTEN x",
        "select E'abc\\'; LISTEN x",
        'select "abc; LISTEN x',
        'select U&"abc; LISTEN x',
        "select $a$ abc; LISTEN x",
        "select 1 /* abc; LISTEN x",
        "select 1 /* a /* b */ c; LISTEN x",
        "select 'a''; LISTEN x",
    ],
)
def test_unterminated_swallows_the_rest(sql: str) -> None:
    statements = split_statements(sql)
    assert len(statements) == 1
    assert statements[0].incomplete
    assert classify(statements[0]) == OTHER


def test_unterminated_comment_alone_is_an_incomplete_empty_statement() -> None:
    first, last = split_statements("select 1; /* never closed")
    assert first.tokens == (Token(WORD, "select", 0, 6), Token(LIT, "1", 7, 8))
    assert not first.incomplete
    assert last.tokens == ()
    assert last.incomplete
    (only_one,) = split_statements("/* never closed")
    assert only_one.tokens == ()
    assert only_one.incomplete


def test_standard_conforming_strings_off() -> None:
    # With standard_conforming_strings=off, \' escapes a quote inside '...'.
    sql = "select 'a\\'; listen x; select ''"
    assert len(split_statements(sql)) == 3
    assert len(split_statements(sql, standard_conforming_strings=False)) == 1
    # ... and the reverse: a string that scs=on reads as one literal.
    sql = "select '\\'' ; listen x; --'"
    assert [e.kind for e in scan(sql)] == [EffectKind.OTHER]
    assert [e.kind for e in scan(sql, standard_conforming_strings=False)] == [
        EffectKind.OTHER,
        EffectKind.PIN,
    ]
    # E'' strings are the same either way; U&'' and B'' never take backslash escapes.
    assert len(split_statements("select E'\\'';", standard_conforming_strings=False)) == 1
    assert len(split_statements("select U&'\\'; select 1", standard_conforming_strings=False)) == 2


# --- the classifier -------------------------------------------------------------------------

EXAMPLES: list[tuple[str, StatementEffect]] = [
    # temporary objects
    ("CREATE TEMP TABLE t (a int)", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMPORARY TABLE t AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("create global temporary table t (a int)", pin(PinReason.TEMP_OBJECT)),
    ("create local temp table t (a int)", pin(PinReason.TEMP_OBJECT)),
    ("create temp unlogged table t (a int)", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP SEQUENCE s", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP VIEW v AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP TABLE t (a int) ON COMMIT PRESERVE ROWS", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP TABLE t (a int) ON COMMIT DROP", OTHER),
    ("create temp table t on commit drop as select 1", OTHER),
    ("create temp table t as select 1 from a join b on commit drop", pin(PinReason.TEMP_OBJECT)),
    ("CREATE TEMP TABLE t (CHECK ((ON) = 1))", pin(PinReason.TEMP_OBJECT)),
    ("SELECT * INTO TEMP TABLE t FROM generate_series(1, 3)", pin(PinReason.TEMP_OBJECT)),
    ("SELECT 1 AS a INTO TEMPORARY t", pin(PinReason.TEMP_OBJECT)),
    ("SELECT 1 INTO LOCAL TEMP t", pin(PinReason.TEMP_OBJECT)),
    ('SELECT 1 INTO TEMP "T"', pin(PinReason.TEMP_OBJECT)),
    ("WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x", pin(PinReason.TEMP_OBJECT)),
    ("SELECT 1 INTO t", OTHER),
    ("INSERT INTO temp VALUES (1)", OTHER),  # a table called "temp"
    ("INSERT INTO temp (a) VALUES (1)", OTHER),
    ("INSERT INTO temp SELECT 1", OTHER),
    ("INSERT INTO temp.t VALUES (1)", OTHER),  # a schema called "temp"
    ("CREATE TABLE pg_temp.t (a int)", pin(PinReason.TEMP_OBJECT)),
    ('CREATE VIEW "pg_temp".v AS SELECT 1', pin(PinReason.TEMP_OBJECT)),
    ("create table pg_temp_3.t (a int)", pin(PinReason.TEMP_OBJECT)),
    ("SELECT * FROM pg_temp.t", pin(PinReason.TEMP_OBJECT)),
    ("SELECT pg_temp, pg_temporary.x FROM t", OTHER),
    ("CREATE TABLE t (a int)", OTHER),
    ("CREATE UNLOGGED TABLE t (a int)", OTHER),
    ("DROP TABLE t", OTHER),
    # cursors
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", pin(PinReason.CURSOR_WITH_HOLD, "c")),
    (
        'declare "C" binary insensitive no scroll cursor with hold for select 1',
        pin(PinReason.CURSOR_WITH_HOLD, "C"),
    ),
    ("DECLARE c CURSOR FOR SELECT 1", OTHER),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", OTHER),
    ("DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold", OTHER),
    ("CLOSE c", unpin(StateKind.CURSOR, "c")),
    ("CLOSE ALL", unpin(StateKind.CURSOR)),
    ('CLOSE "all"', unpin(StateKind.CURSOR, "all")),
    # LISTEN
    ("LISTEN channel", pin(PinReason.LISTEN, "channel")),
    ('listen "Channel"', pin(PinReason.LISTEN, "Channel")),
    ("UNLISTEN channel", unpin(StateKind.LISTEN, "channel")),
    ("UNLISTEN *", unpin(StateKind.LISTEN)),
    ("NOTIFY channel, 'x'", OTHER),
    # advisory locks
    ("SELECT pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT pg_advisory_lock_shared(1)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT pg_try_advisory_lock(1, 2)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT pg_try_advisory_lock_shared (42)", pin(PinReason.ADVISORY_LOCK)),
    ("select 1, PG_ADVISORY_LOCK(7)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT pg_catalog.pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    ('SELECT "pg_advisory_lock"(1)', pin(PinReason.ADVISORY_LOCK)),
    ("SELECT * FROM pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    ("UPDATE t SET a = 1 WHERE pg_try_advisory_lock(id)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT pg_advisory_lock /* c */ (1)", pin(PinReason.ADVISORY_LOCK)),
    ('SELECT "PG_ADVISORY_LOCK"(1)', OTHER),  # a different (quoted) name
    ("SELECT pg_advisory_lock FROM t", OTHER),  # a column, not a call
    ("SELECT 'pg_advisory_lock(1)'", OTHER),
    ("SELECT pg_advisory_xact_lock(1)", OTHER),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", OTHER),
    ("SELECT pg_advisory_unlock(1)", OTHER),
    ("SELECT pg_advisory_unlock_all()", unpin(StateKind.ADVISORY_LOCK)),
    ("SELECT pg_advisory_unlock_all(), pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    # LOAD, PREPARE
    ("LOAD 'auto_explain'", pin(PinReason.LOAD)),
    ("PREPARE q AS SELECT 1", pin(PinReason.PREPARE, "q")),
    ("prepare q (int) as select $1", pin(PinReason.PREPARE, "q")),
    ("PREPARE q AS SELECT pg_advisory_lock($1)", pin(PinReason.PREPARE, "q")),
    ("PREPARE transaction AS SELECT 1", pin(PinReason.PREPARE, "transaction")),
    ("PREPARE TRANSACTION 'gid'", tx(TxCommand.PREPARE_TRANSACTION)),
    ("EXECUTE q(1)", OTHER),
    ("DEALLOCATE q", unpin(StateKind.PREPARED_STATEMENT, "q")),
    ("DEALLOCATE PREPARE q", unpin(StateKind.PREPARED_STATEMENT, "q")),
    ("DEALLOCATE ALL", unpin(StateKind.PREPARED_STATEMENT)),
    ("deallocate prepare all", unpin(StateKind.PREPARED_STATEMENT)),
    # DISCARD
    ("DISCARD ALL", unpin(StateKind.ALL)),
    ("DISCARD TEMP", unpin(StateKind.TEMP_OBJECT)),
    ("DISCARD TEMPORARY", unpin(StateKind.TEMP_OBJECT)),
    ("DISCARD PLANS", unpin(StateKind.CACHED_PLANS)),
    ("DISCARD SEQUENCES", unpin(StateKind.SEQUENCE_STATE)),
    ("DISCARD", OTHER),
    # identity
    ("SET ROLE app_admin", pin(PinReason.ROLE)),
    ("SET SESSION ROLE app_admin", pin(PinReason.ROLE)),
    ("SET ROLE NONE", pin(PinReason.ROLE)),
    ("SET role = 'x'", pin(PinReason.ROLE)),
    ("RESET ROLE", pin(PinReason.ROLE)),
    ("SET SESSION AUTHORIZATION alice", pin(PinReason.SESSION_AUTHORIZATION)),
    ("SET SESSION SESSION AUTHORIZATION DEFAULT", pin(PinReason.SESSION_AUTHORIZATION)),
    ("set session_authorization = 'alice'", pin(PinReason.SESSION_AUTHORIZATION)),
    ("RESET SESSION AUTHORIZATION", pin(PinReason.SESSION_AUTHORIZATION)),
    ("RESET session_authorization", pin(PinReason.SESSION_AUTHORIZATION)),
    ("SET LOCAL ROLE app_admin", LOCAL),
    ("SET LOCAL SESSION AUTHORIZATION alice", LOCAL),
    # session SET / RESET
    ("SET search_path TO app, public", session_set("search_path", "app, public")),
    ("set search_path = app", session_set("search_path", "app")),
    ("SET SESSION search_path TO app", session_set("search_path", "app")),
    ('SET "Search_Path" TO "App"', session_set("search_path", '"App"')),
    ("SET statement_timeout = 0", session_set("statement_timeout", "0")),
    ("SET statement_timeout TO DEFAULT", session_set("statement_timeout", None)),
    ("SET work_mem = '64MB' /* trailing */", session_set("work_mem", "'64MB'")),
    ("SET x.y = 1", session_set("x.y", "1")),
    ('SET "x" . "Y" TO on', session_set("x.y", "on")),
    ("SET application_name = 'billing'", session_set("application_name", "'billing'")),
    ("SET DateStyle = ISO, MDY", session_set("datestyle", "ISO, MDY")),
    ("SET TIME ZONE 'Europe/Paris'", session_set("timezone", "'Europe/Paris'")),
    (
        "SET TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE",
        session_set("timezone", "INTERVAL '+00:00' HOUR TO MINUTE"),
    ),
    ("SET TIME ZONE LOCAL", session_set("timezone", None)),
    ("SET TIME ZONE DEFAULT", session_set("timezone", None)),
    ("SET TimeZone = 'UTC'", session_set("timezone", "'UTC'")),
    ("SET NAMES 'UTF8'", session_set("client_encoding", "'UTF8'")),
    ("SET NAMES", session_set("client_encoding", None)),
    ("SET SCHEMA 'app'", session_set("search_path", "'app'")),
    ("SET XML OPTION DOCUMENT", session_set("xmloption", "DOCUMENT")),
    ("RESET search_path", session_set("search_path", None)),
    ("RESET x.y", session_set("x.y", None)),
    ("RESET TIME ZONE", session_set("timezone", None)),
    ("RESET ALL", session_set(None, None)),
    ("SET work_mem FROM CURRENT", pin(PinReason.SET_FROM_CURRENT)),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        pin(PinReason.SESSION_CHARACTERISTICS),
    ),
    ("SET", pin(PinReason.UNRECOGNISED_SET)),
    ("SET search_path", pin(PinReason.UNRECOGNISED_SET)),
    ("SET search_path TO", pin(PinReason.UNRECOGNISED_SET)),
    ("SET 'x' = 1", pin(PinReason.UNRECOGNISED_SET)),
    ("RESET", pin(PinReason.UNRECOGNISED_SET)),
    ("RESET a b", pin(PinReason.UNRECOGNISED_SET)),
    # transaction-scoped settings
    ("SET LOCAL search_path TO app", LOCAL),
    ("set local statement_timeout = '1s'", LOCAL),
    ("SET LOCAL x.y = 1", LOCAL),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", LOCAL),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", LOCAL),
    ("SET CONSTRAINTS ALL DEFERRED", LOCAL),
    ("RESET TRANSACTION ISOLATION LEVEL", LOCAL),
    # set_config
    # the name, when literal, lets the session ledger replay it instead of pinning
    ("SELECT set_config('search_path', 'app', false)", pin(PinReason.SET_CONFIG, "search_path")),
    ("SELECT set_config('search_path', 'app', FALSE)", pin(PinReason.SET_CONFIG, "search_path")),
    ("SELECT set_config('search_path', 'app', 'off')", pin(PinReason.SET_CONFIG, "search_path")),
    ("SELECT set_config('search_path', 'app', $1)", pin(PinReason.SET_CONFIG, "search_path")),
    (
        "SELECT set_config('search_path', 'app', true::bool)",
        pin(PinReason.SET_CONFIG, "search_path"),
    ),
    ("SELECT set_config('search_path', 'app')", pin(PinReason.SET_CONFIG, "search_path")),
    ("SELECT set_config('search_path', 'app', true", pin(PinReason.SET_CONFIG, "search_path")),
    ("SELECT pg_catalog.set_config('a', 'b', false)", pin(PinReason.SET_CONFIG, "a")),
    ("SELECT set_config('search_path', 'app', true)", OTHER),
    ("SELECT set_config('search_path', 'app', TRUE)", OTHER),
    ("SELECT set_config('a', concat('b', 'c'), 'on')", OTHER),
    ("SELECT set_config('a', 'b', ' Tr ')", OTHER),
    ("SELECT set_config('a', 'b', 'y')", OTHER),
    ("SELECT set_config('a', 'b', '1')", OTHER),
    (
        "SELECT set_config('a', 'b', true), set_config('c', 'd', false)",
        pin(PinReason.SET_CONFIG, "c"),
    ),
    ("SELECT set_config FROM t", OTHER),
    ("SELECT set_config('a', 'b', false), set_config('c', 'd', false)", pin(PinReason.SET_CONFIG)),
    ("SELECT set_config(x, 'b', false) FROM t", pin(PinReason.SET_CONFIG)),
    ("SELECT set_config('a', 'b', false), pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    ("SELECT current_setting('search_path')", OTHER),
    # transaction control
    ("BEGIN", tx(TxCommand.BEGIN)),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", tx(TxCommand.BEGIN)),
    ("START TRANSACTION READ ONLY", tx(TxCommand.BEGIN)),
    ("COMMIT", tx(TxCommand.COMMIT)),
    ("COMMIT AND CHAIN", tx(TxCommand.COMMIT)),
    ("END", tx(TxCommand.COMMIT)),
    ("ROLLBACK", tx(TxCommand.ROLLBACK)),
    ("ABORT", tx(TxCommand.ROLLBACK)),
    ("ROLLBACK TO SAVEPOINT s", tx(TxCommand.ROLLBACK_TO_SAVEPOINT)),
    ("ROLLBACK WORK TO s", tx(TxCommand.ROLLBACK_TO_SAVEPOINT)),
    ("SAVEPOINT s", tx(TxCommand.SAVEPOINT)),
    ("RELEASE SAVEPOINT s", tx(TxCommand.RELEASE_SAVEPOINT)),
    ("COMMIT PREPARED 'gid'", tx(TxCommand.COMMIT_PREPARED)),
    ("ROLLBACK PREPARED 'gid'", tx(TxCommand.ROLLBACK_PREPARED)),
    # EXPLAIN runs (with ANALYZE) the statement it explains
    ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", pin(PinReason.TEMP_OBJECT)),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT 1 INTO TEMP t", pin(PinReason.TEMP_OBJECT)),
    ("EXPLAIN ANALYZE VERBOSE SELECT pg_advisory_lock(1)", pin(PinReason.ADVISORY_LOCK)),
    ("EXPLAIN SELECT 1", OTHER),
    ("EXPLAIN", OTHER),
    # everything else
    ("SELECT 1", OTHER),
    ("UPDATE t SET col = 1", OTHER),
    ("ALTER ROLE r SET search_path = app", OTHER),
    ("CREATE FUNCTION f() RETURNS int SET search_path = app AS 'select 1' LANGUAGE sql", OTHER),
    ("DO $$BEGIN PERFORM pg_advisory_lock(1); END$$", OTHER),  # invisible (see docs)
    ("CALL p()", OTHER),
    ("COPY t TO STDOUT", OTHER),
    ("COPY (SELECT pg_advisory_lock(1)) TO STDOUT", pin(PinReason.ADVISORY_LOCK)),
    ('"LISTEN" x', OTHER),
    ("$1", OTHER),
    ("(", OTHER),
]


@pytest.mark.parametrize(("sql", "expected"), EXAMPLES, ids=[sql for sql, _ in EXAMPLES])
def test_classify(sql: str, expected: StatementEffect) -> None:
    assert effect(sql) == expected


def test_unicode_escapes_cannot_hide_a_function_name() -> None:
    assert effect('SELECT U&"pg\\005fadvisory\\005flock"(1)') == pin(PinReason.ADVISORY_LOCK)
    assert effect("SELECT U&\"set!005fconfig\" UESCAPE '!' ('a', 'b', false)") == pin(
        PinReason.SET_CONFIG, "a"
    )
    assert effect('CREATE TABLE U&"pg\\005ftemp".t (a int)') == pin(PinReason.TEMP_OBJECT)


def test_scan_classifies_every_statement() -> None:
    assert scan("BEGIN; SET search_path = app; LISTEN x; COMMIT") == [
        tx(TxCommand.BEGIN),
        session_set("search_path", "app"),
        pin(PinReason.LISTEN, "x"),
        tx(TxCommand.COMMIT),
    ]


# --- properties ------------------------------------------------------------------------------

#: Text that would pin (or unpin) if it were outside quotes and comments.
DANGEROUS = [
    "LISTEN x; PREPARE q AS SELECT 1",
    "; LISTEN x;",
    "SET ROLE admin",
    ";SET search_path = evil;",
    "CREATE TEMP TABLE t (a int);",
    "SELECT pg_advisory_lock(1)",
    "set_config('a', 'b', false)",
    "; DISCARD ALL; UNLISTEN *;",
    "' ; LISTEN x ; '",
    '" ; LISTEN x ; "',
    "$$ ; LISTEN x ; $$",
    "$q ; LISTEN x",
    "*/ LISTEN x /*",
    "/* ; LISTEN x */",
    "-- \n LISTEN x\n",
    "E'\\' ; LISTEN x",
    "\\'; LISTEN x; --",
    "INTO TEMP t",
    "pg_temp.t",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    'U&"pg\\005fadvisory_lock"(1)',
]

payloads = st.lists(
    st.one_of(st.sampled_from(DANGEROUS), st.text(max_size=8)), min_size=1, max_size=4
).map(" ".join)


def _contain(kind: str, payload: str) -> str:
    """``payload`` made harmless inside one kind of quote or comment."""
    if kind == "string":
        return "'" + payload.replace("'", "''") + "'"
    if kind == "escape":
        return "E'" + payload.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind == "unicode":
        return "U&'" + payload.replace("'", "''") + "'"
    if kind == "bits":
        return "B'" + payload.replace("'", "''") + "'"
    if kind == "national":
        return "n'" + payload.replace("'", "''") + "'"
    if kind == "dollar":
        return "$q$" + payload.replace("$q$", "$Q$") + "$q$"
    if kind == "empty_dollar":
        return "$$" + payload.replace("$", "") + "$$"
    if kind == "ident":
        return '"' + (payload.replace('"', '""') or "x") + '"'
    if kind == "line":
        return "-- " + payload.replace("\n", " ").replace("\r", " ") + "\n"
    if kind == "block":
        return "/* " + payload.replace("/*", "/ *").replace("*/", "* /") + " */"
    assert kind == "nested"
    inner = payload.replace("/*", "/ *").replace("*/", "* /")
    return f"/* {inner} /* {inner} */ {inner} */"


CONTAINERS = [
    "string",
    "escape",
    "unicode",
    "bits",
    "national",
    "dollar",
    "empty_dollar",
    "ident",
    "line",
    "block",
    "nested",
]
BENIGN = [
    "SELECT {0}",
    "SELECT a, {0} FROM t WHERE b = 1",
    "UPDATE t SET a = {0} WHERE b = 1",
    "INSERT INTO t (a) VALUES ({0})",
    "DELETE FROM t WHERE a = {0}",
    "SELECT {0} FROM t {0}",
    "{0} SELECT 1",
    "SELECT 1 {0}",
]


@st.composite
def benign_statement(draw: st.DrawFn) -> str:
    template = draw(st.sampled_from(BENIGN))
    kind = draw(st.sampled_from(CONTAINERS))
    contained = _contain(kind, draw(payloads))
    if kind in ("line", "block", "nested"):
        contained = " " + contained + " 1 "  # a comment needs a value next to it
    return template.format(contained)


@given(sql=benign_statement())
def test_quoted_and_commented_text_never_matters(sql: str) -> None:
    statements = split_statements(sql)
    assert len(statements) == 1
    assert not statements[0].incomplete
    assert classify(statements[0]) == OTHER


@given(
    statements=st.lists(benign_statement(), min_size=1, max_size=6),
    separators=st.lists(st.sampled_from([";", "; ", " ;\n", ";\t\r\n", ";;"]), min_size=6),
)
def test_splitting_gives_back_the_statements(statements: list[str], separators: list[str]) -> None:
    sql = "".join(s + sep for s, sep in zip(statements, separators, strict=False))
    found = split_statements(sql)
    assert len(found) == len(statements)
    assert [s.text for s in found] == [s.strip() for s in statements]


SOUP = [
    "'",
    "''",
    "\\",
    "E'",
    "U&'",
    'U&"',
    "B'",
    '"',
    '""',
    "$$",
    "$a$",
    "$1",
    "a$",
    "--",
    "/*",
    "*/",
    "\n",
    " ",
    ";",
    "(",
    ")",
    ",",
    ".",
    "=",
    "UESCAPE",
    "'!'",
    "LISTEN x",
    "SET",
    "RESET",
    "ROLE",
    "TO",
    "DEFAULT",
    "CREATE",
    "TEMP",
    "INTO",
    "pg_temp",
    "set_config",
    "pg_advisory_lock",
    "true",
    "DECLARE",
    "WITH",
    "HOLD",
    "FOR",
    "EXPLAIN",
    "(ANALYZE)",
    "ON COMMIT DROP",
    "PREPARE",
    "TRANSACTION",
    "DISCARD",
    "ALL",
    "x",
    "1",
]
garbage = st.one_of(st.text(), st.lists(st.sampled_from(SOUP), max_size=30).map("".join))


@given(sql=garbage, standard=st.booleans())
def test_any_text_scans_without_error(sql: str, standard: bool) -> None:
    statements = split_statements(sql, standard_conforming_strings=standard)
    previous_end = 0
    for statement in statements:
        assert previous_end <= statement.start <= statement.end <= len(sql)
        previous_end = statement.end
        last = statement.start
        for token in statement.tokens:
            assert statement.start <= last <= token.start < token.end <= statement.end
            last = token.end
        assert isinstance(classify(statement), StatementEffect)
    assert all(not s.incomplete for s in statements[:-1])


CASE_EXAMPLES = [
    sql
    for sql, expected in EXAMPLES
    if "'" not in sql and '"' not in sql and "$" not in sql and expected.setting is None
]


@given(
    sql=st.sampled_from(CASE_EXAMPLES),
    flips=st.lists(st.booleans(), min_size=200, max_size=200),
)
def test_keywords_are_case_insensitive(sql: str, flips: list[bool]) -> None:
    flipped = "".join(c.swapcase() if flip else c for c, flip in zip(sql, flips, strict=False))
    flipped += sql[len(flips) :]
    assert effect(flipped) == effect(sql)


@given(
    sql=st.sampled_from([sql for sql, e in EXAMPLES if e.setting is not None]),
    upper=st.booleans(),
)
def test_setting_names_are_case_insensitive(sql: str, upper: bool) -> None:
    changed = sql.upper() if upper else sql.lower()
    setting, expected = effect(changed).setting, effect(sql).setting
    assert setting is not None
    assert expected is not None
    assert setting.name == expected.name
    assert (setting.value is None) == (expected.value is None)
