"""The interim, conservative pin detector: which statements leave session state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._session.pinning import (
    TRACKED_PARAMETERS,
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
    "DISCARD TEMP",
    "SELECT set_config('search_path', 'app', false)",
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
        ("DISCARD ALL", "DISCARD"),
        ("SET search_path = a", "SET search_path"),
        ("SET ROLE r", "SET role"),
        ("SET SESSION AUTHORIZATION a", "SET authorization"),
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


# --- known gaps (the detector is meant to err on the side of pinning) -------------------

MISSED = "BUG: the interim detector misses this session-state statement (no pin)"


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(
            "/* outer /* nested */ still comment */ PREPARE q AS SELECT 1",
            marks=pytest.mark.xfail(strict=True, reason=MISSED + ": nested block comment"),
            id="nested-comment",
        ),
        pytest.param(
            "/* a; b */ LISTEN x",
            marks=pytest.mark.xfail(
                strict=True, reason=MISSED + ": ';' inside a leading block comment"
            ),
            id="semicolon-in-comment",
        ),
        pytest.param(
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            marks=pytest.mark.xfail(strict=True, reason=MISSED + ": CREATE OR REPLACE TEMP"),
            id="create-or-replace-temp",
        ),
        pytest.param(
            "SELECT * INTO TEMP TABLE t FROM generate_series(1, 3)",
            marks=pytest.mark.xfail(strict=True, reason=MISSED + ": SELECT INTO TEMP"),
            id="select-into-temp",
        ),
        pytest.param(
            "CREATE TABLE pg_temp.t (a int)",
            marks=pytest.mark.xfail(strict=True, reason=MISSED + ": pg_temp schema"),
            id="pg-temp-schema",
        ),
    ],
)
def test_known_gaps_should_pin(sql: str) -> None:
    assert pin_reason_for_query(sql) is not None
