"""The login's ParameterStatus block: remembered per (pool defaults, client parameters)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from trioproxy._protocol.messages import parameter_status_bytes
from trioproxy._server.backend import ServerConnection
from trioproxy._server.parameters import ClientParameters, _lookup
from trioproxy._session.pinning import TRACKED_PARAMETERS


def _session(defaults: dict[str, str] | None, parameters: dict[str, str]) -> ClientParameters:
    session = ClientParameters()
    session.pool = cast("Any", SimpleNamespace(server_parameters=defaults))
    session.parameters = parameters
    return session


def test_reported_bytes_equal_the_uncached_encoding() -> None:
    defaults = {"TimeZone": "UTC", "application_name": "", "server_version": "16.1"}
    first = _session(defaults, {"timezone": "UTC", "application_name": "app"})
    expected = parameter_status_bytes(first._reported_parameters())
    assert first._reported_parameter_bytes() == expected
    assert first._reported_parameter_bytes() == expected  # from the cache
    # Other client parameters, other defaults, or no defaults: never a stale answer.
    other = _session(defaults, {"timezone": "Europe/Paris", "application_name": "app"})
    assert other._reported_parameter_bytes() == parameter_status_bytes(other._reported_parameters())
    reordered = _session(defaults, {"application_name": "app", "timezone": "UTC"})
    assert reordered._reported_parameter_bytes() == parameter_status_bytes(
        reordered._reported_parameters()
    )
    fresh = _session(dict(defaults, server_version="17.0"), dict(first.parameters))
    assert b"17.0" in fresh._reported_parameter_bytes()
    empty = _session(None, {"application_name": "x"})
    assert empty._reported_parameter_bytes() == parameter_status_bytes({"application_name": "x"})


SERVER_NAMES = st.sampled_from(
    [
        "TimeZone",
        "DateStyle",
        "application_name",
        "client_encoding",
        "server_version",
        "search_path",
    ]
)
VALUES = st.sampled_from(["UTC", "ISO, MDY", "app", "UTF8", "", "x"])


@given(
    st.dictionaries(SERVER_NAMES, VALUES),
    st.lists(st.tuples(SERVER_NAMES, VALUES), max_size=6),
    st.dictionaries(SERVER_NAMES.map(str.lower), VALUES),
    st.booleans(),
)
def test_the_one_comparison_in_sync_check_agrees_with_the_name_by_name_one(
    connected: dict[str, str],
    reported: list[tuple[str, str]],
    client: dict[str, str],
    copy_tracked: bool,
) -> None:
    """ServerConnection.tracked_parameters, kept through every ParameterStatus, lets
    ``_parameters_in_sync`` answer with one dict comparison: never a different answer
    from comparing name by name (as the server spells them)."""
    conn = ServerConnection(
        transport=cast("Any", None), key=None, parameters=dict(connected), created_at=0, last_used=0
    )
    for name, value in reported:
        conn.set_parameter(name, value)
    expected_tracked = {
        k.lower(): v for k, v in conn.parameters.items() if k.lower() in TRACKED_PARAMETERS
    }
    assert conn.tracked_parameters == expected_tracked
    session = _session(None, dict(conn.tracked_parameters) if copy_tracked else client)
    session.extra_parameters = {}
    by_name = all(
        _lookup(conn.parameters, name) == value for name, value in session.parameters.items()
    )
    assert session._parameters_in_sync(conn) == by_name
