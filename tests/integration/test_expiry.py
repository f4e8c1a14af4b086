"""Expiry: migrelay_certificate_expiry_timestamp_seconds and the daemon's daily warning.

Why it matters: an expired certificate, CA or CRL fails every migration at once, long
after whoever installed it has moved on. The date is a metric for alerting, and the
relay says so in its log once a day from two weeks before. Weeks pass in milliseconds
on trio's autojump clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from cryptography import x509

from relay.core import config
from relay.daemon import expiry
from relay.daemon.tlsconfig import load_identity
from relay.tools import loopback, pki
from tests.integration.conftest import counted, running
from tests.support import Pki, pair_configs

DAY_S = 24 * 3600


def wall_clock_on_trio_time() -> Callable[[], dt.datetime]:
    """Today's date, moved on by trio's (autojump) clock."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=trio.current_time())
    return lambda: start + dt.timedelta(seconds=trio.current_time())


def not_after(path: Path) -> dt.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


async def test_the_daemon_warns_once_a_day_from_14_days_before_its_certificate_expires(
    tmp_path: Path, p: Pki, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    pki.issue(p.dir, "hvA", days=16)  # issued 5 minutes ago: 16 days less 5 minutes to go
    identity = load_identity(loopback.tls_files(p.dir, "hvA"))
    async with trio.open_nursery() as n:
        n.start_soon(expiry.warn_before_expiry, lambda: identity, wall_clock_on_trio_time())
        await trio.sleep(20 * DAY_S + 1)  # checks on days 0 to 20
        n.cancel_scope.cancel()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "migrelay.expiry"]
    warnings = [m for level, m in lines if level == logging.WARNING]
    errors = [m for level, m in lines if level == logging.ERROR]
    # days 0 and 1: more than 14 days to go; days 2-15: warned; days 16-20: expired
    assert len(warnings) == 14 and len(errors) == 5, lines
    cert = p.dir / "hvA.pem"
    assert warnings[0].startswith(f"[tls] cert {cert} expires on {not_after(cert):%Y-%m-%d %H:%M} UTC, in 14.0 days")
    assert warnings[-1].endswith("in 1.0 days: then peers refuse this relay; issue a fresh certificate and reload")
    assert all(m.startswith(f"[tls] cert {cert} expired on") for m in errors)


async def test_a_crl_is_warned_about_like_a_certificate_from_its_next_update(
    p: Pki, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay keeps the CRL it loaded: past its next update it refuses every peer until a reload."""
    pki.reissue_crl(p.dir, days=100)
    files = dataclasses.replace(loopback.tls_files(p.dir, "hvA"), crl=p.dir / "crl.pem")
    identity = load_identity(files)
    async with trio.open_nursery() as n:
        n.start_soon(expiry.warn_before_expiry, lambda: identity, wall_clock_on_trio_time())
        await trio.sleep(90 * DAY_S + 1)
        n.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.name == "migrelay.expiry"]
    assert len(warnings) == 5, warnings  # days 86-90 of 100: from 14 days before
    assert warnings[0].startswith(f"[tls] crl {p.dir / 'crl.pem'} (CN=migrelay CA) expires on")
    assert warnings[0].endswith("then this relay refuses every peer of that CA; install a fresh CRL and reload")


async def test_the_expiry_metric_and_a_first_warning_come_with_the_contexts(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """cert="own" is our certificate; with two CAs in [tls] ca, cert="ca" is the one that expires first."""
    _, b = pair_configs(tmp_path, p, "tls")
    own, _ = pki.issue(p.dir, "hvB", days=10)
    soon = tmp_path / "soon-ca"
    pki.init_ca(soon, name="soon CA", days=100)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((p.dir / "ca.pem").read_bytes() + (soon / "ca.pem").read_bytes())
    assert b.tls is not None
    b = config.load(loopback.with_changes(tmp_path / "hvB.toml", tls=dataclasses.replace(b.tls, ca=bundle)))
    async with running(b) as (rb,):
        metric = "migrelay_certificate_expiry_timestamp_seconds"
        assert counted(rb, metric, cert="own") == not_after(own).timestamp()
        assert counted(rb, metric, cert="ca") == not_after(soon / "ca.pem").timestamp()
        assert not_after(soon / "ca.pem") < not_after(p.dir / "ca.pem")
    warnings = [r.getMessage() for r in caplog.records if r.name == "migrelay.expiry"]
    assert len(warnings) == 1 and warnings[0].startswith(f"[tls] cert {own} expires on"), warnings


async def test_the_crl_next_update_is_exported_and_goes_with_the_crl(tmp_path: Path, p: Pki) -> None:
    """cert="crl": past the CRL's next update the relay refuses every peer of its CA, so alert on it
    too; a reload that drops [tls] crl drops the series (no stale date)."""
    _, b = pair_configs(tmp_path, p, "tls")
    pki.reissue_crl(p.dir, days=20)
    next_update = x509.load_pem_x509_crl((p.dir / "crl.pem").read_bytes()).next_update_utc
    assert b.tls is not None and next_update is not None
    path = loopback.with_changes(tmp_path / "hvB.toml", tls=dataclasses.replace(b.tls, crl=p.dir / "crl.pem"))
    metric = "migrelay_certificate_expiry_timestamp_seconds"
    async with running(config.load(path)) as (rb,):
        assert counted(rb, metric, cert="crl") == next_update.timestamp()
        loopback.with_changes(path, tls=b.tls)
        await rb.reload()
        assert not any(
            sample.labels.get("cert") == "crl"
            for family in rb.metrics.registry.collect()
            for sample in family.samples
            if family.name == metric
        )
