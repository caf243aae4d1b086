"""``tls-server-end-point`` channel binding data (RFC 5929 section 4), sans-IO.

[core] SCRAM-SHA-256-PLUS binds the SCRAM exchange to the TLS connection it runs over: the
client hashes the certificate the server presented and sends the hash inside its signed
proof, so a man in the middle that terminates TLS with another certificate cannot relay
the login. The hash function is the one of the certificate's signature algorithm, except
that MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 4.1), exactly as PostgreSQL computes
it (``be_tls_get_certificate_hash``).

Certificates whose signature has no separate hash (Ed25519, Ed448) have no
tls-server-end-point binding defined; PostgreSQL refuses channel binding for them, and so
do we (the proxy then does not offer SCRAM-SHA-256-PLUS).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

__all__ = ["tls_server_end_point"]


def tls_server_end_point(certificate: bytes) -> bytes | None:
    """The binding data for our certificate (PEM, the first one of a chain, or DER).

    Returns None when the certificate's signature algorithm defines no binding.
    """
    if b"-----BEGIN" in certificate:
        cert = x509.load_pem_x509_certificate(certificate)
    else:
        cert = x509.load_der_x509_certificate(certificate)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    if algorithm is None:
        return None
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()
