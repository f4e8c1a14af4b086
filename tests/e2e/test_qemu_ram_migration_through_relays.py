"""A real QEMU precopy migration through two relays: the destination ends completed, RAM identical.

Why it matters: QEMU's migration stream has no end-to-end checksum; only a byte-exact
relay yields a destination guest identical to the source. The guest's RAM is a file of
random bytes (no zero pages, every page distinct), so every byte must cross the relays.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.tools.qemu import UNCAPPED_BYTES_PER_S
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, precopy, running, sha256, vm_pair


def test_qemu_ram_migration_through_relays(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64")
    src, dst = vm_pair(hosts.root, ram_dir)

    async def migrate() -> None:
        async with running(src, dst):
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            info = await precopy(src, dst, hosts.source("migration.sock"), hosts.destination("migration.sock"))
            assert info["status"] == "completed"

    asyncio.run(migrate())
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert hosts.connections("migration") == 1
