"""A multifd migration (4 channels = 5 connections on one socket) through the relays.

Why it matters: QEMU 7.2 tells the main stream from its multifd channels by the order the
destination accepts them. A relay that connects them in parallel breaks these migrations at
random; this one must deliver all five, in order, every time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.conftest import Hosts
from tests.e2e.procs import UNCAPPED_BYTES_PER_S, Qemu, need, precopy, sha256

CHANNELS = 4


def test_qemu_multifd_through_relays(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64")
    src, dst = Qemu("src", hosts.root, ram_dir), Qemu("dst", hosts.root, ram_dir, incoming=True)
    src.fill_ram()
    dst.blank_ram()

    async def migrate() -> None:
        await src.start()
        await dst.start()
        try:
            for vm in (src, dst):
                await vm.capabilities(multifd=True)
                await vm.parameters(multifd_channels=CHANNELS)
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            await precopy(src, dst, hosts.source("migration.sock"), hosts.destination("migration.sock"))
        finally:
            await src.stop()
            await dst.stop()

    asyncio.run(migrate())
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert hosts.connections("migration") == 1 + CHANNELS
