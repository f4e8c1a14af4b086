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

import subprocess
import time

import pytest

from tests.e2e.libvirt_hosts import (
    Cluster,
    cleanup,
    disks_identical,
    domain_xml,
    fill_guest_ram,
    migrate,
    overlay_uris,
    persistent,
    start_transient,
    state,
)


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
    start_transient(cluster, name, file_ram=True)
    # 64 MiB that cannot be skipped as zero pages: at 1 MiB/s, precopy cannot finish
    # before the switch (an idle guest's RAM is nearly all zero pages, sent for free)
    fill_guest_ram(cluster.a, 64)
    events = subprocess.Popen(
        cluster.b.inside("virsh", "-q", "-c", "qemu:///system", "event", "--all", "--loop", "--timeout", "300"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # capped at 1 MiB/s so the switch to postcopy happens while precopy is still running
        job = subprocess.Popen(
            cluster.a.inside(
                "virsh",
                "-q",
                "-c",
                "qemu:///system",
                "migrate",
                "--live",
                "--p2p",
                "--postcopy",
                "--bandwidth",
                "1",
                name,
                *overlay_uris("hvB"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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
        migrate(
            cluster, "--live", "--p2p", "--tunnelled", name, "qemu+unix:///system?socket=/run/migrelay/hvB/libvirt.sock"
        )
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
