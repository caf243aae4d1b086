"""SCRAM-SHA-256: RFC 7677 vector, verifiers made by a real PostgreSQL, and fuzzing."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy._auth.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramServer,
    ScramVerifier,
    choose_mechanism,
    salted_password,
    saslprep,
)
from trioproxy.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    RemoteProtocolError,
    SQLState,
)

# Everything a peer can provoke must surface as one of these, never as e.g. IndexError.
PEER_ERRORS = (AuthenticationFailed, RemoteProtocolError)

# --- RFC 7677 section 3 (values exactly as published there) ----------------------------

RFC_PASSWORD = "pencil"
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Made by PostgreSQL 15.18 (CREATE ROLE ... PASSWORD with password_encryption =
# scram-sha-256); the non-ASCII ones pin down SASLprep, including PostgreSQL's fallback
# to the raw password when SASLprep rejects it.
PG_VERIFIERS = {
    "secret": (
        "SCRAM-SHA-256$4096:oNvlwdXKkIoZcoS+sUl70g==$U5tipBFoWFTUZ9WKfAxJd+NNaNX2O5CP1LaXNJuvPSU="
        ":Qml26PUU7no1KJ7Ez8YafR/pcLazO+GAH0Nlf0xjx4E="
    ),
    # soft hyphen is mapped to nothing: same as "IX"
    "I\xadX": (
        "SCRAM-SHA-256$4096:sUX6PkHCxpzmrLQY4hDQFA==$gLZhBgnBZBMqt8TBAsZc/PTcYmFhduRwGExnkHCL+1c="
        ":2EIEQwXDSEXRv4B2PMy3056ScsJrOaHXfbKrMa4tSKM="
    ),
    # ligature and full-width letters are NFKC-normalized, NBSP becomes a space
    "\ufb01\xa0\uff30\uff41\uff53\uff53": (
        "SCRAM-SHA-256$4096:voLOxlXuFqxLQ2nAl6ZK1w==$EQO5ZVzk4dP6emmTRrAAohgph6vSkLz+LEy0lfvcj9k="
        ":27etUji4AD1IbPauPSgN653w/jaepTNezUySO7rM8Iw="
    ),
    # control character: prohibited, so the raw password is used
    "\x07\xe9\ufb01": (
        "SCRAM-SHA-256$4096:msu3NqVA78xIqdXww4rMpQ==$mqe/npSNRCP6836iw6HX1A8Uek0bmFYS4dZ0nbg+wbo="
        ":g7n8CKxCeGIexihhbwpIZuxso+mmO9mOGe2lYvH4Nok="
    ),
    # left-to-right and right-to-left mixed: bidi rule fails, raw password
    "a\u05d0\ufb01": (
        "SCRAM-SHA-256$4096:Dtxh2tYtJiblJjfuyq71Hg==$OVMM20p2UAvmUttehzgnD6pTUVtJRJMpNpeHn9GjLXw="
        ":sSOeDtf4HU710D/7MckjQ9zcoXH8S5+V23CHCMXYVVU="
    ),
    # all right-to-left: allowed and normalized
    "\u05d0\ufb2a\u05d1": (
        "SCRAM-SHA-256$4096:9WeOMpW8tly3TxAkVFPz0g==$6Hznfc+wKUNGQf7Hg0L/Er1O6bzWdXlG7B49TZO470g="
        ":fxOhevWKqpAcr20QiYsKUK8Ij177eHzk0V4wksxX5Z8="
    ),
    # U+0221 is unassigned in Unicode 3.2: prohibited, raw password
    "\u0221\ufb01": (
        "SCRAM-SHA-256$4096:L+r+TksJ92ZcDFl9eCubfA==$yvAyNvVFGFdTVjSdnQM8a00pqYon3yK3w0h66UWnvig="
        ":YIMpSztRKHqmHQ8f3s36u5jNKt+X582Dc7FhYaEfugw="
    ),
    # U+200B is both "mapped to nothing" and a non-ASCII space: PostgreSQL makes it " "
    "\xad\u200b": (
        "SCRAM-SHA-256$4096:tHJMixjr6//MfID6O8gPTg==$5qb8OQx40Kn40xnHbsJ3le5egQCDraVvB4BpZm+XQMo="
        ":a8cXFfAqWD5PPlKmV9Pee462ztZMqHhkYQhzntlXwqc="
    ),
}

VERIFIER_RE = re.compile(
    r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)

FAST = 16  # iteration count for property tests: PBKDF2 at 4096 would dominate the run


def fast_verifier(password: str, salt: bytes = b"0123456789abcdef") -> ScramVerifier:
    return ScramVerifier.from_password(password, salt=salt, iterations=FAST)


def exchange(server: ScramServer, client: ScramClient) -> None:
    """Run a whole login; raises whatever either side raises."""
    server_first = server.handle_client_first(client.mechanism, client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.handle_server_final(server_final)


def started() -> tuple[ScramServer, ScramClient, bytes]:
    """A server and client for password "pw" one step in, plus the client-final-message."""
    server = ScramServer(fast_verifier("pw"))
    client = ScramClient("pw")
    server_first = server.handle_client_first(MECHANISM, client.client_first())
    return server, client, client.handle_server_first(server_first)


def reference_client_final(
    password: str, server_first: bytes, client_first_bare: bytes, cbind_input: bytes
) -> bytes:
    """Independent RFC 5802 client-final computation, for gs2 headers ScramClient can't do."""
    attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + base64.b64encode(cbind_input) + b",r=" + attrs[b"r"]
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


# --- known answers ------------------------------------------------------------------------


def test_rfc7677_client() -> None:
    client = ScramClient(RFC_PASSWORD, client_nonce=RFC_CLIENT_NONCE, username="user")
    assert client.mechanism == "SCRAM-SHA-256"
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.done
    client.handle_server_final(RFC_SERVER_FINAL)
    assert client.done


def test_rfc7677_server() -> None:
    verifier = ScramVerifier.from_password(RFC_PASSWORD, salt=RFC_SALT, iterations=4096)
    server = ScramServer(verifier, server_nonce=RFC_SERVER_NONCE)
    assert server.mechanisms == ("SCRAM-SHA-256",) == ScramServer.MECHANISMS
    assert server.handle_client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert not server.done
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.done


@pytest.mark.parametrize("password", list(PG_VERIFIERS))
def test_postgresql_verifiers(password: str) -> None:
    text = PG_VERIFIERS[password]
    verifier = ScramVerifier.parse(text)
    assert verifier.iterations == 4096
    assert verifier.to_text() == text
    # Same password and salt give byte-identical keys, so our SASLprep matches PostgreSQL's.
    assert ScramVerifier.from_password(password, salt=verifier.salt).to_text() == text
    exchange(ScramServer(verifier), ScramClient(password))


def test_secret_verifier_text_format() -> None:
    salt = bytes(range(16))
    verifier = ScramVerifier.from_password("secret", salt=salt)
    text = verifier.to_text()
    match = VERIFIER_RE.fullmatch(text)
    assert match is not None
    assert match[1] == "4096"
    assert base64.b64decode(match[2]) == salt
    assert len(base64.b64decode(match[3])) == len(base64.b64decode(match[4])) == 32
    assert ScramVerifier.parse(text) == verifier
    server = ScramServer(ScramVerifier.parse(text))
    exchange(server, ScramClient("secret"))
    assert server.done


def test_client_first_looks_like_libpq() -> None:
    first = ScramClient("pw").client_first()
    assert re.fullmatch(rb"n,,n=,r=[A-Za-z0-9+/]{24}", first)
    assert ScramClient("pw").client_first() != first  # fresh nonce every time


def test_username_is_escaped_and_ignored_by_server() -> None:
    client = ScramClient("pw", client_nonce="abc", username="a=b,c")
    assert client.client_first() == b"n,,n=a=3Db=2Cc,r=abc"
    exchange(ScramServer(fast_verifier("pw")), ScramClient("pw", username="someone else"))


# --- round trips and failures -----------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=st.text(), salt=st.binary(min_size=1, max_size=32))
def test_round_trip(password: str, salt: bytes) -> None:
    server = ScramServer(fast_verifier(password, salt))
    client = ScramClient(password)
    exchange(server, client)
    assert server.done
    assert client.done


@settings(max_examples=25, deadline=None)
@given(password=st.text(), wrong=st.text())
def test_wrong_password(password: str, wrong: str) -> None:
    if saslprep(password) == saslprep(wrong):
        return
    server = ScramServer(fast_verifier(password))
    with pytest.raises(AuthenticationFailed, match="password authentication failed"):
        exchange(server, ScramClient(wrong))
    assert not server.done


@pytest.mark.parametrize("bit", [0, 7, 100, 255])
def test_tampered_proof(bit: int) -> None:
    server, _, final = started()
    head, _, proof_b64 = final.rpartition(b",p=")
    proof = bytearray(base64.b64decode(proof_b64))
    proof[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(head + b",p=" + base64.b64encode(bytes(proof)))


def test_tampered_server_signature() -> None:
    server, client, final = started()
    server_final = server.handle_client_final(final)
    # Flip one bit of the signature itself (not of its base64 text, which could turn a
    # character into a non-base64 one and test the parser instead).
    signature = bytearray(base64.b64decode(server_final[2:]))
    signature[-1] ^= 1
    tampered = b"v=" + base64.b64encode(bytes(signature))
    with pytest.raises(AuthenticationFailed, match="server signature mismatch"):
        client.handle_server_final(tampered)
    assert not client.done


def test_server_signature_from_other_exchange_rejected() -> None:
    server1, _, final1 = started()
    _, client2, _ = started()
    with pytest.raises(AuthenticationFailed, match="server signature mismatch"):
        client2.handle_server_final(server1.handle_client_final(final1))


def test_server_error_attribute() -> None:
    _, client, _ = started()
    with pytest.raises(AuthenticationFailed, match="invalid-proof"):
        client.handle_server_final(b"e=invalid-proof")


def test_client_final_replayed_to_new_server_fails() -> None:
    # A new server has a new nonce, so a recorded client-final is useless.
    _, _, final = started()
    server = ScramServer(fast_verifier("pw"))
    server.handle_client_first(MECHANISM, ScramClient("pw").client_first())
    with pytest.raises(RemoteProtocolError, match="nonce mismatch"):
        server.handle_client_final(final)


def test_out_of_order_calls() -> None:
    server = ScramServer(fast_verifier("pw"))
    with pytest.raises(LocalProtocolError):
        server.handle_client_final(b"c=biws,r=x,p=AAAA")
    client = ScramClient("pw")
    with pytest.raises(LocalProtocolError):
        client.handle_server_first(b"r=x,s=AAAA,i=1")
    client.client_first()
    with pytest.raises(LocalProtocolError):
        client.client_first()
    # A failed step kills the exchange: no second try on the same object.
    server = ScramServer(fast_verifier("pw"))
    with pytest.raises(RemoteProtocolError):
        server.handle_client_first(MECHANISM, b"garbage")
    with pytest.raises(LocalProtocolError):
        server.handle_client_first(MECHANISM, ScramClient("pw").client_first())


@pytest.mark.parametrize("nonce", ["", "a,b", "caf\xe9", "sp ace", "tab\t"])
def test_bad_nonce_arguments(nonce: str) -> None:
    with pytest.raises(ValueError, match="nonce"):
        ScramClient("pw", client_nonce=nonce)
    with pytest.raises(ValueError, match="nonce"):
        ScramServer(fast_verifier("pw"), server_nonce=nonce)


# --- malformed input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "message", "error", "match"),
    [
        ("SCRAM-SHA-1", b"n,,n=,r=abc", RemoteProtocolError, "invalid SASL"),
        (MECHANISM_PLUS, b"p=tls-server-end-point,,n=,r=abc", RemoteProtocolError, "invalid SASL"),
        (MECHANISM, b"", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n=,r=abc", RemoteProtocolError, "malformed"),
        (MECHANISM, b"x,,n=,r=abc", RemoteProtocolError, "malformed"),
        (MECHANISM, b"p=tls-server-end-point,,n=,r=abc", RemoteProtocolError, "channel binding"),
        (MECHANISM, b"n,a=someone,n=,r=abc", RemoteProtocolError, "authorization identity"),
        (MECHANISM, b"n,junk,n=,r=abc", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,m=ext,n=,r=abc", RemoteProtocolError, "extension"),
        (MECHANISM, b"n,,r=abc,n=", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,n=", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,n=,r=", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,n=,r=a\x00b", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,n=,r=caf\xc3\xa9", RemoteProtocolError, "malformed"),
        (MECHANISM, b"n,,n=,,r=abc", RemoteProtocolError, "malformed"),
    ],
)
def test_malformed_client_first(
    mechanism: str, message: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ScramServer(fast_verifier("pw")).handle_client_first(mechanism, message)


def test_authzid_is_feature_not_supported() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ScramServer(fast_verifier("pw")).handle_client_first(MECHANISM, b"n,a=x,n=,r=abc")
    assert info.value.sqlstate == SQLState.FEATURE_NOT_SUPPORTED


def test_gs2_y_accepted_without_plus_and_extensions_ignored() -> None:
    server = ScramServer(fast_verifier("pw"))
    first_bare = b"n=,r=abc,x=optional-extension"
    server_first = server.handle_client_first(MECHANISM, b"y,," + first_bare)
    final = reference_client_final("pw", server_first, first_bare, b"y,,")
    assert server.handle_client_final(final).startswith(b"v=")


def test_client_final_must_repeat_gs2_header() -> None:
    server = ScramServer(fast_verifier("pw"))
    server_first = server.handle_client_first(MECHANISM, b"y,,n=,r=abc")
    final = reference_client_final("pw", server_first, b"n=,r=abc", b"n,,")
    with pytest.raises(RemoteProtocolError, match="channel binding"):
        server.handle_client_final(final)


def client_final_variants() -> list[bytes]:
    """Malformed client-final-messages (nonce placeholders are fixed up in the test)."""
    proof = base64.b64encode(bytes(32))
    return [
        b"",
        b"c=biws",
        b"c=biws,r=NONCE",
        b"r=NONCE,c=biws,p=" + proof,
        b"c=biws,p=" + proof + b",r=NONCE",
        b"c=!!!,r=NONCE,p=" + proof,
        b"c=eSws,r=NONCE,p=" + proof,  # "y,," but client-first said "n,,"
        b"c=" + base64.b64encode(b"n,,extra") + b",r=NONCE,p=" + proof,
        b"c=biws,r=NONCEx,p=" + proof,
        b"c=biws,r=NONCE,p=AAAA",
        b"c=biws,r=NONCE,p=not base64",
        b"c=biws,r=NONCE,p=" + proof + b",",
        b"c=biws,r=NONCE,p=" + proof + b"\x00",
    ]


@pytest.mark.parametrize("template", client_final_variants())
def test_malformed_client_final(template: bytes) -> None:
    server = ScramServer(fast_verifier("pw"), server_nonce="SRV")
    server.handle_client_first(MECHANISM, b"n,,n=,r=CLI")
    with pytest.raises(RemoteProtocolError):
        server.handle_client_final(template.replace(b"NONCE", b"CLISRV"))


def test_extensions_in_client_final_are_covered_by_the_proof() -> None:
    # Extensions sit in client-final-without-proof, so the proof must cover them: adding
    # one after the fact breaks the proof rather than being silently accepted.
    server, _, final = started()
    head, _, proof = final.rpartition(b",p=")
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(head + b",x=injected,p=" + proof)


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (b"", "malformed"),
        (b"m=ext,r=NONCEsrv,s=c2FsdA==,i=4096", "extension"),
        (b"r=NONCEsrv,i=4096,s=c2FsdA==", "malformed"),
        (b"r=NONCE,s=c2FsdA==,i=4096", "nonce mismatch"),  # server added nothing
        (b"r=OTHERsrv,s=c2FsdA==,i=4096", "nonce mismatch"),
        (b"r=NONCEs\xc3\xa9,s=c2FsdA==,i=4096", "nonce mismatch"),
        (b"r=NONCEsrv,s=,i=4096", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA=,i=4096", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==,i=0", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==,i=-1", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==,i=+5", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==,i=\xd9\xa3", "malformed"),  # Arabic-Indic digit three
        (b"r=NONCEsrv,s=c2FsdA==,i=2147483648", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==,i=99999999999999999999999", "malformed"),
        (b"r=NONCEsrv,s=c2FsdA==", "malformed"),
    ],
)
def test_malformed_server_first(message: bytes, match: str) -> None:
    client = ScramClient("pw", client_nonce="NONCE")
    client.client_first()
    with pytest.raises(RemoteProtocolError, match=match):
        client.handle_server_first(message)


def test_server_first_extensions_ignored() -> None:
    server = ScramServer(fast_verifier("pw"))
    client = ScramClient("pw")
    server_first = server.handle_client_first(MECHANISM, client.client_first())
    # An optional extension after i= changes AuthMessage; the server never sent it, so
    # the proof fails, but parsing it must not.
    final = client.handle_server_first(server_first + b",x=ext")
    with pytest.raises(AuthenticationFailed):
        server.handle_client_final(final)


@pytest.mark.parametrize(
    "message", [b"", b"v=", b"v=AAAA", b"x=abc", b"v=!!", b"v", b"e", b"v=AA==,"]
)
def test_malformed_server_final(message: bytes) -> None:
    _, client, _ = started()
    with pytest.raises(RemoteProtocolError):
        client.handle_server_final(message)


@settings(max_examples=300)
@given(mechanism=st.sampled_from([MECHANISM, MECHANISM_PLUS, ""]), data=st.binary())
def test_fuzz_client_first(mechanism: str, data: bytes) -> None:
    server = ScramServer(fast_verifier("pw"))
    with contextlib.suppress(*PEER_ERRORS):
        server.handle_client_first(mechanism, data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary())
def test_fuzz_client_final(data: bytes) -> None:
    server, _, _ = started()
    with pytest.raises(PEER_ERRORS):
        server.handle_client_final(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary())
def test_fuzz_server_first(data: bytes) -> None:
    client = ScramClient("pw")
    client.client_first()
    with pytest.raises(PEER_ERRORS):
        client.handle_server_first(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary())
def test_fuzz_server_final(data: bytes) -> None:
    _, client, _ = started()
    with pytest.raises(PEER_ERRORS):
        client.handle_server_final(data)


mutation = st.tuples(
    st.sampled_from(["flip", "delete", "insert", "truncate"]),
    st.integers(min_value=0),
    st.sampled_from(list(b",=\x00 AZaz09+/rncpvei")) | st.integers(0, 255),
)


def mutate(data: bytes, how: tuple[str, int, int]) -> bytes:
    op, where, byte = how
    if not data:
        return bytes([byte])
    i = where % len(data)
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (byte or 1)]) + data[i + 1 :]
    if op == "delete":
        return data[:i] + data[i + 1 :]
    if op == "insert":
        return data[:i] + bytes([byte]) + data[i:]
    return data[:i]


@settings(max_examples=300, deadline=None)
@given(step=st.integers(0, 3), how=mutation)
def test_fuzz_mutated_exchange(step: int, how: tuple[str, int, int]) -> None:
    """Corrupt one message of an otherwise valid exchange: only peer errors may come out."""
    server = ScramServer(fast_verifier("pw"))
    client = ScramClient("pw")
    message = client.client_first()
    try:
        message = mutate(message, how) if step == 0 else message
        message = server.handle_client_first(MECHANISM, message)
        message = mutate(message, how) if step == 1 else message
        message = client.handle_server_first(message)
        message = mutate(message, how) if step == 2 else message
        message = server.handle_client_final(message)
        message = mutate(message, how) if step == 3 else message
        client.handle_server_final(message)
    except PEER_ERRORS:
        return
    # Survivable corruptions exist (e.g. a byte of the ignored user name), but then the
    # exchange must really have completed on both sides.
    assert server.done
    assert client.done


# --- channel binding (SCRAM-SHA-256-PLUS) -----------------------------------------------

CB_DATA = hashlib.sha256(b"certificate").digest()
CB_HEADER = b"p=tls-server-end-point,,"


def test_plus_offered_only_with_channel_binding() -> None:
    server = ScramServer(fast_verifier("pw"), channel_binding=CB_DATA)
    assert server.mechanisms == (MECHANISM_PLUS, MECHANISM)


def test_plus_exchange() -> None:
    server = ScramServer(fast_verifier("pw"), channel_binding=CB_DATA)
    server_first = server.handle_client_first(MECHANISM_PLUS, CB_HEADER + b"n=,r=abc")
    final = reference_client_final("pw", server_first, b"n=,r=abc", CB_HEADER + CB_DATA)
    assert server.handle_client_final(final).startswith(b"v=")
    assert server.done


def test_plus_wrong_binding_data() -> None:
    server = ScramServer(fast_verifier("pw"), channel_binding=CB_DATA)
    server_first = server.handle_client_first(MECHANISM_PLUS, CB_HEADER + b"n=,r=abc")
    final = reference_client_final("pw", server_first, b"n=,r=abc", CB_HEADER + b"other")
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        server.handle_client_final(final)


def test_plain_scram_still_works_when_plus_offered() -> None:
    server = ScramServer(fast_verifier("pw"), channel_binding=CB_DATA)
    exchange(server, ScramClient("pw"))
    assert server.done


@pytest.mark.parametrize(
    ("mechanism", "message", "match"),
    [
        # "y" while we offered PLUS: someone removed PLUS from the offer (downgrade).
        (MECHANISM, b"y,,n=,r=abc", "negotiation error"),
        (MECHANISM_PLUS, b"n,,n=,r=abc", "did not send channel binding"),
        (MECHANISM_PLUS, b"y,,n=,r=abc", "did not send channel binding"),
        (MECHANISM_PLUS, b"p=tls-unique,,n=,r=abc", "unsupported SCRAM channel-binding type"),
        (MECHANISM, CB_HEADER + b"n=,r=abc", "includes channel binding data"),
    ],
)
def test_plus_negotiation_errors(mechanism: str, message: bytes, match: str) -> None:
    server = ScramServer(fast_verifier("pw"), channel_binding=CB_DATA)
    with pytest.raises(RemoteProtocolError, match=match):
        server.handle_client_first(mechanism, message)


# --- unknown users ----------------------------------------------------------------------


def test_mock_verifier_is_deterministic_and_plausible() -> None:
    secret = b"s" * 32
    mock = ScramVerifier.mock_for("ghost", secret)
    assert mock == ScramVerifier.mock_for("ghost", secret)
    assert mock.salt == hmac.digest(secret, b"ghost", "sha256")[:16]
    assert mock.iterations == 4096
    assert mock.salt != ScramVerifier.mock_for("ghost2", secret).salt
    assert mock.salt != ScramVerifier.mock_for("ghost", b"t" * 32).salt
    assert ScramVerifier.mock_for("ghost", secret, iterations=10000).iterations == 10000
    # Shaped exactly like a real one.
    assert VERIFIER_RE.fullmatch(mock.to_text())


def test_mock_exchange_fails_like_wrong_password() -> None:
    mock_server = ScramServer(ScramVerifier.mock_for("ghost", b"s" * 32))
    client = ScramClient("anything")
    server_first = mock_server.handle_client_first(MECHANISM, client.client_first())
    assert re.fullmatch(rb"r=[^,]+,s=[A-Za-z0-9+/]{22}==,i=4096", server_first)
    with pytest.raises(AuthenticationFailed) as mock_info:
        mock_server.handle_client_final(client.handle_server_first(server_first))

    real_server = ScramServer(ScramVerifier.from_password("right"))
    with pytest.raises(AuthenticationFailed) as real_info:
        exchange(real_server, ScramClient("wrong"))
    assert mock_info.value.message == real_info.value.message
    assert mock_info.value.sqlstate == real_info.value.sqlstate == "28P01"


def test_mock_flag_fails_even_if_keys_matched() -> None:
    # Belt and braces: a mock verifier never authenticates, whatever its keys are.
    real = fast_verifier("pw")
    mock = ScramVerifier(
        iterations=real.iterations,
        salt=real.salt,
        stored_key=real.stored_key,
        server_key=real.server_key,
        mock=True,
    )
    with pytest.raises(AuthenticationFailed):
        exchange(ScramServer(mock), ScramClient("pw"))


# --- verifier text ------------------------------------------------------------------------


@given(
    iterations=st.integers(1, 2**31 - 1),
    salt=st.binary(min_size=1, max_size=64),
    stored_key=st.binary(min_size=32, max_size=32),
    server_key=st.binary(min_size=32, max_size=32),
)
def test_verifier_text_round_trip(
    iterations: int, salt: bytes, stored_key: bytes, server_key: bytes
) -> None:
    verifier = ScramVerifier(
        iterations=iterations, salt=salt, stored_key=stored_key, server_key=server_key
    )
    text = verifier.to_text()
    assert VERIFIER_RE.fullmatch(text)
    assert ScramVerifier.parse(text) == verifier


GOOD = PG_VERIFIERS["secret"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not a SCRAM-SHA-256 verifier"),
        ("md53175bce1d3201d16594cebf9d7eb3f9d", "not a SCRAM-SHA-256 verifier"),
        ("secret", "not a SCRAM-SHA-256 verifier"),
        ("scram-sha-256" + GOOD[13:], "not a SCRAM-SHA-256 verifier"),
        ("SCRAM-SHA-256$" + GOOD[14:].replace("$", "#"), "malformed"),
        (GOOD.replace(":", ";", 1), "malformed"),
        (GOOD.replace("4096", "0"), "iteration count"),
        (GOOD.replace("4096", "-1"), "iteration count"),
        (GOOD.replace("4096", "4096 "), "iteration count"),
        (GOOD.replace("4096", "\u0664"), "iteration count"),
        (GOOD.replace("4096", "99999999999"), "iteration count"),
        (GOOD.replace("oNvlwdXKkIoZcoS+sUl70g==", ""), "empty salt"),
        (GOOD.replace("oNvlwdXKkIoZcoS+sUl70g==", "oNvlwdXKkIoZcoS+sUl70g="), "salt"),
        (GOOD.replace("oNvlwdXKkIoZcoS+sUl70g==", "o\xe9vlwdXKkIoZcoS+sUl70g=="), "salt"),
        (GOOD.replace("U5tipBFo", "U5ti_BFo"), "StoredKey"),
        (GOOD.replace("Qml26PUU", "Qml2 PUU"), "ServerKey"),
        (GOOD[:-4] + "==", "32 bytes"),
        (GOOD + ":extra", "ServerKey"),
    ],
)
def test_verifier_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        ScramVerifier.parse(text)
    # The verifier is a secret: it must not leak into the error (and from there, logs).
    assert "oNvlwdXKkIoZcoS" not in str(info.value)
    assert "U5tipBFo" not in str(info.value)


def test_verifier_repr_hides_keys() -> None:
    verifier = ScramVerifier.parse(GOOD)
    assert base64.b64encode(verifier.stored_key).decode()[:8] not in repr(verifier)
    assert "stored_key" not in repr(verifier)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterations": 0},
        {"salt": b""},
        {"stored_key": b"short"},
        {"server_key": bytes(33)},
    ],
)
def test_verifier_constructor_validates(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {
        "iterations": 1,
        "salt": b"s",
        "stored_key": bytes(32),
        "server_key": bytes(32),
    }
    with pytest.raises(ValueError, match="SCRAM"):
        ScramVerifier(**{**fields, **kwargs})  # type: ignore[arg-type]


def test_from_password_random_salt() -> None:
    first = ScramVerifier.from_password("pw", iterations=FAST)
    second = ScramVerifier.from_password("pw", iterations=FAST)
    assert len(first.salt) == 16
    assert first.salt != second.salt
    assert first.stored_key != second.stored_key


# --- SASLprep and the PBKDF2 cache ------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("plain ascii \x07 kept", "plain ascii \x07 kept"),
        ("I\xadX", "IX"),
        ("a\xa0b", "a b"),
        ("\u2168", "IX"),  # roman numeral nine
        ("\ufb01", "fi"),
        ("\x07\xe9", "\x07\xe9"),  # prohibited: raw
        ("\xad", "\xad"),  # maps to empty: raw
        ("\u05d0a", "\u05d0a"),  # bidi violation: raw
        ("\u05d0\u05d1", "\u05d0\u05d1"),
    ],
)
def test_saslprep(password: str, prepared: str) -> None:
    assert saslprep(password) == prepared


def test_salted_password_is_cached() -> None:
    salted_password.cache_clear()
    first = salted_password("pw", b"salt", FAST)
    assert salted_password("pw", b"salt", FAST) is first
    info = salted_password.cache_info()
    assert (info.hits, info.misses, info.maxsize) == (1, 1, 256)
    assert first == hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", FAST)
    # Random-salt verifiers would only evict useful entries, so they bypass the cache.
    ScramVerifier.from_password("pw", iterations=FAST)
    assert salted_password.cache_info().currsize == 1


def test_salted_password_rejects_bad_iterations() -> None:
    with pytest.raises(ValueError, match="iteration"):
        salted_password("pw", b"salt", 0)


def test_undecodable_password_bytes_round_trip() -> None:
    # A password read from bytes with surrogateescape is hashed as those exact bytes.
    password = b"caf\xe9".decode("utf-8", "surrogateescape")
    exchange(ScramServer(fast_verifier(password)), ScramClient(password))
    assert salted_password(password, b"s", FAST) == hashlib.pbkdf2_hmac(
        "sha256", b"caf\xe9", b"s", FAST
    )


# --- choose_mechanism -------------------------------------------------------------------


def test_choose_mechanism() -> None:
    assert choose_mechanism(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]) == "SCRAM-SHA-256"
    assert choose_mechanism(("SCRAM-SHA-256",)) == "SCRAM-SHA-256"
    with pytest.raises(AuthenticationFailed, match="offered: SCRAM-SHA-256-PLUS, OAUTHBEARER"):
        choose_mechanism(["SCRAM-SHA-256-PLUS", "OAUTHBEARER"])
    with pytest.raises(AuthenticationFailed, match="offered: nothing"):
        choose_mechanism([])


# --- primitives --------------------------------------------------------------------------


@given(st.binary(max_size=40))
def test_printable_nonce_matches_rfc_5802(nonce: bytes) -> None:
    from trioproxy._auth.scram import _is_printable_nonce

    expected = bool(nonce) and all(0x21 <= c <= 0x7E and c != 0x2C for c in nonce)
    assert _is_printable_nonce(nonce) is expected
    assert not _is_printable_nonce(b"abc\n")  # no trailing-newline leniency


@given(
    st.binary(min_size=0, max_size=40).flatmap(
        lambda a: st.tuples(st.just(a), st.binary(min_size=len(a), max_size=len(a)))
    )
)
def test_xor_is_bytewise(pair: tuple[bytes, bytes]) -> None:
    from trioproxy._auth.scram import _xor

    a, b = pair
    assert _xor(a, b) == bytes(x ^ y for x, y in zip(a, b, strict=True))


def test_xor_refuses_different_lengths() -> None:
    from trioproxy._auth.scram import _xor

    with pytest.raises(ValueError, match="length"):
        _xor(b"\0" * 32, b"\0" * 31)
