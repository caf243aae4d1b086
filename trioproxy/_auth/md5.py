"""PostgreSQL's legacy MD5 password authentication, sans-IO.

The stored verifier is ``"md5" + md5hex(password + user)``; on the wire the client sends
``"md5" + md5hex(md5hex(password + user) + salt)`` for the server's 4-byte salt. MD5 is
broken and the scheme is replayable per salt, but old servers and clients still use it,
so the proxy must speak it on both sides.

Strings are encoded as UTF-8: PostgreSQL hashes the raw bytes it received, which for any
sane deployment (client_encoding UTF8) are exactly these.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = ["is_md5_verifier", "md5_check", "md5_password_message", "md5_verifier"]

_PREFIX: Final = "md5"
_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")


def _md5hex(data: bytes) -> bytes:
    # usedforsecurity=False lets this run on FIPS-mode OpenSSL builds; the protocol
    # dictates MD5, and refusing it would only break logins, not make them safer.
    return hashlib.md5(data, usedforsecurity=False).hexdigest().encode("ascii")


def md5_verifier(user: str, password: str) -> str:
    """The verifier PostgreSQL stores for ``password`` (the user name is the salt)."""
    return _PREFIX + _md5hex((password + user).encode("utf-8")).decode("ascii")


def md5_password_message(user: str, password: str, salt: bytes) -> bytes:
    """The client's answer to AuthenticationMD5Password (without the trailing NUL)."""
    inner = _md5hex((password + user).encode("utf-8"))
    return _PREFIX.encode("ascii") + _md5hex(inner + salt)


def is_md5_verifier(text: str) -> bool:
    """True if ``text`` looks like a stored MD5 verifier (``md5`` + 32 hex digits)."""
    return len(text) == 35 and text.startswith(_PREFIX) and set(text[3:]) <= _HEX_DIGITS


def md5_check(stored: str, salt: bytes, response: bytes) -> bool:
    """Check a client's MD5 response against a stored ``md5...`` verifier.

    Raises ValueError if ``stored`` is not an MD5 verifier: that is a configuration or
    dispatch bug on our side and must not look like a wrong password.
    """
    if not is_md5_verifier(stored):
        raise ValueError("stored password is not an MD5 verifier ('md5' + 32 hex digits)")
    # Clients send lowercase hex (it's what hexdigest and libpq produce).
    expected = _PREFIX.encode("ascii") + _md5hex(stored[3:].lower().encode("ascii") + salt)
    # Constant time, so response timing says nothing about how many bytes were right.
    return hmac.compare_digest(expected, response)
