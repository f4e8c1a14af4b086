"""The control socket: sessions, status and reload, for `migrelay session|status|migrate|reload`.

A session is a fresh set of overlay listeners for one migration to one peer,
`<socket_dir>/<peer>/<self>_<id>-migration.sock` and `..._<id>-nbd.sock`, so that concurrent
migrations to the same peer get distinct destination paths (two destination QEMUs
cannot listen on one path). It ends when closed, or after `session_idle_s` without a
stream; streams already running keep going either way.

Wire format (parsed and encoded, sans-IO, in control_protocol.py): one JSON object per
line. Request `{"op": "open", "peer": "hv2"}`; answer `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`. Only root (or the daemon's own user) may connect: the
socket is 0600 and peers are checked with SO_PEERCRED.

No request ends the daemon: a bad one, or one that cannot be done, gets a one-line error;
a bug is logged with its traceback, counted (migrelay_internal_errors_total{where="control"})
and answered "internal error"; either way only that connection ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, assert_never

import trio

from relay.core.config import PeerConfig
from relay.core.control_protocol import (
    CloseSession,
    ControlRequest,
    GetStatus,
    ListSessions,
    OpenSession,
    Reload,
    RequestReader,
    encode_error,
    encode_result,
)
from relay.core.errors import ControlError, LocalError
from relay.core.overlay import LIBVIRT_CHANNEL, SESSION_ID_CHARS, peer_dir, session_name, unix_path_problem
from relay.daemon import net
from relay.daemon.forward import Activity, Forwarding, PeerLink, StreamInFlight, accept_outbound_loop
from relay.daemon.reload import ReloadFailed
from relay.daemon.selinux import SocketLabel

log = logging.getLogger("migrelay.control")

SESSION_CHANNELS: Final = ("migration.sock", "nbd.sock")
CONTROL_MODE: Final = 0o600
RECV_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT_S: Final = 5.0
# A client that does not read its answer must not hold a task (and its socket) forever.
ANSWER_TIMEOUT_S: Final = 5.0
INTERNAL_ERROR: Final = "internal error (the relay's log has the details)"
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid


def new_session_id() -> str:
    """A fresh session id: short, since it is part of socket paths, and random, so it is not guessed."""
    return secrets.token_hex(SESSION_ID_CHARS // 2)


@dataclass
class Session:
    id: str
    peer: str
    sockets: dict[str, Path]  # channel -> overlay path
    libvirt: Path | None
    activity: Activity
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    created: float = field(default_factory=time.time)

    def describe(self) -> dict[str, Any]:
        """What a user needs for virsh / migrateToURI3, as JSON."""
        out: dict[str, Any] = {"id": self.id, "peer": self.peer}
        if self.libvirt is not None:
            out["desturi"] = f"qemu+unix:///system?socket={self.libvirt}"
        if "migration.sock" in self.sockets:
            out["migrateuri"] = f"unix://{self.sockets['migration.sock']}"
        if "nbd.sock" in self.sockets:
            out["disks_uri"] = f"unix://{self.sockets['nbd.sock']}"
        out["sockets"] = [str(p) for p in self.sockets.values()]
        out["active_streams"] = self.activity.active
        out["bytes"] = self.activity.bytes
        out["idle_s"] = round(self.activity.idle_for(), 1)
        return out


class Control:
    """Owns the sessions of one relay; served over the control socket."""

    def __init__(
        self,
        ctx: Forwarding,
        streams: trio.Nursery,
        started: float | None = None,
        session_ids: Callable[[], str] = new_session_id,
        reload: Callable[[], Awaitable[str]] | None = None,
        overlay_label: SocketLabel | None = None,
    ) -> None:
        self.ctx = ctx
        self.streams = streams
        self.session_ids = session_ids  # a parameter so that tests can know a session's paths in advance
        self.reload = reload  # the daemon's reload (`migrelay reload`); it answers with what changed
        self.overlay_label = overlay_label  # [relay] socket_context: the local QEMU connects to session sockets
        self.sessions: dict[str, Session] = {}
        self.started = started if started is not None else time.time()
        self._nursery: trio.Nursery | None = None

    # --- operations -----------------------------------------------------------------

    async def open(self, peer_name: str) -> Session:
        cfg = self.ctx.config
        peer = cfg.peers.get(peer_name)
        if peer is None:
            known = ", ".join(sorted(cfg.peers)) or "none"
            raise ControlError(f"unknown peer {peer_name!r} (configured: {known})")
        if peer.address is None:
            raise ControlError(f"peer {peer_name} has no address: this relay cannot dial it")
        channels = [c for c in SESSION_CHANNELS if c in peer.channels]
        if not channels:
            raise ControlError(f"peer {peer_name} allows neither migration.sock nor nbd.sock")
        assert self._nursery is not None, "Control.serve() must be running"
        session_id = self.session_ids()
        if session_id in self.sessions:  # 32 random bits: a clash is rare, but it must not end the daemon
            raise ControlError(f"session id {session_id} is taken; ask again")
        folder = peer_dir(cfg.socket_dir, peer.name)
        # Not recreated here: the peer's own sockets (libvirt.sock, named in the answer's desturi)
        # went with it, and only a restart binds those again.
        if not folder.is_dir():
            raise ControlError(
                f"cannot open a session to {peer.name}: its overlay folder {folder} is missing "
                "(removed while the relay runs?); restart the relay to recreate it and its sockets"
            )
        listeners: list[tuple[trio.socket.SocketType, str]] = []
        sockets: dict[str, Path] = {}
        try:
            for channel in channels:
                name = session_name(cfg.name, session_id, channel)
                if (problem := unix_path_problem(folder / name)) is not None:
                    raise ControlError(f"session socket path {problem}")  # config load checks this too
                sock = await net.listen_unix(folder / name, cfg.socket_mode, cfg.socket_gid, self.overlay_label)
                listeners.append((sock, name))
                sockets[channel] = folder / name
        except BaseException:
            for sock, _ in listeners:
                sock.close()
            for path in sockets.values():
                path.unlink(missing_ok=True)
            raise
        if self.ctx.config.peers.get(peer.name) is None:  # a reload removed it while we bound
            for sock, _ in listeners:
                sock.close()
            for path in sockets.values():
                path.unlink(missing_ok=True)
            raise ControlError(f"peer {peer.name} was removed by a reload meanwhile")
        libvirt = folder / LIBVIRT_CHANNEL if LIBVIRT_CHANNEL in peer.channels else None
        session = Session(session_id, peer.name, sockets, libvirt, Activity())
        self.sessions[session_id] = session
        self._nursery.start_soon(self._run_session, session, peer, listeners)
        log.info("session %s to %s opened: %s", session_id, peer.name, ", ".join(map(str, sockets.values())))
        return session

    def close(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            raise ControlError(f"no session {session_id!r}")
        session.scope.cancel()

    def close_sessions_of(self, peer: str) -> int:
        """Close every session to `peer` (a reload removed it); their running streams go on, as on close."""
        doomed = [s for s in self.sessions.values() if s.peer == peer]
        for session in doomed:
            session.scope.cancel()
        return len(doomed)

    def status(self) -> dict[str, Any]:
        """A snapshot: peers (totals, last dial, last handshake), streams in flight, sessions.

        No rates: a watcher computes those from two snapshots' byte counts and `clock_s`, over
        its own interval (relay/tools/status.py), so the daemon keeps no history per watcher.
        """
        cfg = self.ctx.config
        totals = self.ctx.metrics.peer_totals()
        # (the byte totals include what streams in flight have moved so far: metrics.LiveBytes)
        now, clock = time.time(), trio.current_time()
        streams = sorted(self.ctx.in_flight, key=lambda s: s.started)
        return {
            "relay": cfg.name,
            "time": round(now, 3),
            # trio's clock (monotonic) at this snapshot: the time base of the streams' age_s
            "clock_s": round(clock, 3),
            "uptime_s": round(now - self.started, 1),
            "socket_dir": str(cfg.socket_dir),
            "listen": [str(a) for a in cfg.listen],
            "peers": {
                p.name: {
                    "address": str(p.address) if p.address else None,
                    "channels": list(p.channels),
                    **totals.get(p.name, {}),
                    **_describe_link(self.ctx.links.get(p.name, PeerLink())),
                }
                for p in cfg.peers.values()
            },
            "streams": [_describe_stream(s, now, clock) for s in streams],
            "sessions": [s.describe() for s in self.sessions.values()],
        }

    # --- tasks ----------------------------------------------------------------------

    async def _run_session(
        self, session: Session, peer: PeerConfig, listeners: list[tuple[trio.socket.SocketType, str]]
    ) -> None:
        # `peer` as open() found it: a reload may remove it before this task first runs (and then
        # cancels session.scope); each accepted client is sent to the peer as configured by then
        try:
            # every listener is closed and every socket file removed, even if removing one fails
            with contextlib.ExitStack() as cleanup:
                for path in session.sockets.values():
                    cleanup.callback(path.unlink, missing_ok=True)
                for sock, _ in listeners:
                    cleanup.callback(sock.close)
                with session.scope:
                    async with trio.open_nursery() as nursery:
                        for sock, name in listeners:
                            nursery.start_soon(
                                accept_outbound_loop, self.ctx, sock, peer, name, self.streams, session.activity
                            )
                        await self._expire_when_idle(session)
                        log.info(
                            "session %s to %s expired after %.0fs idle",
                            session.id,
                            session.peer,
                            self.ctx.config.session_idle_s,
                        )
                        nursery.cancel_scope.cancel()
        except Exception:
            # Whatever ends one session badly (a bug, a listener that broke, a socket file that
            # cannot be removed) ends that session only; cancellation passes through.
            log.exception("session %s to %s failed; the relay goes on", session.id, session.peer)
            self.ctx.metrics.internal_errors.labels("control").inc()
        finally:
            del self.sessions[session.id]
            log.info("session %s to %s closed", session.id, session.peer)

    async def _expire_when_idle(self, session: Session) -> None:
        limit = self.ctx.config.session_idle_s
        # Not a poll: each sleep lasts until the earliest moment the session could be idle enough.
        while (idle := session.activity.idle_for()) < limit:  # noqa: ASYNC110
            await trio.sleep(limit - idle if idle else limit)

    async def serve(self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the control socket; also the home of every session's tasks."""
        listener = await net.listen_unix(path, CONTROL_MODE)
        try:
            await self.serve_on(listener, task_status=task_status)
        finally:
            listener.close()
            path.unlink(missing_ok=True)  # noqa: ASYNC240  (a local socket file: no I/O worth a thread)

    async def serve_on(
        self, listener: trio.socket.SocketType, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer clients of a bound listener until cancelled; ends only if the listener cannot go on."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                # net.accept goes on after a client's own failure (ECONNABORTED, EPROTO, EPERM)
                # and raises ListenerFailed when the listener cannot go on
                sock = await net.accept(listener)
                nursery.start_soon(self._answer, sock)

    async def _answer(self, sock: trio.socket.SocketType) -> None:
        """One connection, one request, one answer; whatever happens, only this connection ends."""
        with sock:
            try:
                answer = await self._respond(sock)
            except Exception:
                # A bug (ours or a library's): the one log line with the traceback, the count, and
                # a best-effort answer. Cancellation is a BaseException and passes through.
                log.exception("control: internal error; this request failed, the relay goes on")
                self.ctx.metrics.internal_errors.labels("control").inc()
                answer = encode_error(INTERNAL_ERROR)
            if answer is not None:
                await _send_answer(sock, answer)

    async def _respond(self, sock: trio.socket.SocketType) -> bytes | None:
        """Read, check and do one request; the encoded answer (None: the client gets none)."""
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in (0, os.geteuid()):
            log.warning("control: refused pid %d uid %d (root only)", pid, uid)
            return None
        try:
            request = await _read_request(sock)
            if request is None:
                return None
            result = await self._dispatch(request)
        except ReloadFailed as e:  # the reload logged its one line already
            return encode_error(f"reload failed, still serving the previous configuration: {e}")
        except ControlError as e:  # a bad request, or one that cannot be done
            log.info("control: request refused: %s", e)
            return encode_error(str(e))
        except LocalError as e:  # this host needs fixing (e.g. a file in the way of a session socket)
            log.warning("control: request failed: %s", e)
            return encode_error(str(e))
        return encode_result(result)

    async def _dispatch(self, request: ControlRequest) -> Any:
        if isinstance(request, OpenSession):
            return (await self.open(request.peer)).describe()
        if isinstance(request, CloseSession):
            self.close(request.id)
            return {"closed": request.id}
        if isinstance(request, ListSessions):
            return [s.describe() for s in self.sessions.values()]
        if isinstance(request, GetStatus):
            return self.status()
        if isinstance(request, Reload):
            if self.reload is None:
                raise ControlError("this relay cannot reload (not started by `migrelay serve`)")
            return {"reloaded": await self.reload()}
        assert_never(request)


def _describe_link(link: PeerLink) -> dict[str, Any]:
    return {
        "last_dial": link.last_dial,
        "last_dial_at": link.last_dial_at,
        "last_dial_error": link.last_dial_error,
        "last_handshake_at": link.last_handshake_at,
    }


def _describe_stream(stream: StreamInFlight, now: float, clock: float) -> dict[str, Any]:
    age = clock - stream.started
    return {
        "id": stream.id,
        "peer": stream.peer,
        "socket": stream.socket_name,
        "channel": stream.channel,
        "direction": stream.direction,
        "tx_bytes": stream.tx.total,
        "rx_bytes": stream.rx.total,
        "age_s": round(age, 3),
        "started_at": round(now - age, 3),
    }


async def _read_request(sock: trio.socket.SocketType) -> ControlRequest | None:
    """The client's one request, or BadControlRequest, or None if it reset the connection (routine).

    Never holds more than the reader's bound.
    """
    reader = RequestReader()
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        try:
            while chunk := await sock.recv(RECV_BYTES):
                if (request := reader.feed(chunk)) is not None:
                    return request
        except OSError as e:
            log.info("control: client left before its request was read: %s", e.strerror)
            return None
        return reader.eof()
    raise ControlError(f"no complete request within {REQUEST_TIMEOUT_S:.0f}s")


async def _send_answer(sock: trio.socket.SocketType, answer: bytes) -> None:
    """Best effort: a client that has left or stopped reading loses its answer, nothing else."""
    with trio.move_on_after(ANSWER_TIMEOUT_S) as scope:
        try:
            while answer:
                answer = answer[await sock.send(answer) :]
        except OSError as e:
            log.info("control client left before the answer: %s", e.strerror)
    if scope.cancelled_caught:
        log.info("control client did not read its answer within %.0fs", ANSWER_TIMEOUT_S)
