"""Secret sources: parsing Secrets Manager JSON, merging secrets into users, the config keys,
and the credential store built from them (``trioproxy._auth.secrets``, ``credentials``).

Sync and sans-IO, except ``SecretRefresher.load_initial`` reading small files in tmp_path.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from trioproxy._auth.credentials import CredentialStore
from trioproxy._auth.md5 import md5_verifier
from trioproxy._auth.secrets import (
    MAX_SECRET_SIZE,
    SecretError,
    SecretKind,
    SecretRef,
    SecretValue,
    arn_region,
    effective_users,
    parse_secret,
    secret_ref,
)
from trioproxy._server.secret_refresh import SecretRefresher
from trioproxy.config import ClientPasswordAuthType, parse_config
from trioproxy.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/db-AbCdEf"
SECRET_PW = "s3cr3t-from-the-secret"


# --- parse_secret ---------------------------------------------------------------------


def test_parse_full_secrets_manager_document() -> None:
    document = {
        "engine": "postgres",
        "host": "db.example",
        "port": 5432,
        "dbname": "app",
        "username": "app_rw",
        "password": SECRET_PW,
    }
    value = parse_secret(json.dumps(document))
    assert value == SecretValue(username="app_rw", password=SECRET_PW)
    assert parse_secret(json.dumps(document).encode()) == value
    assert SECRET_PW not in repr(value)


def test_username_is_optional() -> None:
    assert parse_secret('{"password": "pw"}') == SecretValue(username=None, password="pw")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "not a JSON object"),
        (f"password={SECRET_PW}", "not a JSON object"),
        (f'{{"password": "{SECRET_PW}"', "not a JSON object"),  # truncated
        (f'["{SECRET_PW}"]', "not a JSON object"),
        (f'"{SECRET_PW}"', "not a JSON object"),
        ('{"username": "u"}', 'no "password"'),
        ('{"password": ""}', 'no "password"'),
        ('{"password": 12345678}', 'no "password"'),
        ('{"password": "a\\u0000b"}', "NUL"),
        (f'{{"password": "{SECRET_PW}", "username": 7}}', '"username" must be'),
        (f'{{"password": "{SECRET_PW}", "username": ""}}', '"username" must be'),
        (b"\xff\xfe", "not UTF-8"),
        ("x" * (MAX_SECRET_SIZE + 1), "larger than"),
    ],
)
def test_bad_secrets_are_refused_without_quoting_them(data: str | bytes, message: str) -> None:
    with pytest.raises(SecretError, match=message) as caught:
        parse_secret(data)
    assert SECRET_PW not in str(caught.value)
    assert caught.value.__cause__ is None  # no chained decoder message that could quote it


def test_arn_region() -> None:
    assert arn_region(ARN) == "eu-west-1"
    with pytest.raises(SecretError):
        arn_region("arn:aws:secretsmanager")


# --- configuration ---------------------------------------------------------------------


def test_config_secret_file_and_arn(tmp_path: Path) -> None:
    (tmp_path / "db.json").write_text('{"password": "x"}')
    config = parse_config(
        {
            "users": {
                "a": {"secret_file": "db.json"},
                "b": {"secret_arn": ARN, "client_password_auth_type": "md5"},
            }
        },
        base_dir=tmp_path,
    )
    a, b = config.users["a"], config.users["b"]
    assert a.secret_file == tmp_path / "db.json"
    assert a.backend_password is None  # read from the secret at run time
    assert b.secret_arn == ARN
    assert b.client_password_auth_type is ClientPasswordAuthType.MD5
    assert secret_ref(a) == SecretRef(SecretKind.FILE, str(tmp_path / "db.json"))
    assert str(secret_ref(b)) == f"secret_arn {ARN}"
    assert secret_ref(parse_config({"users": {"c": {"password": "p"}}}).users["c"]) is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"secret_file": "missing.json"}, "secret_file: file .* does not exist"),
        ({"secret_arn": "arn:aws:s3:::bucket"}, "secret_arn: must be a Secrets Manager ARN"),
        ({"secret_arn": "prod/db"}, "secret_arn: must be a Secrets Manager ARN"),
        ({"secret_file": "db.json", "secret_arn": ARN}, "secret_arn: conflicts with secret_file"),
        (
            {"secret_file": "db.json", "backend_password": "x"},
            "backend_password: conflicts with secret_file",
        ),
        (
            {"secret_arn": ARN, "backend_password_env": "X"},
            "backend_password_env: conflicts with secret_arn",
        ),
        (
            {
                "scram_verifier": "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
                "client_password_auth_type": "md5",
            },
            'client_password_auth_type: "md5" needs the plaintext password',
        ),
        ({"client_password_auth_type": "sha1", "password": "p"}, "must be one of"),
        ({}, "no client credential: .* secret_file or secret_arn"),
    ],
)
def test_config_errors(tmp_path: Path, table: dict[str, object], message: str) -> None:
    (tmp_path / "db.json").write_text('{"password": "x"}')
    with pytest.raises(ConfigError, match=message):
        parse_config({"users": {"u": table}}, base_dir=tmp_path)


# --- merging secrets into users ----------------------------------------------------------


def _config(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "db.json").write_text("{}")
    return {
        "users": {
            "plain": {"password": "plain-pw"},
            "rds": {"secret_file": "db.json"},
            "own_pw": {"secret_file": "db.json", "password": "client-pw", "backend_user": "x"},
            "nouser": {"secret_arn": ARN, "backend_user": "fallback"},
        }
    }


def test_effective_users(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path), base_dir=tmp_path)
    secrets = {
        "rds": SecretValue(username="app_rw", password=SECRET_PW),
        "own_pw": SecretValue(username="app_rw", password=SECRET_PW),
        "nouser": SecretValue(username=None, password=SECRET_PW),
    }
    users = effective_users(config.users, secrets)
    plain, rds, own, nouser = (users[n] for n in ("plain", "rds", "own_pw", "nouser"))
    assert (plain.password, plain.backend_user, plain.backend_password) == (
        "plain-pw",
        "plain",
        "plain-pw",
    )
    # As RDS Proxy: the client is checked against the secret's password.
    assert (rds.password, rds.backend_user, rds.backend_password) == (
        SECRET_PW,
        "app_rw",
        SECRET_PW,
    )
    # A client password of its own; the secret's username wins over backend_user.
    assert (own.password, own.backend_user, own.backend_password) == (
        "client-pw",
        "app_rw",
        SECRET_PW,
    )
    assert (nouser.backend_user, nouser.backend_password) == ("fallback", SECRET_PW)
    assert SECRET_PW not in repr(users)
    with pytest.raises(SecretError, match=r"'rds': secret_file .* has not been read"):
        effective_users(config.users, {})


# --- the credential store ------------------------------------------------------------------


def test_store_from_secrets(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path), base_dir=tmp_path)
    secrets = {
        name: SecretValue(username="app_rw", password=SECRET_PW)
        for name in ("rds", "own_pw", "nouser")
    }
    store = CredentialStore(effective_users(config.users, secrets))
    rds = store.lookup("rds")
    assert rds is not None
    assert rds.verifier is not None
    assert rds.verifier.check_password(SECRET_PW)
    assert rds.md5_verifier == md5_verifier("rds", SECRET_PW)
    assert store.backend_login("rds") == ("app_rw", SECRET_PW)
    assert store.backend_login("nobody") is None
    assert SECRET_PW not in repr(rds)


def test_rebuilt_store_reuses_unchanged_verifiers(tmp_path: Path) -> None:
    config = parse_config(_config(tmp_path), base_dir=tmp_path)
    first = {n: SecretValue(username=None, password="one") for n in ("rds", "own_pw", "nouser")}
    old = CredentialStore(effective_users(config.users, first))
    rotated = {**first, "rds": SecretValue(username=None, password="two")}
    new = CredentialStore(effective_users(config.users, rotated), previous=old)

    def verifier(store: CredentialStore, name: str) -> object:
        user = store.lookup(name)
        assert user is not None
        return user.verifier

    assert verifier(new, "plain") is verifier(old, "plain")
    assert verifier(new, "nouser") is verifier(old, "nouser")
    assert verifier(new, "rds") is not verifier(old, "rds")
    # Unknown users see the same mock salt before and after: no enumeration by refresh.
    assert new.verifier_for("ghost").salt == old.verifier_for("ghost").salt
    # Without `previous`, every store derives fresh verifiers (random salts).
    assert verifier(CredentialStore(effective_users(config.users, first)), "plain") is not (
        verifier(old, "plain")
    )


def test_md5_user_from_config() -> None:
    config = parse_config(
        {"users": {"old": {"password": "pw", "client_password_auth_type": "md5"}}}
    )
    user = CredentialStore(config.users).lookup("old")
    assert user is not None
    assert user.client_password_auth_type is ClientPasswordAuthType.MD5
    assert user.md5_verifier == md5_verifier("old", "pw")


# --- reading secret files at start ---------------------------------------------------------


def test_load_initial_reads_secret_files(tmp_path: Path) -> None:
    (tmp_path / "db.json").write_text(json.dumps({"username": "app_rw", "password": SECRET_PW}))
    config = parse_config({"users": {"rds": {"secret_file": "db.json"}}}, base_dir=tmp_path)
    store = SecretRefresher(config).load_initial()
    assert store.backend_login("rds") == ("app_rw", SECRET_PW)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"password: {SECRET_PW}", "not a JSON object"),
        ('{"username": "app_rw"}', 'no "password"'),
    ],
)
def test_load_initial_refuses_bad_secret_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "db.json").write_text(content)
    config = parse_config({"users": {"rds": {"secret_file": "db.json"}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"user 'rds': secret_file .*db.json: .*{message}") as e:
        SecretRefresher(config).load_initial()
    assert SECRET_PW not in str(e.value)


def test_load_initial_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "db.json").write_text("{}")
    config = parse_config({"users": {"rds": {"secret_file": "db.json"}}}, base_dir=tmp_path)
    (tmp_path / "db.json").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        SecretRefresher(config).load_initial()
