"""The login's ParameterStatus block: remembered per (pool defaults, client parameters)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from trioproxy._protocol.messages import parameter_status_bytes
from trioproxy._server.parameters import ClientParameters


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
