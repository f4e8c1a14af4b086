"""[relay] socket_context: exactly the sockets a confined QEMU connects to are created with it.

Why it matters: on SELinux hosts (RHEL, Fedora, CentOS Stream) QEMU runs as svirt_t and may
connect only to sockets of a type its policy allows, and a socket's label is fixed when the
socket is created. A relay that labels too few breaks migrations there; one that labels too
many lets a confined QEMU reach the control socket, the peer listener or root libvirt on the
peer (libvirt.sock).

This machine has no SELinux, so a recording labeler stands in for libselinux (a Daemon
parameter). It notes which sockets came into being while its context was set, by the
socket inodes that appeared between setting and resetting it, and /proc/net/unix names the
path each was then bound to: what the kernel would have labelled. libselinux's own answers
on a host without SELinux are tested as they really are.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.core.config import Config
from relay.core.errors import LocalError
from relay.daemon.selinux import LibSelinux, SocketLabel
from relay.daemon.server import Daemon, run_daemon
from relay.tools.check import run_check
from relay.tools.control_client import request
from tests.support import Pki, pair_configs

CONTEXT = "system_u:object_r:svirt_socket_t:s0"
REFUSED = f"[relay] socket_context: the kernel refused {CONTEXT!r} (Invalid argument)"


def socket_inodes() -> set[int]:
    """The inodes of this process's open sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd os.listdir itself used, closed by now
            continue
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(int(match[1]))
    return inodes


def bound_unix_sockets() -> dict[int, str]:
    """inode -> path of every bound unix socket in this network namespace (/proc/net/unix)."""
    out = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8:  # the last field, the path, is absent for unbound sockets
            out[int(fields[6])] = fields[7]
    return out


class RecordingLabeler:
    """Records, per time a context was set, the sockets created before it was reset.

    `refuse_after` makes it refuse as the kernel would (EINVAL) once it has been set that
    many times: a context the policy does not know, or one the policy stopped allowing.
    """

    def __init__(self, refuse_after: int | None = None) -> None:
        self.refuse_after = refuse_after
        self.context: str | None = None
        self.before: set[int] = set()
        self.times_set = 0
        self.created: list[tuple[str, set[int]]] = []

    def set_socket_context(self, context: str | None) -> None:
        if context is None:
            assert self.context is not None, "reset without a context set"
            self.created.append((self.context, socket_inodes() - self.before))
            self.context = None
            return
        assert self.context is None, f"set to {context} while still {self.context}: never reset"
        if self.refuse_after is not None and self.times_set >= self.refuse_after:
            raise LocalError(REFUSED)
        self.times_set += 1
        self.context, self.before = context, socket_inodes()

    def labelled(self, root: Path) -> set[str]:
        """The paths, relative to root, of the sockets created with a context (each one set to CONTEXT)."""
        assert self.context is None, "left set"
        assert {context for context, _ in self.created} <= {CONTEXT}
        bound = bound_unix_sockets()
        return {str(Path(bound[inode]).relative_to(root)) for _, inodes in self.created for inode in inodes}


def labelled_pair(tmp_path: Path, p: Pki) -> tuple[Config, Config]:
    """hvA dials hvB's unix peer listener; both relays set socket_context; hvB has a libvirt socket."""
    a, b = pair_configs(tmp_path, p, "unix", libvirt=tmp_path / "hvB-libvirt-sock")
    return dataclasses.replace(a, socket_context=CONTEXT), dataclasses.replace(b, socket_context=CONTEXT)


async def ask(path: Path, op: str, **args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: request(path, op, 10.0, **args))


async def test_only_the_sockets_qemu_connects_to_are_labelled(tmp_path: Path, p: Pki) -> None:
    a, b = labelled_pair(tmp_path, p)
    labeler_a, labeler_b = RecordingLabeler(), RecordingLabeler()
    async with trio.open_nursery() as nursery:
        ra = await nursery.start(Daemon(a, labeler=labeler_a).run)
        rb = await nursery.start(Daemon(b, labeler=labeler_b).run)
        session = await ask(a.control_path, "open", peer="hvB")
        sid = session["id"]
        every_socket = {
            str(Path(path).relative_to(tmp_path))
            for path in bound_unix_sockets().values()
            if path.startswith(f"{tmp_path}/")
        }
        # start probes the context before it binds anything: a set and a reset with nothing between
        for labeler in (labeler_a, labeler_b):
            assert labeler.created[0] == (CONTEXT, set())
            # and each socket is created alone between a set and its reset
            assert all(len(inodes) == 1 for _, inodes in labeler.created[1:]), labeler.created
        qemu_a = {"hvA/hvB/migration.sock", "hvA/hvB/nbd.sock"}
        qemu_a |= {f"hvA/hvB/hvA_{sid}-migration.sock", f"hvA/hvB/hvA_{sid}-nbd.sock"}
        qemu_b = {"hvB/hvA/migration.sock", "hvB/hvA/nbd.sock"}
        assert labeler_a.labelled(tmp_path) == qemu_a
        assert labeler_b.labelled(tmp_path) == qemu_b
        # every other socket the relays listen on is left alone: root libvirt on the peer, the
        # unix peer listener, the control sockets
        unlabelled = {"hvA/hvB/libvirt.sock", "hvB/hvA/libvirt.sock", "hvB-peer.sock"}
        unlabelled |= {"hvA/control.sock", "hvB/control.sock"}
        assert every_socket - qemu_a - qemu_b == unlabelled
        ra.stop()
        rb.stop()


def test_a_refused_context_stops_the_relay_with_one_line(tmp_path: Path, p: Pki) -> None:
    """What `migrelay serve` does with it: one LocalError line (exit status 2), no socket left behind."""
    a, _ = labelled_pair(tmp_path, p)
    labeler = RecordingLabeler(refuse_after=0)
    with pytest.raises(LocalError) as e:
        run_daemon(Daemon(a, labeler=labeler))
    assert str(e.value) == REFUSED
    assert labeler.created == []
    assert not [path for path in tmp_path.rglob("*") if path.is_socket()]


async def test_a_session_the_kernel_refuses_is_refused_and_the_relay_goes_on(tmp_path: Path, p: Pki) -> None:
    """The policy may change under a running relay: the session fails with the reason, nothing else."""
    a, b = labelled_pair(tmp_path, p)
    # the probe and the two overlay sockets pass; the first session socket is refused
    labeler = RecordingLabeler(refuse_after=3)
    async with trio.open_nursery() as nursery:
        ra = await nursery.start(Daemon(a, labeler=labeler, session_ids=lambda: "5e55").run)
        rb = await nursery.start(Daemon(b, labeler=RecordingLabeler()).run)
        with pytest.raises(LocalError, match=re.escape(REFUSED)):
            await ask(a.control_path, "open", peer="hvB")
        assert not list((tmp_path / "hvA/hvB").glob("hvA_5e55-*"))
        assert (await ask(a.control_path, "status"))["relay"] == "hvA"
        ra.stop()
        rb.stop()


@pytest.mark.skipif(Path("/sys/fs/selinux/enforce").exists(), reason="this host has SELinux")
def test_libselinux_says_selinux_is_off_here() -> None:
    with pytest.raises(LocalError) as e:
        LibSelinux().set_socket_context(CONTEXT)
    assert str(e.value) == "[relay] socket_context is set, but SELinux is not enabled on this host; remove the key"


def test_without_libselinux_the_error_names_the_key_and_the_library() -> None:
    with pytest.raises(LocalError, match=r"^\[relay\] socket_context needs libselinux, and libselinux-absent.so.1 "):
        SocketLabel(LibSelinux("libselinux-absent.so.1"), CONTEXT).check()


async def test_check_reports_a_context_the_host_cannot_use(tmp_path: Path, p: Pki) -> None:
    a, _ = labelled_pair(tmp_path, p)
    findings = [str(f) for f in await run_check(a, RecordingLabeler(refuse_after=0))]
    assert f"error: {REFUSED}" in findings
    findings = [str(f) for f in await run_check(a, RecordingLabeler())]
    assert f"ok: [relay] socket_context {CONTEXT}: the kernel takes it for new sockets" in findings
