"""Is each peer up? `migrelay_peer_up`, from a light periodic probe (and from every dial, forward.py).

A probe is what `migrelay check` does: connect, complete the TLS handshake (mutual, the
peer's certificate must name it), close cleanly, and send no request. The peer logs that
at debug and counts nothing (forward.py, `ClosedBeforeHeader`), opens no target and takes
no stream slot, so probing disturbs no stream. Without it, a peer that died while no
migration ran would look up until the next migration failed against it.
"""

from __future__ import annotations

import logging
from typing import Final

import trio
from OpenSSL import SSL

from relay.core.config import PeerConfig
from relay.core.errors import PeerUnavailable, RemoteError, printable
from relay.daemon import net
from relay.daemon.datapath import TlsConn
from relay.daemon.forward import Forwarding
from relay.daemon.guard import contained
from relay.daemon.tlsconfig import peer_cert_names

log = logging.getLogger("migrelay.probe")

# One handshake per peer this often: a dead peer shows in migrelay_peer_up within a
# scrape or two, at a cost the peer does not notice (its log sees a debug line).
PEER_PROBE_INTERVAL_S: Final = 30.0


async def probe_peers(ctx: Forwarding, interval_s: float = PEER_PROBE_INTERVAL_S) -> None:
    """Probe every peer that has an address, now and then every `interval_s`, until cancelled.

    Each round takes the peers of the configuration in force: a peer added by a reload is
    probed from the next round on (a removed one's series went at the reload, forward.py).
    """
    was_up: dict[str, bool] = {}
    while True:
        peers = [peer for peer in ctx.config.peers.values() if peer.address is not None]
        for gone in was_up.keys() - {peer.name for peer in peers}:
            del was_up[gone]
        async with trio.open_nursery() as nursery:  # each probe is bounded by handshake_timeout_s
            for peer in peers:
                nursery.start_soon(_probe_once, ctx, peer, was_up)
        await trio.sleep(interval_s)


async def _probe_once(ctx: Forwarding, peer: PeerConfig, was_up: dict[str, bool]) -> None:
    with contained("peer-probe", ctx.metrics.internal_errors):
        was_up[peer.name] = await _probe_and_report(ctx, peer, was_up.get(peer.name))


async def _probe_and_report(ctx: Forwarding, peer: PeerConfig, was_up: bool | None) -> bool:
    """Probe once, set migrelay_peer_up, and log when the answer changes (not every time)."""
    try:
        with trio.fail_after(ctx.config.handshake_timeout_s):
            await probe(ctx, peer)
    except (RemoteError, OSError, trio.TooSlowError) as e:
        if isinstance(e, trio.TooSlowError):
            why = f"no answer within {ctx.config.handshake_timeout_s:g}s"
        else:
            why = (e.strerror if isinstance(e, OSError) else None) or str(e)
        ctx.reached(peer, why)
        if was_up is not False:
            log.warning("peer %s at %s is down: %s", peer.name, peer.address, why)
        return False
    ctx.reached(peer)
    if was_up is False:
        log.info("peer %s at %s is up again", peer.name, peer.address)
    return True


async def probe(ctx: Forwarding, peer: PeerConfig) -> None:
    """Reach `peer` as a stream would, authenticate both ways, and hang up without a request.

    Raises PeerUnavailable (no TLS handshake, the wrong certificate, or the peer refused
    ours) or OSError (could not connect). Callers bound it in time.
    """
    assert peer.address is not None
    sock = await net.dial(peer.address)  # no keepalive: it lives for a handshake
    with sock:
        if peer.address.kind != "tls":
            return  # unix and tcp:// have nothing more to prove
        assert ctx.client_tls is not None
        # never a stored ticket: a resumed handshake would not show the certificate again
        tls = TlsConn.client(sock, ctx.client_tls)
        tls.ssl.set_tlsext_host_name(peer.name.encode())
        await tls.handshake()
        names = peer_cert_names(tls.ssl)
        if peer.name not in names:
            named = printable(", ".join(sorted(names))) or "nothing"
            raise PeerUnavailable(f"its certificate names {named}, not {peer.name}")
        await tls.send_eof()
        await _peer_hangs_up(tls, sock)


async def _peer_hangs_up(tls: TlsConn, sock: trio.socket.SocketType) -> None:
    """Wait for the peer's side of the goodbye; raise PeerUnavailable if it refused our certificate.

    In TLS 1.3 the client's handshake is complete before the server has checked the
    client's certificate: a peer that refuses ours (another CA, a revoked certificate)
    says so with an alert that arrives only now. A peer that accepted us reads our
    close_notify as a probe and closes the connection.
    """
    while True:
        try:
            tls.ssl.recv(1)  # session tickets are consumed inside; a migrelay sends no data here
        except SSL.WantReadError:
            await trio.lowlevel.wait_readable(sock)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return  # its close_notify, or its FIN (it closes without one): it took us for a probe
        except SSL.Error as e:
            reasons = _reasons(e)
            if not reasons:
                return  # a FIN without close_notify, as some OpenSSL 3 versions report it
            raise PeerUnavailable(f"it refused this relay's certificate: {reasons}") from None
        else:
            return  # data: not what a migrelay sends, but it did accept us


def _reasons(e: SSL.Error) -> str:
    """OpenSSL's reason strings for an SSL.Error, e.g. 'tlsv1 alert unknown ca'; empty if it queued none."""
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    return ", ".join(str(err[2]) for err in errors if isinstance(err, tuple) and len(err) == 3 and err[2])
