"""A multifd migration (4 channels = 5 connections on one socket) through the relays.

Why it matters: QEMU 7.2 tells the main stream from its multifd channels by the order the
destination accepts them. A relay that connects them in parallel breaks these migrations at
random; this one must deliver all five, in order, every time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.tools.qemu import UNCAPPED_BYTES_PER_S
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, precopy, running, sha256, vm_pair

CHANNELS = 4


def test_qemu_multifd_through_relays(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64")
    src, dst = vm_pair(hosts.root, ram_dir)

    async def migrate() -> None:
        async with running(src, dst):
            for vm in (src, dst):
                await vm.capabilities(multifd=True)
                await vm.parameters(multifd_channels=CHANNELS)
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            await precopy(src, dst, hosts.source("migration.sock"), hosts.destination("migration.sock"))

    asyncio.run(migrate())
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert hosts.connections("migration") == 1 + CHANNELS
