"""Express transactions (trioproxy/_session/express.py): the two predicates, checked
against what the general path's own scanner, tracker and pinning scanner would do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import Backend, Frontend
from trioproxy._protocol.framing import MessageReader, StreamScanner
from trioproxy._protocol.messages import (
    Bind,
    Close,
    Describe,
    Execute,
    Flush,
    Parse,
    Query,
    Sync,
    frame,
)
from trioproxy._server.relay import CLIENT_INSPECT, SERVER_INSPECT
from trioproxy._session.express import express_answer, express_bind, express_query
from trioproxy._session.prepared import ServerStatements, StatementDef, StatementMapper
from trioproxy._session.state import SessionState
from trioproxy._session.tracker import TransactionTracker

LIMIT = 1024 * 1024


def q(sql: str) -> bytes:
    return Query(sql).encode()


def test_plain_selects_are_express() -> None:
    for sql in (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
        "select 1",
        "  \n\tselect now()  ;  ",
        "SELECT * FROM t WHERE name = 'x'",
    ):
        assert express_query(q(sql), LIMIT), sql


def test_anything_else_takes_the_general_path() -> None:
    for sql in (
        "begin",
        "insert into t values (1)",
        "select 1; select 2",
        "select 1; begin",
        "select set_config('search_path', 'x', false)",  # 'set': may change the session
        "select pg_advisory_lock(1)",
        "select * into temp t2 from t",
        "select 'é'",  # not ASCII: decoded the general way
        "/* comment */ select 1",
        "with x as (select 1) select * from x",
    ):
        assert not express_query(q(sql), LIMIT), sql
    one = q("select 1")
    assert not express_query(one + Sync().encode(), LIMIT)  # a second message
    assert not express_query(one[:-1], LIMIT)  # half a message
    assert not express_query(frame(Frontend.QUERY, b"select 1\0x\0"), LIMIT)  # NUL inside
    assert not express_query(Parse("", "select 1").encode(), LIMIT)
    assert not express_query(q("select 1"), 4)  # over max_message_size


def batch(
    sql: str,
    *,
    statement: str = "",
    portal: str = "",
    describe: bool = True,
    max_rows: int = 0,
    types: tuple[int, ...] = (23,),
) -> bytes:
    """The extended batch libpq sends for a query with parameters."""
    return b"".join(
        [
            Parse(statement, sql, types).encode(),
            Bind(portal, statement, (), (b"42",) * len(types), ()).encode(),
            *([Describe(b"P", portal).encode()] if describe else []),
            Execute(portal, max_rows).encode(),
            Sync().encode(),
        ]
    )


def test_the_unnamed_extended_batch_of_a_select_is_express() -> None:
    assert express_query(batch("SELECT abalance FROM pgbench_accounts WHERE aid = $1"), LIMIT)
    assert express_query(batch("select $1::int", describe=False), LIMIT)
    assert express_query(batch("select 1", types=()), LIMIT)


def test_other_extended_batches_take_the_general_path() -> None:
    assert not express_query(batch("select $1", statement="s1"), LIMIT)  # named
    assert not express_query(batch("select $1", portal="p1"), LIMIT)
    assert not express_query(batch("select $1", max_rows=10), LIMIT)  # PortalSuspended
    assert not express_query(batch("begin"), LIMIT)
    assert not express_query(batch("select set_config('a.b', $1, false)"), LIMIT)
    whole = batch("select $1")
    assert not express_query(whole[:-5], LIMIT)  # no Sync
    assert not express_query(whole + Sync().encode(), LIMIT)
    assert not express_query(whole[:-5] + Flush().encode() + Sync().encode(), LIMIT)
    assert not express_query(Close(b"S", "").encode() + whole, LIMIT)
    parse = Parse("", "select $1", (23,)).encode()
    short = parse[:1] + (len(parse) - 5).to_bytes(4, "big") + parse[5:-4]  # a type missing
    assert not express_query(short + whole[len(parse) :], LIMIT)


SQL_PARTS = st.sampled_from(
    [
        "select",
        "SELECT",
        " ",
        "1",
        ",",
        ";",
        "'",
        '"',
        "from t",
        "set",
        "temp",
        "listen",
        "begin",
        "commit",
        "prepare",
        "discard all",
        "pg_advisory_lock(1)",
        "&",
        "--",
        "/*",
        "*/",
        "\\",
        "\n",
        "x",
        "é",
    ]
)


@given(
    st.tuples(
        st.sampled_from(["select ", "SELECT", " \n select", ""]),
        st.lists(SQL_PARTS, max_size=12).map("".join),
    ).map("".join)
)
def test_an_express_query_is_what_the_general_path_would_forward_untouched(sql: str) -> None:
    """Whatever the text: if it is express, the client scanner sees exactly one whole
    Query, and the pinning scanner takes no pin, no pending unpin, no parameter change."""
    request = q(sql)
    if not express_query(request, LIMIT):
        return
    scanner = StreamScanner(inspect=CLIENT_INSPECT)
    assert scanner.feed(request) == [(Frontend.QUERY, request[5:], len(request))]
    assert scanner.at_boundary
    state = SessionState()
    assert state.on_sql(sql) == []
    assert not state.pinned
    assert not state.pending
    assert not state.touched
    assert not state.reset_all
    assert not state.forgets_statements()


ROW_DESCRIPTION = frame(Backend.ROW_DESCRIPTION, b"\0\x01a\0" + bytes(18))
DATA_ROW = frame(Backend.DATA_ROW, b"\0\x01\0\0\0\x011")
COMMAND_COMPLETE = frame(Backend.COMMAND_COMPLETE, b"SELECT 1\0")
ERROR = frame(Backend.ERROR_RESPONSE, b"SERROR\0C22012\0Mdivision by zero\0\0")
NOTICE = frame(Backend.NOTICE_RESPONSE, b"SNOTICE\0C00000\0Mhello\0\0")
EMPTY = frame(Backend.EMPTY_QUERY_RESPONSE, b"")
PARAMETER_STATUS = frame(Backend.PARAMETER_STATUS, b"TimeZone\0UTC\0")
COPY_OUT = frame(Backend.COPY_OUT_RESPONSE, b"\0\0\0")
NOTIFICATION = frame(Backend.NOTIFICATION_RESPONSE, b"\0\0\0\x01chan\0\0")


def ready(status: bytes) -> bytes:
    return frame(Backend.READY_FOR_QUERY, status)


def test_a_whole_answer_ending_idle_is_express() -> None:
    assert express_answer(ROW_DESCRIPTION + DATA_ROW + COMMAND_COMPLETE + ready(b"I"), LIMIT) == 0
    assert express_answer(NOTICE + ERROR + ready(b"I"), LIMIT) == 1
    assert express_answer(EMPTY + ready(b"I"), LIMIT) == 0


def test_any_other_answer_goes_to_the_general_path() -> None:
    body = ROW_DESCRIPTION + DATA_ROW + COMMAND_COMPLETE
    for chunk in (
        body,  # more to come
        body + ready(b"I")[:-1],  # half a ReadyForQuery
        body + ready(b"T"),  # a transaction stays open
        body + ready(b"E"),
        body + ready(b"I") + NOTICE,  # something after the answer
        PARAMETER_STATUS + body + ready(b"I"),  # the relay records these
        COPY_OUT + ready(b"I"),
        NOTIFICATION + body + ready(b"I"),
        b"",
    ):
        assert express_answer(chunk, LIMIT) is None, chunk
    assert express_answer(body + ready(b"I"), 8) is None  # a message over the limit


ANSWER_PARTS = st.sampled_from(
    [
        ROW_DESCRIPTION,
        DATA_ROW,
        COMMAND_COMPLETE,
        ERROR,
        NOTICE,
        EMPTY,
        PARAMETER_STATUS,
        COPY_OUT,
        NOTIFICATION,
        ready(b"I"),
        ready(b"T"),
        ready(b"E"),
    ]
)


@given(
    st.tuples(
        st.lists(ANSWER_PARTS, max_size=8).map(b"".join),
        st.sampled_from([ready(b"I"), ready(b"I"), b""]),
    ).map(b"".join),
    st.integers(0, 40),
)
def test_an_express_answer_leaves_the_tracker_where_release_is_allowed(
    chunk: bytes, cut: int
) -> None:
    """If an answer is express, the general path (scanner and tracker, after one Query)
    ends with nothing owed, no transaction, no COPY, nothing the relay acts on but
    errors, which are counted the same; a cut anywhere makes it not express."""
    chunk_cut = chunk[: max(0, len(chunk) - cut)] if cut else chunk
    errors = express_answer(chunk_cut, LIMIT)
    if errors is None:
        return
    scanner = StreamScanner(inspect=SERVER_INSPECT)
    tracker = TransactionTracker()
    tracker.client_message(Frontend.QUERY)
    scanned = scanner.feed(chunk_cut)
    for type_, body, _end in scanned:
        assert type_ != Backend.PARAMETER_STATUS
        tracker.server_message(type_, body)
    assert scanner.at_boundary
    assert scanned[-1][2] == len(chunk_cut)
    assert tracker.releasable
    assert tracker.errors == errors


@given(
    st.tuples(
        st.sampled_from(["select ", "SELECT", " \n select", ""]),
        st.lists(SQL_PARTS, max_size=12).map("".join),
    ).map("".join),
    st.booleans(),
    st.integers(0, 3),
)
def test_an_express_batch_is_what_the_general_path_would_forward_untouched(
    sql: str, describe: bool, cut: int
) -> None:
    """If an extended batch is express, the client scanner sees its five (or four) whole
    messages, the tracker ends with one answer owed and nothing unsynced, and the pinning
    scanner takes nothing; a cut anywhere makes it not express."""
    request = batch(sql, describe=describe)
    if cut:
        request = request[: -cut * 3]
    if not express_query(request, LIMIT):
        return
    assert not cut
    scanner = StreamScanner(inspect=CLIENT_INSPECT)
    scanned = scanner.feed(request)
    assert scanner.at_boundary
    assert scanned[-1] == (Frontend.SYNC, None, len(request))
    tracker = TransactionTracker()
    for type_, _body, _end in scanned:
        tracker.client_message(type_)
    assert (tracker.owed, tracker.unsynced) == (1, False)
    state = SessionState()
    assert state.on_parse("", sql) == []
    assert not state.pinned
    assert not state.pending
    assert not state.touched


def run_batch(
    statement: str,
    *,
    portal: str = "",
    describe: bytes | None = b"P",
    max_rows: int = 0,
    values: tuple[bytes | None, ...] = (b"42",),
) -> bytes:
    """The batch libpq sends to run a statement prepared under a name."""
    return b"".join(
        [
            Bind(portal, statement, (), values, ()).encode(),
            *([Describe(describe, portal).encode()] if describe else []),
            Execute(portal, max_rows).encode(),
            Sync().encode(),
        ]
    )


def test_the_run_of_a_named_statement_is_an_express_bind() -> None:
    request = run_batch("P0_1")
    found = express_bind(request, LIMIT)
    assert found is not None
    name, start, end = found
    assert name == "P0_1"
    bind = Bind("", "P0_1", (), (b"42",), ()).encode()
    assert (request[:start], end) == (bind[: 5 + len("\0P0_1\0")], len(bind))
    assert express_bind(run_batch("P0_1", describe=None), LIMIT) is not None


def test_other_runs_take_the_general_path() -> None:
    assert express_bind(run_batch(""), LIMIT) is None  # the unnamed statement
    assert express_bind(run_batch("s", portal="p"), LIMIT) is None
    assert express_bind(run_batch("s", max_rows=10), LIMIT) is None
    assert express_bind(run_batch("s", describe=b"S"), LIMIT) is None  # names it again
    whole = run_batch("s")
    assert express_bind(whole[:-5], LIMIT) is None  # no Sync
    assert express_bind(whole + Sync().encode(), LIMIT) is None
    assert express_bind(Parse("s", "select 1").encode() + whole, LIMIT) is None
    assert express_bind(batch("select $1"), LIMIT) is None
    assert express_bind(whole, 8) is None  # over max_message_size
    bad_name = whole.replace(b"\0s\0", b"\0\xff\0", 1)
    assert express_bind(bad_name, LIMIT) is None  # not UTF-8: the general path's error


def test_a_statement_may_go_express_when_its_sql_is_an_express_select() -> None:
    assert StatementDef.from_parse("SELECT abalance FROM a WHERE aid = $1;", (23,)).express
    for sql in ("insert into t values ($1)", "select set_config('a.b', $1, false)", "select 'é'"):
        assert not StatementDef.from_parse(sql, ()).express, sql


@given(
    st.text(min_size=1, max_size=8).filter(lambda s: "\0" not in s),
    st.lists(st.one_of(st.none(), st.binary(max_size=6)), max_size=3).map(tuple),
    st.sampled_from([b"P", None]),
)
def test_an_express_bind_sends_what_the_statement_mapper_would(
    name: str, values: tuple[bytes | None, ...], describe: bytes | None
) -> None:
    """Rewritten for a server connection that holds the statement, an express Bind's
    request is byte for byte what ``LinkedMapper`` makes of it, and every answer to it
    passes the mapper untouched: nothing is swallowed or translated."""
    definition = StatementDef.from_parse("select $1", (23,))
    mapper = StatementMapper({name: definition})
    held = ServerStatements(8)
    held.add(definition.server_name)
    request = run_batch(name, describe=describe, values=values)
    found = express_bind(request, LIMIT)
    assert found is not None
    _name, start, end = found
    express = definition.bind_message(b"", request[start:end]) + request[end:]
    linked = mapper.link(held)
    reader = MessageReader()
    reader.feed(request)
    general = b"".join(
        linked.client_message(m.type, m.body, frame(m.type, m.body)) for m in reader.messages()
    )
    assert express == general
    for answer in (b"2", b"T", b"D", b"C", b"Z"):
        raw = frame(ord(answer), b"")
        assert linked.server_message(ord(answer), raw) == raw
    assert linked.idle
