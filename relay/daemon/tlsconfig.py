"""The one place that builds TLS contexts and reads certificates.

TLS 1.3 only, mutual authentication against the configured CA. Which peer a
certificate belongs to is decided by its subjectAltName DNS names, never by the
address dialled; the check itself lives here too (`cert_names`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from relay.core.config import TlsFiles
from relay.core.errors import BadCertificate, PkiError, printable
from relay.daemon import tls_fastpath

# Lets pyOpenSSL/OpenSSL resume TLS 1.3 sessions across our many short connections.
SESSION_ID_CONTEXT: Final = b"migrelay"


@dataclass(frozen=True)
class Identity:
    """This relay's certificate, as loaded and checked at startup."""

    names: frozenset[str]
    not_after: dt.datetime


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise PkiError(f"Failed to load [tls] {what} {path}: {(e.strerror or str(e)).lower()}") from None


def cert_names(cert: x509.Certificate) -> frozenset[str]:
    """The DNS names in a certificate's subjectAltName (empty if it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(san.get_values_for_type(x509.DNSName))


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """A real signature check: two CAs may well share a subject name."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_identity(files: TlsFiles, *, now: dt.datetime | None = None) -> Identity:
    """Load and cross-check CA, certificate and key; raise PkiError naming what to fix."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        cas = x509.load_pem_x509_certificates(_read(files.ca, "ca"))
    except ValueError:
        raise PkiError(f"Failed to load [tls] ca {files.ca}: not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(_read(files.cert, "cert"))
    except ValueError:
        raise PkiError(f"Failed to load [tls] cert {files.cert}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(_read(files.key, "key"), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"Failed to load [tls] key {files.key}: {e}") from None
    cert_key = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    own_key = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert_key != own_key:
        raise PkiError(f"[tls] key {files.key} does not match [tls] cert {files.cert}")
    if cert.not_valid_after_utc < now:
        raise PkiError(f"[tls] cert {files.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise PkiError(f"[tls] cert {files.cert} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}")
    if not any(_issued_by(cert, ca) for ca in cas):
        raise PkiError(f"[tls] cert {files.cert} was not issued by [tls] ca {files.ca}")
    return Identity(cert_names(cert), cert.not_valid_after_utc)


# X509_V_ERR_* codes an operator meets in practice, in OpenSSL's own words.
_VERIFY_ERRORS: Final = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (not from our CA)",
    21: "unable to verify the first certificate",
}


@dataclass
class HandshakeNotes:
    """What the verify callback saw during one connection's handshake (its app data)."""

    certificate_checked: bool = False  # still False after a handshake: resumed, no certificate sent
    failure: str | None = None


def new_notes(conn: SSL.Connection) -> None:
    conn.set_app_data(HandshakeNotes())


def _notes(conn: SSL.Connection) -> HandshakeNotes:
    notes = conn.get_app_data()
    if not isinstance(notes, HandshakeNotes):
        notes = HandshakeNotes()
        conn.set_app_data(notes)
    return notes


def _note_verify(conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int) -> bool:
    """Keep OpenSSL's verdict; remember that a certificate was checked and why it failed.

    OpenSSL calls this in the middle of a handshake, and pyOpenSSL re-raises whatever
    escapes it from do_handshake as a non-SSL exception. So it never raises: the
    certificate comes from whoever connected, and OpenSSL parses certificates that the
    cryptography package refuses (an out-of-range version field, for one).
    """
    try:
        notes = _notes(conn)
        notes.certificate_checked = True
        if not ok and notes.failure is None:
            notes.failure = f"{_VERIFY_ERRORS.get(errnum, f'X509 verify error {errnum}')} (subject {_subject(cert)})"
    except Exception:
        return False  # we could not even take notes: refuse rather than guess
    return bool(ok)


def _subject(cert: crypto.X509) -> str:
    """The subject, escaped for a log line (the peer chose every byte of it)."""
    try:
        subject = cert.to_cryptography().subject.rfc4514_string()
    except Exception as e:
        return f"unreadable: {printable(str(e))}"
    return printable(subject) or "?"


def verify_failure(conn: SSL.Connection) -> str | None:
    """Why the peer's certificate was rejected in this connection's handshake, if it was."""
    return _notes(conn).failure


def resumed(conn: SSL.Connection) -> bool:
    """After a successful handshake: was it a session resumption (no certificate exchanged)?"""
    return not _notes(conn).certificate_checked


def _context(files: TlsFiles, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    try:
        ctx.use_certificate_chain_file(str(files.cert))
        ctx.use_privatekey_file(str(files.key))
        ctx.check_privatekey()
        ctx.load_verify_locations(str(files.ca))
    except SSL.Error as e:
        raise PkiError(f"Failed to load [tls] files ({files.cert}, {files.key}, {files.ca}): {e}") from None
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _note_verify)
    tls_fastpath.calls().whole_writes(ctx)  # one SSL_write per chunk, not per record
    if server:
        ctx.set_session_id(SESSION_ID_CONTEXT)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    else:
        ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


def server_context(files: TlsFiles) -> SSL.Context:
    """Context for accepted peer connections: demands a client certificate from our CA."""
    return _context(files, server=True)


def client_context(files: TlsFiles) -> SSL.Context:
    """Context for dialled peer connections: presents our certificate, verifies theirs."""
    return _context(files, server=False)


def peer_cert_names(conn: SSL.Connection) -> frozenset[str]:
    """SAN DNS names of the (already verified) certificate the other side presented.

    Raises BadCertificate if it cannot be read: OpenSSL accepted it, but the cryptography
    package may still refuse it (a CA can sign odd certificates too).
    """
    cert = conn.get_peer_certificate()
    if cert is None:
        return frozenset()
    try:
        return cert_names(cert.to_cryptography())
    except Exception as e:
        raise BadCertificate(f"the peer's certificate cannot be read: {printable(str(e))}") from None


__all__ = ["Identity", "cert_names", "client_context", "load_identity", "peer_cert_names", "server_context"]
