"""The session-state ledger: pins, unpins at boundaries, SETs to replay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._session.state import NAMED_STATEMENT, SessionState


def test_listen_and_temp_pin_until_their_state_is_gone() -> None:
    s = SessionState()
    assert s.on_sql("LISTEN a; CREATE TEMP TABLE t (x int)") == ["LISTEN", "temporary object"]
    assert s.pinned
    s.on_sql("UNLISTEN a")
    assert s.pinned  # not before the boundary
    assert s.settle(errors_seen=False) == ["LISTEN"]
    assert s.pinned  # the temp table is still there
    s.on_sql("DISCARD TEMP")
    assert s.settle(errors_seen=False) == ["temporary object"]
    assert not s.pinned


def test_unlisten_all_then_listen_keeps_the_new_channel() -> None:
    s = SessionState()
    s.on_sql("LISTEN a")
    s.on_sql("UNLISTEN *; LISTEN b")
    s.settle(errors_seen=False)
    assert s.pins == {"LISTEN": {"b"}}


def test_an_error_before_the_boundary_keeps_the_pin() -> None:
    s = SessionState()
    s.on_sql("LISTEN a")
    s.on_sql("UNLISTEN a")
    assert s.settle(errors_seen=True) == []
    assert s.pinned
    assert s.pending == []


def test_discard_all_unpins_everything_and_resets_parameters() -> None:
    s = SessionState()
    s.on_sql("PREPARE p AS SELECT 1; SELECT pg_advisory_lock(1)")
    s.on_parse("stmt1", "select 1")
    assert set(s.reasons) == {"SQL PREPARE", "advisory lock", NAMED_STATEMENT}
    s.on_sql("DISCARD ALL")
    assert s.reset_all
    s.settle(errors_seen=False)
    assert not s.pinned


def test_session_sets_are_replayed_not_pinned() -> None:
    s = SessionState()
    assert s.on_sql("SET search_path = app, public; SET statement_timeout TO '5s'") == []
    assert not s.pinned
    assert s.touched == {"search_path", "statement_timeout"}
    assert s.on_sql("SET LOCAL work_mem = '1MB'") == []
    assert s.touched == {"search_path", "statement_timeout"}
    s.on_sql("SET application_name = 'x'")  # tracked through ParameterStatus
    assert "application_name" not in s.touched


def test_set_role_pins() -> None:
    s = SessionState()
    assert s.on_sql("SET ROLE other") != []
    assert s.pinned


def test_named_statements_pin_until_closed() -> None:
    s = SessionState()
    assert s.on_parse("", "select 1") == []
    assert s.on_parse("s1", "select 1") == [NAMED_STATEMENT]
    s.on_parse("s2", "select 2")
    s.on_close_statement("s1")
    assert s.pinned
    s.on_close_statement("s2")
    assert not s.pinned


def test_exclude_variable_sets_filter() -> None:
    s = SessionState(exclude_variable_sets=True)
    s.on_sql("SET search_path = x")
    assert s.touched == set()
    assert not s.pinned


@given(st.text(max_size=200))
def test_text_in_literals_and_comments_never_pins(text: str) -> None:
    s = SessionState()
    quoted = text.replace("'", "''")
    s.on_sql(f"SELECT '{quoted} LISTEN x; PREPARE' /* LISTEN y */ -- DISCARD ALL\n")
    assert not s.pinned
    assert not s.touched
    assert not s.pending


def test_session_set_config_with_a_literal_name_is_replayed() -> None:
    s = SessionState()
    assert s.on_sql("select set_config('search_path', 'x', false)") == []
    assert s.touched == {"search_path"}
    assert not s.pinned
    assert s.on_sql("select set_config('a.b', 'x', true)") == []  # local: nothing
    assert s.on_sql("select set_config(name, 'x', false) from t") == ["set_config"]
    assert s.pinned


def test_rollback_after_an_unpin_keeps_the_pin() -> None:
    s = SessionState()
    s.on_sql("LISTEN a")
    s.on_sql("BEGIN; UNLISTEN *")
    s.on_sql("ROLLBACK")
    assert s.settle(errors_seen=False) == []
    assert s.pinned
    s.on_sql("UNLISTEN *")
    assert s.settle(errors_seen=False) == ["LISTEN"]
