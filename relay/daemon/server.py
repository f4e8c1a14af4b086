"""The daemon: bind everything, accept, reload, and shut down in two steps.

Nursery layout (every task has an owner):

    run()
    └── streams nursery          forwarded connections; survives the accept phase
        └── accept nursery       accept loops, metrics endpoint, peer probes, watchdog
On stop: the accept nursery is cancelled (no new connections, listeners closed),
then in-flight streams get `drain_timeout_s` before they are cancelled too.
On reload (SIGHUP, or `migrelay reload` on the control socket; relay/daemon/reload.py):
the new config and TLS files are loaded and checked in a thread, the overlay listeners of
added peers and channels are bound, and only then, with no await in between, the new
configuration is swapped in, removed peers' overlay listeners are closed and their
sessions ended. Streams in flight are not touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from relay.core.config import Address, Config, PeerConfig
from relay.core.errors import InternalError, LocalError, printable
from relay.core.overlay import LIBVIRT_CHANNEL, peer_dir
from relay.daemon import expiry, net
from relay.daemon.control import Control, new_session_id
from relay.daemon.datapath import hotloop
from relay.daemon.forward import Forwarding, accept_inbound_loop, accept_outbound_loop
from relay.daemon.metrics import Metrics, serve_metrics
from relay.daemon.probe import probe_peers
from relay.daemon.reload import Material, ReloadFailed, describe, load_material, older_crls, prepare
from relay.daemon.selinux import LibSelinux, SocketLabel, SocketLabeler
from relay.daemon.systemd import Notifier, inherited_sockets
from relay.daemon.tlsconfig import Identity

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


@dataclass(eq=False)
class _Overlay:
    """One overlay listener, `<socket_dir>/<peer>/<channel>`: its socket, its file and its accept loop."""

    peer: str
    channel: str
    sock: trio.socket.SocketType
    path: Path
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def close(self) -> None:
        """Stop accepting and remove the file, so new clients fail at once; its streams go on."""
        self.scope.cancel()
        self.sock.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:  # something else took its place (a folder): not ours to remove
            log.warning("overlay %s closed, but its path could not be removed: %s", self.path, e.strerror or e)


@dataclass
class Daemon:
    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    allow_splice: bool = True
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    control: Control | None = None
    context: Forwarding | None = None  # set by run(): what its connections share
    identity: Identity | None = None  # set with the TLS contexts: our certificate, CAs and CRLs
    session_ids: Callable[[], str] = new_session_id
    labeler: SocketLabeler = field(default_factory=LibSelinux)  # used only with [relay] socket_context
    _stop: trio.Event = field(default_factory=trio.Event)
    _socket_files: list[Path] = field(default_factory=list)
    _overlay: dict[tuple[str, str], _Overlay] = field(default_factory=dict)  # (peer, channel) ->
    # set by run() once everything is bound: what a reload needs
    _material: Material | None = None
    _accepting: trio.Nursery | None = None
    _streams: trio.Nursery | None = None
    _notifier: Notifier | None = None
    _gids: tuple[int | None, int | None] = (None, None)  # socket_group, libvirt_group: resolved once
    _ready: bool = False  # systemd has heard READY=1 (a reload before it would tell systemd too early)
    _reloading: trio.Lock = field(default_factory=trio.Lock)

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    @property
    def overlay_label(self) -> SocketLabel | None:
        """The SELinux label of the sockets a local QEMU connects to: overlay channels and sessions.

        Not libvirt.sock (libvirtd connects there, not QEMU), the peer listeners or the
        control socket: a confined QEMU must not be allowed to reach those.
        """
        context = self.config.socket_context
        return None if context is None else SocketLabel(self.labeler, context)

    def _adopt_identity(self, material: Material) -> None:
        """The certificates now in use: for the expiry gauge and the daily warning."""
        self.identity = material.identity
        if material.identity is not None:
            expiry.publish(self.metrics, material.identity)

    def _context(self, material: Material) -> Forwarding:
        ctx = Forwarding(self.config, self.metrics, allow_splice=self.allow_splice)
        ctx.server_tls, ctx.client_tls = material.server_tls, material.client_tls
        self._adopt_identity(material)
        return ctx

    async def _bind(self) -> list[tuple[trio.socket.SocketType, Address]]:
        """Create the overlay folders and bind the peer listeners (or raise LocalError)."""
        cfg = self.config
        label = self.overlay_label
        if label is not None:
            label.check()  # no SELinux, or a context the kernel refuses: one line now, not at a migration
        cfg.socket_dir.mkdir(parents=True, exist_ok=True)
        own = peer_dir(cfg.socket_dir, cfg.name)
        own.mkdir(mode=DIR_MODE, exist_ok=True)
        # group lookups may go to LDAP or sssd: done once (both groups need a restart to change)
        gid = cfg.socket_gid
        self._gids = (gid, cfg.libvirt_gid)
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
        return inbound

    async def _bind_overlay(self, cfg: Config, wanted: Iterable[tuple[PeerConfig, str]]) -> list[_Overlay]:
        """Bind `<socket_dir>/<peer>/<channel>` for each wanted pair; all of them, or none (LocalError)."""
        socket_gid, libvirt_gid = self._gids
        bound: list[_Overlay] = []
        try:
            for peer, name in wanted:
                folder = peer_dir(cfg.socket_dir, peer.name)
                try:
                    folder.mkdir(mode=DIR_MODE, exist_ok=True)
                except OSError as e:
                    raise LocalError(f"cannot create {folder}: {e.strerror or e}") from None
                path = folder / name
                if name == LIBVIRT_CHANNEL:
                    mode = ROOT_ONLY_MODE if libvirt_gid is None else GROUP_ONLY_MODE
                    sock = await net.listen_unix(path, mode, libvirt_gid)
                else:
                    sock = await net.listen_unix(path, cfg.socket_mode, socket_gid, self.overlay_label)
                bound.append(_Overlay(peer.name, name, sock, path))
        except BaseException:
            for overlay in bound:
                overlay.close()
            raise
        return bound

    def _start_overlay(self, overlay: _Overlay) -> None:
        assert self._accepting is not None
        self._overlay[overlay.peer, overlay.channel] = overlay
        self._accepting.start_soon(self._serve_overlay, overlay)

    async def _serve_overlay(self, overlay: _Overlay) -> None:
        assert self.context is not None and self._streams is not None
        peer = self.config.peers.get(overlay.peer)
        if peer is None:
            return  # a reload removed it (and closed its socket) before this task first ran
        with overlay.scope:
            await accept_outbound_loop(self.context, overlay.sock, peer, overlay.channel, self._streams)

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop() (or cancellation); readiness is reported once everything is bound."""
        self._material = load_material(self.config)
        self.context = ctx = self._context(self._material)
        self._notifier = notifier = Notifier(self.env)
        try:
            async with trio.open_nursery() as streams:
                async with trio.open_nursery() as accepting:
                    inbound = await self._bind()
                    wanted = [(peer, name) for peer in self.config.peers.values() for name in peer.channels]
                    overlay = await self._bind_overlay(self.config, wanted)
                    self._accepting, self._streams = accepting, streams
                    for sock, address in inbound:
                        accepting.start_soon(accept_inbound_loop, ctx, sock, address.kind, streams)
                    for listener in overlay:
                        self._start_overlay(listener)
                    by_control = functools.partial(self.reload, "migrelay reload")
                    self.control = Control(
                        ctx,
                        streams,
                        session_ids=self.session_ids,
                        reload=by_control,
                        overlay_label=self.overlay_label,
                    )
                    await accepting.start(self.control.serve, self.config.control_path)
                    if self.config.metrics_listen is not None:
                        await accepting.start(serve_metrics, self.config.metrics_listen, self.metrics)
                    accepting.start_soon(probe_peers, ctx)  # migrelay_peer_up; each probe is guarded
                    accepting.start_soon(notifier.watchdog)
                    accepting.start_soon(expiry.warn_before_expiry, lambda: self.identity)
                    log.info(
                        "%s serving: %d peer listener(s), %d overlay socket(s) under %s; data path: %s (%s loops)",
                        self.config.name,
                        len(inbound),
                        len(overlay),
                        self.config.socket_dir,
                        self.config.data_path,
                        hotloop.describe() if self.config.data_path == "threads" else "trio",
                    )
                    notifier.notify("READY=1", self._status())
                    self._ready = True
                    task_status.started(self)
                    await self._stop.wait()
                    accepting.cancel_scope.cancel()
                    for sock, _ in inbound:
                        sock.close()
                    self._close_overlay()
                    self._remove_socket_files()  # new clients fail at once instead of queueing
                notifier.notify("STOPPING=1", "STATUS=draining")
                log.info("stopped accepting; draining streams for up to %.0fs", self.config.drain_timeout_s)
                streams.cancel_scope.deadline = trio.current_time() + self.config.drain_timeout_s
        finally:
            self._close_overlay()
            self._remove_socket_files()
            notifier.close()

    def _status(self, note: str = "") -> str:
        return f"STATUS=serving {len(self._overlay)} overlay sockets{note}"

    def _close_overlay(self) -> None:
        for overlay in self._overlay.values():
            overlay.close()
        self._overlay.clear()

    def _remove_socket_files(self) -> None:
        for path in self._socket_files:
            try:
                path.unlink(missing_ok=True)
            except OSError as e:  # replaced by something that is not ours (a folder): leave it
                log.warning("could not remove %s: %s", path, e.strerror or e)
        self._socket_files.clear()

    # --- reload -------------------------------------------------------------------------

    async def reload(self, trigger: str = "reload") -> str:
        """Re-read the config file and its TLS files; swap them in if all of it is good.

        Returns what changed; raises ReloadFailed (logged and counted here) and keeps the
        running configuration otherwise. systemd hears RELOADING=1 before and READY=1 after,
        whichever way it went. One reload at a time: a second waits for the first.
        """
        async with self._reloading:
            if not self._ready or self._stop.is_set():
                self.metrics.reload_failures.inc()
                log.error("reload (%s) refused: the relay is still starting, or stopping", trigger)
                raise ReloadFailed("the relay is still starting, or stopping")
            # sd_notify(3): MONOTONIC_USEC is CLOCK_MONOTONIC, in microseconds
            self._notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            try:
                summary = await self._reload()
            except ReloadFailed as e:
                failure = e
                log.error("reload (%s) failed, still serving the previous configuration: %s", trigger, e)
            except Exception:
                # a bug: its traceback, the counts, and the relay goes on with what it has
                log.exception("reload (%s) failed on an internal error", trigger)
                self.metrics.internal_errors.labels("reload").inc()
                failure = ReloadFailed("internal error (the relay's log has the details)")
            else:
                # counted and logged before READY=1: whoever waits for it finds the outcome
                self.metrics.reloads.inc()
                log.info("reloaded %s (%s): %s", self.config.source, trigger, summary)
                self._notify("READY=1", self._status())
                return summary
            self.metrics.reload_failures.inc()
            self._notify("READY=1", self._status(f"; the last reload failed: {failure}"))
            raise failure

    def _notify(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(*lines)

    async def _reload(self) -> str:
        old, ctx, control = self._material, self.context, self.control
        assert old is not None and ctx is not None and control is not None  # set before READY=1
        # blocking file reads and NSS lookups: off the thread that runs the streams
        new = await trio.to_thread.run_sync(prepare, self.config, abandon_on_cancel=True)  # a stop never waits for it
        cfg = new.config
        rollback = older_crls(old.identity.crls if old.identity else (), new.identity.crls if new.identity else ())
        if rollback is not None:
            raise ReloadFailed(f"{rollback}: a CRL put back would let revoked hosts in again")
        wanted = {(peer.name, name): peer for peer in cfg.peers.values() for name in peer.channels}
        missing = [(peer, name) for (_, name), peer in wanted.items() if (peer.name, name) not in self._overlay]
        try:
            added = await self._bind_overlay(cfg, missing)
        except LocalError as e:
            raise ReloadFailed(str(e)) from None
        if self._stop.is_set():
            for overlay in added:
                overlay.close()
            raise ReloadFailed("the relay began to stop")
        # The swap. Nothing below awaits: no connection sees half of it.
        ctx.reconfigure(cfg, new.server_tls, new.client_tls)
        self.config, self._material = cfg, new
        self._adopt_identity(new)
        for key in [key for key in self._overlay if key not in wanted]:
            self._overlay.pop(key).close()  # the removed peer's own folder stays, as on stop
        for overlay in added:
            self._start_overlay(overlay)
        closed = sum(control.close_sessions_of(name) for name in old.config.peers.keys() - cfg.peers.keys())
        return describe(old, new, closed)


async def run_until_signalled(relay: Daemon) -> None:
    """Run a relay in the foreground: SIGTERM/SIGINT start a graceful stop, SIGHUP a reload."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def reload() -> None:
                with contextlib.suppress(ReloadFailed):  # reload() logged and counted it
                    await relay.reload("SIGHUP")

            async def watch() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        nursery.start_soon(reload)
                        continue
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


# Stack of every thread the relay starts from here on: with the threaded data path
# ([relay] data_path = "threads") two per stream, up to 2 x [limits] streams_per_peer per
# peer. A pump thread touches a few KiB of it (glibc's default reserves 8 MiB each, which
# costs address space, not RSS); the other threads (getaddrinfo, a reload's file reads)
# keep room to spare.
THREAD_STACK_BYTES: Final = 512 * 1024


def run_daemon(relay: Daemon) -> None:
    """`migrelay serve`: run until signalled.

    A startup problem or a listener that cannot go on surfaces as its one LocalError
    (one line, exit status 2). Anything else is a bug outside every per-connection
    guard: its traceback goes to the log and it surfaces as one InternalError line.
    """
    _raise_fd_limit()
    _fix_mmap_threshold()
    threading.stack_size(THREAD_STACK_BYTES)
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
