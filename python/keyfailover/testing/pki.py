"""A certificate authority of a test's own, for upstreams over TLS on loopback.

    pki = write_pki(tmp_path)          # ca.pem, cert.pem, key.pem in tmp_path
    # serve TLS with pki.cert and pki.key; run keyfailover with SSL_CERT_FILE=pki.ca

Needs the `cryptography` package (in keyfailover's `test` extra); imported when
called, so `keyfailover.testing` does not need it.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate (PEM): what SSL_CERT_FILE names
    cert: Path  # the server's certificate (PEM)
    key: Path  # the server's private key (PEM, PKCS#8, unencrypted)


def write_pki(directory: Path, host: str = "127.0.0.1", *, days: int = 1) -> Pki:
    """A CA and a certificate it signed for `host` (an IP address, as a SAN), P-256 keys,
    valid from an hour ago for `days`; written to `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)
    since, until = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("keyfailover test CA"))
        .issuer_name(name("keyfailover test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(since)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name(host))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(since)
        .not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pki = Pki(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    pki.ca.write_bytes(ca.public_bytes(pem))
    pki.cert.write_bytes(leaf.public_bytes(pem))
    pki.key.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki
