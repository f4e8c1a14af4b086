"""Certificates and CRLs that stop working on a date: their metric, and a daily warning before it.

A relay whose certificate, CA or CRL runs out keeps running but fails every handshake
(an expired CRL makes OpenSSL refuse every peer), so the date is exported as a metric
for alerting and, from WARNING_DAYS before, logged once a day by the daemon.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Final

import trio

from relay.daemon.metrics import Metrics
from relay.daemon.tlsconfig import ExpiryKind, Identity

log = logging.getLogger("migrelay.expiry")

WARNING_DAYS: Final = 14
CHECK_EVERY_S: Final = 24 * 3600.0
# what stops when it runs out, and what to do about it
_CONSEQUENCE: Final[dict[ExpiryKind, str]] = {
    "own": "peers refuse this relay; issue a fresh certificate and reload",
    "ca": "every certificate it issued is refused; roll over to a new CA",
    "crl": "this relay refuses every peer of that CA; install a fresh CRL and reload",
}


def publish(metrics: Metrics, identity: Identity) -> None:
    """Set migrelay_certificate_expiry_timestamp_seconds from what was just loaded.

    With several CAs in [tls] ca, cert="ca" is the first to expire: the one date an alert
    needs, on a series whose labels do not change when a CA is added for a rollover; the
    same for cert="crl", the first next update of the CRLs in [tls] crl (past it the
    relay refuses every peer of that CA).
    """
    for kind in ("own", "ca", "crl"):
        ends = [e.end for e in identity.expiries if e.kind == kind]
        if ends:
            metrics.certificate_expiry.labels(kind).set(min(ends).timestamp())
        else:  # a reload dropped [tls] crl: no stale date for it
            with contextlib.suppress(KeyError):
                metrics.certificate_expiry.remove(kind)


def _wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def warn_before_expiry(
    current: Callable[[], Identity | None], now: Callable[[], dt.datetime] = _wall_clock
) -> None:
    """Forever, once a day (on trio's clock): one line for each certificate or CRL close to its end.

    `current` gives what the relay uses now (a reload may change it); `now` is the date, a
    parameter so a test can run weeks with trio's autojump clock. A CRL is warned about
    from a shorter lead if it is short-lived (tlsconfig.Expiry.warn_from).
    """
    while True:
        identity = current()
        today = now()
        for item in identity.expiries if identity is not None else ():
            when, then = f"{item.end:%Y-%m-%d %H:%M} UTC", _CONSEQUENCE[item.kind]
            if today >= item.end:
                log.error("%s expired on %s: %s", item.what, when, then)
            elif today >= item.warn_from(WARNING_DAYS):
                days = (item.end - today) / dt.timedelta(days=1)
                log.warning("%s expires on %s, in %.1f days: then %s", item.what, when, days, then)
        await trio.sleep(CHECK_EVERY_S)
