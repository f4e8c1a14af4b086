"""A small CA, host certificates and a CRL for relays (`migrelay pki init|issue|revoke|crl`).

ECDSA P-256 keys (cheap handshakes), certificates usable as both TLS server and
client, SAN DNS:<name> plus any extras. Private keys are created 0600. The CA's
revocations live in DIR/crl.pem itself: `revoke` reads it, adds one and signs it anew.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.core.errors import PkiError
from relay.core.overlay import host_problem

CA_DAYS: Final = 3650
HOST_DAYS: Final = 825
# A relay refuses every peer once its CRL is past its next update, so the built-in CA's
# lasts a year; `migrelay pki crl DIR` reissues it (the relays then need a reload).
CRL_DAYS: Final = 365
CRL_FILE: Final = "crl.pem"
KEY_MODE: Final = 0o600
# Certificates and CRLs start a little in the past: a peer whose clock is behind ours
# would refuse them as not yet valid (a CRL not yet valid makes it refuse every peer).
CLOCK_SKEW: Final = dt.timedelta(minutes=5)


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL-free but created with the final mode, so a key is never world-readable, even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write a file others read while it changes (a relay reloading its CRL): whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write(tmp, data, mode)
    os.replace(tmp, path)


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
        .not_valid_before(now - CLOCK_SKEW)
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
    start = not_before or dt.datetime.now(dt.UTC) - CLOCK_SKEW
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


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CrlWritten:
    """What `revoke` or `reissue_crl` wrote."""

    path: Path
    revoked: int  # serials the CRL lists
    next_update: dt.datetime
    newly_revoked: bool = False  # False for `revoke` of a certificate already listed


def _read_crl(folder: Path, ca: _Ca) -> x509.CertificateRevocationList | None:
    """DIR/crl.pem (None if there is none yet); it must be this CA's, or its list would be lost."""
    path = folder / CRL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PkiError(f"Failed to read {path}: {(e.strerror or str(e)).lower()}") from None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError:
        raise PkiError(f"{path} is not a PEM CRL; move it away to start a new one") from None
    if crl.issuer != ca.cert.subject or not crl.is_signature_valid(ca.key.public_key()):
        raise PkiError(f"{path} is not signed by the CA in {folder}; move it away to start a new one")
    return crl


def _sign_crl(
    folder: Path,
    ca: _Ca,
    previous: x509.CertificateRevocationList | None,
    added: Sequence[x509.RevokedCertificate],
    days: int,
    now: dt.datetime,
) -> CrlWritten:
    """Sign DIR/crl.pem anew: the previous CRL's entries, `added`, a CRL number one higher."""
    if days < 1:
        raise PkiError(f"--days {days}: a CRL must be valid for at least a day (relays refuse every peer past it)")
    number = 1
    entries: list[x509.RevokedCertificate] = []
    if previous is not None:
        entries = list(previous)
        with contextlib.suppress(x509.ExtensionNotFound):  # not made by us: numbered from 1
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    entries += added
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    path = folder / CRL_FILE
    _replace(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    assert crl.next_update_utc is not None
    return CrlWritten(path, len(entries), crl.next_update_utc, newly_revoked=bool(added))


def revoke(folder: Path, name: str, *, days: int = CRL_DAYS, now: dt.datetime | None = None) -> CrlWritten:
    """Revoke DIR/NAME.pem (by its serial) in DIR/crl.pem, keeping every earlier revocation.

    The certificate is needed for its serial: revoke a host before `issue` replaces its file.
    """
    if (problem := host_problem(name)) is not None:
        raise PkiError(problem)
    now = now or dt.datetime.now(dt.UTC)
    ca = _Ca(*_load_ca(folder))
    path = folder / f"{name}.pem"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path} is missing: revoking a host needs its certificate (for the serial)") from None
    except (OSError, ValueError) as e:
        raise PkiError(f"Failed to load {path}: {e}") from None
    if cert.serial_number == ca.cert.serial_number and cert.subject == ca.cert.subject:
        raise PkiError(f"{path} is the CA itself; to retire a CA, take it out of every relay's [tls] ca")
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"{path} was not issued by the CA in {folder}") from None
    previous = _read_crl(folder, ca)
    if previous is not None and previous.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        return _sign_crl(folder, ca, previous, [], days, now)  # already listed: only fresh dates
    entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build()
    return _sign_crl(folder, ca, previous, [entry], days, now)


def reissue_crl(folder: Path, *, days: int = CRL_DAYS, now: dt.datetime | None = None) -> CrlWritten:
    """Sign DIR/crl.pem anew with the same revocations and a fresh next update (an empty one if none yet)."""
    now = now or dt.datetime.now(dt.UTC)
    ca = _Ca(*_load_ca(folder))
    return _sign_crl(folder, ca, _read_crl(folder, ca), [], days, now)
