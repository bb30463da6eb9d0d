"""A certificate authority of a test's own and what it signs for a TLS server on 127.0.0.1 and its client, as
PEM files (``cryptography`` builds them): for servers that verify their clients, as a Nomad agent with
``verify_https_client`` does."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def issue(folder: Path) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, each signed by the CA, in ``folder``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = signed(ca_name, ca_key.public_key(), ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    paths = {"ca": _write(folder / "ca.pem", ca)}
    for role, usage, extra in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.ExtendedKeyUsage([usage]), False)]
        if extra:
            extensions.append((x509.SubjectAlternativeName(extra), False))
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test {role}")])
        paths[f"{role}_cert"] = _write(
            folder / f"{role}.pem", signed(name, key.public_key(), ca_name, ca_key, extensions)
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (folder / f"{role}-key.pem").write_bytes(pem)
        paths[f"{role}_key"] = folder / f"{role}-key.pem"
    return TlsFiles(**paths)


def signed(subject, public_key, issuer, issuer_key, extensions) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate) -> Path:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path
