"""Postcopy and postcopy-preempt migrations through the relays.

Why it matters: after the switch to postcopy the destination runs the guest and pulls the
missing pages through the return path, which flows the other way on the same connection;
with preempt, urgent pages come over a second connection. Both directions and both
connections must stay live and exact, or the destination guest is corrupted for good.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.tools.qemu import PC_HOLE, start_postcopy
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, running, sha256, vm_pair

# Slow precopy enough that the switch to postcopy happens with most RAM still on the source,
# and the background push after it, so that the destination's reads must fault pages in.
PRECOPY_BYTES_PER_S = 8 << 20
POSTCOPY_PUSH_BYTES_PER_S = 16 << 20


@pytest.mark.parametrize("preempt", [False, True], ids=["postcopy", "postcopy-preempt"])
def test_qemu_postcopy_through_relays(hosts: Hosts, ram_dir: Path, preempt: bool) -> None:
    need("qemu-system-x86_64")
    src, dst = vm_pair(hosts.root, ram_dir)
    dump = ram_dir / "dst-read-during-postcopy.bin"

    async def migrate() -> dict[str, object]:
        async with running(src, dst):
            await start_postcopy(
                src,
                dst,
                hosts.source("migration.sock"),
                hosts.destination("migration.sock"),
                PRECOPY_BYTES_PER_S,
                POSTCOPY_PUSH_BYTES_PER_S,
                **({"postcopy_preempt": True} if preempt else {}),
            )
            # Reading all guest RAM on the destination faults in every page not there yet:
            # each is requested from the source over the return path (and, with preempt,
            # delivered over the second connection).
            await dst.cmd("pmemsave", val=0, size=src.ram_mib << 20, filename=str(dump))
            info: dict[str, object] = await dst.wait_migration({"completed"})
            done = await src.wait_migration({"completed"})
            info["postcopy_requests"] = done["ram"]["postcopy-requests"]
            return info

    info = asyncio.run(migrate())
    assert info["status"] == "completed"
    assert "postcopy-active" in src.statuses, src.statuses
    assert isinstance(info["postcopy_requests"], int) and info["postcopy_requests"] > 0, info
    # what the destination read while pages were in flight (its ROM/VGA hole aside)
    assert sha256(dump, skip=PC_HOLE) == sha256(src.ram_file, skip=PC_HOLE)
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert hosts.connections("migration") == (2 if preempt else 1)
