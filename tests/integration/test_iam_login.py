"""IAM-style auth tokens checked by the proxy itself, end to end with real clients.

Includes the seed's Lambda handler as written (node-postgres ``Pool`` with ``max: 1``,
``ssl`` trusting the proxy's CA, password from ``@aws-sdk/rds-signer``'s
``getAuthToken()``), run by node against the proxy.
"""

from __future__ import annotations

import json
import os
import socket
import time

import psycopg
import pytest

from tests.fix_node import run_node
from tests.fix_pg import APP_PASSWORD
from tests.fix_proxy import PROXY_USERS
from trioproxy._auth.sigv4 import AccessKey, generate_auth_token

KEY_ID = "AKIATRIOPROXYTEST01"
SECRET = "test-secret-access-key-not-a-real-one"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def iam_proxy(proxy_factory):
    port = _free_port()
    users = {
        **PROXY_USERS,
        "lambda_user": {
            "iam_auth": "REQUIRED",
            "backend_user": "app",
            "backend_password": APP_PASSWORD,
        },
        "mixed_user": {
            "iam_auth": "ENABLED",
            "password": "mixed-pw",
            "backend_user": "app",
            "backend_password": APP_PASSWORD,
        },
    }
    proxy = proxy_factory(
        proxy={"listen": f"127.0.0.1:{port}"},
        pool={"pool_mode": "transaction", "max_connections": 4},
        iam={
            "endpoints": [f"localhost:{port}"],
            "regions": [REGION],
            "keys": {
                KEY_ID: {
                    "secret_access_key": SECRET,
                    "allowed_users": ["lambda_user", "mixed_user"],
                }
            },
        },
        users=users,
    )
    return proxy


def _token(proxy, user: str = "lambda_user", *, now: float | None = None, **kw) -> str:
    key = AccessKey(access_key_id=KEY_ID, secret_access_key=SECRET, allowed_users={"*"})
    return generate_auth_token(
        host=kw.get("host", "localhost"),
        port=kw.get("port", proxy.port),
        db_user=user,
        region=kw.get("region", REGION),
        key=kw.get("key", key),
        now=time.time() if now is None else now,
    )


def test_token_logs_in_over_tls(iam_proxy) -> None:
    token = _token(iam_proxy)
    with psycopg.connect(iam_proxy.dsn(user="lambda_user", password=token)) as conn:
        assert conn.execute("select current_user").fetchone() == ("app",)


def test_botocore_token_logs_in(iam_proxy, monkeypatch, tmp_path) -> None:
    botocore_session = pytest.importorskip("botocore.session")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    session = botocore_session.get_session()
    session.set_credentials(KEY_ID, SECRET)
    client = session.create_client("rds", region_name=REGION)
    token = client.generate_db_auth_token(
        DBHostname="localhost", Port=iam_proxy.port, DBUsername="lambda_user"
    )
    with psycopg.connect(iam_proxy.dsn(user="lambda_user", password=token)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("expired", {"now": time.time() - 3600}),
        ("future", {"now": time.time() + 3600}),
        ("wrong host", {"host": "elsewhere.example"}),
        ("wrong region", {"region": "eu-west-1"}),
        (
            "unknown key",
            {
                "key": AccessKey(
                    access_key_id="AKIAUNKNOWN0000001", secret_access_key="x", allowed_users={"*"}
                )
            },
        ),
        (
            "wrong secret",
            {
                "key": AccessKey(
                    access_key_id=KEY_ID, secret_access_key="not-it", allowed_users={"*"}
                )
            },
        ),
    ],
)
def test_bad_tokens_are_refused_with_rds_proxy_text(iam_proxy, case: str, kwargs) -> None:
    token = _token(iam_proxy, **kwargs)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(iam_proxy.dsn(user="lambda_user", password=token))
    assert 'IAM authentication failed for user "lambda_user"' in str(caught.value), case
    assert SECRET not in str(caught.value)


def test_tampered_and_wrong_user_tokens_are_refused(iam_proxy) -> None:
    token = _token(iam_proxy)
    tampered = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    with pytest.raises(psycopg.OperationalError, match="IAM authentication failed"):
        psycopg.connect(iam_proxy.dsn(user="lambda_user", password=tampered))
    other = _token(iam_proxy, user="mixed_user")
    with pytest.raises(psycopg.OperationalError, match="IAM authentication failed"):
        psycopg.connect(iam_proxy.dsn(user="lambda_user", password=other))


def test_iam_requires_tls(iam_proxy) -> None:
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(
            iam_proxy.dsn(user="lambda_user", password=_token(iam_proxy), sslmode="disable")
        )
    assert "IAM authentication is allowed only with SSL connections." in str(caught.value)


def test_enabled_accepts_token_or_password(iam_proxy) -> None:
    with psycopg.connect(iam_proxy.dsn(user="mixed_user", password="mixed-pw")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    token = _token(iam_proxy, user="mixed_user")
    with psycopg.connect(iam_proxy.dsn(user="mixed_user", password=token)) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(iam_proxy.dsn(user="mixed_user", password="wrong"))


# --- the seed's Lambda handler ------------------------------------------------------------

LAMBDA_HANDLER = r"""
const fs = require('fs');
const { Signer } = require('@aws-sdk/rds-signer');
const { Pool } = require('pg');

const signer = new Signer({
  hostname: process.env.PROXY_HOST,
  port: Number(process.env.PROXY_PORT),
  region: 'us-east-1',
  username: 'lambda_user',
});

exports.handler = async (event) => {
  // Generate a short-lived auth token instead of storing passwords
  const token = await signer.getAuthToken();

  const pool = new Pool({
    host: process.env.PROXY_HOST,
    port: Number(process.env.PROXY_PORT),
    database: 'app',
    user: 'lambda_user',
    password: token,
    ssl: { rejectUnauthorized: true, ca: fs.readFileSync(process.env.PROXY_CA) },
    max: 1,
  });

  // Run your queries
  const result = await pool.query('SELECT * FROM orders WHERE id = $1', [event.orderId]);
  await pool.end();
  return result.rows[0];
};

(async () => {
  const rows = [];
  for (const orderId of [1, 2, 3]) rows.push(await exports.handler({ orderId }));
  console.log(JSON.stringify(rows));
})().catch((err) => { console.error(err); process.exit(1); });
"""


def test_seed_lambda_handler_through_the_proxy(iam_proxy, node_modules, tmp_path) -> None:
    with psycopg.connect(iam_proxy.dsn(), autocommit=True) as setup:
        setup.execute("drop table if exists orders")
        setup.execute("create table orders (id int primary key, item text, total numeric)")
        setup.execute(
            "insert into orders values (1, 'coffee', 12.50), (2, 'tea', 7.00), (3, 'mug', 9.90)"
        )
    env = {
        "PROXY_HOST": "localhost",
        "PROXY_PORT": str(iam_proxy.port),
        "PROXY_CA": str(iam_proxy.tls.ca_cert),
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    stdout = run_node(LAMBDA_HANDLER, node_modules, env, tmp_path)
    rows = json.loads(stdout.strip().splitlines()[-1])
    assert [(r["id"], r["item"], r["total"]) for r in rows] == [
        (1, "coffee", "12.50"),
        (2, "tea", "7.00"),
        (3, "mug", "9.90"),
    ]
