"""The pinning policy: which statements pin a client to its server connection.

``pinning.py`` decides from ``sqlscan``'s classification (test_sqlscan.py covers the lexer and
every classification rule); these tests pin down the policy on top: tracked parameters are
replayed rather than pinned, unterminated text pins, both readings of backslashes count, and
the fast path (pre-filter, cache) answers exactly like the slow one.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._session.pinning import (
    TRACKED_PARAMETERS,
    UNTERMINATED,
    _pin_reason_unfiltered,
    pin_reason_for_parse,
    pin_reason_for_query,
)

PINS = [
    "PREPARE q AS SELECT 1",
    "prepare q (int) as select $1",
    "LISTEN channel",
    'listen "Channel"',
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "declare c scroll cursor with  hold for select 1",
    "CREATE TEMP TABLE t (a int)",
    "CREATE TEMPORARY TABLE t AS SELECT 1",
    "CREATE TEMPORARY VIEW v AS SELECT 1",
    "CREATE GLOBAL TEMPORARY TABLE t (a int)",
    "create local temp sequence s",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock(1, 2)",
    "SELECT pg_advisory_lock_shared (42)",
    "select 1, PG_ADVISORY_LOCK(7)",
    "LOAD 'auto_explain'",
    "SET search_path TO app, public",
    "set search_path = app",
    "SET SESSION search_path TO app",
    "RESET search_path",
    "SET ROLE app_admin",
    "SET SESSION ROLE app_admin",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION alice",
    "SET statement_timeout = 0",
    'SET "search_path" TO app',
    "DISCARD ALL",
    "RESET ALL",
    "SELECT set_config('search_path', 'app', false)",
    "SELECT set_config('application_name', 'app', false)",  # conservative: set_config pins
    "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
    "SELECT * INTO TEMP TABLE t FROM generate_series(1, 3)",
    "CREATE TABLE pg_temp.t (a int)",
    "CREATE TEMP TABLE t (a int) ON COMMIT DELETE ROWS",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET search_path FROM CURRENT",
    "SET x.y TO DEFAULT",
    "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)",
    "SELECT 1; LISTEN x",
    "BEGIN; SET search_path = app; COMMIT",
]

DOES_NOT_PIN = [
    "SELECT 1",
    "select * from t where a = 'PREPARE'",
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET col = 1",
    "UPDATE t SET col = 1 WHERE x IN (SELECT 1)",
    "DELETE FROM t",
    "SET LOCAL x.y = 1",
    "SET LOCAL search_path TO app",
    "set local statement_timeout = '1s'",
    "SET application_name = 'billing'",
    "SET application_name TO 'billing'",
    "SET SESSION application_name = 'billing'",
    'SET "application_name" = x',
    "RESET application_name",
    "SET TimeZone = 'UTC'",
    "SET DateStyle = ISO",
    "SET client_encoding = 'UTF8'",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "BEGIN; SELECT 1; COMMIT",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "CREATE TABLE t (a int)",
    "SELECT pg_advisory_xact_lock(1)",
    "PREPARE TRANSACTION 'gid'",
    "COMMIT PREPARED 'gid'",
    "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
    "SET TIME ZONE 'UTC'",
    "SET NAMES 'UTF8'",
    "RESET TimeZone",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('search_path', 'app', true)",
    # Removing state never needs a pin (and a client that holds state is pinned already).
    "DISCARD TEMP",
    "DISCARD PLANS",
    "DEALLOCATE ALL",
    "UNLISTEN *",
    "CLOSE ALL",
    "SELECT pg_advisory_unlock_all()",
    "NOTIFY channel",
    "EXECUTE q",
    "INSERT INTO temp VALUES (1)",
    "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
    "",
    "   ",
    ";;",
    "-- just a comment",
    "/* just a comment */",
]


@pytest.mark.parametrize("sql", PINS)
def test_pins(sql: str) -> None:
    assert pin_reason_for_query(sql) is not None


@pytest.mark.parametrize("sql", DOES_NOT_PIN)
def test_does_not_pin(sql: str) -> None:
    assert pin_reason_for_query(sql) is None


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("PREPARE q AS SELECT 1", "SQL PREPARE"),
        ("LISTEN x", "LISTEN"),
        ("LOAD 'x'", "LOAD"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor WITH HOLD"),
        ("CREATE TEMP TABLE t (a int)", "temporary object"),
        ("SELECT pg_advisory_lock(1)", "advisory lock"),
        ("DISCARD ALL", "DISCARD ALL"),
        ("RESET ALL", "RESET ALL"),
        ("SET search_path = a", "SET search_path"),
        ("SET SEARCH_PATH TO DEFAULT", "RESET search_path"),
        ("RESET search_path", "RESET search_path"),
        ("SET SCHEMA 'app'", "SET search_path"),
        ("SET ROLE r", "SET ROLE"),
        ("SET SESSION AUTHORIZATION a", "SET SESSION AUTHORIZATION"),
        ("SELECT set_config('a', 'b', false)", "set_config"),
        ("SELECT 'unterminated; LISTEN x", UNTERMINATED),
        ("SELECT 1; LISTEN x; SET ROLE r", "LISTEN"),
    ],
)
def test_reasons(sql: str, reason: str) -> None:
    assert pin_reason_for_query(sql) == reason


@pytest.mark.parametrize(
    "sql",
    [
        "-- comment\nPREPARE q AS SELECT 1",
        "/* comment */ LISTEN x",
        "/* multi\nline */\n\tDISCARD ALL",
        "-- one\n-- two\n/* three */ SET search_path = a",
        "SELECT 1; -- next\nLISTEN x",
        "SELECT 1; /* next */ CREATE TEMP TABLE t (a int)",
    ],
)
def test_leading_comments_are_skipped(sql: str) -> None:
    assert pin_reason_for_query(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "-- SET search_path = a\nSELECT 1",
        "/* LISTEN x */ SELECT 1",
        "/* PREPARE */ -- DISCARD\n UPDATE t SET a = 1",
    ],
)
def test_commented_out_statements_do_not_pin(sql: str) -> None:
    assert pin_reason_for_query(sql) is None


@pytest.mark.parametrize("name", sorted(TRACKED_PARAMETERS))
def test_tracked_parameters_do_not_pin(name: str) -> None:
    assert pin_reason_for_query(f"SET {name} = 'x'") is None
    assert pin_reason_for_query(f"SET {name.upper()} TO DEFAULT") is None


def test_named_parse_pins_unnamed_does_not() -> None:
    assert pin_reason_for_parse("") is None
    assert pin_reason_for_parse("stmt_1") == "named prepared statement"


@given(sql=st.text(max_size=80))
def test_random_sql_never_crashes(sql: str) -> None:
    reason = pin_reason_for_query(sql)
    assert reason is None or isinstance(reason, str)


@given(
    prefix=st.sampled_from(["", "SELECT 1; ", "/* c */ ", "-- c\n", "  \n"]),
    sql=st.sampled_from(PINS),
)
def test_pins_after_any_prefix(prefix: str, sql: str) -> None:
    assert pin_reason_for_query(prefix + sql) is not None


# --- formerly known gaps of the interim detector (regex + split on ';') ---------------------


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(
            "/* outer /* nested */ still comment */ PREPARE q AS SELECT 1", id="nested-comment"
        ),
        pytest.param("/* a; b */ LISTEN x", id="semicolon-in-comment"),
        pytest.param("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", id="create-or-replace-temp"),
        pytest.param(
            "SELECT * INTO TEMP TABLE t FROM generate_series(1, 3)", id="select-into-temp"
        ),
        pytest.param("CREATE TABLE pg_temp.t (a int)", id="pg-temp-schema"),
        pytest.param("SELECT ';'; LISTEN x", id="semicolon-in-literal"),
        pytest.param("SELECT $$;$$; LISTEN x", id="semicolon-in-dollar-quote"),
        pytest.param('SELECT U&"pg\\005fadvisory_lock"(1)', id="unicode-escaped-name"),
    ],
)
def test_former_gaps_pin(sql: str) -> None:
    assert pin_reason_for_query(sql) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'LISTEN x; SET ROLE r'",
        "SELECT $$ ; LISTEN x; $$",
        "SELECT 1 -- ; LISTEN x",
        "SELECT 1 /* ; LISTEN x */",
        'SELECT 1 AS "; LISTEN x"',
    ],
)
def test_quoted_statements_do_not_pin(sql: str) -> None:
    assert pin_reason_for_query(sql) is None


# --- backslashes: both readings count ---------------------------------------------------------


def test_backslash_in_a_plain_string_is_read_both_ways() -> None:
    # standard_conforming_strings=on (the default): one string, no LISTEN. With it off,
    # \' is an escaped quote and LISTEN runs. The proxy cannot be sure of the setting: pin.
    sql = "SELECT '\\'' ; LISTEN x; --'"
    assert pin_reason_for_query(sql) == "LISTEN"
    # And the other way round: off reads one string, on reads a LISTEN.
    assert pin_reason_for_query("SELECT 'a\\'; LISTEN x; SELECT ''") == "LISTEN"
    # E'' strings read the same either way.
    assert pin_reason_for_query("SELECT E'a\\' ; LISTEN x'") is None


# --- the unterminated rest of a query ---------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SET search_path = 'app",
        "SELECT 'LISTEN x",
        "SELECT $a$ prepare",
        "SELECT 1 /* temp",
        'SELECT "hold',
    ],
)
def test_unterminated_text_pins(sql: str) -> None:
    assert pin_reason_for_query(sql) == UNTERMINATED


def test_unterminated_text_without_any_trigger_word_does_not_pin() -> None:
    # No reading of this text can contain a session-state statement.
    assert pin_reason_for_query("SELECT 'abc") is None


# --- EXCLUDE_VARIABLE_SETS ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "pins"),
    [
        ("SET search_path = app", False),
        ("RESET search_path", False),
        ("RESET ALL", False),
        ("SELECT set_config('search_path', 'app', false)", False),
        ("DISCARD ALL", False),
        ("SET ROLE r", True),
        ("SET SESSION AUTHORIZATION a", True),
        ("LISTEN x", True),
        ("SET search_path FROM CURRENT", True),
    ],
)
def test_exclude_variable_sets(sql: str, pins: bool) -> None:
    assert (pin_reason_for_query(sql, exclude_variable_sets=True) is not None) is pins
    assert pin_reason_for_query(sql) is not None


# --- the fast path answers like the slow path ---------------------------------------------------

SOUP = [
    "SET ",
    "reset ",
    "TEMP ",
    "pg_temp.",
    "listen ",
    "PREPARE ",
    "LOAD ",
    "hold ",
    "with ",
    "declare c cursor ",
    "discard all",
    "pg_advisory_lock(1)",
    "set_config('a', 'b', false)",
    "create ",
    "into ",
    "'",
    "\\",
    "$$",
    "/*",
    "*/",
    "--",
    "\n",
    ";",
    '"',
    'U&"',
    "!005f",
    "x",
    "= 1",
    " ",
]


@given(
    sql=st.one_of(
        st.lists(st.sampled_from(SOUP), max_size=20).map("".join),
        st.text(max_size=40),
    ),
    exclude=st.booleans(),
)
def test_prefilter_and_cache_change_nothing(sql: str, exclude: bool) -> None:
    expected = _pin_reason_unfiltered(sql, exclude)
    assert pin_reason_for_query(sql, exclude_variable_sets=exclude) == expected
    assert pin_reason_for_query(sql, exclude_variable_sets=exclude) == expected  # cached


def test_long_queries_are_not_cached_but_answered() -> None:
    sql = "SELECT 1 " + " " * 10_000 + "; LISTEN x"
    assert pin_reason_for_query(sql) == "LISTEN"
    assert pin_reason_for_query("UPDATE t SET a = 1;" * 1000) is None
