"""Real libvirt migrations between two libvirt daemons, through two relays, with one virsh line.

Why it matters: this is what operators run. Each daemon is its own "host" (mount and UTS
namespace, own /etc/libvirt, /run, hostname, host UUID) with its own relay; the overlay
path /run/migrelay/hvB/... is the same on both, so libvirt hands the destination the very
URIs the source uses. Every scenario of libvirt's migration guide that applies here is
covered: p2p and managed direct migration with disk copy, multifd (--parallel), postcopy,
libvirt's own tunnel carried inside the relay's TLS, offline migration, and the
configuration-file table (--persistent / --undefinesource).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import pki
from tests.e2e.libvirt_hosts import LibvirtHost, domain_xml, overlay_uris, relay_config
from tests.support import free_port, scrape

DISK_MIB = 64


@dataclass
class Cluster:
    a: LibvirtHost
    b: LibvirtHost
    root: Path
    metrics_a: int

    def connections(self, channel: str) -> float:
        labels = frozenset({"peer": "hvB", "channel": channel, "result": "ok"}.items())
        return scrape(self.metrics_a).get(("migrelay_connections_total", labels), 0.0)

    def define_disk(self, host: LibvirtHost, name: str, fill: bool) -> Path:
        image = host.path(f"/var/lib/libvirt/images/{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{DISK_MIB}M"], check=True)
        if fill:  # data the copy must carry: 16 MiB of a pattern, in several places
            for offset in (0, 20, 40):
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{offset + 17:x} {offset}M 5M", str(image)],
                               check=True, capture_output=True)  # fmt: skip
        return image


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"not installed: {tool} (make test installs libvirt-daemon-system from Debian)")
    root = tmp_path_factory.mktemp("libvirt")
    pki_dir = root / "pki"
    pki.init_ca(pki_dir)
    for name in ("hvA", "hvB"):
        pki.issue(pki_dir, name)
    port_a, port_b, metrics_a, metrics_b = free_port(), free_port(), free_port(), free_port()
    a, b = LibvirtHost("hvA", root / "hvA"), LibvirtHost("hvB", root / "hvB")
    try:
        a.start()
        b.start()
        a.start_relay(relay_config(root, "hvA", "hvB", pki_dir, port_a, port_b, metrics_a))
        b.start_relay(relay_config(root, "hvB", "hvA", pki_dir, port_b, port_a, metrics_b))
        yield Cluster(a, b, root, metrics_a)
    except BaseException:
        print(a.dump_logs(), b.dump_logs())
        raise
    finally:
        a.stop()
        b.stop()


def start_transient(c: Cluster, name: str, disk: bool = False) -> None:
    xml = c.root / f"{name}.xml"
    xml.write_text(domain_xml(name, disk=disk))
    c.a.virsh("create", str(xml))


def state(host: LibvirtHost, name: str) -> str:
    result = host.virsh("domstate", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else "absent"


def persistent(host: LibvirtHost, name: str) -> bool:
    return "Persistent:     yes" in host.virsh("dominfo", name).stdout


def migrate(c: Cluster, *args: str, timeout: float = 240) -> None:
    result = c.a.virsh("migrate", *args, check=False, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"virsh migrate failed: {result.stderr}\n{c.a.dump_logs()}\n{c.b.dump_logs()}")


def disks_identical(c: Cluster, name: str) -> None:
    src = c.a.path(f"/var/lib/libvirt/images/{name}.qcow2")
    dst = c.b.path(f"/var/lib/libvirt/images/{name}.qcow2")
    # -U: both images are still open by running (or paused) guests
    compare = subprocess.run(["qemu-img", "compare", "-U", str(src), str(dst)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def cleanup(c: Cluster, name: str) -> None:
    for host in (c.a, c.b):
        host.virsh("destroy", name, check=False)
        host.virsh("undefine", name, check=False)


@pytest.mark.parametrize("p2p", [True, False], ids=["p2p", "direct"])
def test_live_migration_with_disk_copy(cluster: Cluster, p2p: bool) -> None:
    """The seed's UNIX-socket example, verbatim but for the overlay paths: RPC, QEMU and NBD all relayed."""
    name = f"copy-{'p2p' if p2p else 'direct'}"
    cluster.define_disk(cluster.a, name, fill=True)
    cluster.define_disk(cluster.b, name, fill=False)
    before = (cluster.connections("libvirt"), cluster.connections("migration"), cluster.connections("nbd"))
    start_transient(cluster, name, disk=True)
    try:
        migrate(cluster, "--live", *(["--p2p"] if p2p else []), "--copy-storage-all", name, *overlay_uris("hvB"))
        assert state(cluster.b, name) == "running"
        assert state(cluster.a, name) == "absent"
        disks_identical(cluster, name)
        after = (cluster.connections("libvirt"), cluster.connections("migration"), cluster.connections("nbd"))
        assert after[0] > before[0] and after[1] == before[1] + 1 and after[2] > before[2]
    finally:
        cleanup(cluster, name)


def test_parallel_migration(cluster: Cluster) -> None:
    """--parallel: libvirt's multifd, 1 + 4 connections that must arrive in order."""
    name = "parallel"
    start_transient(cluster, name)
    before = cluster.connections("migration")
    try:
        migrate(cluster, "--live", "--p2p", "--parallel", "--parallel-connections", "4", name, *overlay_uris("hvB"))
        assert state(cluster.b, name) == "running"
        assert cluster.connections("migration") == before + 5
    finally:
        cleanup(cluster, name)


def memory_moving(jobinfo: str) -> bool:
    """domjobinfo shows RAM transferred: QEMU's migration (and its capabilities) is under way."""
    for line in jobinfo.splitlines():
        if line.startswith("Memory processed:"):
            return not line.split(":", 1)[1].strip().startswith("0.000")
    return False


def test_postcopy_migration(cluster: Cluster) -> None:
    """--postcopy + virsh migrate-postcopy: the destination runs the guest and pulls pages back."""
    name = "postcopy"
    start_transient(cluster, name)
    events = subprocess.Popen(
        cluster.b.inside("virsh", "-q", "-c", "qemu:///system", "event", "--all", "--loop", "--timeout", "300"),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # capped at 1 MiB/s so the switch to postcopy happens while precopy is still running
        job = subprocess.Popen(
            cluster.a.inside("virsh", "-q", "-c", "qemu:///system", "migrate", "--live", "--p2p", "--postcopy",
                             "--bandwidth", "1", name, *overlay_uris("hvB")),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not memory_moving(cluster.a.virsh("domjobinfo", name, check=False).stdout):
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "the migration job never started"
            time.sleep(0.1)
        cluster.a.virsh("migrate-postcopy", name)
        _, err = job.communicate(timeout=240)
        assert job.returncode == 0, err
        assert state(cluster.b, name) == "running"
    finally:
        events.terminate()
        cleanup(cluster, name)
    seen = events.communicate(timeout=10)[0]
    # the destination only runs a guest in post-copy mode if the switch really happened
    assert f"event 'lifecycle' for domain '{name}': Resumed Post-copy" in seen, seen


def test_tunnelled_migration(cluster: Cluster) -> None:
    """--p2p --tunnelled: libvirt's own tunnel rides on libvirt.sock, inside the relay's TLS."""
    name = "tunnelled"
    start_transient(cluster, name)
    before = (cluster.connections("libvirt"), cluster.connections("migration"))
    try:
        migrate(cluster, "--live", "--p2p", "--tunnelled", name,
                "qemu+unix:///system?socket=/run/migrelay/hvB/libvirt.sock")  # fmt: skip
        assert state(cluster.b, name) == "running"
        assert cluster.connections("libvirt") > before[0] and cluster.connections("migration") == before[1]
    finally:
        cleanup(cluster, name)


def test_offline_migration(cluster: Cluster) -> None:
    """--offline: only the definition moves, over the relayed libvirt RPC connection."""
    name = "offline"
    xml = cluster.root / f"{name}.xml"
    xml.write_text(domain_xml(name))
    cluster.a.virsh("define", str(xml))
    try:
        migrate(cluster, "--offline", "--persistent", name, *overlay_uris("hvB")[:2])
        assert state(cluster.b, name) == "shut off" and persistent(cluster.b, name)
        assert state(cluster.a, name) == "shut off"  # no --undefinesource: the source keeps its definition
    finally:
        cleanup(cluster, name)


@pytest.mark.parametrize(
    ("source_persistent", "flags", "dest_persistent", "source_kept"),
    [
        (False, [], False, False),
        (False, ["--persistent"], True, False),
        (False, ["--undefinesource", "--persistent"], True, False),
        (True, [], False, True),
        (True, ["--persistent", "--undefinesource"], True, False),
    ],
    ids=["transient", "transient+persistent", "transient+both", "persistent", "persistent+both"],
)
def test_configuration_file_handling(
    cluster: Cluster, source_persistent: bool, flags: list[str], dest_persistent: bool, source_kept: bool
) -> None:
    """The seed's configuration-file table, checked on both hosts after each migration."""
    name = "cfg-" + ("p" if source_persistent else "t") + "".join(f[2] for f in flags)
    xml = cluster.root / f"{name}.xml"
    xml.write_text(domain_xml(name))
    if source_persistent:
        cluster.a.virsh("define", str(xml))
        cluster.a.virsh("start", name)
    else:
        cluster.a.virsh("create", str(xml))
    try:
        migrate(cluster, "--live", "--p2p", *flags, name, *overlay_uris("hvB"))
        assert state(cluster.b, name) == "running"
        assert persistent(cluster.b, name) == dest_persistent
        assert state(cluster.a, name) == ("shut off" if source_kept else "absent")
    finally:
        cleanup(cluster, name)
