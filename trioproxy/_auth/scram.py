"""SCRAM-SHA-256 (RFC 5802, RFC 7677) for both sides of the proxy, sans-IO.

:class:`ScramServer` authenticates clients against a stored :class:`ScramVerifier`;
:class:`ScramClient` logs the proxy in to a PostgreSQL backend. Both take and return the
SASL payload bytes only; framing them into AuthenticationSASL* / SASLResponse messages is
the shell's job.

Error convention: bytes that break the SCRAM grammar raise
:class:`~trioproxy.errors.RemoteProtocolError` (PostgreSQL answers those with 08P01 too);
a wrong password, a bad server signature or a failed channel-binding check raise
:class:`~trioproxy.errors.AuthenticationFailed`. Calling steps out of order is a bug in the
caller and raises :class:`~trioproxy.errors.LocalProtocolError`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from typing import TYPE_CHECKING, ClassVar, Final

import attrs

from trioproxy.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    RemoteProtocolError,
    SQLState,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_ITERATIONS",
    "MECHANISM",
    "MECHANISM_PLUS",
    "ScramClient",
    "ScramServer",
    "ScramVerifier",
    "choose_mechanism",
    "salted_password",
    "saslprep",
]

MECHANISM: Final = "SCRAM-SHA-256"
MECHANISM_PLUS: Final = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS: Final = 4096

# The only channel-binding type PostgreSQL implements.
_CB_TYPE: Final = b"tls-server-end-point"
# Our GS2 header as a client: "n,," without channel binding, "p=tls-server-end-point,,"
# with it (only when the server offered SCRAM-SHA-256-PLUS).
_CLIENT_GS2_HEADER: Final = b"n,,"
_CLIENT_GS2_HEADER_PLUS: Final = b"p=" + _CB_TYPE + b",,"
_KEY_LEN: Final = 32  # SHA-256 output size
_SALT_LEN: Final = 16  # what PostgreSQL generates
_RAW_NONCE_LEN: Final = 18  # what PostgreSQL generates; 24 characters once base64-encoded
# PostgreSQL stores the count in an int; anything larger is bogus (and a DoS lever).
_MAX_ITERATIONS: Final = 2**31 - 1
_VERIFIER_PREFIX: Final = MECHANISM + "$"


# --- primitives -------------------------------------------------------------------------


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("_xor() operands differ in length")
    # One XOR of two big integers rather than a generator over 32 byte pairs.
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(len(a))


def _b64encode(data: bytes) -> bytes:
    # base64.b64encode() without its wrapper: what it returns, one Python call less.
    return binascii.b2a_base64(data, newline=False)


def _b64decode(data: bytes | str) -> bytes:
    """Strict base64: characters outside the alphabet or bad padding raise ValueError."""
    if isinstance(data, str):
        if not data.isascii():
            raise ValueError("non-ASCII base64")
        data = data.encode("ascii")
    # binascii.Error is a ValueError subclass, so callers catch ValueError only.
    return base64.b64decode(data, validate=True)


# RFC 5802 "printable": %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
_PRINTABLE_NONCE = re.compile(rb"[\x21-\x2b\x2d-\x7e]+")


def _is_printable_nonce(nonce: bytes) -> bool:
    return _PRINTABLE_NONCE.fullmatch(nonce) is not None


@functools.lru_cache(maxsize=64)
def _salt_and_iterations(salt: bytes, iterations: int) -> bytes:
    """The ``,s=<salt>,i=<iterations>`` tail of a server-first-message (per verifier)."""
    return b",s=" + _b64encode(salt) + b",i=" + str(iterations).encode("ascii")


def _checked_nonce(nonce: str | None) -> bytes:
    if nonce is None:
        return _b64encode(secrets.token_bytes(_RAW_NONCE_LEN))
    raw = nonce.encode("utf-8", "surrogatepass")
    if not _is_printable_nonce(raw):
        raise ValueError("SCRAM nonce must be non-empty printable ASCII without ','")
    return raw


def _parse_iterations(text: bytes | str) -> int:
    """Decimal digits only (no sign, spaces or Unicode digits), 1 ≤ n ≤ 2**31-1."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise ValueError("iteration count is not a decimal number")
    value = int(text)
    if not 1 <= value <= _MAX_ITERATIONS:
        raise ValueError(f"iteration count must be between 1 and {_MAX_ITERATIONS}")
    return value


# --- SASLprep -----------------------------------------------------------------------------


def _prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3 output tables, minus C.1.2 (already mapped to a space), plus
    # RFC 3454 table A.1 because a stored password must not use unassigned code points.
    return (
        stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)
    )


def saslprep(password: str) -> str:
    """Normalize ``password`` with SASLprep (RFC 4013) the way PostgreSQL does.

    PostgreSQL (server and libpq alike) falls back to the raw password whenever SASLprep
    would reject it (prohibited or unassigned characters, bad bidi, empty result); we
    copy that, so the result always matches what PostgreSQL computed for the same
    password. Also like PostgreSQL, the prohibition and bidi checks look at the mapped
    string before NFKC, not after: deviating from the RFC there is what keeps us
    compatible with the verifiers PostgreSQL already stored.
    """
    if password.isascii():
        return password  # PostgreSQL's fast path: ASCII is passed through untouched
    # Map C.1.2 to a space before dropping B.1: U+200B is in both tables and PostgreSQL
    # turns it into a space.
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if stringprep.in_table_c12(ch) or not stringprep.in_table_b1(ch)
    )
    if not mapped or any(_prohibited(ch) for ch in mapped):
        return password
    if any(stringprep.in_table_d1(ch) for ch in mapped):
        if any(stringprep.in_table_d2(ch) for ch in mapped):
            return password
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            return password
    # Current Unicode NFKC rather than 3.2's, because PostgreSQL uses its current tables.
    return unicodedata.normalize("NFKC", mapped)


def _password_bytes(password: str) -> bytes:
    # surrogateescape turns passwords that came from undecodable bytes back into those
    # bytes, matching PostgreSQL's "not valid UTF-8, use as is" fallback.
    return saslprep(password).encode("utf-8", "surrogateescape")


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iteration count must be between 1 and {_MAX_ITERATIONS}")
    return hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)


@functools.lru_cache(maxsize=256)
def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword = Hi(SASLprep(password), salt, i) with Hi = PBKDF2-HMAC-SHA256.

    Cached because the proxy logs in to the same backends with the same password, salt
    and count over and over, and PBKDF2 is deliberately slow (4096+ HMAC rounds).
    """
    return _pbkdf2(password, salt, iterations)


# --- verifiers ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ScramVerifier:
    """What the server stores instead of the password (PostgreSQL's ``rolpassword``)."""

    iterations: int
    salt: bytes
    # Keys stay out of repr: with them anyone can impersonate the server or (StoredKey
    # plus one sniffed exchange) the client, so they must not end up in logs.
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)
    # Set only by mock_for(): the exchange fails at the proof check however it went.
    mock: bool = attrs.field(default=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            raise ValueError(f"SCRAM iteration count must be between 1 and {_MAX_ITERATIONS}")
        if not self.salt:
            raise ValueError("SCRAM salt must not be empty")
        if len(self.stored_key) != _KEY_LEN or len(self.server_key) != _KEY_LEN:
            raise ValueError(f"SCRAM StoredKey and ServerKey must be {_KEY_LEN} bytes")

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Parse ``SCRAM-SHA-256$<iter>:<b64 salt>$<b64 StoredKey>:<b64 ServerKey>``.

        Error messages never quote ``text``: it is a secret and may end up in logs.
        """
        expected = "expected 'SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>'"
        if not text.startswith(_VERIFIER_PREFIX):
            raise ValueError(f"not a SCRAM-SHA-256 verifier: {expected}")
        params, sep, keys = text[len(_VERIFIER_PREFIX) :].partition("$")
        iter_text, sep1, salt_text = params.partition(":")
        stored_text, sep2, server_text = keys.partition(":")
        if not (sep and sep1 and sep2):
            raise ValueError(f"malformed SCRAM-SHA-256 verifier: {expected}")
        try:
            iterations = _parse_iterations(iter_text)
        except ValueError as exc:
            raise ValueError(f"malformed SCRAM-SHA-256 verifier: {exc}") from None
        fields: list[bytes] = []
        for name, value in (
            ("salt", salt_text),
            ("StoredKey", stored_text),
            ("ServerKey", server_text),
        ):
            try:
                fields.append(_b64decode(value))
            except ValueError:
                raise ValueError(
                    f"malformed SCRAM-SHA-256 verifier: {name} is not valid base64"
                ) from None
        salt, stored_key, server_key = fields
        if not salt:
            raise ValueError("malformed SCRAM-SHA-256 verifier: empty salt")
        if len(stored_key) != _KEY_LEN or len(server_key) != _KEY_LEN:
            raise ValueError(
                f"malformed SCRAM-SHA-256 verifier: StoredKey and ServerKey must decode "
                f"to {_KEY_LEN} bytes"
            )
        return cls(iterations=iterations, salt=salt, stored_key=stored_key, server_key=server_key)

    @classmethod
    def from_password(
        cls, password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """Derive a verifier the way PostgreSQL's ``ALTER ROLE ... PASSWORD`` does."""
        if salt is None:
            salt = secrets.token_bytes(_SALT_LEN)
            # A fresh random salt can never hit the cache again; bypass it so we don't
            # evict the entries that backend logins reuse.
            salted = _pbkdf2(password, salt, iterations)
        else:
            salted = salted_password(password, salt, iterations)
        return cls(
            iterations=iterations,
            salt=salt,
            stored_key=_sha256(_hmac(salted, b"Client Key")),
            server_key=_hmac(salted, b"Server Key"),
        )

    @classmethod
    def mock_for(
        cls, username: str, mock_secret: bytes, *, iterations: int = DEFAULT_ITERATIONS
    ) -> ScramVerifier:
        """A stable fake verifier so unknown users get a normal-looking exchange.

        The salt is derived from the user name and a server secret, so repeated attempts
        for one name see the same salt (as for a real user) and nobody can tell the name
        is unknown. ``iterations`` should equal the count real verifiers use. The keys are
        HMAC outputs: no proof matches them short of a SHA-256 preimage, and ``mock=True``
        makes the proof check fail regardless.
        """
        name = username.encode("utf-8", "surrogatepass")
        return cls(
            iterations=iterations,
            salt=_hmac(mock_secret, name)[:_SALT_LEN],
            stored_key=_hmac(mock_secret, b"trioproxy mock StoredKey\0" + name),
            server_key=_hmac(mock_secret, b"trioproxy mock ServerKey\0" + name),
            mock=True,
        )

    def check_password(self, password: str) -> bool:
        """Does a cleartext password match? (For clients that send one: IAM-enabled users.)

        Runs PBKDF2, so the shell calls it off the event loop. Never cached: caching
        would keep client passwords in memory.
        """
        salted = _pbkdf2(password, self.salt, self.iterations)
        stored_key = _sha256(_hmac(salted, b"Client Key"))
        return hmac.compare_digest(stored_key, self.stored_key) and not self.mock

    def to_text(self) -> str:
        return (
            f"{_VERIFIER_PREFIX}{self.iterations}:{_b64encode(self.salt).decode()}"
            f"${_b64encode(self.stored_key).decode()}:{_b64encode(self.server_key).decode()}"
        )


# --- message parsing ------------------------------------------------------------------------


def _malformed(what: str, why: str) -> RemoteProtocolError:
    # Same wording as PostgreSQL: a fixed message, the specifics in the DETAIL.
    return RemoteProtocolError("malformed SCRAM message", detail=f"{what}: {why}")


def _parse_attributes(data: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """Split ``a=value,b=value,...`` into (name, value) pairs, keeping order.

    Works on bytes so the exact input can go into AuthMessage and so odd bytes in fields
    we ignore (the user name) can't trip a decoder.
    """
    if b"\0" in data:
        raise _malformed(what, "contains a NUL byte")
    attributes: list[tuple[bytes, bytes]] = []
    for part in data.split(b","):
        name = part[:1]
        if len(part) < 2 or not (name.isascii() and name.isalpha()) or part[1:2] != b"=":
            raise _malformed(what, "expected attribute=value")
        attributes.append((name, part[2:]))
    return attributes


def _names(attributes: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(name for name, _ in attributes)


def _decode_proof(value: bytes, what: str, name: str) -> bytes:
    try:
        decoded = _b64decode(value)
    except ValueError:
        raise _malformed(what, f"{name} is not valid base64") from None
    if len(decoded) != _KEY_LEN:
        raise _malformed(what, f"{name} has the wrong length")
    return decoded


class _State(enum.Enum):
    START = enum.auto()
    SENT_FIRST = enum.auto()
    SENT_FINAL = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


def _expect(current: _State, wanted: _State, step: str) -> None:
    if current is not wanted:
        raise LocalProtocolError(f"SCRAM: {step} called in state {current.name}")


# --- the proxy as SCRAM server ----------------------------------------------------------


class ScramServer:
    """Client-facing SCRAM-SHA-256 (RFC 5802/7677): the proxy plays the server.

    Usage: offer :attr:`mechanisms` in AuthenticationSASL, feed the SASLInitialResponse to
    :meth:`handle_client_first` and send the result as AuthenticationSASLContinue, feed
    the SASLResponse to :meth:`handle_client_final` and send the result as
    AuthenticationSASLFinal. Any exception ends the exchange.
    """

    MECHANISMS: ClassVar[tuple[str, ...]] = (MECHANISM,)

    def __init__(
        self,
        verifier: ScramVerifier,
        *,
        server_nonce: str | None = None,
        channel_binding: bytes | None = None,
    ) -> None:
        """``server_nonce`` is the printable suffix we append to the client's nonce
        (random when None; tests pin it). ``channel_binding`` is the tls-server-end-point
        data of the client's TLS connection; giving it offers SCRAM-SHA-256-PLUS too.
        """
        self._verifier = verifier
        self._server_nonce = _checked_nonce(server_nonce)
        self._channel_binding = channel_binding
        self._state = _State.START
        self._plus = False
        self._gs2_header = b""
        self._client_first_bare = b""
        self._server_first = b""
        self._nonce = b""

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What to list in AuthenticationSASL, most preferred first (as PostgreSQL does)."""
        if self._channel_binding is None:
            return self.MECHANISMS
        return (MECHANISM_PLUS, *self.MECHANISMS)

    @property
    def done(self) -> bool:
        """True once the client's proof has been verified."""
        return self._state is _State.DONE

    def handle_client_first(self, mechanism: str, data: bytes) -> bytes:
        """Take the client-first-message, return the server-first-message."""
        _expect(self._state, _State.START, "handle_client_first")
        # Pessimistic: any exception below leaves the exchange dead.
        self._state = _State.FAILED
        if mechanism not in self.mechanisms:
            raise RemoteProtocolError(
                "client selected an invalid SASL authentication mechanism",
                detail=f"offered: {', '.join(self.mechanisms)}",
            )
        self._plus = mechanism == MECHANISM_PLUS
        what = "client-first-message"

        parts = data.split(b",", 2)
        if len(parts) != 3:
            raise _malformed(what, "missing GS2 header")
        cbind_flag, authzid, bare = parts
        if cbind_flag in (b"n", b"y"):
            if self._plus:
                raise RemoteProtocolError(
                    "client selected SCRAM-SHA-256-PLUS but did not send channel binding data"
                )
            # "y" means "I could bind but you don't seem to offer it". If we did offer
            # PLUS, someone stripped it from our list on the way: a downgrade attack.
            if cbind_flag == b"y" and self._channel_binding is not None:
                raise RemoteProtocolError(
                    "SCRAM channel binding negotiation error",
                    detail="The client supports SCRAM channel binding but thinks the server "
                    "does not. However, this server does support channel binding.",
                )
        elif cbind_flag.startswith(b"p="):
            if not self._plus:
                raise RemoteProtocolError(
                    "client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                    "message includes channel binding data"
                )
            if cbind_flag[2:] != _CB_TYPE:
                raise RemoteProtocolError("unsupported SCRAM channel-binding type")
        else:
            raise _malformed(what, "invalid GS2 channel-binding flag")
        if authzid:
            if not authzid.startswith(b"a="):
                raise _malformed(what, "invalid GS2 authorization identity")
            raise RemoteProtocolError(
                "client uses authorization identity, but it is not supported",
                sqlstate=SQLState.FEATURE_NOT_SUPPORTED,
            )

        attributes = _parse_attributes(bare, what)
        if attributes[0][0] == b"m":
            # RFC 5802: an unknown mandatory extension must make authentication fail.
            raise RemoteProtocolError(
                "unsupported SCRAM extension", sqlstate=SQLState.FEATURE_NOT_SUPPORTED
            )
        if not _names(attributes).startswith(b"nr"):
            raise _malformed(what, "expected n=<user>,r=<nonce>")
        # The user name is ignored: PostgreSQL takes it from the startup packet and libpq
        # sends "n=". Trailing extensions are optional ones and are ignored as well.
        client_nonce = attributes[1][1]
        if not _is_printable_nonce(client_nonce):
            raise _malformed(what, "invalid nonce")

        self._gs2_header = data[: len(data) - len(bare)]
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        verifier = self._verifier
        self._server_first = (
            b"r=" + self._nonce + _salt_and_iterations(verifier.salt, verifier.iterations)
        )
        self._state = _State.SENT_FIRST
        return self._server_first

    def handle_client_final(self, data: bytes) -> bytes:
        """Check the client-final-message's proof; return the server-final-message."""
        _expect(self._state, _State.SENT_FIRST, "handle_client_final")
        self._state = _State.FAILED
        what = "client-final-message"
        attributes = _parse_attributes(data, what)
        names = _names(attributes)
        if len(names) < 3 or not names.startswith(b"cr") or not names.endswith(b"p"):
            raise _malformed(what, "expected c=<binding>,r=<nonce>,...,p=<proof>")

        try:
            cbind_input = _b64decode(attributes[0][1])
        except ValueError:
            raise _malformed(what, "channel binding is not valid base64") from None
        if not cbind_input.startswith(self._gs2_header):
            raise RemoteProtocolError(
                "SCRAM channel binding check failed",
                detail="the GS2 header differs from the client-first-message's",
            )
        cbind_data = cbind_input[len(self._gs2_header) :]
        if self._plus:
            # _plus implies we offered PLUS, i.e. _channel_binding is set. A mismatch
            # means the client's TLS session is not the one we terminate: a MITM.
            expected = self._channel_binding or b""
            if not hmac.compare_digest(cbind_data, expected):
                raise AuthenticationFailed("SCRAM channel binding check failed")
        elif cbind_data:
            raise RemoteProtocolError("unexpected SCRAM channel-binding data")

        if attributes[1][1] != self._nonce:
            raise RemoteProtocolError("SCRAM nonce mismatch")
        proof = _decode_proof(attributes[-1][1], what, "proof")

        # p= is last and base64 has no ',', so everything before the last ',' is
        # client-final-message-without-proof, byte for byte.
        without_proof = data.rpartition(b",")[0]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        verifier = self._verifier
        client_key = _xor(proof, _hmac(verifier.stored_key, auth_message))
        # ClientProof = ClientKey XOR ClientSignature, so undoing the XOR must give a key
        # whose hash is StoredKey. compare_digest: no timing hints about how close it was.
        if not hmac.compare_digest(_sha256(client_key), verifier.stored_key) or verifier.mock:
            # Same message for unknown users (mock) and wrong passwords: no enumeration.
            raise AuthenticationFailed("password authentication failed")
        self._state = _State.DONE
        return b"v=" + _b64encode(_hmac(verifier.server_key, auth_message))


# --- the proxy as SCRAM client ----------------------------------------------------------


def _saslname(username: str) -> bytes:
    # RFC 5802 saslname: ',' and '=' must be escaped.
    return username.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


class ScramClient:
    """Backend-facing SCRAM-SHA-256: the proxy logs in to PostgreSQL.

    Usage: check :func:`choose_mechanism`, send :meth:`client_first` in
    SASLInitialResponse, answer AuthenticationSASLContinue with
    :meth:`handle_server_first`, then pass AuthenticationSASLFinal's payload to
    :meth:`handle_server_final`: only once that returns is the backend authenticated
    (to us) and AuthenticationOk trustworthy.
    """

    def __init__(
        self,
        password: str,
        *,
        client_nonce: str | None = None,
        username: str = "",
        channel_binding: bytes | None = None,
    ) -> None:
        """``client_nonce`` is the printable nonce (random when None; tests pin it).
        ``username`` goes into "n=": PostgreSQL ignores it, so we send "n=" like libpq
        does; it exists to reproduce the RFC 7677 test vector. ``channel_binding`` is the
        tls-server-end-point data of the server's certificate: giving it selects
        SCRAM-SHA-256-PLUS (use it only when the server offered that).
        """
        # Fail now, not halfway through a login, if the password cannot be encoded.
        _password_bytes(password)
        self._password = password
        self._channel_binding = channel_binding
        self._gs2_header = (
            _CLIENT_GS2_HEADER if channel_binding is None else _CLIENT_GS2_HEADER_PLUS
        )
        self._client_nonce = _checked_nonce(client_nonce)
        self._client_first_bare = b"n=" + _saslname(username) + b",r=" + self._client_nonce
        self._state = _State.START
        self._server_signature = b""

    @property
    def mechanism(self) -> str:
        return MECHANISM if self._channel_binding is None else MECHANISM_PLUS

    @property
    def done(self) -> bool:
        """True once the server's signature has been verified."""
        return self._state is _State.DONE

    def client_first(self) -> bytes:
        """The client-first-message for SASLInitialResponse."""
        _expect(self._state, _State.START, "client_first")
        self._state = _State.SENT_FIRST
        return self._gs2_header + self._client_first_bare

    def handle_server_first(self, data: bytes) -> bytes:
        """Take the server-first-message, return the client-final-message."""
        _expect(self._state, _State.SENT_FIRST, "handle_server_first")
        self._state = _State.FAILED
        what = "server-first-message"
        attributes = _parse_attributes(data, what)
        if attributes[0][0] == b"m":
            raise RemoteProtocolError("server requires an unsupported SCRAM extension")
        if not _names(attributes).startswith(b"rsi"):
            raise _malformed(what, "expected r=<nonce>,s=<salt>,i=<iterations>")
        nonce = attributes[0][1]
        # The server must extend our nonce, not replace it: that is what makes its
        # answer fresh for this exchange.
        if (
            not _is_printable_nonce(nonce)
            or len(nonce) <= len(self._client_nonce)
            or not nonce.startswith(self._client_nonce)
        ):
            raise RemoteProtocolError("SCRAM nonce mismatch", detail=what)
        try:
            salt = _b64decode(attributes[1][1])
        except ValueError:
            raise _malformed(what, "salt is not valid base64") from None
        if not salt:
            raise _malformed(what, "empty salt")
        try:
            iterations = _parse_iterations(attributes[2][1])
        except ValueError as exc:
            raise _malformed(what, str(exc)) from None

        salted = salted_password(self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        # c= is the GS2 header plus, with PLUS, the binding data: the proof then covers
        # the TLS session, and a MITM with another certificate cannot relay it.
        cbind_input = self._gs2_header + (self._channel_binding or b"")
        without_proof = b"c=" + _b64encode(cbind_input) + b",r=" + nonce
        auth_message = self._client_first_bare + b"," + data + b"," + without_proof
        proof = _xor(client_key, _hmac(_sha256(client_key), auth_message))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        self._state = _State.SENT_FINAL
        return without_proof + b",p=" + _b64encode(proof)

    def handle_server_final(self, data: bytes) -> None:
        """Verify the server-final-message; raises unless the server proved itself."""
        _expect(self._state, _State.SENT_FINAL, "handle_server_final")
        self._state = _State.FAILED
        what = "server-final-message"
        attributes = _parse_attributes(data, what)
        name, value = attributes[0]
        if name == b"e":
            reason = value[:200].decode("utf-8", "replace")
            raise AuthenticationFailed(f"server rejected SCRAM authentication: {reason}")
        if name != b"v":
            raise _malformed(what, "expected v=<signature> or e=<error>")
        signature = _decode_proof(value, what, "server signature")
        # A server that got our proof but can't sign back doesn't know the verifier: it
        # is not the PostgreSQL we meant to talk to.
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationFailed("server signature mismatch")
        self._state = _State.DONE


def choose_mechanism(offered: Sequence[str], *, channel_binding: bool = False) -> str:
    """Pick the SASL mechanism for logging in to a backend from its offer.

    ``channel_binding``: we are on TLS and have the server certificate's binding data;
    then SCRAM-SHA-256-PLUS is chosen when offered. Otherwise plain SCRAM-SHA-256 with gs2
    flag "n", which servers always accept alongside PLUS.
    """
    if channel_binding and MECHANISM_PLUS in offered:
        return MECHANISM_PLUS
    if MECHANISM in offered:
        return MECHANISM
    listed = ", ".join(offered) if offered else "nothing"
    raise AuthenticationFailed(
        f"backend offered no supported SASL mechanism (offered: {listed}; supported: {MECHANISM})"
    )
