"""Listeners (tcp, unix) and dialling, as trio sockets."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

import trio

from relay.core.config import Address, Liveness
from relay.core.errors import LocalError, NoTarget
from relay.daemon.guard import RateLimitedLog
from relay.daemon.selinux import SocketLabel

log = logging.getLogger("migrelay.net")
_capacity_log = RateLimitedLog(log)


class ListenerFailed(LocalError):
    """One of the relay's own listening sockets cannot accept any more."""


# Room for a burst of connections between two accept() calls (the kernel caps it at
# net.core.somaxconn): a flood fills a small backlog, and then the kernel drops the last
# ACK of new handshakes, leaving clients (real peers among them) connected on their side
# only, for the minutes it takes SYN-ACK retries to give up.
LISTEN_BACKLOG: Final = 1024
# Accept loops retry on these (a full fd table is a capacity problem, not a bug).
CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
CAPACITY_BACKOFF_S: Final = 0.1
# ...and go on after these: they concern one connection, not the listener.
CONNECTION_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
UNIX_SEND_BUFFER_BYTES: Final = 2 << 20
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux; Python's socket module lacks the name


def _tune_tcp(sock: trio.socket.SocketType) -> None:
    # The libvirt RPC channel is latency-bound; bulk streams use big writes anyway.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_liveness(sock: trio.socket.SocketType, liveness: Liveness) -> None:
    """TCP keepalive on a peer TCP connection, so an idle stream to a dead peer fails (config.Liveness).

    A peer that vanishes without a FIN or RST (power loss, a partition, a firewall that
    drops) would leave an idle connection open forever: with keepalive, the pending read
    fails with ETIMEDOUT and the pump ends the stream as broken. Data in flight is
    watch_acks's business.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, liveness.keepalive_idle_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, liveness.keepalive_interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, liveness.keepalive_count)


# struct tcp_info (linux/tcp.h), as far as watch_acks reads it:
#   0  u8 state, ca_state, retransmits, probes, backoff, options, wscale, flags
#   8  u32 rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets
#  44  u32 last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (ms ago)
_TCP_INFO: Final = struct.Struct("=8B9I4I")
_TCP_INFO_PROBES: Final = 3
_TCP_INFO_UNACKED: Final = 12
_TCP_INFO_LAST_ACK_RECV: Final = 20
# two checks in a row must agree: one could fall between a window probe and its answer
ACK_CHECKS_PER_TIMEOUT: Final = 4


def ack_state(sock: trio.socket.SocketType) -> tuple[bool, float]:
    """(whether the peer owes this connection an ACK, seconds since the last ACK arrived).

    Owed is for data sent and not yet acknowledged, or for a probe not yet answered (a
    zero-window probe, or a keepalive probe).
    """
    fields = _TCP_INFO.unpack(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size))
    owed = bool(fields[_TCP_INFO_UNACKED] or fields[_TCP_INFO_PROBES])
    return owed, float(fields[_TCP_INFO_LAST_ACK_RECV]) / 1000


async def watch_acks(current: Callable[[], trio.socket.SocketType], liveness: Liveness) -> None:
    """Raise OSError(ETIMEDOUT) once the peer has owed an ACK for liveness.ack_timeout_s.

    Runs beside a stream's pumps on its peer TCP connection, `current()` (asked at each
    check: a rekeyed stream moves to fresh connections). A live peer acknowledges
    data within round trips and answers every window probe, however long it keeps its
    window closed; only a dead or cut-off one owes ACKs for long.

    Owed is counted from when something became outstanding, not from the last ACK: after
    a quiet spell (no ACK for minutes, rightly) the first bytes sent are owed from then on.
    TCP_INFO does not say when that was, so it is the first check that saw it, backdated
    by one period at most (never before the last ACK): the timeout may run up to one
    period long, never short.
    """
    period_s = liveness.ack_timeout_s / ACK_CHECKS_PER_TIMEOUT
    strikes = 0
    sock: trio.socket.SocketType | None = None
    owed_since: float | None = None
    while True:
        await trio.sleep(period_s)
        now = trio.current_time()
        try:
            if (fresh := current()) is not sock:
                sock, owed_since = fresh, None
            owed, since_ack_s = ack_state(sock)
        except OSError:
            return  # closed under us: the pumps say why
        if not owed:
            owed_since, strikes = None, 0
            continue
        if owed_since is None:
            owed_since = now - min(period_s, since_ack_s)
        owed_s = min(since_ack_s, now - owed_since)
        strikes = strikes + 1 if owed_s >= liveness.ack_timeout_s else 0
        if strikes >= 2:
            raise OSError(errno.ETIMEDOUT, f"timed out: the peer acknowledged nothing for {owed_s:.0f}s")


# a TLS record header: content type, legacy version, length
_TLS_RECORD_HEADER: Final = struct.Struct("!BHH")
_TLS_HANDSHAKE_RECORD: Final = 22
# a record's plaintext is at most 2^14 bytes; anything announcing more is OpenSSL's to refuse
_MAX_FIRST_RECORD_BYTES: Final = 16384


async def first_record(sock: trio.socket.SocketType) -> None:
    """Return once a TLS client's whole first record (its ClientHello) has arrived, unread.

    Until then the connection costs no OpenSSL state, no handshake slot and no wakeup:
    SO_RCVLOWAT keeps the kernel from reporting the socket readable before that many bytes
    are queued (an EOF still wakes it). So a client trickling its ClientHello a byte every
    few seconds (a slow-handshake attack) only waits, bounded by handshake_timeout_s,
    where it would otherwise hold a handshake slot and wake the relay at every byte. A
    first record that is not a TLS handshake returns at once: OpenSSL refuses it.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _TLS_RECORD_HEADER.size)
    await trio.lowlevel.wait_readable(sock)
    head = await sock.recv(_TLS_RECORD_HEADER.size, socket.MSG_PEEK)
    if len(head) == _TLS_RECORD_HEADER.size:
        kind, _, length = _TLS_RECORD_HEADER.unpack(head)
        if kind == _TLS_HANDSHAKE_RECORD and length <= _MAX_FIRST_RECORD_BYTES:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _TLS_RECORD_HEADER.size + length)
            await trio.lowlevel.wait_readable(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _tune_unix(sock: trio.socket.SocketType) -> None:
    """A deeper send buffer than the default ~208 KiB, on every unix socket the relay uses
    (the legs to a local QEMU or libvirt, and the unix peer transport).

    A unix stream socket is writable again only when less than a quarter of its send
    buffer is queued: a quarter of the default is less than a destination QEMU drains in
    one relay wakeup. SO_SNDBUFFORCE (root) goes past net.core.wmem_max; without the
    privilege, SO_SNDBUF gets what the limit allows. What it buys a real migration is
    measured in bench/README.md ("Local unix legs: send buffer depth").
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, UNIX_SEND_BUFFER_BYTES)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER_BYTES)


async def listen_tcp(host: str, port: int) -> trio.socket.SocketType:
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise LocalError(f"cannot resolve listen address {host}:{port}")
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise LocalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by an earlier run; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalError(f"{path} exists and is not a socket; remove it or change the config")
    path.unlink()


async def listen_unix(
    path: Path, mode: int, gid: int | None = None, label: SocketLabel | None = None
) -> trio.socket.SocketType:
    """Listen on `path`; `label` (sockets a confined QEMU connects to) gives the socket its SELinux context."""
    remove_stale_socket(path)
    if label is None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        with label.creating():  # no await inside: the label is the thread's, for whatever it creates
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise LocalError(f"cannot listen on {path}: {e.strerror or e}") from None
    return sock


async def listen(address: Address, socket_mode: int, gid: int | None = None) -> trio.socket.SocketType:
    if address.kind == "unix":
        return await listen_unix(Path(address.path), socket_mode, gid)
    return await listen_tcp(address.host, address.port)


async def connect_unix(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    _tune_unix(sock)
    return sock


async def connect_beneath(folder: Path, name: str, owner_ok: Callable[[int], bool]) -> trio.socket.SocketType:
    """Connect the unix socket `name` directly in `folder`, never by a path someone else can swap.

    The relay runs as root and connects for a peer, in a folder the local hypervisor's
    group may write to: a check by path, then a connect by path, can be raced (a symlink
    swapped in between), and a hard link passes any path check. So the entry is opened
    once (O_PATH|O_NOFOLLOW, relative to the folder), that very inode is checked (a
    socket, one link, an owner who may listen there) and connected through
    /proc/self/fd/N. Raises NoTarget with a reason for the log (it names the path).
    """
    path = folder / name
    try:
        dir_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise NoTarget(f"cannot open {folder}: {e.strerror}") from None
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise NoTarget(f"nothing listens on {path}") from None
    except OSError as e:
        raise NoTarget(f"cannot open {path}: {e.strerror}") from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise NoTarget(f"{path} is a symlink")
        if not stat.S_ISSOCK(st.st_mode):
            raise NoTarget(f"{path} is not a socket")
        if st.st_nlink != 1:
            raise NoTarget(f"{path} has {st.st_nlink} links (a hard link to another socket?)")
        if not owner_ok(st.st_uid):
            raise NoTarget(f"{path} belongs to uid {st.st_uid}, who may not listen there")
        try:
            return await connect_unix(f"/proc/self/fd/{fd}")
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise NoTarget(f"nothing listens on {path}") from None
            raise NoTarget(f"cannot connect {path}: {e.strerror}") from None
    finally:
        os.close(fd)


async def connect_tcp(host: str, port: int, liveness: Liveness | None = None) -> trio.socket.SocketType:
    """Dial host:port; `liveness` (peer connections) arms dead-peer detection, None keeps the kernel's."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            await sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            last = e
            continue
        except BaseException:
            sock.close()
            raise
        try:
            _tune_tcp(sock)
            if liveness is not None:
                set_liveness(sock, liveness)
        except OSError:
            sock.close()  # it died already (a reset makes setsockopt fail): the caller says why
            raise
        return sock
    raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}")


async def dial(address: Address, liveness: Liveness | None = None) -> trio.socket.SocketType:
    """Connect a peer transport; `liveness` applies to TCP only (a unix peer's death is seen at once)."""
    if address.kind == "unix":
        return await connect_unix(address.path)
    return await connect_tcp(address.host, address.port, liveness)


async def accept(listener: trio.socket.SocketType, liveness: Liveness | None = None) -> trio.socket.SocketType:
    """Accept one connection.

    Capacity errors (out of fds or memory) pause accepting for a moment, as trio's own
    accept loop does: the connections wait in the backlog meanwhile. A connection that
    died in the backlog (ECONNABORTED), a protocol error on it (EPROTO) or a firewall
    verdict (EPERM) concern that connection only. Anything else means this listener
    cannot go on: ListenerFailed, which ends the daemon with one line.
    `liveness` is for peer listeners: it arms dead-peer detection on accepted TCP sockets.
    """
    while True:
        try:
            sock, _ = await listener.accept()
        except OSError as e:
            if e.errno in CAPACITY_ERRNOS:
                _capacity_log.warning(str(e.errno), "cannot accept: %s; pausing %.1fs", e.strerror, CAPACITY_BACKOFF_S)
                await trio.sleep(CAPACITY_BACKOFF_S)
                continue
            if e.errno in CONNECTION_ERRNOS:
                continue
            raise ListenerFailed(f"listener {_describe(listener)} failed: {e.strerror or e}") from None
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                _tune_tcp(sock)
                if liveness is not None:
                    set_liveness(sock, liveness)
            elif sock.family == socket.AF_UNIX:
                _tune_unix(sock)
        except OSError:
            sock.close()  # it died already (ECONNRESET on a setsockopt): the next one
            continue
        return sock


def _describe(listener: trio.socket.SocketType) -> str:
    try:
        return str(listener.getsockname())
    except OSError:
        return f"fd {listener.fileno()}"


async def _bound_address(address: Address) -> object:
    """What getsockname() says for a socket bound to `address`."""
    if address.kind == "unix":
        return address.path
    infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][4][:2] if infos else None


async def adopt(address: Address, inherited: list[socket.socket]) -> trio.socket.SocketType | None:
    """Take the inherited (socket-activated) listener bound to `address` out of `inherited`, if any."""
    wanted = await _bound_address(address)
    for sock in inherited:
        name = sock.getsockname()
        if (name if isinstance(name, str) else name[:2]) == wanted:
            inherited.remove(sock)
            return trio.socket.from_stdlib_socket(sock)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on host (for the demo, the bench and tests; racy by nature)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
