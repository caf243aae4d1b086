"""Node.js packages for interop tests (node-postgres, @aws-sdk/rds-signer).

Installed with ``npm install --prefix <venv>/npm-lambda`` on first use: under CI=true (or
TRIOPROXY_NPM_INSTALL=1) a missing node/npm or a failed install is a failure, locally a
skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NPM_PACKAGES = ["pg@^8", "@aws-sdk/rds-signer@^3"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """The ``node_modules`` folder holding pg and @aws-sdk/rds-signer."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are needed for the node-postgres tests")
    assert npm is not None
    prefix = Path(sys.prefix) / "npm-lambda"
    modules = prefix / "node_modules"
    if not (modules / "pg").is_dir() or not (modules / "@aws-sdk" / "rds-signer").is_dir():
        if not _in_ci() and os.environ.get("TRIOPROXY_NPM_INSTALL") != "1":
            pytest.skip("set TRIOPROXY_NPM_INSTALL=1 (or CI=true) to npm-install pg and rds-signer")
        proc = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *NPM_PACKAGES],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if proc.returncode != 0:
            _unavailable(f"npm install failed: {proc.stderr[-1500:]}")
    return modules


def run_node(script: str, modules: Path, env: dict[str, str], tmp_path: Path) -> str:
    """Run a node script with ``modules`` on NODE_PATH; return its stdout (fails on error)."""
    path = tmp_path / "script.js"
    path.write_text(script)
    proc = subprocess.run(
        ["node", str(path)],
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "NODE_PATH": str(modules),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout
