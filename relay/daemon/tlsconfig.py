"""The one place that builds TLS contexts and reads certificates and CRLs.

TLS 1.3 only, mutual authentication against the configured CA, and with [tls] crl a
revocation check at every full handshake, both ways. Which peer a certificate belongs
to is decided by its subjectAltName DNS names, never by the address dialled; the check
itself lives here too (`cert_names`). The CRLs are read each time a context is built,
so contexts rebuilt from the config (a reload) check against the CRL file as it is then.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from relay.core.config import TlsFiles
from relay.core.errors import BadCertificate, HandshakeReason, PkiError, printable
from relay.daemon import tls_fastpath

# Lets pyOpenSSL/OpenSSL resume TLS 1.3 sessions across our many short connections.
SESSION_ID_CONTEXT: Final = b"migrelay"
# Linear in the file's size whatever it holds (a lazy ".+?" was quadratic on BEGIN lines
# without an END: 200 KiB of them held the relay's thread for 20 s, regex holds the GIL).
_PEM_CRL: Final = re.compile(rb"-----BEGIN X509 CRL-----[A-Za-z0-9+/=\r\n\t ]*-----END X509 CRL-----")
# Certificates, keys, bundles and CRLs are kilobytes; a CRL of a large CA a few MiB.
MAX_TLS_FILE_BYTES: Final = 64 << 20

ExpiryKind = Literal["own", "ca", "crl"]


@dataclass(frozen=True)
class Expiry:
    """Something [tls] loads that stops working at `end`: the relay's certificate, a CA, a CRL."""

    kind: ExpiryKind
    what: str  # for a log line or a finding: the key, the file and, for a CA or a CRL, whose
    start: dt.datetime  # valid from (a CRL: its last update)
    end: dt.datetime  # valid until (a CRL: its next update; past it OpenSSL refuses every handshake)

    def warn_from(self, days: float) -> dt.datetime:
        """When warnings about it should start: `days` before its end.

        A CRL, at most a quarter of its validity before: many CAs reissue a CRL valid for a
        week every day, and one with six days to go is on time, not late.
        """
        lead = dt.timedelta(days=days)
        if self.kind == "crl":
            lead = min(lead, (self.end - self.start) / 4)
        return self.end - lead


@dataclass(frozen=True)
class Identity:
    """This relay's certificate, as loaded and checked at startup (with its CAs and CRLs)."""

    names: frozenset[str]
    not_after: dt.datetime
    expiries: tuple[Expiry, ...] = ()  # the certificate, each CA, each CRL that has a next update
    revoked: bool = False  # [tls] crl revokes our own certificate: peers with that CRL refuse us
    crls: tuple[x509.CertificateRevocationList, ...] = ()


def read_tls_file(path: Path) -> bytes:
    """A TLS file's bytes: a regular file of at most MAX_TLS_FILE_BYTES, read once.

    Opened without blocking and checked before it is read, so a FIFO, a device (/dev/zero)
    or a huge file at a path whoever refreshes the file can change (a CRL fetched by a
    cron job) fails the start or the reload with one line, instead of hanging it or
    filling memory. Raises OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > MAX_TLS_FILE_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_TLS_FILE_BYTES >> 20} MiB")
        data = f.read(MAX_TLS_FILE_BYTES + 1)
    if len(data) > MAX_TLS_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_TLS_FILE_BYTES >> 20} MiB")
    return data


def _read(path: Path, what: str) -> bytes:
    try:
        return read_tls_file(path)
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


def _load_cas(files: TlsFiles) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(files.ca, "ca"))
    except (ValueError, x509.InvalidVersion):
        raise PkiError(f"Failed to load [tls] ca {files.ca}: not a PEM certificate") from None


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        # public_key() may be a type that signs nothing (X25519...): is_signature_valid refuses it
        return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return False  # a CA key type that cannot sign CRLs


def load_crls(
    files: TlsFiles, cas: Sequence[x509.Certificate], now: dt.datetime | None = None
) -> list[x509.CertificateRevocationList]:
    """The CRLs in [tls] crl ([] without it), each checked; raise PkiError naming what to fix.

    Each is checked here because OpenSSL would take any of these faults silently and then
    refuse handshakes one by one: a CRL not signed by a CA in [tls] ca, expired or not yet
    valid makes it refuse every peer ("CRL has expired"), and a CA without a CRL every
    host of that CA ("unable to get certificate CRL").
    """
    if files.crl is None:
        return []
    now = now or dt.datetime.now(dt.UTC)
    where = f"[tls] crl {files.crl}"
    blocks = _PEM_CRL.findall(_read(files.crl, "crl"))
    if not blocks:
        raise PkiError(f"Failed to load {where}: no PEM CRL in it")
    crls = []
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as e:
            raise PkiError(f"Failed to load {where}: not a valid CRL: {printable(str(e))}") from None
        issuer = printable(crl.issuer.rfc4514_string())
        if not any(_signed_by(crl, ca) for ca in cas):
            raise PkiError(f"{where}: the CRL of {issuer} is not signed by a CA in [tls] ca {files.ca}")
        if crl.next_update_utc is not None and crl.next_update_utc <= now:
            raise PkiError(
                f"{where}: the CRL of {issuer} expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC (its next update); "
                "install a fresh one (`migrelay pki crl DIR` reissues the built-in CA's)"
            )
        if crl.last_update_utc > now:
            raise PkiError(f"{where}: the CRL of {issuer} is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC")
        crls.append(crl)
    for ca in cas:
        if not any(_signed_by(crl, ca) for crl in crls):
            subject = printable(ca.subject.rfc4514_string())
            raise PkiError(
                f"{where} has no CRL from the CA {subject} in [tls] ca {files.ca}: "
                "every host of that CA would be refused; add its CRL or remove the CA"
            )
    return crls


def _revoked(cert: x509.Certificate, crls: Sequence[x509.CertificateRevocationList]) -> bool:
    return any(
        crl.issuer == cert.issuer and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        for crl in crls
    )


def load_identity(files: TlsFiles, *, now: dt.datetime | None = None) -> Identity:
    """Load and cross-check CA, certificate, key and CRLs; raise PkiError naming what to fix."""
    now = now or dt.datetime.now(dt.UTC)
    cas = _load_cas(files)
    try:
        cert = x509.load_pem_x509_certificate(_read(files.cert, "cert"))
    except (ValueError, x509.InvalidVersion):
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
    crls = load_crls(files, cas, now)
    expiries = [Expiry("own", f"[tls] cert {files.cert}", cert.not_valid_before_utc, cert.not_valid_after_utc)]
    for ca in cas:
        what = f"[tls] ca {files.ca} ({printable(ca.subject.rfc4514_string())})"
        expiries.append(Expiry("ca", what, ca.not_valid_before_utc, ca.not_valid_after_utc))
    for crl in crls:
        if crl.next_update_utc is not None:  # a CRL without one never expires (OpenSSL agrees)
            what = f"[tls] crl {files.crl} ({printable(crl.issuer.rfc4514_string())})"
            expiries.append(Expiry("crl", what, crl.last_update_utc, crl.next_update_utc))
    return Identity(cert_names(cert), cert.not_valid_after_utc, tuple(expiries), _revoked(cert, crls), tuple(crls))


# X509_V_ERR_* codes an operator meets in practice, in OpenSSL's own words.
_VERIFY_ERRORS: Final = {
    2: "unable to get issuer certificate",
    3: "unable to get certificate CRL (no CRL from its CA in [tls] crl)",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    11: "CRL is not yet valid",
    12: "CRL has expired (install a fresh [tls] crl and reload)",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate (not from our CA)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
}
# How each verify error is counted (migrelay_handshake_failures_total): not from a CA
# we trust (2, 20: issuer unknown; 18, 19: self-signed; 21: no chain to one), expired,
# revoked; anything else wrong with it (not yet valid, a bad signature, a CRL we cannot
# use) is a bad certificate.
_UNKNOWN_CA_ERRORS: Final = frozenset({2, 18, 19, 20, 21})
_EXPIRED_ERROR: Final = 10
_REVOKED_ERROR: Final = 23
# OpenSSL's reason (SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) when a client sent none: the
# verify callback never runs then, and pyOpenSSL hands over reasons only as text.
_NO_CERTIFICATE: Final = "peer did not return a certificate"


@dataclass
class HandshakeNotes:
    """What the verify callback saw during one connection's handshake (its app data)."""

    certificate_checked: bool = False  # still False after a handshake: resumed, no certificate sent
    failure: str | None = None
    errnum: int | None = None  # the X509_V_ERR_* code of `failure`


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
            # the serial too: it is what a CRL lists
            what = f"subject {_subject(cert)}, serial {cert.get_serial_number():x}"
            notes.failure = f"{_VERIFY_ERRORS.get(errnum, f'X509 verify error {errnum}')} ({what})"
            notes.errnum = errnum
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


def failure_reason(conn: SSL.Connection, openssl_reason: str) -> HandshakeReason:
    """How a failed handshake is counted, from the verify callback's notes and OpenSSL's reason.

    Only what this side judged: an alert from the other side (it refused our certificate)
    is `protocol` here, and counted by its reason over there.
    """
    errnum = _notes(conn).errnum
    if errnum is None:
        return "bad_certificate" if _NO_CERTIFICATE in openssl_reason else "protocol"
    if errnum in _UNKNOWN_CA_ERRORS:
        return "unknown_ca"
    if errnum == _EXPIRED_ERROR:
        return "expired"
    if errnum == _REVOKED_ERROR:
        return "revoked"
    return "bad_certificate"


def resumed(conn: SSL.Connection) -> bool:
    """After a successful handshake: was it a session resumption (no certificate exchanged)?"""
    return not _notes(conn).certificate_checked


def _context(files: TlsFiles, server: bool) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    # from bytes read once each (read_tls_file), never by path inside OpenSSL
    cas = _load_cas(files)
    try:
        chain = x509.load_pem_x509_certificates(_read(files.cert, "cert"))
        key = serialization.load_pem_private_key(_read(files.key, "key"), password=None)
    except (ValueError, TypeError, x509.InvalidVersion) as e:
        raise PkiError(f"Failed to load [tls] cert {files.cert} or key {files.key}: {e}") from None
    store = ctx.get_cert_store()
    assert store is not None  # every SSL_CTX has one
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
        for ca in cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
    except (SSL.Error, crypto.Error, TypeError, ValueError) as e:
        raise PkiError(f"Failed to load [tls] files ({files.cert}, {files.key}, {files.ca}): {e}") from None
    crls = load_crls(files, cas)  # read now: a context built later sees the file as it is then
    if crls:
        for crl in crls:
            store.add_crl(crl)
        # every certificate of the chain, not only the peer's own: an intermediate CA can be revoked too
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
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


__all__ = [
    "Expiry",
    "Identity",
    "cert_names",
    "client_context",
    "failure_reason",
    "load_crls",
    "load_identity",
    "peer_cert_names",
    "server_context",
]
