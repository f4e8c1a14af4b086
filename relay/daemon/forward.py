"""One forwarded connection: dial/accept, TLS, header, policy, target, pump.

Outbound (source host): a client connected to `<socket_dir>/<peer>/<name>`; we dial
the peer relay, authenticate it, send the Request and wait for its Reply.
Inbound (destination host): a peer relay connected to one of our listeners; we
authenticate it, read its Request, apply the destination policy, connect the local
target and answer. Only then does payload flow, through `datapath.relay`.
Over TLS, the source moves a long stream onto fresh connections (Continue; see the
rekeying section at the end and relay/datapath/rekey.py).
"""

from __future__ import annotations

import contextlib
import functools
import grp
import itertools
import logging
import math
import os
import pwd
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import trio
from OpenSSL import SSL

from relay.core.config import Config, PeerConfig, Transport
from relay.core.errors import (
    STATUS_BAD_REQUEST,
    STATUS_FORBIDDEN,
    STATUS_NO_TARGET,
    STATUS_OK,
    STATUS_OVER_LIMIT,
    STATUS_UNSUPPORTED_VERSION,
    HandshakeFailed,
    HandshakeReason,
    NoTarget,
    PeerUnavailable,
    ProtocolError,
    Refused,
    RemoteError,
    printable,
)
from relay.core.overlay import LIBVIRT_CHANNEL, channel_of, metric_channel, peer_dir, refusal
from relay.core.protocol import (
    Continue,
    HeaderReader,
    Reply,
    ReplyReader,
    Request,
    RequestReader,
    UnsupportedVersion,
    encode_reply,
    encode_request,
)
from relay.daemon import net
from relay.daemon.admission import Admission, OverLimit, Slot
from relay.daemon.datapath import (
    Conn,
    Meter,
    PlainConn,
    RekeyConn,
    StreamBroken,
    StreamTruncated,
    SwitchDeclined,
    TlsConn,
    bridge,
    threaded_bridge,
)
from relay.daemon.guard import Closable, RateLimitedLog, contained
from relay.daemon.metrics import Metrics
from relay.daemon.tlsconfig import peer_cert_names, resumed

log = logging.getLogger("migrelay.forward")
T = TypeVar("T")

Result = Literal["ok", "refused", "failed"]
# outbound: a local client connected to our overlay and we dialled the peer; inbound: the peer dialled us
Direction = Literal["outbound", "inbound"]
# A refusal is sent on a best-effort basis: the peer may already be gone.
REFUSAL_SEND_TIMEOUT_S = 1.0


@dataclass(eq=False)  # each stream is its own entry, however alike two are
class StreamInFlight:
    """A stream as `migrelay status` shows it, registered for its lifetime by _pump_counted."""

    id: int  # the #N of its log lines: the source's id, so the same on both relays
    peer: str
    socket_name: str
    channel: str  # its metric label
    direction: Direction
    started: float  # trio clock
    tx: Meter  # .total is exact: the pumps add every chunk to it anyway
    rx: Meter


@dataclass
class PeerLink:
    """What `migrelay status` shows of a peer's reachability; wall-clock times, None for never."""

    last_dial: Literal["up", "down", "never"] = "never"
    last_dial_at: float | None = None
    last_dial_error: str | None = None
    last_handshake_at: float | None = None  # either direction


@dataclass
class Forwarding:
    """What every forwarded connection of one relay shares."""

    config: Config
    metrics: Metrics
    server_tls: SSL.Context | None = None
    client_tls: SSL.Context | None = None
    allow_splice: bool = True
    # TLS 1.3 tickets from each peer, so the next connection resumes instead of a full handshake.
    # A resumed handshake checks no certificate: whatever replaces client_tls (a reload with a
    # new [tls] crl) must empty this too, or a revoked peer is resumed until its ticket expires.
    tls_tickets: dict[str, SSL.Session] = field(default_factory=dict)
    # Inbound TLS streams a peer may continue on a fresh connection: (peer, stream id) ->
    # (socket name, stream). Ids start at a random point, so a restarted source does not
    # reuse the id of a stream we have not yet seen end.
    live_streams: dict[tuple[str, int], tuple[str, RekeyConn]] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(secrets.randbits(32)))
    admission: Admission = field(init=False)
    _socket_gid: int | None = field(init=False)
    # what anyone who can reach a listener can make the relay log: at most a line a second per kind
    anyone_log: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))
    # for `migrelay status`: touched once per stream and once per handshake, never per chunk
    in_flight: set[StreamInFlight] = field(default_factory=set)
    links: dict[str, PeerLink] = field(default_factory=dict)  # configured peers only

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.limits, self.metrics.refused)
        # resolved once: an NSS lookup (LDAP, sssd) per stream could stall every stream
        self._socket_gid = self.config.socket_gid

    def reconfigure(self, config: Config, server_tls: SSL.Context | None, client_tls: SSL.Context | None) -> None:
        """Take a reloaded configuration (relay/daemon/reload.py): new connections use it at once.

        Streams in flight keep what they started with. The tickets cached from peers go with
        the old client context: resuming one would skip checking that peer's certificate
        against the new CA bundle (and CRL), and pyOpenSSL refuses a session made by another
        context anyway (ValueError: the stream would fail).
        """
        for name in self.config.peers:
            if name not in config.peers or config.peers[name].address is None:
                self.forget_peer(name)  # removed, or now only accepted from: we dial it no more
        self.config = config
        self.server_tls, self.client_tls = server_tls, client_tls
        self.tls_tickets.clear()
        self.admission.limits = config.limits  # the counts held carry on under the new caps

    def keep_ticket(self, peer: str, ssl: SSL.Connection) -> None:
        """Cache `peer`'s ticket for the next connection, unless a reload came while this one shook hands."""
        session = ssl.get_session()
        if session is not None and ssl.get_context() is self.client_tls:
            self.tls_tickets[peer] = session

    def next_stream_id(self) -> int:
        return next(self._ids)

    def count(self, peer: str, socket_name: str, result: Result) -> None:
        self.metrics.connections.labels(peer, self.channel_label(peer, socket_name), result).inc()

    def reached(self, peer: PeerConfig, error: str | None = None) -> None:
        """The outcome of a dial or a probe to `peer`: it answered (a refusal is an answer), or
        `error`. Feeds migrelay_peer_up and `migrelay status` (peers we dial, with an address)."""
        # a stream that began before a reload removed its peer says nothing about the peers now
        current = self.config.peers.get(peer.name)
        if peer.address is None or current is None or current.address is None:
            return
        self.metrics.peer_up.labels(peer.name).set(0 if error else 1)
        link = self.links.setdefault(peer.name, PeerLink())
        link.last_dial, link.last_dial_at, link.last_dial_error = ("down" if error else "up"), time.time(), error
        if error is None:
            link.last_handshake_at = link.last_dial_at

    def forget_peer(self, name: str) -> None:
        """A reload removed peer `name`: its migrelay_peer_up series and status entry go too."""
        with contextlib.suppress(KeyError):
            self.metrics.peer_up.remove(name)
        self.links.pop(name, None)

    def handshake_done(self, peer: str) -> None:
        """A connection with `peer` authenticated and exchanged headers, whichever side dialled."""
        self.links.setdefault(peer, PeerLink()).last_handshake_at = time.time()

    def count_handshake(self, role: Literal["client", "server"], conn: TlsConn) -> None:
        self.metrics.tls_handshakes.labels(role, "yes" if resumed(conn.ssl) else "no").inc()

    def count_handshake_failure(self, reason: HandshakeReason) -> None:
        self.metrics.handshake_failures.labels(reason).inc()

    def may_listen(self, uid: int) -> bool:
        """May the owner of a socket in our own overlay folder have put it there?

        Root, this relay's user, or a member of socket_group (the local hypervisor).
        Anyone else's socket there is not connected for a peer.
        """
        if uid in (0, os.geteuid()):
            return True
        gid = self._socket_gid
        return gid is not None and _in_group(uid, gid)

    def channel_label(self, peer: str, socket_name: str) -> str:
        """Bounded label values: names a peer invents do not create new series."""
        known = self.config.peers.get(peer)
        if known is not None and channel_of(socket_name) in known.channels:
            return metric_channel(socket_name)
        return "other"


@functools.lru_cache(maxsize=1024)
def _in_group(uid: int, gid: int) -> bool:
    """Whether user `uid` is in group `gid` (primary or supplementary); one NSS lookup per user."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


@dataclass
class Activity:
    """Streams running through a group of listeners, and when that last changed (trio clock)."""

    active: int = 0
    since: float = field(default_factory=trio.current_time)
    bytes: int = 0  # both directions, of the streams that have ended

    def touch(self) -> None:
        self.since = trio.current_time()

    def idle_for(self) -> float:
        """Seconds without any stream; 0 while one runs."""
        return 0.0 if self.active else trio.current_time() - self.since


class ClosedBeforeHeader(ProtocolError):
    """The other side authenticated and hung up without a byte: a probe (`migrelay check`, or a
    peer's periodic one, relay/daemon/probe.py).

    `known` is set where the prober can only be a peer relay or root: its certificate
    names a configured peer, or it came through a unix listener (root only).
    """

    known = False
    names: frozenset[str] = frozenset()  # the prober's certificate names, when not known


async def read_header(conn: Conn, reader: HeaderReader[T]) -> T:
    """Read exactly one header: never more bytes than it needs, so no payload is consumed."""
    buf = bytearray(max(reader.wanted(), 64))
    fed = False
    while True:
        want = reader.wanted()
        if want > len(buf):
            buf = bytearray(want)
        got = await conn.recv_into(memoryview(buf)[:want])
        if got == 0 and not fed:
            raise ClosedBeforeHeader("connection closed before sending a header")
        if got == 0:
            raise ProtocolError("connection closed before a complete header")
        fed = True
        message = reader.feed(bytes(buf[:got]))
        if message is not None:
            return message


async def _pump(
    ctx: Forwarding,
    peer: str,
    socket_name: str,
    stream_id: int,
    direction: Direction,
    local: Conn,
    remote: Conn,
    label: str,
    slot: Slot,
    activity: Activity | None = None,
) -> None:
    """Run the data path for an established connection, with metrics and one log line at the end.

    The stream's admission slot is released when it ends, however it ends.
    """
    with slot, contained("stream", ctx.metrics.internal_errors, local, remote):
        await _pump_counted(ctx, peer, socket_name, stream_id, direction, local, remote, label, activity)


async def _pump_counted(
    ctx: Forwarding,
    peer: str,
    socket_name: str,
    stream_id: int,
    direction: Direction,
    local: Conn,
    remote: Conn,
    label: str,
    activity: Activity | None,
) -> None:
    if activity is not None:
        activity.active += 1
    channel = ctx.channel_label(peer, socket_name)
    started = trio.current_time()
    # read by every scrape while the stream runs, flushed into the counter when it ends
    tx = ctx.metrics.live_bytes.meter(peer, channel, "tx")
    rx = ctx.metrics.live_bytes.meter(peer, channel, "rx")
    active = ctx.metrics.active.labels(peer, channel)
    active.inc()
    shown = StreamInFlight(stream_id, peer, socket_name, channel, direction, trio.current_time(), tx, rx)
    ctx.in_flight.add(shown)
    try:
        async with trio.open_nursery() as watchdog:
            if remote.socket.family in (socket.AF_INET, socket.AF_INET6):
                # a function, not the socket: a rekeyed stream moves to fresh connections
                watchdog.start_soon(net.watch_acks, lambda: remote.socket, ctx.config.liveness)
            pumps = threaded_bridge if ctx.config.data_path == "threads" else bridge
            await pumps(local, remote, tx, rx, allow_splice=ctx.allow_splice)
            watchdog.cancel_scope.cancel()
    except* (StreamBroken, OSError) as group:
        # StreamBroken from the pumps, or the ACK watchdog's OSError (it aborted both ends)
        why = "; ".join(e.strerror if isinstance(e, OSError) and e.strerror else str(e) for e in group.exceptions)
        log.warning("%s: broken after tx %d rx %d bytes: %s", label, tx.total, rx.total, why)
        ctx.metrics.streams_closed.labels(peer, channel, "failed").inc()
    else:
        log.info("%s: closed, tx %d rx %d bytes", label, tx.total, rx.total)
        ctx.metrics.streams_closed.labels(peer, channel, "ok").inc()
    finally:
        ctx.metrics.live_bytes.release(tx)
        ctx.metrics.live_bytes.release(rx)
        ctx.metrics.stream_duration.labels(channel).observe(trio.current_time() - started)
        active.dec()
        ctx.in_flight.discard(shown)
        if activity is not None:
            activity.active -= 1
            activity.bytes += tx.total + rx.total
            activity.touch()


# --- outbound: source side ----------------------------------------------------------


async def open_outbound(ctx: Forwarding, peer: PeerConfig, socket_name: str, stream_id: int) -> Conn:
    """Dial `peer`, authenticate it, ask for `name`; return the accepted connection.

    Raises Refused (the peer said no), PeerUnavailable or OSError (could not reach it),
    ProtocolError (it answered nonsense).
    """
    address = peer.address
    if address is None:
        raise PeerUnavailable(f"peer {peer.name} has no address configured (it can only dial us)")
    try:
        raw = await net.dial(address, ctx.config.liveness)
    except OSError as e:
        raise PeerUnavailable(f"cannot reach {peer.name} at {address}: {e.strerror or e}") from None
    conn: Conn | None = None
    try:
        # over TLS 1.3 the peer's verdict on our certificate comes with its first bytes: the reply
        with _handshake_counted(ctx, counted=address.kind == "tls"):
            conn = await _start_tls(ctx, peer, raw) if address.kind == "tls" else PlainConn(raw)
            await conn.send_all(memoryview(encode_request(Request(ctx.config.name, socket_name, stream_id))))
            reply = await read_header(conn, ReplyReader())
        if not reply.ok:
            raise Refused(reply.status, reply.reason)
        if isinstance(conn, TlsConn):
            ctx.keep_ticket(peer.name, conn.ssl)
        return conn
    except BaseException:
        if conn is not None:
            conn.close()  # a PlainConn also holds a duplicate of the fd
        else:
            raw.close()
        raise


@contextlib.contextmanager
def _handshake_counted(
    ctx: Forwarding, *, counted: bool = True, not_failures: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Count a peer connection that ends inside this block, once, by why its handshake failed.

    The block is a TLS connection's first steps: up to the peer's reply when dialling
    (TLS 1.3 delivers the peer's verdict on our certificate with its first bytes), up
    to the peer's identification when accepting. A timeout is the caller's deadline
    (handshake_timeout_s) passing, not a shutdown's cancellation: the clock tells them
    apart. `not_failures` end a connection without any handshake having failed.
    """
    deadline = trio.current_effective_deadline()  # -inf if already cancelled: then we cannot tell
    try:
        yield
    except not_failures:
        raise
    except BaseException as e:
        reason = _failure_reason(e, timed_out=-math.inf < deadline <= trio.current_time())
        if counted and reason is not None:
            ctx.count_handshake_failure(reason)
        raise


def _failure_reason(e: BaseException, *, timed_out: bool) -> HandshakeReason | None:
    """How an exception from a peer connection's first steps is counted (None: not as a handshake failure)."""
    if isinstance(e, HandshakeFailed):
        return e.reason
    if isinstance(e, _Answerable):
        return e.unidentified  # a refusal fails the handshake only if we could not tell who it is
    if isinstance(e, (RemoteError, OSError)):
        return "protocol"  # garbage, a TLS alert, EOF or a reset mid-handshake
    if isinstance(e, (trio.Cancelled, trio.TooSlowError)) and timed_out:
        return "timeout"
    return None  # a shutdown, or a bug (the connection's guard counts that)


async def accept_outbound_loop(
    ctx: Forwarding,
    listener: trio.socket.SocketType,
    peer: PeerConfig,
    socket_name: str,
    streams: trio.Nursery,
    activity: Activity | None = None,
) -> None:
    """Accept clients on `<socket_dir>/<peer>/<name>` and forward each to the peer.

    Connections must reach the destination in the order they were accepted: QEMU
    tells its main migration stream from multifd channels by arrival order. So each
    downstream connect finishes (acknowledged by the peer) before the next accept.
    """
    while True:
        client = await net.accept(listener)
        if activity is not None:
            activity.touch()
        # the peer as configured now: a reload may have changed its address since this loop began
        current = ctx.config.peers.get(peer.name)
        if current is None:  # and removed it: its listeners are being closed, never dial it again
            client.close()
            continue
        with contained("overlay-client", ctx.metrics.internal_errors, client):
            await _forward(ctx, client, current, socket_name, streams, activity)


async def _forward(
    ctx: Forwarding,
    client: trio.socket.SocketType,
    peer: PeerConfig,
    socket_name: str,
    streams: trio.Nursery,
    activity: Activity | None,
) -> None:
    """Connect one accepted overlay client to the peer, then hand both ends to a pump task."""
    try:
        slot = ctx.admission.stream_slot(peer.name)
    except OverLimit:
        ctx.count(peer.name, socket_name, "refused")
        client.close()
        return
    with contextlib.ExitStack() as until_handed_over:
        until_handed_over.callback(slot.release)
        stream_id = ctx.next_stream_id()
        label = f"{ctx.config.name}->{peer.name} #{stream_id} {socket_name}"
        try:
            with trio.fail_after(ctx.config.handshake_timeout_s):
                remote = await open_outbound(ctx, peer, socket_name, stream_id)
        except Refused as e:
            ctx.reached(peer)  # it answered: up, just not for this
            log.warning("%s: refused by %s: %s", label, peer.name, printable(str(e)))
            ctx.count(peer.name, socket_name, "refused")
            client.close()
            return
        except (RemoteError, OSError, trio.TooSlowError) as e:
            reason = "timed out" if isinstance(e, trio.TooSlowError) else str(e)
            ctx.reached(peer, reason)
            log.warning("%s: failed: %s", label, reason)
            ctx.count(peer.name, socket_name, "failed")
            client.close()
            return
        ctx.reached(peer)
        try:
            local = PlainConn(client)
        except OSError as e:  # no fd left for its duplicate
            log.warning("%s: failed: %s", label, e.strerror)
            ctx.count(peer.name, socket_name, "failed")
            client.close()
            remote.abort()
            return
        ctx.count(peer.name, socket_name, "ok")
        log.info("%s: open", label)
        remote = _rekeying(ctx, peer, socket_name, stream_id, remote, label)
        until_handed_over.pop_all()  # the pump task releases the slot
        streams.start_soon(
            _pump, ctx, peer.name, socket_name, stream_id, "outbound", local, remote, label, slot, activity
        )


# --- inbound: destination side -------------------------------------------------------


def _identify(ctx: Forwarding, kind: Transport, request: Request | Continue, cert_names: frozenset[str]) -> PeerConfig:
    """Which configured peer this is, by the rules of the listener it came in on."""
    peer = ctx.config.peers.get(request.source)
    if kind == "tls":
        if request.source not in cert_names:
            names = printable(", ".join(sorted(cert_names)))
            raise _Unidentified("name_mismatch", f"certificate names {names}, not {request.source}")
        if peer is None:
            raise _Unidentified("unknown_peer", f"{request.source} is not a configured peer of {ctx.config.name}")
    elif peer is None:
        raise Refused(STATUS_FORBIDDEN, f"{request.source} is not a configured peer of {ctx.config.name}")
    elif kind == "tcp" and not peer.insecure:
        raise Refused(STATUS_FORBIDDEN, f"{request.source} may not use plaintext tcp (set insecure = true for it)")
    return peer


class _Unidentified(Refused):
    """A valid certificate that does not make its holder the configured peer it says it is."""

    def __init__(self, why: HandshakeReason, reason: str) -> None:
        super().__init__(STATUS_FORBIDDEN, reason)
        self.why: HandshakeReason = why


async def _open_target(ctx: Forwarding, socket_name: str) -> trio.socket.SocketType:
    """Connect the local end for `name`; Refused if it is not there (the reason names no path)."""
    if socket_name == LIBVIRT_CHANNEL:
        assert ctx.config.libvirt is not None
        path = ctx.config.libvirt  # the operator's choice: connected by path
        try:
            return await net.connect_unix(str(path))
        except OSError as e:
            detail = f"cannot connect {path}: {e.strerror}"
            raise Refused(STATUS_NO_TARGET, f"nothing usable listens on {socket_name} here", detail) from None
    try:
        return await net.connect_beneath(peer_dir(ctx.config.socket_dir, ctx.config.name), socket_name, ctx.may_listen)
    except NoTarget as e:
        raise Refused(STATUS_NO_TARGET, f"nothing usable listens on {socket_name} here", str(e)) from None


async def _accept_request(
    ctx: Forwarding, raw: trio.socket.SocketType, kind: Transport, who: str, eviction: trio.CancelScope
) -> tuple[Conn, PeerConfig, Request | Continue]:
    conn: Conn
    names: frozenset[str] = frozenset()
    # until the peer is identified, whatever ends the connection is a failed handshake too
    with _handshake_counted(ctx, counted=kind == "tls", not_failures=(ClosedBeforeHeader, OverLimit)):
        if kind == "tls":
            assert ctx.server_tls is not None
            # a silent or trickling client holds no handshake slot and no OpenSSL state, only
            # its socket: it waits for its whole ClientHello, for handshake_timeout_s at most
            await net.first_record(raw)
            tls = TlsConn.server(raw, ctx.server_tls)
            conn = tls
            with ctx.admission.handshake_slot(_address(raw, kind), eviction.cancel):
                await tls.handshake()
            names = peer_cert_names(tls.ssl)
        else:
            conn = PlainConn(raw)
        probe = False
        try:
            request = await read_header(conn, RequestReader())
        except ClosedBeforeHeader as e:
            probe = True
            # unix: only root can connect; tcp:// has no identity to check (an insecure
            # transport anyone who reaches it may use); TLS: a configured peer's certificate
            e.known = kind != "tls" or not names.isdisjoint(ctx.config.peers)
            if not e.known:
                # a certificate of our CA(s) that names no peer: counted as any such connection is
                e.names = names
                ctx.count_handshake_failure("unknown_peer")
            raise
        except UnsupportedVersion as e:
            raise _Answerable(conn, Refused(STATUS_UNSUPPORTED_VERSION, str(e)), unidentified="protocol") from None
        except ProtocolError as e:
            raise _Answerable(conn, Refused(STATUS_BAD_REQUEST, str(e)), unidentified="protocol") from None
        finally:
            # a probe is not counted: one every PEER_PROBE_INTERVAL_S per peer would only
            # dilute what the counter is for, how often streams resume their TLS sessions
            if isinstance(conn, TlsConn) and not probe:
                ctx.count_handshake("server", conn)
        try:
            peer = _identify(ctx, kind, request, names)
        except _Unidentified as e:
            raise _Answerable(conn, e, request, unidentified=e.why) from None
        except Refused as e:  # a plaintext listener's rules: there is no handshake to fail
            raise _Answerable(conn, e, request) from None
    # a Continue names a stream this policy admitted already (_continue_inbound)
    if isinstance(request, Request):
        reason = refusal(request.name, peer.channels, ctx.config.libvirt is not None, request.source)
        if reason is not None:
            raise _Answerable(conn, Refused(STATUS_FORBIDDEN, reason), request)
    return conn, peer, request


class _Answerable(Exception):
    """A refusal we can still tell the peer about (the transport is up).

    `unidentified`: refused before we knew which configured peer it is, a handshake failure too.
    """

    def __init__(
        self,
        conn: Conn,
        refused: Refused,
        request: Request | Continue | None = None,
        *,
        unidentified: HandshakeReason | None = None,
    ) -> None:
        super().__init__(refused.reason)
        self.conn, self.refused, self.request = conn, refused, request
        self.unidentified = unidentified


async def handle_inbound(
    ctx: Forwarding,
    raw: trio.socket.SocketType,
    kind: Transport,
    remote: str,
    unauthenticated: Slot,
    eviction: trio.CancelScope,
) -> None:
    """Serve one connection from a peer relay, start to end.

    It holds `unauthenticated` until it has authenticated; until then admission may
    close it to make room (`eviction` is cancelled), which ends it quietly.
    """
    with eviction, unauthenticated, contained("peer-connection", ctx.metrics.internal_errors, raw) as owned:
        await _serve_inbound(ctx, raw, kind, remote, owned, unauthenticated, eviction)


async def _serve_inbound(
    ctx: Forwarding,
    raw: trio.socket.SocketType,
    kind: Transport,
    remote: str,
    owned: list[Closable],
    unauthenticated: Slot,
    eviction: trio.CancelScope,
) -> None:
    who = f"{remote} ({kind})"
    with contextlib.ExitStack() as slots:
        try:
            with trio.fail_after(ctx.config.handshake_timeout_s):
                conn, peer, request = await _accept_request(ctx, raw, kind, who, eviction)
                unauthenticated.release()
                ctx.handshake_done(peer.name)
                if isinstance(request, Continue):  # not a new stream: no stream slot, no target
                    await _continue_inbound(ctx, conn, peer, request)
                    return
                label = f"{request.source}->{ctx.config.name} #{request.stream_id} {printable(request.name)}"
                try:
                    slots.enter_context(ctx.admission.stream_slot(peer.name))
                    target = await _open_target(ctx, request.name)
                except OverLimit as e:
                    raise _Answerable(conn, Refused(STATUS_OVER_LIMIT, str(e)), request) from None
                except Refused as e:
                    raise _Answerable(conn, e, request) from None
                owned.append(target)
                await conn.send_all(memoryview(encode_reply(Reply(STATUS_OK))))
        except _Answerable as e:
            what = f"{e.request.source} #{e.request.stream_id} {printable(e.request.name)} from " if e.request else ""
            peer_label = e.request.source if e.request and e.request.source in ctx.config.peers else "unknown"
            if peer_label == "unknown":  # anyone can do this (on unix and tcp:// listeners): throttled
                ctx.anyone_log.warning("refused", "refused %s%s: %s", what, who, e.refused.detail)
            else:
                log.warning("refused %s%s: %s", what, who, e.refused.detail)
            ctx.count(peer_label, e.request.name if e.request else "", "refused")
            with trio.move_on_after(REFUSAL_SEND_TIMEOUT_S):
                try:
                    await e.conn.send_all(memoryview(encode_reply(Reply(e.refused.status, e.refused.reason))))
                    await e.conn.send_eof()
                except (OSError, RemoteError):
                    pass  # the peer left first; the refusal is logged and counted above
            e.conn.close()
            return
        except ClosedBeforeHeader as e:
            if e.known:  # routine: every peer probes every PEER_PROBE_INTERVAL_S (relay/daemon/probe.py)
                log.debug("%s completed a handshake and closed (a probe)", who)
            else:
                named = printable(", ".join(sorted(e.names))) or "nothing"
                ctx.anyone_log.log(
                    logging.INFO,
                    "probe",
                    "%s (certificate naming %s, not a peer) completed a handshake and closed",
                    who,
                    named,
                )
            raw.close()
            return
        except OverLimit:
            raw.close()  # before authentication: closed at once, said nothing (admission logged it)
            return
        except (RemoteError, OSError, trio.TooSlowError) as e:
            # mostly before authentication, where anyone can cause it at will: throttled per kind
            kind_of = "timeout" if isinstance(e, trio.TooSlowError) else type(e).__name__
            if isinstance(e, HandshakeFailed):
                kind_of = e.reason  # per reason: a flood of garbage does not hide the line about a revoked peer
            reason = "handshake timed out" if isinstance(e, trio.TooSlowError) else str(e)
            ctx.anyone_log.warning(kind_of, "failed connection from %s: %s", who, reason)
            ctx.count("unknown", "", "failed")
            raw.close()
            for sock in owned[1:]:  # a target connected before the reply could be sent
                sock.close()
            return
        try:
            local = PlainConn(target)
        except OSError as e:  # no fd left for its duplicate
            log.warning("%s: failed: %s", label, e.strerror)
            ctx.count(peer.name, request.name, "failed")
            target.close()
            conn.abort()
            return
        ctx.count(peer.name, request.name, "ok")
        log.info("%s: open", label)
        # the peer's request ended exactly at the header: no payload was read early
        with _continuable(ctx, peer.name, request, conn, label) as chain:
            await _pump(
                ctx, peer.name, request.name, request.stream_id, "inbound", local, chain, label, Slot(slots.close)
            )


def _address(sock: trio.socket.SocketType, kind: Transport) -> str | None:
    """The source IP address of a peer connection (None for unix peers, or if it left)."""
    if kind == "unix":
        return None
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return None


async def accept_inbound_loop(
    ctx: Forwarding, listener: trio.socket.SocketType, kind: Transport, streams: trio.Nursery
) -> None:
    """Accept peer relays on one transport listener; each connection runs on its own."""
    while True:
        sock = await net.accept(listener, ctx.config.liveness)
        address: str | None = None
        if kind != "unix":
            try:
                address = str(sock.getpeername()[0])
                remote = str(sock.getpeername())
            except OSError:
                sock.close()  # it left while in the backlog
                continue
        else:
            remote = "unix peer"
        eviction = trio.CancelScope()
        try:
            unauthenticated = ctx.admission.unauthenticated_slot(address, eviction.cancel)
        except OverLimit:
            sock.close()  # at once: nothing is said to whoever has not authenticated
            continue
        streams.start_soon(handle_inbound, ctx, sock, kind, remote, unauthenticated, eviction)


# --- rekeying: a long TLS stream moves onto a fresh connection (datapath/rekey.py) -------


async def _start_tls(ctx: Forwarding, peer: PeerConfig, raw: trio.socket.SocketType) -> TlsConn:
    """The client handshake with `peer` (resumed if we hold a ticket); its certificate must name it."""
    assert ctx.client_tls is not None
    tls = TlsConn.client(raw, ctx.client_tls, ctx.tls_tickets.get(peer.name))
    tls.ssl.set_tlsext_host_name(peer.name.encode())
    await tls.handshake()
    ctx.count_handshake("client", tls)
    names = peer_cert_names(tls.ssl)
    if peer.name not in names:
        named = printable(", ".join(sorted(names))) or "nothing"
        raise HandshakeFailed(f"certificate at {peer.address} names {named}, not {peer.name}", "name_mismatch")
    return tls


def _rekeying(ctx: Forwarding, peer: PeerConfig, socket_name: str, stream_id: int, conn: Conn, label: str) -> Conn:
    """The source side of a stream: over TLS, a fresh connection every [tls] rekey_after_bytes."""
    if not isinstance(conn, TlsConn):
        return conn  # unix and tcp peers: no keys to wear out

    async def dial() -> TlsConn:
        return await continue_outbound(ctx, peer, socket_name, stream_id)

    def count(result: str) -> None:
        ctx.metrics.tls_rekeys.labels("client", result).inc()

    return RekeyConn(
        conn,
        label=label,
        switch_timeout_s=ctx.config.handshake_timeout_s,
        dial=dial,
        rekey_after_bytes=ctx.config.rekey_after_bytes,
        count=count,
    )


async def continue_outbound(ctx: Forwarding, peer: PeerConfig, socket_name: str, stream_id: int) -> TlsConn:
    """A fresh TLS connection to `peer` that carries our stream `stream_id` from now on.

    Raises SwitchDeclined if the peer certainly did not take it: it could not be asked, or
    it answered, and not OK. Raises StreamTruncated if it was asked and no answer came
    back: it may have moved the stream already, so the stream cannot go on either way.
    """
    assert peer.address is not None  # we dialled it for this very stream
    if ctx.client_tls is None:
        # a reload left no TLS peer, so no TLS context: the stream runs on where it is
        raise SwitchDeclined(f"no TLS peers configured since the reload: {peer.name} is not asked", refused=True)
    raw: trio.socket.SocketType | None = None
    asked = False
    try:
        with trio.fail_after(ctx.config.handshake_timeout_s):
            raw = await net.dial(peer.address, ctx.config.liveness)
            with _handshake_counted(ctx):
                conn = await _start_tls(ctx, peer, raw)
                await conn.send_all(memoryview(encode_request(Continue(ctx.config.name, socket_name, stream_id))))
                # a failed send_all left at most part of the request's one record: nothing a peer acts on
                asked = True
                reply = await read_header(conn, ReplyReader())
    except ProtocolError as e:
        # it closed cleanly, or sent what no migrelay sends, before a whole reply: not an OK
        if raw is not None:
            raw.close()
        raise SwitchDeclined(f"{peer.name} gave no reply: {e}") from None
    except (RemoteError, OSError, trio.TooSlowError) as e:
        if raw is not None:
            raw.close()
        why = "timed out" if isinstance(e, trio.TooSlowError) else str(e)
        if asked:
            raise StreamTruncated(f"{peer.name} did not answer the switch to a fresh connection: {why}") from None
        raise SwitchDeclined(f"no fresh connection to {peer.name}: {why}") from None
    except BaseException:
        if raw is not None:
            raw.close()
        raise
    assert isinstance(reply, Reply)
    if not reply.ok:
        raw.close()
        raise SwitchDeclined(f"{peer.name} refused: {printable(reply.reason)}", refused=True)
    ctx.keep_ticket(peer.name, conn.ssl)
    ctx.handshake_done(peer.name)  # a dial for a fresh key, not for a stream: last_dial stays
    return conn


@contextlib.contextmanager
def _continuable(ctx: Forwarding, peer: str, request: Request, conn: Conn, label: str) -> Iterator[Conn]:
    """The destination side of a stream: over TLS, its source may move it onto fresh connections."""
    if not isinstance(conn, TlsConn):
        yield conn
        return

    def count(result: str) -> None:
        ctx.metrics.tls_rekeys.labels("server", result).inc()

    chain = RekeyConn(conn, label=label, switch_timeout_s=ctx.config.handshake_timeout_s, count=count)
    key = (peer, request.stream_id)
    if key in ctx.live_streams:
        # the source restarted and reused an id (ids start at random: rare) while its old
        # stream here has not ended yet; only the new one can still be continued
        log.warning("%s: replaces a live stream with the same id", label)
    entry = ctx.live_streams[key] = (request.name, chain)
    try:
        yield chain
    finally:
        if ctx.live_streams.get(key) is entry:
            del ctx.live_streams[key]


async def _continue_inbound(ctx: Forwarding, conn: Conn, peer: PeerConfig, request: Continue) -> None:
    """Carry a live stream of `peer` on `conn` from now on, or refuse with a reason.

    Only the peer that opened the stream can name it: streams are keyed by the name its
    certificate proved (_identify). The reason names no local path.
    """
    try:
        if not isinstance(conn, TlsConn):
            raise Refused(STATUS_FORBIDDEN, "only a stream over TLS can be continued, and only over TLS")
        live = ctx.live_streams.get((peer.name, request.stream_id))
        if live is None or live[0] != request.name:
            name = printable(request.name)
            raise Refused(STATUS_NO_TARGET, f"no live stream #{request.stream_id} on {name} from {peer.name}")

        async def answer() -> None:
            await conn.send_all(memoryview(encode_reply(Reply(STATUS_OK))))

        try:
            await live[1].adopt(conn, answer)
        except SwitchDeclined as e:
            raise Refused(STATUS_NO_TARGET, f"stream #{request.stream_id}: {e}") from None
    except Refused as e:
        ctx.metrics.tls_rekeys.labels("server", "refused").inc()
        raise _Answerable(conn, e, request) from None
