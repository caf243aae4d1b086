"""IAM auth tokens made by the real AWS SDKs verify with our verifier (no proxy, no network).

* botocore: ``generate_db_auth_token`` with static fake credentials (and with a session token).
* @aws-sdk/rds-signer (AWS SDK for JavaScript v3) run by ``node``, credentials from the
  environment. The npm package is installed into ``<venv>/npm-rds-signer`` (or a temp dir when
  not in a venv) by ``npm install --prefix``. Locally that happens only with CI=true or
  TRIOPROXY_NPM_INSTALL=1 set (otherwise the test skips, saying so, unless a previous run left
  the package there); under CI=true a missing botocore, node, npm or package is a failure, not
  a skip, like the rest of the integration tier.

Each token is checked at ``now`` = its own X-Amz-Date + 1 s: signing needs no network, and
the SDKs take the time from the real clock.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

from trioproxy._auth.sigv4 import (
    AccessKey,
    RejectCode,
    TokenPolicy,
    TokenRejected,
    generate_auth_token,
    verify_auth_token,
)

KEY_ID = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_KEY_ID = "ASIAEXAMPLESESSION01"
SESSION_TOKEN = "FwoGZXIvYXdzEJr//////////wEaDM+example/session+token=="
HOST = "proxy.example.internal"
PORT = 5432
REGION = "us-east-1"

KEYS = {
    KEY_ID: AccessKey(access_key_id=KEY_ID, secret_access_key=SECRET, allowed_users={"*"}),
    SESSION_KEY_ID: AccessKey(
        access_key_id=SESSION_KEY_ID, secret_access_key=SECRET, allowed_users={"*"}
    ),
}
POLICY = TokenPolicy(endpoints={f"{HOST}:{PORT}", f"{HOST}:443"}, regions={REGION})

# (host as the client writes it, port, database user)
CASES = [
    pytest.param(HOST, PORT, "app", id="plain"),
    pytest.param("Proxy.Example.INTERNAL", PORT, "app", id="mixed-case-host"),
    pytest.param(HOST, 443, "app", id="port-443"),
    pytest.param("Proxy.Example.INTERNAL", 443, "app", id="mixed-case-host-port-443"),
    pytest.param(HOST, PORT, "a b+c@d/é~*!'()=&%", id="user-needing-encoding"),
    pytest.param(HOST, PORT, "ユーザー😀", id="user-non-ascii"),
]

NPM_PACKAGE = "@aws-sdk/rds-signer@^3"
NPM_TIMEOUT = 300
NODE_TIMEOUT = 60


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(reason: str) -> NoReturn:
    """Skip locally, fail under CI (as tests/fix_pg.py does)."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true, so this is an error rather than a skip)", pytrace=False)
    pytest.skip(reason)


def _amz_date(token: str) -> str:
    m = re.search(r"[?&]X-Amz-Date=([0-9]{8}T[0-9]{6}Z)(?:&|$)", token)
    assert m is not None, token
    return m[1]


def _epoch(amz_date: str) -> float:
    d = amz_date
    return float(
        calendar.timegm(
            (int(d[0:4]), int(d[4:6]), int(d[6:8]), int(d[9:11]), int(d[11:13]), int(d[13:15]))
        )
    )


def _check(token: str, *, host: str, port: int, user: str, session: bool) -> None:
    signed_at = _epoch(_amz_date(token))
    verified = verify_auth_token(token, db_user=user, keys=KEYS, policy=POLICY, now=signed_at + 1)
    assert verified.db_user == user
    assert verified.access_key_id == (SESSION_KEY_ID if session else KEY_ID)
    assert verified.region == REGION
    assert verified.endpoint == f"{host.lower()}:{port}"
    assert verified.expires_at == signed_at + 900
    assert verified.has_session_token is session
    # ... and the same token is refused for anyone else, later, or elsewhere.
    with pytest.raises(TokenRejected) as info:
        verify_auth_token(token, db_user="other", keys=KEYS, policy=POLICY, now=signed_at + 1)
    assert info.value.code is RejectCode.WRONG_USER
    with pytest.raises(TokenRejected) as info:
        verify_auth_token(token, db_user=user, keys=KEYS, policy=POLICY, now=signed_at + 900)
    assert info.value.code is RejectCode.EXPIRED
    wrong_secret = {
        k: AccessKey(access_key_id=k, secret_access_key="not-" + SECRET, allowed_users={"*"})
        for k in KEYS
    }
    with pytest.raises(TokenRejected) as info:
        verify_auth_token(token, db_user=user, keys=wrong_secret, policy=POLICY, now=signed_at + 1)
    assert info.value.code is RejectCode.SIGNATURE_MISMATCH


# --- botocore ------------------------------------------------------------------------------


@pytest.fixture
def botocore_session(monkeypatch, tmp_path):
    try:
        import botocore.session  # type: ignore[import-untyped]  # optional test dependency
    except ImportError:
        _unavailable("botocore is not installed (pip install botocore)")
    # Hermetic: no profile, config or credentials file of the machine's user.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return botocore.session.Session()


def _botocore_token(session, host: str, port: int, user: str, *, session_token: bool) -> str:
    client = session.create_client(
        "rds",
        region_name=REGION,
        aws_access_key_id=SESSION_KEY_ID if session_token else KEY_ID,
        aws_secret_access_key=SECRET,
        aws_session_token=SESSION_TOKEN if session_token else None,
    )
    token = client.generate_db_auth_token(DBHostname=host, Port=port, DBUsername=user)
    assert isinstance(token, str)
    return token


@pytest.mark.parametrize(("host", "port", "user"), CASES)
def test_botocore_token(botocore_session, host: str, port: int, user: str) -> None:
    token = _botocore_token(botocore_session, host, port, user, session_token=False)
    _check(token, host=host, port=port, user=user, session=False)
    # Our signer writes exactly what botocore writes, given the same second.
    ours = generate_auth_token(
        host=host,
        port=port,
        db_user=user,
        region=REGION,
        key=KEYS[KEY_ID],
        now=_epoch(_amz_date(token)),
    )
    assert ours == token


@pytest.mark.parametrize(("host", "port", "user"), CASES[:2])
def test_botocore_token_with_session_token(botocore_session, host: str, port: int, user) -> None:
    token = _botocore_token(botocore_session, host, port, user, session_token=True)
    assert "X-Amz-Security-Token=" in token
    _check(token, host=host, port=port, user=user, session=True)
    ours = generate_auth_token(
        host=host,
        port=port,
        db_user=user,
        region=REGION,
        key=KEYS[SESSION_KEY_ID],
        now=_epoch(_amz_date(token)),
        session_token=SESSION_TOKEN,
    )
    assert ours == token


# --- @aws-sdk/rds-signer ------------------------------------------------------------------

NODE_SCRIPT = r"""
const { Signer } = require("@aws-sdk/rds-signer");
const cases = JSON.parse(process.argv[1]);
(async () => {
  const tokens = [];
  for (const c of cases) {
    const signer = new Signer({
      hostname: c.host, port: c.port, region: c.region, username: c.user,
    });
    tokens.push(await signer.getAuthToken());
  }
  process.stdout.write(JSON.stringify(tokens));
})().catch((err) => { console.error(err); process.exit(1); });
"""


def _npm_dir() -> Path:
    if sys.prefix != sys.base_prefix:  # running in a virtualenv: keep it with the venv
        return Path(sys.prefix) / "npm-rds-signer"
    return Path(tempfile.gettempdir()) / "trioproxy-npm-rds-signer"


@pytest.fixture(scope="module")
def rds_signer_dir() -> Path:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are needed for the @aws-sdk/rds-signer interop test")
    prefix = _npm_dir()
    if (prefix / "node_modules" / "@aws-sdk" / "rds-signer" / "package.json").is_file():
        return prefix
    if not (_in_ci() or os.environ.get("TRIOPROXY_NPM_INSTALL") == "1"):
        pytest.skip(
            f"@aws-sdk/rds-signer is not installed in {prefix}; "
            "set TRIOPROXY_NPM_INSTALL=1 (or CI=true) to let the test npm-install it"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", NPM_PACKAGE],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"npm install {NPM_PACKAGE} took over {NPM_TIMEOUT} s")
    if proc.returncode != 0:
        _unavailable(f"npm install {NPM_PACKAGE} failed:\n{proc.stderr[-2000:]}")
    return prefix


def _node_tokens(prefix: Path, cases: list[dict[str, object]], *, session_token: bool):
    home = prefix / "home"  # an empty HOME: no ~/.aws of the machine's user
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "NODE_PATH": str(prefix / "node_modules"),
        "AWS_ACCESS_KEY_ID": SESSION_KEY_ID if session_token else KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
    }
    if session_token:
        env["AWS_SESSION_TOKEN"] = SESSION_TOKEN
    node = shutil.which("node")
    assert node is not None
    proc = subprocess.run(
        [node, "-e", NODE_SCRIPT, json.dumps(cases)],
        cwd=prefix,
        env=env,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads(proc.stdout)
    assert isinstance(tokens, list)
    assert len(tokens) == len(cases)
    return tokens


def _case_dicts() -> list[dict[str, object]]:
    return [
        {"host": p.values[0], "port": p.values[1], "user": p.values[2], "region": REGION}
        for p in CASES
    ]


@pytest.mark.parametrize("session_token", [False, True], ids=["static", "session-token"])
def test_js_rds_signer_tokens(rds_signer_dir: Path, session_token: bool) -> None:
    cases = _case_dicts()
    tokens = _node_tokens(rds_signer_dir, cases, session_token=session_token)
    for case, token in zip(cases, tokens, strict=True):
        assert isinstance(token, str)
        assert ("X-Amz-Security-Token=" in token) is session_token
        host, port, user = case["host"], case["port"], case["user"]
        assert isinstance(host, str)
        assert isinstance(port, int)
        assert isinstance(user, str)
        _check(token, host=host, port=port, user=user, session=session_token)
