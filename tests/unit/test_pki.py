"""`migrelay pki`: a CA, host certificates with the right names, private keys 0600."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from relay.core.config import TlsFiles
from relay.core.errors import PkiError
from relay.daemon.tlsconfig import cert_names, load_identity
from relay.tools import pki


def test_init_and_issue(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    cert_path, key_path = pki.issue(tmp_path, "hv1", dns=["hv1.example.org"], ips=["192.0.2.1"])
    for key in (key_path, tmp_path / "ca-key.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert_names(cert) == {"hv1", "hv1.example.org"}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {u.dotted_string for u in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    identity = load_identity(TlsFiles(tmp_path / "ca.pem", cert_path, key_path))
    assert identity.names == {"hv1", "hv1.example.org"}


def test_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    with pytest.raises(PkiError, match="already holds a CA"):
        pki.init_ca(tmp_path)


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="pki init"):
        pki.issue(tmp_path, "hv1")


def test_identity_errors(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    a_cert, a_key = pki.issue(tmp_path, "a")
    _, b_key = pki.issue(tmp_path, "b")
    ca = tmp_path / "ca.pem"
    with pytest.raises(PkiError, match="does not match"):
        load_identity(TlsFiles(ca, a_cert, b_key))
    with pytest.raises(PkiError, match=r"Failed to load \[tls\] cert .*missing.pem: no such file"):
        load_identity(TlsFiles(ca, tmp_path / "missing.pem", a_key))
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    old_cert, old_key = pki.issue(tmp_path, "old", days=1, not_before=old)
    with pytest.raises(PkiError, match="expired on"):
        load_identity(TlsFiles(ca, old_cert, old_key))
    other = tmp_path / "other"
    pki.init_ca(other)
    with pytest.raises(PkiError, match="not issued by"):
        load_identity(TlsFiles(other / "ca.pem", a_cert, a_key))
