"""The daemon: bind everything, accept, and shut down in two steps.

Nursery layout (every task has an owner):

    run()
    └── streams nursery          forwarded connections; survives the accept phase
        └── accept nursery       accept loops, metrics endpoint, peer probes, watchdog
On stop: the accept nursery is cancelled (no new connections, listeners closed),
then in-flight streams get `drain_timeout_s` before they are cancelled too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from relay.core.config import Address, Config
from relay.core.errors import InternalError, LocalError, printable
from relay.core.overlay import LIBVIRT_CHANNEL, peer_dir
from relay.daemon import net
from relay.daemon.control import Control, new_session_id
from relay.daemon.forward import Forwarding, accept_inbound_loop, accept_outbound_loop
from relay.daemon.metrics import Metrics, serve_metrics
from relay.daemon.probe import probe_peers
from relay.daemon.systemd import Notifier, inherited_sockets
from relay.daemon.tlsconfig import client_context, load_identity, server_context

log = logging.getLogger("migrelay.server")

DIR_MODE = 0o755
# With socket_group, the local hypervisor's group creates its listening sockets in our own
# folder: setgid keeps the group on them, and the sticky bit keeps a member from removing
# or renaming a socket it does not own.
OWN_DIR_GROUP_MODE = 0o3775
# Reaching a peer's libvirt.sock means root libvirt on that peer: root only, unless
# [relay] libvirt_group names a group for it. The unix peer listener is for peer relays
# (root in the next container), never for the local hypervisor: root only.
ROOT_ONLY_MODE = 0o600
GROUP_ONLY_MODE = 0o660


@dataclass
class Daemon:
    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    allow_splice: bool = True
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    control: Control | None = None
    context: Forwarding | None = None  # set by run(): what its connections share
    session_ids: Callable[[], str] = new_session_id
    _stop: trio.Event = field(default_factory=trio.Event)
    _socket_files: list[Path] = field(default_factory=list)

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    def _context(self) -> Forwarding:
        ctx = Forwarding(self.config, self.metrics, allow_splice=self.allow_splice)
        tls = self.config.tls
        if self.config.needs_tls() and tls is not None:
            identity = load_identity(tls)
            if self.config.name not in identity.names:
                log.warning(
                    "[tls] cert %s names %s, not this relay (%s): peers will refuse it",
                    tls.cert,
                    ", ".join(sorted(identity.names)),
                    self.config.name,
                )
            ctx.server_tls = server_context(tls)
            ctx.client_tls = client_context(tls)
        return ctx

    async def _bind(
        self,
    ) -> tuple[list[tuple[trio.socket.SocketType, Address]], list[tuple[trio.socket.SocketType, str, str]]]:
        """Create the overlay folders and bind every listener (or raise LocalError)."""
        cfg = self.config
        cfg.socket_dir.mkdir(parents=True, exist_ok=True)
        own = peer_dir(cfg.socket_dir, cfg.name)
        own.mkdir(mode=DIR_MODE, exist_ok=True)
        gid = cfg.socket_gid
        if gid is not None:
            # the local hypervisor (e.g. QEMU as libvirt-qemu) creates its listening sockets here
            os.chown(own, -1, gid)
            os.chmod(own, OWN_DIR_GROUP_MODE)
        inherited = inherited_sockets(self.env)
        inbound = []
        for address in cfg.listen:
            adopted = await net.adopt(address, inherited)
            if adopted is not None:
                log.info("using the socket-activated listener for %s", address)
                inbound.append((adopted, address))
                continue
            inbound.append((await net.listen(address, ROOT_ONLY_MODE), address))
            if address.kind == "unix":
                self._socket_files.append(Path(address.path))
        if inherited:
            names = ", ".join(str(s.getsockname()) for s in inherited)
            raise LocalError(f"systemd passed socket(s) {names} that no [relay] listen entry names")
        outbound = []
        for peer in cfg.peers.values():
            folder = peer_dir(cfg.socket_dir, peer.name)
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
            for name in peer.channels:
                path = folder / name
                if name == LIBVIRT_CHANNEL:
                    libvirt_gid = cfg.libvirt_gid
                    mode = ROOT_ONLY_MODE if libvirt_gid is None else GROUP_ONLY_MODE
                    sock = await net.listen_unix(path, mode, libvirt_gid)
                else:
                    sock = await net.listen_unix(path, cfg.socket_mode, gid)
                outbound.append((sock, peer.name, name))
                self._socket_files.append(path)
        return inbound, outbound

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop() (or cancellation); readiness is reported once everything is bound."""
        self.context = ctx = self._context()
        notifier = Notifier(self.env)
        try:
            async with trio.open_nursery() as streams:
                async with trio.open_nursery() as accepting:
                    inbound, outbound = await self._bind()
                    for sock, address in inbound:
                        accepting.start_soon(accept_inbound_loop, ctx, sock, address.kind, streams)
                    for sock, peer_name, name in outbound:
                        peer = self.config.peers[peer_name]
                        accepting.start_soon(accept_outbound_loop, ctx, sock, peer, name, streams)
                    self.control = Control(ctx, streams, session_ids=self.session_ids)
                    await accepting.start(self.control.serve, self.config.control_path)
                    if self.config.metrics_listen is not None:
                        await accepting.start(serve_metrics, self.config.metrics_listen, self.metrics)
                    accepting.start_soon(probe_peers, ctx)  # migrelay_peer_up; each probe is guarded
                    accepting.start_soon(notifier.watchdog)
                    log.info(
                        "%s serving: %d peer listener(s), %d overlay socket(s) under %s",
                        self.config.name,
                        len(inbound),
                        len(outbound),
                        self.config.socket_dir,
                    )
                    notifier.notify("READY=1", f"STATUS=serving {len(outbound)} overlay sockets")
                    task_status.started(self)
                    await self._stop.wait()
                    accepting.cancel_scope.cancel()
                    for sock, _ in inbound:
                        sock.close()
                    for sock, _, _ in outbound:
                        sock.close()
                    self._remove_socket_files()  # new clients fail at once instead of queueing
                notifier.notify("STOPPING=1", "STATUS=draining")
                log.info("stopped accepting; draining streams for up to %.0fs", self.config.drain_timeout_s)
                streams.cancel_scope.deadline = trio.current_time() + self.config.drain_timeout_s
        finally:
            self._remove_socket_files()
            notifier.close()

    def _remove_socket_files(self) -> None:
        for path in self._socket_files:
            path.unlink(missing_ok=True)
        self._socket_files.clear()


async def run_until_signalled(relay: Daemon) -> None:
    """Run a relay in the foreground: SIGTERM/SIGINT start a graceful stop."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.info("%s received: stopping", signal.Signals(signum).name)
                    relay.stop()

            nursery.start_soon(watch)
            await relay.run()
            nursery.cancel_scope.cancel()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def _raise_fd_limit() -> None:
    """Take the soft RLIMIT_NOFILE up to the hard one.

    Each forwarded connection holds about five fds (two sockets, a duplicate, two pipes
    per spliced direction), and [limits] lets a thousand unauthenticated connections
    wait: the usual soft limit of 1024 would run out first. systemd sets a low soft and
    a high hard limit precisely so that daemons that need more raise it themselves.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("RLIMIT_NOFILE raised from %d to %d", soft, hard)


# glibc's mallopt parameter, and the size from which buffers are mmap'd (its default start)
_M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD_BYTES: Final = 128 * 1024


def _fix_mmap_threshold() -> None:
    """Keep the pumps' 256 KiB buffers out of the heap, so RSS stays flat under churn.

    glibc mmaps such a buffer and gives it back to the kernel when freed, but after the
    first free it raises its threshold (up to 32 MiB) and serves later ones from the
    heap, which thousands of streams of all sizes fragment: RSS climbs for minutes under
    churn before it settles (bench/README.md, "Memory under churn"). A no-op where the
    C library is not glibc.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        log.debug("no mallopt here: the heap keeps its own policy")


def run_daemon(relay: Daemon) -> None:
    """`migrelay serve`: run until signalled.

    A startup problem or a listener that cannot go on surfaces as its one LocalError
    (one line, exit status 2). Anything else is a bug outside every per-connection
    guard: its traceback goes to the log and it surfaces as one InternalError line.
    """
    _raise_fd_limit()
    _fix_mmap_threshold()
    try:
        trio.run(run_until_signalled, relay)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if leaves and all(isinstance(e, LocalError) for e in leaves):
            raise leaves[0] from None
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            raise KeyboardInterrupt from None
        log.critical("the relay stopped on an unexpected error", exc_info=group)
        raise InternalError(f"internal error: {'; '.join(printable(repr(e)) for e in leaves)}") from None
