"""`migrelay pki`: a CA, host certificates with the right names, private keys 0600."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509

from relay.core.config import TlsFiles
from relay.core.errors import PkiError
from relay.daemon.tlsconfig import Expiry, cert_names, load_identity, server_context
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


# --- revocation: `pki revoke` / `pki crl`, and what a relay accepts as [tls] crl -----------


def crl_of(folder: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_revoke_adds_to_the_crl_and_keeps_what_it_listed(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    a, _ = pki.issue(tmp_path, "a")
    b, _ = pki.issue(tmp_path, "b")
    first = pki.revoke(tmp_path, "a")
    assert first.newly_revoked and first.revoked == 1
    second = pki.revoke(tmp_path, "b")
    assert second.revoked == 2
    crl = crl_of(tmp_path)
    assert {r.serial_number for r in crl} == {serial(a), serial(b)}
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert crl.next_update_utc is not None
    days = (crl.next_update_utc - dt.datetime.now(dt.UTC)) / dt.timedelta(days=1)
    assert pki.CRL_DAYS - 1 < days <= pki.CRL_DAYS
    again = pki.revoke(tmp_path, "a")  # idempotent: listed once, dates refreshed
    assert not again.newly_revoked and again.revoked == 2
    assert stat.S_IMODE((tmp_path / "crl.pem").stat().st_mode) == 0o644


def test_pki_crl_reissues_with_a_fresh_next_update_and_the_same_list(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    a, _ = pki.issue(tmp_path, "a")
    empty = pki.reissue_crl(tmp_path)  # before any revocation: an empty CRL, to turn checking on
    assert empty.revoked == 0 and list(crl_of(tmp_path)) == []
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=300)
    pki.revoke(tmp_path, "a", now=long_ago)
    fresh = pki.reissue_crl(tmp_path, days=30)
    crl = crl_of(tmp_path)
    assert [r.serial_number for r in crl] == [serial(a)]
    assert crl.next_update_utc is not None and crl.next_update_utc == fresh.next_update
    assert 29 < (fresh.next_update - dt.datetime.now(dt.UTC)) / dt.timedelta(days=1) <= 30
    revoked = crl.get_revoked_certificate_by_serial_number(serial(a))
    assert revoked is not None and revoked.revocation_date_utc < long_ago + dt.timedelta(minutes=1)


def test_revoke_errors(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue(other, "x")
    with pytest.raises(PkiError, match=r"nope.pem is missing: revoking a host needs its certificate"):
        pki.revoke(tmp_path, "nope")
    with pytest.raises(PkiError, match="is the CA itself"):
        pki.revoke(tmp_path, "ca")
    (tmp_path / "x.pem").write_bytes((other / "x.pem").read_bytes())
    with pytest.raises(PkiError, match=r"x.pem was not issued by the CA in"):
        pki.revoke(tmp_path, "x")
    with pytest.raises(PkiError, match="at least a day"):
        pki.revoke(tmp_path, "a", days=0)
    pki.reissue_crl(other)
    (tmp_path / "crl.pem").write_bytes((other / "crl.pem").read_bytes())
    with pytest.raises(PkiError, match=r"crl.pem is not signed by the CA in .*; move it away"):
        pki.revoke(tmp_path, "a")
    (tmp_path / "crl.pem").write_text("junk")
    with pytest.raises(PkiError, match=r"crl.pem is not a PEM CRL"):
        pki.reissue_crl(tmp_path)


def files_with_crl(folder: Path, name: str, crl: Path | None) -> TlsFiles:
    return TlsFiles(folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}-key.pem", crl)


def test_a_crl_is_checked_when_it_is_loaded(tmp_path: Path) -> None:
    """Each fault here would otherwise make OpenSSL refuse every peer (or every peer of one CA)."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    crl = tmp_path / "crl.pem"
    with pytest.raises(PkiError, match=r"Failed to load \[tls\] crl .*crl.pem: no such file or directory"):
        load_identity(files_with_crl(tmp_path, "a", crl))
    crl.write_text("not a crl\n")
    with pytest.raises(PkiError, match=r"Failed to load \[tls\] crl .*: no PEM CRL in it"):
        load_identity(files_with_crl(tmp_path, "a", crl))
    crl.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(PkiError, match=r"Failed to load \[tls\] crl .*: not a valid CRL"):
        load_identity(files_with_crl(tmp_path, "a", crl))
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.reissue_crl(other)
    with pytest.raises(PkiError, match=r"the CRL of CN=migrelay CA is not signed by a CA in \[tls\] ca"):
        load_identity(files_with_crl(tmp_path, "a", other / "crl.pem"))
    crl.unlink()
    pki.reissue_crl(tmp_path, days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    with pytest.raises(PkiError, match=r"the CRL of CN=migrelay CA expired on .*migrelay pki crl DIR"):
        load_identity(files_with_crl(tmp_path, "a", crl))
    with pytest.raises(PkiError, match="expired on"):  # building a context (a reload) checks it just the same
        server_context(files_with_crl(tmp_path, "a", crl))
    pki.reissue_crl(tmp_path, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
    with pytest.raises(PkiError, match="is not valid before"):
        load_identity(files_with_crl(tmp_path, "a", crl))


def test_every_ca_in_the_bundle_needs_its_crl(tmp_path: Path) -> None:
    """Two CAs in [tls] ca (a rollover) and one CRL: every host of the other CA would be refused."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    other = tmp_path / "other"
    pki.init_ca(other, name="next CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    pki.reissue_crl(tmp_path)
    pki.reissue_crl(other)
    files = TlsFiles(bundle, tmp_path / "a.pem", tmp_path / "a-key.pem", tmp_path / "crl.pem")
    with pytest.raises(PkiError, match=r"has no CRL from the CA CN=next CA in \[tls\] ca .*bundle.pem"):
        load_identity(files)
    both = tmp_path / "both-crls.pem"
    both.write_bytes((tmp_path / "crl.pem").read_bytes() + (other / "crl.pem").read_bytes())
    identity = load_identity(TlsFiles(bundle, tmp_path / "a.pem", tmp_path / "a-key.pem", both))
    assert len(identity.crls) == 2
    assert [e.kind for e in identity.expiries] == ["own", "ca", "ca", "crl", "crl"]


def test_identity_knows_when_its_own_certificate_is_revoked(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    pki.issue(tmp_path, "b")
    pki.revoke(tmp_path, "b")
    assert not load_identity(files_with_crl(tmp_path, "a", tmp_path / "crl.pem")).revoked
    assert load_identity(files_with_crl(tmp_path, "b", tmp_path / "crl.pem")).revoked


def test_a_short_lived_crl_is_warned_about_later_than_a_certificate() -> None:
    """A weekly CRL reissued daily always has less than 14 days to go: that is not a problem."""
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = Expiry("own", "cert", start, start + dt.timedelta(days=365))
    assert cert.warn_from(14) == cert.end - dt.timedelta(days=14)
    yearly_crl = Expiry("crl", "crl", start, start + dt.timedelta(days=365))
    assert yearly_crl.warn_from(14) == yearly_crl.end - dt.timedelta(days=14)
    weekly_crl = Expiry("crl", "crl", start, start + dt.timedelta(days=7))
    assert weekly_crl.warn_from(14) == weekly_crl.end - dt.timedelta(hours=42)
