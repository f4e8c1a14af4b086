"""`migrelay check` on the certificates: what expires within 30 days, the CRL, our own revocation.

Why it matters: `check` is what an operator (or config management) runs before a
reload; it must say what is about to break, not only what is broken.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from relay.core.config import Config
from relay.tools import loopback, pki
from relay.tools.check import check_certificates


def relay_config(folder: Path, name: str = "a", crl: bool = False) -> Config:
    files = dataclasses.replace(loopback.tls_files(folder, name), crl=folder / "crl.pem" if crl else None)
    return Config(name=name, socket_dir=folder / "run", tls=files)


def findings(config: Config) -> list[str]:
    return [str(f) for f in check_certificates(config)]


def test_nothing_to_say_for_fresh_files(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    pki.reissue_crl(tmp_path)
    found = findings(relay_config(tmp_path, crl=True))
    assert [f.split(":")[0] for f in found] == ["ok", "ok"], found
    assert found[1].startswith(f"ok: [tls] crl {tmp_path / 'crl.pem'}: 1 CRL(s), 0 revoked, next update ")


def test_the_certificate_the_ca_and_the_crl_are_each_warned_about_within_30_days(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, days=20)
    pki.issue(tmp_path, "a", days=10)
    pki.reissue_crl(tmp_path, days=100, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=80))  # 20 days to go
    warnings = [f for f in findings(relay_config(tmp_path, crl=True)) if f.startswith("warning:")]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith(f"warning: [tls] cert {tmp_path / 'a.pem'} expires on ")
    assert warnings[0].endswith("in 10.0 days")
    assert warnings[1].startswith(f"warning: [tls] ca {tmp_path / 'ca.pem'} (CN=migrelay CA) expires on ")
    assert warnings[2].startswith(f"warning: [tls] crl {tmp_path / 'crl.pem'} (CN=migrelay CA) expires on ")


def test_a_weekly_crl_is_not_warned_about_until_its_last_quarter(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    pki.reissue_crl(tmp_path, days=7)
    assert not [f for f in findings(relay_config(tmp_path, crl=True)) if f.startswith("warning:")]
    pki.reissue_crl(tmp_path, days=7, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=6))
    warnings = [f for f in findings(relay_config(tmp_path, crl=True)) if f.startswith("warning:")]
    assert len(warnings) == 1 and "[tls] crl" in warnings[0], warnings


def test_our_own_certificate_revoked_is_an_error(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    pki.revoke(tmp_path, "a")
    found = findings(relay_config(tmp_path, crl=True))
    assert "error: [tls] cert is revoked by [tls] crl; peers with that CRL will refuse it" in found
    assert any(f.startswith("ok: [tls] crl") and ": 1 CRL(s), 1 revoked," in f for f in found)


def test_a_crl_that_would_refuse_every_peer_is_an_error(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "a")
    pki.reissue_crl(tmp_path, days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    found = findings(relay_config(tmp_path, crl=True))
    assert len(found) == 1 and found[0].startswith("error: [tls] crl ") and "expired on" in found[0], found


def test_an_expired_ca_is_an_error(tmp_path: Path) -> None:
    """A certificate may outlive its CA (`pki issue --days` is not capped by it): then nothing verifies."""
    pki.init_ca(tmp_path, days=1)
    pki.issue(tmp_path, "a")
    found = check_certificates(relay_config(tmp_path), now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2))
    errors = [str(f) for f in found if f.level == "error"]
    expected = f"error: [tls] ca {tmp_path / 'ca.pem'} (CN=migrelay CA) expired on "
    assert len(errors) == 1 and errors[0].startswith(expected), found
