"""Real QEMU live migrations through each forwarder pair, precopy and postcopy.

The destination listens on the pair's sink socket, the source migrates into its entry
socket. Guest RAM is a file of random bytes (no zero pages, none alike), filled once per
row as a template (relay/tools/qemu.py).

- precopy ("migration"): a 1 GiB guest that runs while it migrates (SeaBIOS, no disk: it
  idles and dirties little), uncapped: total time, downtime, MB/s. The destination's RAM
  must equal the source's afterwards, or the run fails.
- postcopy: a 256 MiB guest running relay/tools/guest.py's page reader, which reads every
  page of its RAM over and over in a scattered order. Precopy is capped (32 MiB/s) and
  switched to postcopy as soon as it runs, so most RAM is still on the source; the source
  then pushes the rest uncapped (QEMU's default) while the destination's vCPU faults in
  every page it reaches first, each one a request over the return path. Figures: QEMU's
  own postcopy blocktime (`postcopy-blocktime` capability, the destination's count of the
  time its vCPU spent waiting for pages), total time, page requests. The destination's RAM
  must equal the source's afterwards (the reader never writes), or the run fails.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

from relay.tools.bench.setups import Setup
from relay.tools.qemu import UNCAPPED_BYTES_PER_S, Qemu, same_ram, start_postcopy

GUEST_MIB: Final = 1024
POSTCOPY_GUEST_MIB: Final = 256
# precopy before the switch: slow, so that the switch comes with most of the RAM on the source
POSTCOPY_PRECOPY_BYTES_PER_S: Final = 32 << 20
MIGRATION_TIMEOUT_S: Final = 300.0


def _mib(ram: Path) -> int:
    return ram.stat().st_size >> 20


async def _migrate(setup: Setup, workdir: Path, src_ram: Path) -> dict[str, Any]:
    """Migrate a running guest whose RAM is `src_ram` into a fresh destination, through `setup`."""
    src = Qemu("src", workdir, src_ram.parent, ram_mib=_mib(src_ram), paused=False)
    dst = Qemu("dst", workdir, workdir, ram_mib=_mib(src_ram), incoming=True)
    dst.blank_ram()
    try:
        await src.start()
        await dst.start()
        await dst.cmd("migrate-incoming", uri=f"unix:{setup.sink}")
        await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
        await src.cmd("migrate", uri=f"unix:{setup.entry}")
        info = await src.wait_migration({"completed"}, MIGRATION_TIMEOUT_S, timed=True)
        await dst.wait_migration({"completed"}, MIGRATION_TIMEOUT_S)  # the destination has really got everything
        # neither guest runs now (the source has stopped, the destination was started with -S)
        digest = await asyncio.to_thread(same_ram, src.ram_file, dst.ram_file)  # raises if it differs
        total_s = info["total-time"] / 1000
        return {
            "total_s": total_s,
            "downtime_ms": float(info["downtime"]),
            "mbps": info["ram"]["transferred"] / total_s / 1e6,
            "ram_sha256": digest,
        }
    finally:
        await src.stop()
        await dst.stop()
        dst.ram_file.unlink(missing_ok=True)


async def _postcopy(setup: Setup, workdir: Path, template: Path, push_bytes_per_s: int) -> dict[str, Any]:
    """Postcopy a page-reading guest whose RAM starts as `template` into a fresh destination, through `setup`."""
    src = Qemu("src", workdir, workdir, ram_mib=_mib(template), paused=False, reader=True)
    # the same command line (the reader is a -kernel, whose option ROM is RAM that migrates); it runs once postcopy does
    dst = Qemu("dst", workdir, workdir, ram_mib=_mib(template), incoming=True, paused=False, reader=True)
    shutil.copyfile(template, src.ram_file)  # the guest writes its boot into it: a fresh copy per run
    dst.blank_ram()
    try:
        await src.start()
        await dst.start()
        await src.wait_reading()
        await start_postcopy(
            src, dst, setup.entry, setup.sink, POSTCOPY_PRECOPY_BYTES_PER_S, push_bytes_per_s, postcopy_blocktime=True
        )
        info = await dst.wait_migration({"completed"}, MIGRATION_TIMEOUT_S)
        done = await src.wait_migration({"completed"}, MIGRATION_TIMEOUT_S, timed=True)
        await dst.cmd("stop")
        digest = await asyncio.to_thread(same_ram, src.ram_file, dst.ram_file)  # raises if it differs
        if "postcopy-blocktime" not in info:
            raise RuntimeError(f"{setup.name}: the destination reported no postcopy-blocktime: {info}")
        total_s = done["total-time"] / 1000
        return {
            "total_s": total_s,
            "blocktime_ms": float(info["postcopy-blocktime"]),
            "vcpu_blocktime_ms": float(max(info["postcopy-vcpu-blocktime"])),
            "postcopy_requests": float(done["ram"]["postcopy-requests"]),
            "mbps": done["ram"]["transferred"] / total_s / 1e6,
            "ram_sha256": digest,  # the same on both sides
        }
    finally:
        await src.stop()
        await dst.stop()


def fill_guest_ram(path: Path, mib: int = GUEST_MIB) -> None:
    """The source guest's RAM, filled once for every run (as `src.ram` in its folder)."""
    Qemu(path.stem, path.parent, path.parent, ram_mib=mib).fill_ram()


def migrate_through(setup: Setup, src_ram: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-vm-", dir="/dev/shm") as tmp:
        return asyncio.run(_migrate(setup, Path(tmp), src_ram))


def postcopy_through(setup: Setup, template: Path, push_bytes_per_s: int = 0) -> dict[str, Any]:
    """One postcopy run; `push_bytes_per_s` caps the background push (0: uncapped, as QEMU's default)."""
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-vm-", dir="/dev/shm") as tmp:
        return asyncio.run(_postcopy(setup, Path(tmp), template, push_bytes_per_s))


def available() -> str | None:
    """Why the migration benchmark cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "qemu.qmp not installed (pip install 'migrelay[bench]')"
    return None
