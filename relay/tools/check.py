"""`migrelay check`: the config, the certificates and every peer, one line per finding."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final, Literal

import trio

from relay.core.config import Config, PeerConfig
from relay.core.errors import LocalError, PkiError
from relay.daemon import net
from relay.daemon.datapath import TlsConn
from relay.daemon.forward import Forwarding
from relay.daemon.metrics import Metrics
from relay.daemon.selinux import LibSelinux, SocketLabel, SocketLabeler
from relay.daemon.tlsconfig import client_context, load_identity, peer_cert_names

EXPIRY_WARNING_DAYS: Final = 30
PEER_CHECK_TIMEOUT_S: Final = 5.0

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    level: Level
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.text}"


def check_certificates(config: Config, now: dt.datetime | None = None) -> list[Finding]:
    if config.tls is None:
        return [Finding("ok", "no TLS transport configured; [tls] not needed")]
    now = now or dt.datetime.now(dt.UTC)
    try:
        identity = load_identity(config.tls, now=now)
    except PkiError as e:
        return [Finding("error", str(e))]
    findings = [
        Finding(
            "ok",
            f"[tls] cert {config.tls.cert} names {', '.join(sorted(identity.names))}, "
            f"valid until {identity.not_after:%Y-%m-%d}, key matches, issued by [tls] ca",
        )
    ]
    if config.name not in identity.names:
        findings.append(Finding("error", f"[tls] cert does not name this relay ({config.name}); peers will refuse it"))
    if config.tls.crl is not None:
        revoked = sum(len(crl) for crl in identity.crls)
        updates = [e.end for e in identity.expiries if e.kind == "crl"]
        next_update = f", next update {min(updates):%Y-%m-%d}" if updates else ""
        text = f"[tls] crl {config.tls.crl}: {len(identity.crls)} CRL(s), {revoked} revoked{next_update}"
        findings.append(Finding("ok", f"{text}, one from each CA in [tls] ca"))
    if identity.revoked:
        findings.append(Finding("error", "[tls] cert is revoked by [tls] crl; peers with that CRL will refuse it"))
    for expiry in identity.expiries:
        if now >= expiry.end:  # a CA: load_identity refuses anything else past its end
            findings.append(Finding("error", f"{expiry.what} expired on {expiry.end:%Y-%m-%d}; it verifies nothing"))
        elif now >= expiry.warn_from(EXPIRY_WARNING_DAYS):  # a CRL reissued weekly: later (Expiry.warn_from)
            days = (expiry.end - now) / dt.timedelta(days=1)
            findings.append(Finding("warning", f"{expiry.what} expires on {expiry.end:%Y-%m-%d}, in {days:.1f} days"))
    return findings


def check_socket_context(config: Config, labeler: SocketLabeler) -> list[Finding]:
    """[relay] socket_context: can this host create sockets with it (as `serve` does at start)?"""
    if config.socket_context is None:
        return []
    try:
        SocketLabel(labeler, config.socket_context).check()
    except LocalError as e:
        return [Finding("error", str(e))]
    # `check` may run in another SELinux domain than the service: the service's start is the last word
    return [Finding("ok", f"[relay] socket_context {config.socket_context}: the kernel takes it for new sockets")]


async def check_peer(ctx: Forwarding, peer: PeerConfig) -> Finding:
    """Reach the peer and, for TLS, complete a handshake and check the name; send no request."""
    if peer.address is None:
        return Finding("ok", f"peer {peer.name}: no address (accepts only), channels {', '.join(peer.channels)}")
    try:
        with trio.fail_after(PEER_CHECK_TIMEOUT_S):
            sock = await net.dial(peer.address)
            try:
                if peer.address.kind != "tls":
                    kind = peer.address.kind
                    return Finding("ok", f"peer {peer.name} at {peer.address}: reachable ({kind}, no TLS)")
                assert ctx.client_tls is not None
                tls = TlsConn.client(sock, ctx.client_tls)
                tls.ssl.set_tlsext_host_name(peer.name.encode())
                await tls.handshake()
                names = peer_cert_names(tls.ssl)
                version = tls.ssl.get_protocol_version_name()
                await tls.send_eof()  # a clean goodbye: the peer logs a probe, not a failure
            finally:
                sock.close()
    except trio.TooSlowError:
        return Finding("error", f"peer {peer.name} at {peer.address}: no answer within {PEER_CHECK_TIMEOUT_S:.0f}s")
    except OSError as e:
        return Finding("error", f"peer {peer.name} at {peer.address}: {e.strerror or e}")
    except Exception as e:  # every failure is a finding here, never a crash of `check`
        return Finding("error", f"peer {peer.name} at {peer.address}: {e}")
    if peer.name not in names:
        return Finding("error", f"peer {peer.name} at {peer.address}: certificate names {', '.join(sorted(names))}")
    return Finding("ok", f"peer {peer.name} at {peer.address}: {version} mutual auth ok, certificate names {peer.name}")


async def run_check(config: Config, labeler: SocketLabeler | None = None) -> list[Finding]:
    """Every finding for this config, in order; `labeler` stands in for libselinux in tests."""
    where = config.source or "(inline)"
    certificates = check_certificates(config)
    findings = [
        Finding("ok", f"config {where}: relay {config.name}, {len(config.peers)} peer(s)"),
        *certificates,
        *check_socket_context(config, labeler or LibSelinux()),
    ]
    if any(f.level == "error" for f in certificates):
        return findings  # no handshake can succeed
    ctx = Forwarding(config, metrics=Metrics())
    if config.tls is not None:
        ctx.client_tls = client_context(config.tls)
    for peer in config.peers.values():
        findings.append(await check_peer(ctx, peer))
    return findings


def check(config: Config, labeler: SocketLabeler | None = None) -> list[Finding]:
    """`migrelay check`: every finding for this config, in order."""
    return trio.run(run_check, config, labeler)
