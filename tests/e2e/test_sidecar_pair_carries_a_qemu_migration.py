"""The sidecar pair of config/sidecar/, as shipped, carries a real QEMU migration from pod to pod.

Why it matters: the sidecar layout is how containerised libvirts migrate over unix sockets
(libvirt's guide, "Migration using only UNIX sockets"), and it lives or dies by its bind
mounts: each relay sees only its own pod's folders, and the two pods share one folder and
nothing else. Here each pod is a mount namespace (unshare --mount) in which test folders
are bind-mounted onto the very paths the configs name — /run/migrelay (the pod's overlay,
which its QEMU shares), /run/libvirt (its libvirt container's sockets) and
/srv/migrelay-shared (both pods) — and the folders behind those mounts are then hidden under
an empty tmpfs, so that no pod can reach the other's by any path. The configs run byte for
byte as shipped. The source QEMU runs in hvA's pod and the destination in hvB's, both with
the same URI, unix:/run/migrelay/hvB/migration.sock (which is what the overlay is for), and
the guest's RAM (random bytes) must arrive intact. No libvirtd runs here (the libvirt tests
cover libvirt over TLS): a stand-in answers on hvB's /run/libvirt/virtqemud-sock, so the
`libvirt` key of the configs is exercised too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.tools.control_client import request
from relay.tools.qemu import UNCAPPED_BYTES_PER_S, Qemu
from tests.e2e.procs import need, precopy, running, serve, sha256

REPO = Path(__file__).parents[2]
SHIPPED = REPO / "config" / "sidecar"
# where the source QEMU connects in hvA's pod, and where the destination QEMU listens in hvB's
MIGRATION_URI = Path("/run/migrelay/hvB/migration.sock")
LIBVIRT_BYTES = 256 * 1024

# One pod's mount namespace: its own /run and /srv, with the configs' folders bound in;
# `exec sleep` keeps the namespace alive for the relay and QEMU that nsenter puts in it.
# Propagation is private, so none of these mounts reaches the host.
BOOT = """
set -e
pod="$1"; shared="$2"; hidden="$3"
mount --bind "$pod/run" /run
mkdir -p /run/migrelay /run/libvirt
mount --bind "$pod/overlay" /run/migrelay
mount --bind "$pod/libvirt" /run/libvirt
mount --bind "$pod/srv" /srv
mkdir -p /srv/migrelay-shared
mount --bind "$shared" /srv/migrelay-shared
mount -t tmpfs -o size=1m,mode=0700 hidden "$hidden"
echo ready
exec sleep infinity
"""


@dataclass
class Pod:
    """A pod's mount namespace; `root` holds its folders as the host sees them."""

    name: str
    root: Path
    proc: subprocess.Popen[str] | None = None

    def start(self, shared: Path, hidden: Path) -> None:
        for folder in ("run", "overlay", "libvirt", "srv"):
            (self.root / folder).mkdir(parents=True)
        folders = (self.root, shared, hidden)
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", BOOT, "boot", *map(str, folders)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        if (line := self.proc.stdout.readline()) != "ready\n":  # or EOF: the script failed
            raise AssertionError(f"pod {self.name} did not start: {line}{self.proc.stdout.read()}")

    def argv(self, *command: str) -> list[str]:
        """`command` inside the pod; nsenter execs it, so the pid is the command's.

        From the repository's folder, so `python -m relay` is this checkout's relay.
        """
        assert self.proc is not None
        return ["nsenter", "--target", str(self.proc.pid), "--mount", f"--wdns={REPO}", "--", *command]

    def run(self, *command: str) -> str:
        return subprocess.run(self.argv(*command), capture_output=True, text=True, check=True, timeout=30).stdout

    def holds(self, pid: int) -> bool:
        """Whether process `pid` runs in this pod's mount namespace (and so not in the host's)."""
        assert self.proc is not None
        mount_ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        return os.readlink(f"/proc/{pid}/ns/mnt") == mount_ns != os.readlink("/proc/self/ns/mnt")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def pods(root: Path) -> Iterator[tuple[Pod, Pod, Path]]:
    """hvA's and hvB's pods, and the folder they share (as the host sees it)."""
    hidden = root / "pods"
    shared = hidden / "shared"
    shared.mkdir(parents=True)
    a, b = Pod("hvA", hidden / "hvA"), Pod("hvB", hidden / "hvB")
    try:
        a.start(shared, hidden)
        b.start(shared, hidden)
        yield a, b, shared
    finally:
        a.stop()
        b.stop()


@contextlib.contextmanager
def libvirt_standin(path: Path) -> Iterator[None]:
    """A stand-in for the libvirt container's daemon: one connection, echoed back until EOF."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def echo() -> None:
        with listener.accept()[0] as conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        yield
    finally:
        if thread.is_alive():  # the test ended before it used the stand-in: one connection ends the wait
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                wake.connect(str(path))
        thread.join(timeout=10)
        listener.close()


def through_libvirt_sock(path: Path) -> None:
    """What comes back from hvB's libvirt daemon through hvA's overlay socket for it."""
    data = os.urandom(LIBVIRT_BYTES)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer == data


def test_sidecar_pair_carries_a_qemu_migration(tmp_path: Path, ram_dir: Path) -> None:
    need("qemu-system-x86_64", "unshare", "nsenter", "mount")
    if os.geteuid() != 0:
        pytest.skip("pods (mount namespaces with bind mounts) need root")
    configs = []
    for name in ("hvA", "hvB"):
        # copied, not rewritten: every path in them is absolute, so the copy means what the original does
        configs.append(Path(shutil.copyfile(SHIPPED / f"{name}.toml", tmp_path / f"{name}.toml")))
    with pods(tmp_path) as (a, b, shared):
        by_name = {"hvA": a, "hvB": b}
        for pod in (a, b):
            assert pod.run("ls", "-A", str(tmp_path / "pods")) == ""  # no pod reaches the folders behind the mounts
        with (
            libvirt_standin(b.root / "libvirt/virtqemud-sock"),
            serve(*configs, prefix=lambda c: by_name[c.stem].argv()) as relays,
        ):
            assert a.holds(relays[0].proc.pid) and b.holds(relays[1].proc.pid)
            # each relay made its own overlay in its own pod, and the shared folder has the two peer listeners
            assert sorted(os.listdir(shared)) == ["hvA.sock", "hvB.sock"]
            assert (a.root / "overlay/hvB/migration.sock").is_socket() and (a.root / "overlay/hvA").is_dir()
            assert (b.root / "overlay/hvA/migration.sock").is_socket() and (b.root / "overlay/hvB").is_dir()
            through_libvirt_sock(a.root / "overlay/hvB/libvirt.sock")

            src = Qemu("src", tmp_path, ram_dir, argv_prefix=tuple(a.argv()))
            dst = Qemu("dst", tmp_path, ram_dir, incoming=True, argv_prefix=tuple(b.argv()))
            src.fill_ram()
            dst.blank_ram()

            async def migrate() -> None:
                async with running(src, dst):
                    assert src.proc is not None and a.holds(src.proc.pid)
                    assert dst.proc is not None and b.holds(dst.proc.pid)
                    await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
                    info = await precopy(src, dst, MIGRATION_URI, MIGRATION_URI)
                    assert info["status"] == "completed"

            asyncio.run(migrate())
            status = request(a.root / "overlay/control.sock", "status")
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    hvb = status["peers"]["hvB"]
    assert hvb["connections_ok"] == 2  # libvirt.sock, then migration.sock
    assert hvb["bytes_tx"] >= LIBVIRT_BYTES + (src.ram_mib << 20)
