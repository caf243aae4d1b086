"""Prepared-statement virtualisation: message scripts through the sans-IO mapper."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.codes import Backend
from trioproxy._protocol.framing import MessageReader
from trioproxy._protocol.messages import (
    Bind,
    Close,
    Describe,
    Execute,
    Parse,
    Query,
    Sync,
    decode_frontend,
    frame,
)
from trioproxy._session.prepared import (
    NOOP_CLOSE,
    ServerStatements,
    StatementDef,
    StatementMapper,
    deallocated_name,
)

PC = frame(Backend.PARSE_COMPLETE, b"")
BC = frame(Backend.BIND_COMPLETE, b"")
CC = frame(Backend.CLOSE_COMPLETE, b"")
CMD = frame(Backend.COMMAND_COMPLETE, b"SELECT 1\0")
ROW = frame(Backend.DATA_ROW, b"\0\x01\0\0\0\x011")
ZI = frame(Backend.READY_FOR_QUERY, b"I")
ERR = frame(Backend.ERROR_RESPONSE, b"SERROR\0C42P01\0Mboom\0\0")
PARAMS = frame(Backend.PARAMETER_DESCRIPTION, b"\0\0")
NODATA = frame(Backend.NO_DATA, b"")


def send(linked, *messages) -> list:
    out = b"".join(
        linked.client_message(m[0], m[5:], m) for m in (msg.encode() for msg in messages)
    )
    reader = MessageReader()
    reader.feed(out)
    return [decode_frontend(m) for m in reader.messages()]


def answer(linked, *raws: bytes) -> bytes:
    return b"".join(linked.server_message(raw[0], raw) for raw in raws)


def test_parse_is_renamed_and_bind_follows() -> None:
    mapper, server = StatementMapper(), ServerStatements(10)
    linked = mapper.link(server)
    sent = send(linked, Parse("s1", "select 1"), Bind("", "s1"), Execute(""), Sync())
    server_name = StatementDef.from_parse("select 1", ()).server_name
    assert sent == [Parse(server_name, "select 1"), Bind("", server_name), Execute(""), Sync()]
    assert answer(linked, PC, BC, ROW, CMD, ZI) == PC + BC + ROW + CMD + ZI
    assert server_name in server
    assert linked.idle


def test_a_second_connection_gets_the_parse_injected_and_its_answer_swallowed() -> None:
    mapper = StatementMapper()
    first = mapper.link(ServerStatements(10))
    send(first, Parse("s1", "select 1"), Sync())
    answer(first, PC, ZI)
    other = ServerStatements(10)
    linked = mapper.link(other)
    server_name = mapper.statements["s1"].server_name
    sent = send(linked, Bind("", "s1"), Execute(""), Sync())
    assert sent == [Parse(server_name, "select 1"), Bind("", server_name), Execute(""), Sync()]
    assert answer(linked, PC, BC, ROW, CMD, ZI) == BC + ROW + CMD + ZI
    assert server_name in other


def test_parse_of_a_statement_the_connection_has_becomes_a_noop_close() -> None:
    server = ServerStatements(10)
    a, b = StatementMapper(), StatementMapper()
    send(link := a.link(server), Parse("x", "select 2"), Sync())
    answer(link, PC, ZI)
    linked = b.link(server)
    sent = send(linked, Parse("y", "select 2"), Describe(b"S", "y"), Sync())
    server_name = b.statements["y"].server_name
    assert sent == [Close(b"P", "_trioproxy_noop"), Describe(b"S", server_name), Sync()]
    assert Close(b"P", "_trioproxy_noop").encode() == NOOP_CLOSE
    assert answer(linked, CC, PARAMS, NODATA, ZI) == PC + PARAMS + NODATA + ZI


def test_client_close_keeps_the_shared_server_statement() -> None:
    server = ServerStatements(10)
    mapper = StatementMapper()
    linked = mapper.link(server)
    send(linked, Parse("s", "select 3"), Sync())
    answer(linked, PC, ZI)
    sent = send(linked, Close(b"S", "s"), Sync())
    assert sent == [Close(b"P", "_trioproxy_noop"), Sync()]
    assert answer(linked, CC, ZI) == CC + ZI
    assert "s" not in mapper.statements
    assert len(server) == 1


def test_error_skips_to_sync_and_forgets_an_unfinished_parse() -> None:
    server = ServerStatements(10)
    mapper = StatementMapper()
    linked = mapper.link(server)
    send(linked, Parse("bad", "select * from nowhere"), Bind("", "bad"), Execute(""), Sync())
    assert answer(linked, ERR, ZI) == ERR + ZI
    assert len(server) == 0
    assert linked.idle
    # Next time the statement is parsed again, not assumed.
    sent = send(linked, Bind("", "bad"), Execute(""), Sync())
    assert isinstance(sent[0], Parse)


def test_cache_evicts_least_recently_used() -> None:
    server = ServerStatements(2)
    mapper = StatementMapper()
    linked = mapper.link(server)
    for i in range(3):
        send(linked, Parse(f"s{i}", f"select {i}"), Sync())
        out = answer(linked, *([CC] if i == 2 else []), PC, ZI)
        assert out == PC + ZI
    assert len(server) == 2
    assert mapper.statements["s0"].server_name not in server


@given(st.lists(st.sampled_from(["s1", "s2", "s3"]), min_size=1, max_size=30), st.integers(1, 3))
def test_any_sequence_of_binds_gets_exactly_its_own_answers(names, capacity) -> None:
    mapper = StatementMapper()
    for name in ("s1", "s2", "s3"):
        mapper.statements[name] = StatementDef.from_parse(f"select '{name}'", ())
    servers = [ServerStatements(capacity), ServerStatements(capacity)]
    for i, name in enumerate(names):
        linked = mapper.link(servers[i % 2])
        sent = send(linked, Bind("", name), Execute(""), Sync())
        server_name = mapper.statements[name].server_name
        replies = []
        for message in sent:
            if isinstance(message, Parse):
                replies.append(PC)
            elif isinstance(message, Close):
                replies.append(CC)
            elif isinstance(message, Bind):
                assert message.statement == server_name
                replies.append(BC)
            elif isinstance(message, Execute):
                replies += [ROW, CMD]
            elif isinstance(message, Sync):
                replies.append(ZI)
        assert answer(linked, *replies) == BC + ROW + CMD + ZI
        assert linked.idle
        assert server_name in servers[i % 2]
        assert len(servers[i % 2]) <= capacity


EMPTY = frame(Backend.EMPTY_QUERY_RESPONSE, b"")
ZT = frame(Backend.READY_FOR_QUERY, b"T")


def test_sql_deallocate_of_a_protocol_name_is_answered_for_the_client() -> None:
    """``DEALLOCATE [PREPARE] name`` of a name the client prepared by protocol: the
    client forgets it (the shared server statement stays), the server gets an empty
    Query, and its answer comes back as DEALLOCATE's, in the server's transaction state."""
    mapper, server = StatementMapper(), ServerStatements(10)
    linked = mapper.link(server)
    send(linked, Parse("_pg3_0", "select 1"), Parse("Mixed", "select 2"), Sync())
    answer(linked, PC, PC, ZI)
    assert send(linked, Query("DEALLOCATE _pg3_0")) == [Query("")]
    assert "_pg3_0" not in mapper.statements
    assert StatementDef.from_parse("select 1", ()).server_name in server
    done = frame(Backend.COMMAND_COMPLETE, b"DEALLOCATE\0")
    assert answer(linked, EMPTY, ZT) == done + ZT
    assert linked.idle
    # Folded as the server folds names: unquoted lower-case, quoted as written.
    assert send(linked, Query("deallocate prepare mixed")) == [Query("deallocate prepare mixed")]
    answer(linked, ERR, ZI)
    assert send(linked, Query(' deallocate "Mixed" ; ')) == [Query("")]
    assert answer(linked, EMPTY, ZI) == done + ZI
    assert mapper.statements == {}


def test_other_deallocates_go_to_the_server_untouched() -> None:
    mapper, server = StatementMapper(), ServerStatements(10)
    linked = mapper.link(server)
    send(linked, Parse("s1", "select 1"), Sync())
    answer(linked, PC, ZI)
    for sql in (
        "deallocate all",
        "deallocate s2",
        "deallocate s1; select 1",
        "select 1 /* deallocate s1 */",
        "deallocate 's1'",
    ):
        assert send(linked, Query(sql)) == [Query(sql)], sql
        answer(linked, CMD, ZI)
    assert "s1" in mapper.statements


@given(st.text(max_size=30))
def test_deallocated_name_never_raises(sql: str) -> None:
    name = deallocated_name(sql.encode() + b"\0")
    assert name is None or sql.strip().lower().startswith("deallocate")
