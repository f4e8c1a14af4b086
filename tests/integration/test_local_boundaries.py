"""Local privilege boundaries: who may use which socket, and what the relay (root) connects to.

The relay runs as root beside every QEMU. The local hypervisor's group (socket_group)
may use the overlay's migration and NBD sockets and listen in the relay's own folder,
and nothing more: not a peer's libvirt.sock (root libvirt there), not the unix peer
listener. A peer may reach only sockets that a legitimate local listener put in the
relay's folder (no hard link to another socket, no symlink, no file of another user),
only its own sessions' sockets, and learns nothing of local paths from a refusal.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from relay.core import config
from relay.core.errors import STATUS_FORBIDDEN, STATUS_NO_TARGET
from relay.core.protocol import Request, encode_request
from tests.integration.conftest import BadPeer, echo_server, roundtrip, running
from tests.support import Pki, listen, pair_configs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own sockets as other users")

NOBODY = pwd.getpwnam("nobody")  # primary group nogroup: a member of socket_group = "nogroup"
OUTSIDER = pwd.getpwnam("daemon")  # not in nogroup


def with_socket_group(tmp_path: Path, name: str, extra: str = "") -> config.Config:
    path = tmp_path / f"{name}.toml"
    group = grp.getgrgid(NOBODY.pw_gid).gr_name
    path.write_text(path.read_text().replace("[relay]\n", f'[relay]\nsocket_group = "{group}"\n{extra}', 1))
    return config.load(path)


def mode_and_group(path: Path) -> tuple[int, int]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), st.st_gid


async def test_libvirt_sock_and_the_unix_peer_listener_stay_root_only(tmp_path: Path, p: Pki) -> None:
    pair_configs(tmp_path, p, "unix")
    a = with_socket_group(tmp_path, "hvA")
    b = with_socket_group(tmp_path, "hvB")
    async with running(a, b):
        nogroup = NOBODY.pw_gid
        assert mode_and_group(tmp_path / "hvA/hvB/migration.sock") == (0o660, nogroup)
        assert mode_and_group(tmp_path / "hvA/hvB/nbd.sock") == (0o660, nogroup)
        assert mode_and_group(tmp_path / "hvA/hvB/libvirt.sock") == (0o600, 0)
        assert mode_and_group(tmp_path / "hvB-peer.sock") == (0o600, 0)
        # QEMU (the group) creates its sockets in the relay's own folder; the sticky bit
        # keeps one member from replacing another's socket
        own_mode, own_group = mode_and_group(tmp_path / "hvA/hvA")
        assert own_group == nogroup and own_mode == 0o3775


async def test_libvirt_group_opens_libvirt_sock_to_that_group_only(tmp_path: Path, p: Pki) -> None:
    pair_configs(tmp_path, p, "tls")
    group = grp.getgrgid(OUTSIDER.pw_gid).gr_name
    a = with_socket_group(tmp_path, "hvA", f'libvirt_group = "{group}"\n')
    async with running(a):
        assert mode_and_group(tmp_path / "hvA/hvB/libvirt.sock") == (0o660, OUTSIDER.pw_gid)
        assert mode_and_group(tmp_path / "hvA/hvB/migration.sock") == (0o660, NOBODY.pw_gid)


async def ask_as_hva(b: config.Config, p: Pki, name: str) -> tuple[int, str]:
    bad = BadPeer(b, p)
    conn = await bad.open()
    reply = await bad.request(conn, encode_request(Request("hvA", name, 1)))
    conn.close()
    return reply.status, reply.reason


def bound_socket(path: Path, owner: pwd.struct_passwd | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(8)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return sock


def hard_link_to_the_control_socket(tmp_path: Path, b: config.Config, target: Path) -> list[socket.socket]:
    os.link(b.control_path, target)
    return []


def hard_link_to_another_socket(tmp_path: Path, b: config.Config, target: Path) -> list[socket.socket]:
    elsewhere = bound_socket(tmp_path / "system-bus.sock")
    os.link(tmp_path / "system-bus.sock", target)
    return [elsewhere]


def another_users_socket(tmp_path: Path, b: config.Config, target: Path) -> list[socket.socket]:
    return [bound_socket(target, OUTSIDER)]


def symlink_to_another_socket(tmp_path: Path, b: config.Config, target: Path) -> list[socket.socket]:
    elsewhere = bound_socket(tmp_path / "elsewhere.sock")
    os.symlink(tmp_path / "elsewhere.sock", target)
    return [elsewhere]


@pytest.mark.parametrize(
    ("plant", "logged"),
    [
        (hard_link_to_the_control_socket, "has 2 links"),
        (hard_link_to_another_socket, "has 2 links"),
        (another_users_socket, f"belongs to uid {OUTSIDER.pw_uid}, who may not listen there"),
        (symlink_to_another_socket, "is a symlink"),
    ],
    ids=lambda v: v.__name__ if callable(v) else "",
)
async def test_a_target_no_legitimate_listener_put_there_is_refused(
    tmp_path: Path,
    p: Pki,
    plant: Callable[[Path, config.Config, Path], list[socket.socket]],
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pair_configs(tmp_path, p, "tls")
    a = config.load(tmp_path / "hvA.toml")
    b = with_socket_group(tmp_path, "hvB")
    target = tmp_path / "hvB/hvB/migration.sock"
    async with running(a, b):
        planted = plant(tmp_path, b, target)
        status, reason = await ask_as_hva(b, p, "migration.sock")
        # the peer learns that it cannot have it, not why nor where
        assert (status, reason) == (STATUS_NO_TARGET, "nothing usable listens on migration.sock here")
        assert any(f"{target} {logged}" in r.getMessage() for r in caplog.records)
        for sock in planted:
            sock.close()


async def test_a_socket_of_a_socket_group_member_is_served(tmp_path: Path, p: Pki) -> None:
    """QEMU running as a member of socket_group (Debian: libvirt-qemu) listens in the relay's folder."""
    pair_configs(tmp_path, p, "tls")
    a = config.load(tmp_path / "hvA.toml")
    b = with_socket_group(tmp_path, "hvB")
    async with running(a, b), trio.open_nursery() as servers:
        listener = await listen(tmp_path / "hvB/hvB/migration.sock")
        os.chown(tmp_path / "hvB/hvB/migration.sock", NOBODY.pw_uid, NOBODY.pw_gid)
        servers.start_soon(echo_server, listener, servers)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 3, 1 << 20)
        servers.cancel_scope.cancel()


async def test_a_peer_cannot_reach_another_peers_session(tmp_path: Path, p: Pki) -> None:
    pair_configs(tmp_path, p, "tls")
    b_text = (tmp_path / "hvB.toml").read_text() + "\n[peers.hvC]\n"
    (tmp_path / "hvB.toml").write_text(b_text)
    b = config.load(tmp_path / "hvB.toml")
    async with running(b), trio.open_nursery() as servers:
        # hvC's migration to hvB: the destination QEMU listens on hvC's session socket
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/hvC_0badcafe-migration.sock"), servers)
        status, reason = await ask_as_hva(b, p, "hvC_0badcafe-migration.sock")
        assert status == STATUS_FORBIDDEN and "belongs to a session of another relay" in reason
        # the legacy, unbound form of a session name is no channel at all
        status, reason = await ask_as_hva(b, p, "0badcafe-migration.sock")
        assert status == STATUS_FORBIDDEN and "is not allowed for this peer" in reason
        servers.cancel_scope.cancel()
