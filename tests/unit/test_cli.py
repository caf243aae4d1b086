from __future__ import annotations

import json
import logging
import os
import signal
import sys
import types

import pytest
import trio

from trioproxy import cli
from trioproxy.errors import BackendError

GOOD = """
[proxy]
listen = ["127.0.0.1:0", "[::1]:0"]
[users.alice]
password_env = "TRIOPROXY_TEST_ALICE"
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIOPROXY_TEST_ALICE", "secret")
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def restore_logging():
    """cli configures the root logger with force=True; put pytest's handlers back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


class _FakeProxy:
    """What cli needs of trioproxy._server.proxy.Proxy, around a fake ``serve``."""

    serve = None

    def __init__(self, config, runtime=None):
        self.config = config
        self.runtime = runtime
        self.draining = False
        self._scope = trio.CancelScope()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        with self._scope:
            await type(self).serve(self.config, task_status=task_status)

    def shutdown(self, timeout=None):
        self.draining = True
        self._scope.cancel()

    def stop(self):
        self._scope.cancel()

    async def reload(self):
        return []


def fake_server(monkeypatch, serve):
    module = types.ModuleType("trioproxy._server.proxy")
    module.serve = serve  # type: ignore[attr-defined]
    module.Proxy = type("Proxy", (_FakeProxy,), {"serve": staticmethod(serve)})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "trioproxy._server.proxy", module)


def test_check_config_ok(config_file, capsys):
    assert cli.main(["--check-config", str(config_file)]) == 0
    out, err = capsys.readouterr()
    assert out == "configuration OK: 1 user, listen 127.0.0.1:0, [::1]:0\n"
    assert err == ""


def test_check_config_names_the_workers(config_file, capsys):
    config_file.write_text(config_file.read_text().replace("[proxy]", "[proxy]\nworkers = 3", 1))
    assert cli.main(["--check-config", str(config_file)]) == 0
    out, _err = capsys.readouterr()
    assert out.endswith(", 3 workers\n")


def test_worker_options_go_together(config_file, capsys):
    assert cli.main(["--config", str(config_file), "--worker", "0"]) == 2
    assert "--worker and --run-dir go together" in capsys.readouterr().err


def test_check_config_bad(tmp_path, capsys):
    path = tmp_path / "proxy.toml"
    path.write_text("[pool]\nconnection_borrow_timeout = 'abc'\n")
    assert cli.main(["--check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "[pool] connection_borrow_timeout: must be a number" in err
    assert str(path) in err
    assert "Traceback" not in err


def test_check_config_missing_env_and_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRIOPROXY_TEST_ALICE", raising=False)
    path = tmp_path / "proxy.toml"
    path.write_text(GOOD)
    assert cli.main(["--check-config", str(path)]) == 2
    assert "password_env: environment variable TRIOPROXY_TEST_ALICE" in capsys.readouterr().err
    assert cli.main(["--check-config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "nope.toml: cannot read configuration" in err
    assert "Traceback" not in err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("trioproxy ")


@pytest.mark.parametrize("argv", [[], ["--config", "a", "--check-config", "b"], ["--bogus"]])
def test_usage_errors(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: trioproxy" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_stops_cleanly_on_signal(config_file, capsys, monkeypatch, restore_logging, signum):
    seen = []

    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        seen.append(config)
        task_status.started()
        os.kill(os.getpid(), signum)
        await trio.sleep_forever()

    fake_server(monkeypatch, serve)
    assert cli.main(["--config", str(config_file)]) == 0
    assert seen[0].users["alice"].password == "secret"
    err = capsys.readouterr().err
    assert f"received {signum.name}, shutting down" in err
    assert "Traceback" not in err
    assert logging.getLogger().level == logging.INFO


def test_run_json_logging_and_debug(tmp_path, capsys, monkeypatch, restore_logging):
    path = tmp_path / "proxy.toml"
    path.write_text('[proxy]\nlog_format = "json"\ndebug_logging = true\n')

    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        logging.getLogger("trioproxy.test").debug("hello %s", "world")
        task_status.started()
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()

    fake_server(monkeypatch, serve)
    assert cli.main(["--config", str(path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert {"time", "level", "logger", "message"} <= lines[0].keys()
    assert (lines[0]["level"], lines[0]["logger"], lines[0]["message"]) == (
        "DEBUG",
        "trioproxy.test",
        "hello world",
    )
    assert lines[-1]["message"] == "received SIGTERM, shutting down"


def test_run_expected_failure_exits_1_without_traceback(
    config_file, capsys, monkeypatch, restore_logging
):
    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        raise OSError(98, "Address already in use")

    fake_server(monkeypatch, serve)
    assert cli.main(["--config", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert "trioproxy stopped: [Errno 98] Address already in use" in err
    assert "Traceback" not in err


def test_run_error_inside_nursery_exits_1(config_file, capsys, monkeypatch, restore_logging):
    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        raise BackendError("backend went away")

    fake_server(monkeypatch, serve)
    assert cli.main(["--config", str(config_file)]) == 1
    assert "trioproxy stopped: backend went away" in capsys.readouterr().err


def test_run_keyboard_interrupt(config_file, monkeypatch, restore_logging):
    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        raise KeyboardInterrupt

    fake_server(monkeypatch, serve)
    assert cli.main(["--config", str(config_file)]) == 130


def test_run_bug_keeps_traceback(config_file, monkeypatch, restore_logging):
    async def serve(config, *, task_status=trio.TASK_STATUS_IGNORED):
        raise ZeroDivisionError

    fake_server(monkeypatch, serve)
    with pytest.raises(BaseException) as info:  # noqa: PT011 - may be wrapped in a group
        cli.main(["--config", str(config_file)])
    assert info.group_contains(ZeroDivisionError) or info.type is ZeroDivisionError
