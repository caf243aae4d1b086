"""PostgreSQL MD5 password authentication."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy._auth.md5 import (
    is_md5_verifier,
    md5_check,
    md5_password_message,
    md5_verifier,
)

salts = st.binary(min_size=4, max_size=4)


def test_known_verifiers() -> None:
    assert md5_verifier("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"
    # Made by PostgreSQL 15.18: SET password_encryption = md5; ALTER ROLE r_secret ...
    assert md5_verifier("r_secret", "secret") == "md5f248df71634bb1dc71b7482684509db0"


def test_password_message_by_hand() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"postgrespostgres", usedforsecurity=False).hexdigest().encode()
    expected = b"md5" + hashlib.md5(inner + salt, usedforsecurity=False).hexdigest().encode()
    message = md5_password_message("postgres", "postgres", salt)
    assert message == expected
    assert message.isascii()
    assert len(message) == 35
    assert b"\0" not in message  # the shell adds the terminator


@given(user=st.text(), password=st.text(), salt=salts)
def test_round_trip(user: str, password: str, salt: bytes) -> None:
    stored = md5_verifier(user, password)
    assert is_md5_verifier(stored)
    assert md5_check(stored, salt, md5_password_message(user, password, salt))


@given(user=st.text(), password=st.text(), wrong=st.text(), salt=salts)
def test_wrong_password(user: str, password: str, wrong: str, salt: bytes) -> None:
    if wrong == password:
        return
    assert not md5_check(
        md5_verifier(user, password), salt, md5_password_message(user, wrong, salt)
    )


@given(salt=salts, other=salts)
def test_salt_matters(salt: bytes, other: bytes) -> None:
    if salt == other:
        return
    stored = md5_verifier("u", "pw")
    assert not md5_check(stored, salt, md5_password_message("u", "pw", other))


def test_user_is_the_salt() -> None:
    assert md5_verifier("alice", "pw") != md5_verifier("bob", "pw")
    stored = md5_verifier("alice", "pw")
    assert not md5_check(stored, b"salt", md5_password_message("bob", "pw", b"salt"))


@given(response=st.binary())
def test_arbitrary_responses_are_just_wrong(response: bytes) -> None:
    assert not md5_check(md5_verifier("u", "pw"), b"salt", response)


def test_uppercase_stored_verifier() -> None:
    stored = md5_verifier("u", "pw")
    assert md5_check("md5" + stored[3:].upper(), b"salt", md5_password_message("u", "pw", b"salt"))


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "md5",
        "3175bce1d3201d16594cebf9d7eb3f9d",
        "md53175bce1d3201d16594cebf9d7eb3f9",
        "md53175bce1d3201d16594cebf9d7eb3f9dd",
        "md53175bce1d3201d16594cebf9d7eb3f9g",
        "MD53175bce1d3201d16594cebf9d7eb3f9d",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
    ],
)
def test_not_an_md5_verifier(stored: str) -> None:
    assert not is_md5_verifier(stored)
    with pytest.raises(ValueError, match="not an MD5 verifier"):
        md5_check(stored, b"salt", b"md5" + b"0" * 32)
