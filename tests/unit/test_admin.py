"""The admin console's wire encoding and command parsing, and the operations config keys.

Sync, no sockets: results are encoded and read back with the project's own framing.
"""

from __future__ import annotations

import struct

import pytest

from trioproxy._protocol.framing import MessageReader
from trioproxy._server.admin import (
    AdminError,
    Result,
    _database_arg,
    _split_peer,
    encode_result,
    show_config,
    show_help,
    show_version,
)
from trioproxy._server.proxy import Proxy
from trioproxy.config import Config, ListenAddress, parse_config
from trioproxy.errors import ConfigError


def messages(data: bytes) -> list[tuple[str, bytes]]:
    reader = MessageReader()
    reader.feed(data)
    out = []
    while (message := reader.next_message()) is not None:
        out.append((chr(message.type), bytes(message.body)))
    assert reader.buffered == 0
    return out


def row_description(body: bytes) -> list[tuple[str, int]]:
    (count,) = struct.unpack_from("!h", body)
    pos, columns = 2, []
    for _ in range(count):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode()
        _table, _attr, type_oid, _size, _mod, _fmt = struct.unpack_from("!ihihih", body, end + 1)
        columns.append((name, type_oid))
        pos = end + 1 + 18
    assert pos == len(body)
    return columns


def data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body)
    pos, values = 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        values.append(body[pos : pos + length].decode())
        pos += length
    assert pos == len(body)
    return values


def test_rows_are_encoded_with_types_and_nulls() -> None:
    result = Result("SHOW", ("database", "cl_active", "link"), (("app", 3, None), ("b", 0, 7)))
    out = messages(encode_result(result))
    assert [t for t, _ in out] == ["T", "D", "D", "C"]
    assert row_description(out[0][1]) == [("database", 25), ("cl_active", 20), ("link", 20)]
    assert data_row(out[1][1]) == ["app", "3", None]
    assert data_row(out[2][1]) == ["b", "0", "7"]
    assert out[3][1] == b"SHOW\0"


def test_command_without_rows_and_notices() -> None:
    out = messages(encode_result(Result("PAUSE", notices=("2 clients still linked",))))
    assert [t for t, _ in out] == ["N", "C"]
    assert b"2 clients still linked" in out[0][1]
    assert out[1][1] == b"PAUSE\0"


@pytest.mark.parametrize(
    ("args", "expected"), [([], None), (["app"], "app"), (['"my db"'], None), (['"x"'], "x")]
)
def test_database_argument(args: list[str], expected: str | None) -> None:
    if args == ['"my db"']:
        with pytest.raises(AdminError):
            _database_arg(args)
        return
    assert _database_arg(args) == expected


def test_split_peer() -> None:
    assert _split_peer("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert _split_peer("[::1]:6432") == ("::1", 6432)
    assert _split_peer("unix") == ("unix", None)


def test_show_config_never_shows_secrets_and_marks_restart_settings() -> None:
    config = parse_config(
        {
            "proxy": {"admin_users": ["ops"], "metrics_listen": "127.0.0.1:9187"},
            "users": {"ops": {"password": "hunter2-secret"}},
        }
    )
    columns, rows = show_config(Proxy(config))
    assert columns == ("key", "value", "default", "changeable")
    by_key = {row[0]: row for row in rows}
    assert by_key["proxy.metrics_listen"][1:] == ("127.0.0.1:9187", "", "no")
    assert by_key["proxy.admin_users"][1] == "ops"
    assert by_key["pool.connection_borrow_timeout"][3] == "yes"
    assert by_key["users"][1] == "ops"
    assert not any("hunter2" in str(value) for row in rows for value in row)


def test_show_version_and_help() -> None:
    proxy = Proxy(Config())
    assert show_version(proxy)[1][0][0].startswith("trioproxy ")  # type: ignore[union-attr]
    assert any("KILL_CLIENT" in str(row[0]) for row in show_help(proxy)[1])


def test_operations_config_keys() -> None:
    config = parse_config({"proxy": {"metrics_listen": "[::1]:9187", "admin_users": "ops"}})
    assert config.proxy.metrics_listen == ListenAddress(host="::1", port=9187)
    assert config.proxy.admin_users == frozenset({"ops"})
    assert parse_config({"proxy": {"metrics_listen": ""}}).proxy.metrics_listen is None
    assert Config().proxy.metrics_listen is None
    with pytest.raises(ConfigError, match="metrics_listen"):
        parse_config({"proxy": {"metrics_listen": "nope"}})
    with pytest.raises(ConfigError, match="admin_users"):
        parse_config({"proxy": {"admin_users": [""]}})
