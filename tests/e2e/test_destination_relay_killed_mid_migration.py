"""The destination relay dies mid-migration: the source fails fast, keeps its guest, and can retry.

Why it matters: a relay is in the path of every migration; when the far one vanishes
(crash, host reboot), the source hypervisor must learn it at once — not after a TCP timeout
of many minutes — so libvirt can resume the guest where it runs; the surviving relay must
not hang or leak, and the next migration must work.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

from relay.tools.qemu import UNCAPPED_BYTES_PER_S, Qemu
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, precopy, serve, sha256

SLOW_BYTES_PER_S = 2 << 20  # 64 MiB at 2 MiB/s: still running when the relay is killed
FAIL_WITHIN_S = 5.0


IN_FLIGHT_BYTES = 1 << 20
IN_FLIGHT_TIMEOUT_S = 30.0


async def in_flight(src: Qemu) -> None:
    """Wait until the source has sent IN_FLIGHT_BYTES of RAM: the stream is carrying data
    through both relays when the destination's is killed, not still being set up."""

    async def sent() -> None:
        while (await src.cmd("query-migrate")).get("ram", {}).get("transferred", 0) < IN_FLIGHT_BYTES:  # noqa: ASYNC110  (QMP has no event for it)
            await asyncio.sleep(0.05)

    await asyncio.wait_for(sent(), IN_FLIGHT_TIMEOUT_S)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_destination_relay_killed_mid_migration(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64")
    relay_a, relay_b = hosts.relays
    baseline_fds = fd_count(relay_a.proc.pid)
    src = Qemu("src", hosts.root, ram_dir)
    src.fill_ram()

    async def scenario() -> float:
        await src.start()
        try:
            took = await doomed()
            await relay_a_settles()
            # hvB comes back (over its stale socket files) and the same source VM migrates again
            with ExitStack() as stack:
                await asyncio.to_thread(stack.enter_context, serve(hosts.root / "hvB.toml"))
                await retry()
            return took
        finally:
            await src.stop()

    async def doomed() -> float:
        dst = Qemu("dst", hosts.root, ram_dir, incoming=True)
        dst.blank_ram()
        await dst.start()
        try:
            await src.cmd("cont")  # the guest runs on the source throughout
            await src.parameters(max_bandwidth=SLOW_BYTES_PER_S)
            await dst.cmd("migrate-incoming", uri=f"unix:{hosts.destination('migration.sock')}")
            await src.cmd("migrate", uri=f"unix:{hosts.source('migration.sock')}")
            await src.wait_migration({"active"})
            await in_flight(src)
            relay_b.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await src.wait_migration({"failed"}, timeout_s=30, fail_ok=True)
            took = time.monotonic() - killed
            assert (await src.cmd("query-status"))["status"] == "running"
            return took
        finally:
            await dst.stop()

    async def relay_a_settles() -> None:
        """Daemon A survives, and the sockets of the broken stream are closed."""
        for _ in range(50):
            if fd_count(relay_a.proc.pid) <= baseline_fds:
                break
            await asyncio.sleep(0.1)
        assert relay_a.proc.poll() is None
        # no leak: never more than before (the baseline may have caught a transient fd,
        # such as a metrics scrape being answered)
        assert fd_count(relay_a.proc.pid) <= baseline_fds

    async def retry() -> None:
        dst2 = Qemu("dst2", hosts.root, ram_dir, incoming=True)
        dst2.blank_ram()
        await dst2.start()
        try:
            await src.cmd("stop")  # freeze RAM so the result can be compared byte for byte
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            await precopy(src, dst2, hosts.source("migration.sock"), hosts.destination("migration.sock"))
        finally:
            await dst2.stop()
        assert sha256(dst2.ram_file) == sha256(src.ram_file)

    took = asyncio.run(scenario())
    assert took < FAIL_WITHIN_S, f"the source noticed only after {took:.1f}s"
    assert hosts.connections("migration", "ok") == 2  # the doomed one and the retry
