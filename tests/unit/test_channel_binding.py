"""tls-server-end-point channel binding data (RFC 5929 4.1) for our certificate."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from trioproxy._auth.channel_binding import tls_server_end_point
from trioproxy._auth.login import backend_login
from trioproxy._auth.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramClient,
    ScramServer,
    ScramVerifier,
    choose_mechanism,
)
from trioproxy._protocol.framing import Message
from trioproxy._protocol.messages import AuthenticationSASL, SASLInitialResponse
from trioproxy.errors import AuthenticationFailed

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _certificate(key: object, algorithm: hashes.HashAlgorithm | None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
    )
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("algorithm", "expected_hash"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ],
)
def test_hash_follows_the_signature_algorithm(
    rsa_key: rsa.RSAPrivateKey, algorithm: hashes.HashAlgorithm, expected_hash: str
) -> None:
    cert = _certificate(rsa_key, algorithm)
    der = cert.public_bytes(serialization.Encoding.DER)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    expected = hashlib.new(expected_hash, der).digest()
    assert tls_server_end_point(der) == expected
    # A PEM chain: the first certificate (ours, the leaf) is the one that counts.
    other = _certificate(ec.generate_private_key(ec.SECP256R1()), hashes.SHA512())
    chain = pem + other.public_bytes(serialization.Encoding.PEM)
    assert tls_server_end_point(chain) == expected


@pytest.mark.parametrize("weak", [hashes.MD5(), hashes.SHA1()])  # noqa: S303 - the point
def test_md5_and_sha1_become_sha256(
    rsa_key: rsa.RSAPrivateKey, weak: hashes.HashAlgorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cryptography no longer signs with SHA-1 or MD5: present a SHA-256 certificate as if
    # its signature used the weak hash.
    cert = _certificate(rsa_key, hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)

    class WeaklySigned:
        signature_hash_algorithm = weak

        def public_bytes(self, encoding: serialization.Encoding) -> bytes:
            return cert.public_bytes(encoding)

    monkeypatch.setattr(x509, "load_der_x509_certificate", lambda _data: WeaklySigned())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_ecdsa_certificate() -> None:
    cert = _certificate(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


def test_ed25519_has_no_binding() -> None:
    cert = _certificate(ed25519.Ed25519PrivateKey.generate(), None)
    assert tls_server_end_point(cert.public_bytes(serialization.Encoding.DER)) is None


# --- SCRAM-SHA-256-PLUS, both roles of the proxy --------------------------------------------


def _exchange(client: ScramClient, server: ScramServer) -> None:
    server_first = server.handle_client_first(client.mechanism, client.client_first())
    client_final = client.handle_server_first(server_first)
    client.handle_server_final(server.handle_client_final(client_final))


def test_plus_round_trip() -> None:
    binding = hashlib.sha256(b"our certificate").digest()
    client = ScramClient("pw", channel_binding=binding)
    server = ScramServer(ScramVerifier.from_password("pw"), channel_binding=binding)
    assert client.mechanism == MECHANISM_PLUS
    _exchange(client, server)
    assert client.done
    assert server.done


def test_plus_with_another_certificate_fails() -> None:
    client = ScramClient("pw", channel_binding=b"\x01" * 32)
    server = ScramServer(ScramVerifier.from_password("pw"), channel_binding=b"\x02" * 32)
    with pytest.raises(AuthenticationFailed, match="channel binding"):
        _exchange(client, server)


def test_client_first_header() -> None:
    assert ScramClient("pw").client_first().startswith(b"n,,n=,r=")
    plus = ScramClient("pw", channel_binding=b"\x01" * 32).client_first()
    assert plus.startswith(b"p=tls-server-end-point,,n=,r=")


@pytest.mark.parametrize(
    ("offered", "binding", "chosen"),
    [
        ([MECHANISM_PLUS, MECHANISM], True, MECHANISM_PLUS),
        ([MECHANISM_PLUS, MECHANISM], False, MECHANISM),
        ([MECHANISM], True, MECHANISM),
        ([MECHANISM_PLUS], True, MECHANISM_PLUS),
    ],
)
def test_choose_mechanism(offered: list[str], binding: bool, chosen: str) -> None:
    assert choose_mechanism(offered, channel_binding=binding) == chosen


def test_plus_only_offer_without_binding_fails() -> None:
    with pytest.raises(AuthenticationFailed, match="no supported SASL mechanism"):
        choose_mechanism([MECHANISM_PLUS])


def test_backend_login_uses_plus_when_offered_and_on_tls() -> None:
    binding = hashlib.sha256(b"server certificate").digest()
    server = ScramServer(ScramVerifier.from_password("pw"), channel_binding=binding)
    login = backend_login(user="u", database="d", password="pw", channel_binding=binding)
    next(login)  # StartupMessage
    assert login.send(None) is None  # now waiting for the server
    wish = login.send(Message(ord("R"), AuthenticationSASL(server.mechanisms).encode()[5:]))
    assert wish is not None
    initial = SASLInitialResponse.parse(wish[5:])
    assert initial.mechanism == MECHANISM_PLUS
    server.handle_client_first(initial.mechanism, initial.data)
