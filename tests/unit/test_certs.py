"""trioproxy.testing.certs: the generated CA/server pair works with the ssl module.

The TLS handshake runs in-process over ssl.MemoryBIO pairs: no sockets, no threads.
"""

from __future__ import annotations

import ssl
import stat
from typing import TYPE_CHECKING

import pytest
from cryptography import x509

from trioproxy.testing.certs import TLSFiles, make_self_signed_ca_and_server

if TYPE_CHECKING:
    from pathlib import Path


def _contexts(files: TLSFiles) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    # Stricter than the 3.11 default (and the 3.13+ default): RFC 5280 conformance.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return server_ctx, client_ctx


class _TLSPair:
    """A client and a server SSLObject wired together through memory BIOs."""

    def __init__(
        self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
    ) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=server_hostname)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def pump(self) -> None:
        self.s_in.write(self.c_out.read())
        self.c_in.write(self.s_out.read())

    def handshake(self) -> None:
        client_done = server_done = False
        for _ in range(20):  # a TLS 1.3 handshake needs ~2 round trips; bounded loop
            if not client_done:
                try:
                    self.client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            self.pump()
            if not server_done:
                try:
                    self.server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
            self.pump()
            if client_done and server_done:
                return
        raise AssertionError("TLS handshake did not complete")


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
) -> _TLSPair:
    pair = _TLSPair(server_ctx, client_ctx, server_hostname)
    pair.handshake()
    return pair


@pytest.fixture
def files(tmp_path: Path) -> TLSFiles:
    return make_self_signed_ca_and_server(tmp_path / "tls")


def test_files_written(files: TLSFiles) -> None:
    for path in (files.ca_cert, files.server_cert, files.server_key):
        assert path.is_file()
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in files.server_cert.read_bytes()


def test_certificate_contents(files: TLSFiles) -> None:
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 29 <= lifetime.days <= 31


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_handshake_verifies(files: TLSFiles, hostname: str) -> None:
    pair = _handshake(*_contexts(files), server_hostname=hostname)
    peer = pair.client.getpeercert()
    assert peer
    assert ("DNS", "localhost") in peer["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    # Application data flows both ways once the handshake is done.
    pair.client.write(b"ping")
    pair.pump()
    assert pair.server.read(4) == b"ping"
    pair.server.write(b"pong")
    pair.pump()
    assert pair.client.read(4) == b"pong"


def test_wrong_hostname_rejected(files: TLSFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(*_contexts(files), server_hostname="example.com")


def test_untrusted_ca_rejected(files: TLSFiles, tmp_path: Path) -> None:
    other = make_self_signed_ca_and_server(tmp_path / "other")
    server_ctx, _ = _contexts(files)
    _, other_client_ctx = _contexts(other)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(server_ctx, other_client_ctx, server_hostname="localhost")


def test_custom_hostnames(tmp_path: Path) -> None:
    files = make_self_signed_ca_and_server(tmp_path, hostnames=["db.test", "10.0.0.7"])
    _handshake(*_contexts(files), server_hostname="db.test")
    _handshake(*_contexts(files), server_hostname="10.0.0.7")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(*_contexts(files), server_hostname="localhost")


def test_rejects_bad_hostnames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_self_signed_ca_and_server(tmp_path, hostnames=[])
    with pytest.raises(TypeError):
        make_self_signed_ca_and_server(tmp_path, hostnames="localhost")
