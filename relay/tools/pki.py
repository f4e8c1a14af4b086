"""A small CA and host certificates for relays (`migrelay pki init|issue`).

ECDSA P-256 keys (cheap handshakes), certificates usable as both TLS server and
client, SAN DNS:<name> plus any extras. Private keys are created 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.core.errors import PkiError
from relay.core.overlay import host_problem

CA_DAYS: Final = 3650
HOST_DAYS: Final = 825
KEY_MODE: Final = 0o600


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL-free but created with the final mode, so a key is never world-readable, even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(folder: Path, *, name: str = "migrelay CA", days: int = CA_DAYS) -> Path:
    """Create DIR/ca.pem and DIR/ca-key.pem; refuse to overwrite an existing CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    if ca_pem.exists() or ca_key.exists():
        raise PkiError(f"{folder} already holds a CA (ca.pem / ca-key.pem); remove it first or use another folder")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(ca_key, _key_pem(key), KEY_MODE)
    _write(ca_pem, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return ca_pem


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca-key.pem").read_bytes(), password=None)
    except FileNotFoundError as e:
        raise PkiError(f"No CA in {folder}: {e.filename} is missing (run `migrelay pki init {folder}`)") from None
    except (OSError, ValueError) as e:
        raise PkiError(f"Failed to load the CA in {folder}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{folder}/ca-key.pem is not an EC key made by `migrelay pki init`")
    return cert, key


def issue(
    folder: Path,
    name: str,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    days: int = HOST_DAYS,
    not_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Write DIR/NAME.pem and DIR/NAME-key.pem signed by DIR's CA; return both paths."""
    if (problem := host_problem(name)) is not None:
        raise PkiError(problem)
    ca_cert, ca_key = _load_ca(folder)
    try:
        ip_addresses = [ipaddress.ip_address(a) for a in ips]
    except ValueError as e:
        raise PkiError(f"--ip: {e}") from None
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([name, *dns])]
    san += [x509.IPAddress(a) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    _write(key_path, _key_pem(key), KEY_MODE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
