"""Disk copy as libvirt's --copy-storage-all does it, with NBD and the migration both through the relays.

Why it matters: the NBD server speaks first (a relay that waits for the client, or reads
ahead of the header, breaks it), the mirror runs for the whole migration, and the switchover
choreography (pause-before-switchover, cancel the ready mirror, continue) only leaves a
consistent destination disk if every NBD write arrived, in order.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from relay.tools.qemu import UNCAPPED_BYTES_PER_S
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, running, sha256, vm_pair

DISK_MIB = 32


def test_qemu_disk_copy_through_relays(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64", "qemu-img")
    src_disk, dst_disk = hosts.root / "src.img", hosts.root / "dst.img"
    with src_disk.open("wb") as f:
        for _ in range(DISK_MIB):
            f.write(os.urandom(1 << 20))
    with dst_disk.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    src, dst = vm_pair(hosts.root, ram_dir, src=src_disk, dst=dst_disk)

    async def migrate() -> None:
        async with running(src, dst):
            # destination: NBD server in its own overlay folder, the disk exported writable
            nbd = {"type": "unix", "data": {"path": str(hosts.destination("nbd.sock"))}}  # SocketAddressLegacy
            await dst.cmd("nbd-server-start", addr=nbd)
            await dst.cmd("block-export-add", type="nbd", id="exp0", **{"node-name": "disk0"}, writable=True)
            await dst.cmd("migrate-incoming", uri=f"unix:{hosts.destination('migration.sock')}")
            # source: mirror into the NBD export through the relays, until ready
            await src.cmd(
                "blockdev-add",
                driver="nbd",
                **{"node-name": "target"},
                export="disk0",
                server={"type": "unix", "path": str(hosts.source("nbd.sock"))},
            )
            await src.cmd("blockdev-mirror", **{"job-id": "mirror0"}, device="disk0", target="target", sync="full")
            for _ in range(1200):
                jobs = await src.cmd("query-block-jobs")
                if jobs and jobs[0]["ready"]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"mirror never became ready: {jobs}")
            await src.capabilities(pause_before_switchover=True)
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            await src.cmd("migrate", uri=f"unix:{hosts.source('migration.sock')}")
            await src.wait_migration({"pre-switchover"})
            await src.cmd("block-job-cancel", device="mirror0")
            for _ in range(600):
                if not await src.cmd("query-block-jobs"):
                    break
                await asyncio.sleep(0.05)
            await src.cmd("migrate-continue", state="pre-switchover")
            assert (await dst.wait_migration({"completed"}))["status"] == "completed"
            await src.wait_migration({"completed"})
            await dst.cmd("nbd-server-stop")

    asyncio.run(migrate())
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src_disk), str(dst_disk)], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert (hosts.connections("migration"), hosts.connections("nbd")) == (1, 1)
