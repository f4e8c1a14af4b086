"""A small x86 QEMU under TCG, driven over QMP: the guest of the bench and of the e2e tests.

RAM is a file (in tmpfs) of random bytes, page-distinct and with no zero pages, so a
migration must carry all of it and the destination's copy can be compared by sha256.
The guest idles in SeaBIOS, or runs a page reader (`reader=True`, relay/tools/guest.py)
that reads every page of its RAM over and over: after a switch to postcopy, its vCPU
faults in every page the destination does not have yet.
Needs qemu-system-x86 and the `qemu.qmp` package (the `bench` and `test` extras).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from relay.tools import guest

# QEMU 7.2 caps precopy at 32 MiB/s by default; whoever does not want a cap lifts it.
UNCAPPED_BYTES_PER_S: Final = 1 << 40
READER_START_TIMEOUT_S: Final = 60.0
QMP_START_TIMEOUT_S: Final = 10.0

# pc machine: guest-physical 0xA0000-0xFFFFF is VGA and BIOS ROM, not the RAM backend.
PC_HOLE: Final = range(0xA0000, 0x100000)


def sha256(path: Path, skip: range | None = None) -> str:
    """sha256 of a file (a RAM file), without the bytes in `skip` (e.g. PC_HOLE)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        offset = 0
        while chunk := f.read(1 << 20):
            if skip is not None and offset < skip.stop and skip.start < offset + len(chunk):
                chunk = chunk[: max(skip.start - offset, 0)] + chunk[max(skip.stop - offset, 0) :]
            h.update(chunk)
            offset += 1 << 20
    return h.hexdigest()


def same_ram(source: Path, destination: Path) -> str:
    """The sha256 of two RAM files that must be equal; RuntimeError naming the first page that differs."""
    h = hashlib.sha256()
    with source.open("rb") as a, destination.open("rb") as b:
        offset = 0
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            if x != y:
                at = offset + next(
                    (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y))
                )
                raise RuntimeError(
                    f"{source} and {destination} first differ at byte {at:#x} (page {at // guest.PAGE});"
                    f" {source.stat().st_size} and {destination.stat().st_size} bytes"
                )
            if not x:
                return h.hexdigest()
            h.update(x)
            offset += len(x)


@dataclass
class Qemu:
    """A small x86 QEMU under TCG with file-backed RAM (random, page-distinct), driven through qemu.qmp."""

    name: str
    workdir: Path  # QMP socket, disk image
    ram_dir: Path  # RAM file (tmpfs)
    ram_mib: int = 64
    incoming: bool = False
    disk: Path | None = None
    paused: bool = True  # started with -S: "cont" makes the guest run
    reader: bool = False  # boots relay/tools/guest.py's page reader instead of idling in SeaBIOS
    # runs QEMU elsewhere, e.g. nsenter into a pod's mount namespace; it must exec QEMU (the pid is QEMU's)
    argv_prefix: tuple[str, ...] = ()
    proc: asyncio.subprocess.Process | None = None
    qmp: Any = None
    statuses: list[str] = field(default_factory=list)  # every migration status seen, in order

    @property
    def ram_file(self) -> Path:
        return self.ram_dir / f"{self.name}.ram"

    @property
    def qmp_path(self) -> Path:
        return self.workdir / f"{self.name}-qmp.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-qemu.log"

    @property
    def kernel_path(self) -> Path:
        return self.workdir / f"{self.name}-reader.bin"

    def fill_ram(self) -> None:
        """Random guest RAM: no zero pages (QEMU skips those) and no two pages alike."""
        with self.ram_file.open("wb") as f:
            for _ in range(self.ram_mib):
                f.write(os.urandom(1 << 20))

    def blank_ram(self) -> None:
        with self.ram_file.open("wb") as f:
            f.truncate(self.ram_mib << 20)

    async def start(self) -> None:
        from qemu.qmp import QMPClient
        from qemu.qmp.protocol import ConnectError

        args = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            *(["-S"] if self.paused else []),
            "-machine",
            "pc,memory-backend=ram",
            "-m",
            f"{self.ram_mib}M",
            "-object",
            f"memory-backend-file,id=ram,size={self.ram_mib}M,mem-path={self.ram_file},share=on",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.disk is not None:
            args += [
                "-blockdev",
                f"driver=file,node-name=file0,filename={self.disk}",
                "-blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "-device",
                "virtio-blk-pci,drive=disk0,id=vblk0",
            ]
        if self.reader:
            self.kernel_path.write_bytes(guest.page_reader(self.ram_mib << 20))
            args += ["-kernel", str(self.kernel_path)]
        if self.incoming:
            args += ["-incoming", "defer"]
        # QEMU's own messages (why a migration failed, why it exited) stay beside its QMP socket
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv_prefix, *args, stdout=subprocess.DEVNULL, stderr=log
            )
        # QEMU binds its QMP socket, then listens: the file appears a moment before a connect works
        deadline = time.monotonic() + QMP_START_TIMEOUT_S
        for _ in range(int(QMP_START_TIMEOUT_S / 0.05)):  # first the file: no connect attempt (and log) before
            if self.qmp_path.exists() or self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        while True:
            self.qmp = QMPClient(self.name)
            try:
                await self.qmp.connect(str(self.qmp_path))
                return
            except ConnectError as e:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name}: QEMU exited ({self.proc.returncode}); see {self.log_path}") from e
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

    async def cmd(self, command: str, **args: Any) -> Any:
        return await self.qmp.execute(command, args or None)

    async def wait_reading(self, timeout_s: float = READER_START_TIMEOUT_S) -> None:
        """Wait until the vCPU runs the page reader's loop (SeaBIOS boots it in a second or two under TCG)."""
        deadline = time.monotonic() + timeout_s
        while True:
            regs = await self.cmd("human-monitor-command", **{"command-line": "info registers"})
            eip = re.search(r"EIP=([0-9a-f]+)", regs)
            if eip is not None and int(eip.group(1), 16) in guest.READER_LOOP:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: the page reader is not running after {timeout_s}s: {regs}")
            await asyncio.sleep(0.1)

    async def capabilities(self, **caps: bool) -> None:
        await self.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    async def parameters(self, **params: Any) -> None:
        await self.cmd("migrate-set-parameters", **{k.replace("_", "-"): v for k, v in params.items()})

    async def wait_migration(
        self, statuses: set[str], timeout_s: float = 120, fail_ok: bool = False, timed: bool = False
    ) -> dict[str, Any]:
        """Poll query-migrate until its status is one of `statuses`; fail on 'failed' unless expected.

        With `timed`, also wait for the total time, which the source QEMU fills in a moment
        after it reports 'completed' (a bench run once read 0 and divided by it).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            info: dict[str, Any] = await self.cmd("query-migrate")
            status = info.get("status", "none")
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            if status in statuses and (not timed or info.get("total-time", 0) > 0):
                return info
            if status == "failed" and not fail_ok:
                raise AssertionError(f"{self.name}: migration failed: {info}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: migration still {status} after {timeout_s}s: {info}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM (QEMU shuts down cleanly on it), SIGKILL if that is not enough, then drop QMP.

        Not QMP `quit`: a VM whose migration just failed may never answer it.
        """
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)


async def start_postcopy(
    src: Qemu,
    dst: Qemu,
    source_uri: Path,
    dest_uri: Path,
    precopy_bytes_per_s: int,
    postcopy_bytes_per_s: int = 0,
    **caps: bool,
) -> None:
    """Migrate `src` into `dst` and switch to postcopy as soon as precopy runs; return once it has.

    Precopy is capped at `precopy_bytes_per_s`, so the switch comes with most RAM still on
    the source; after it the destination runs the guest, and each page it touches and has
    not got is requested over the return path, while the source pushes the rest in the
    background at `postcopy_bytes_per_s` (0: QEMU's default, uncapped). `caps` are more
    migration capabilities for both sides (postcopy_preempt, postcopy_blocktime).
    """
    for vm in (src, dst):
        await vm.capabilities(postcopy_ram=True, **caps)
    await src.parameters(max_bandwidth=precopy_bytes_per_s, max_postcopy_bandwidth=postcopy_bytes_per_s)
    await dst.cmd("migrate-incoming", uri=f"unix:{dest_uri}")
    await src.cmd("migrate", uri=f"unix:{source_uri}")
    await src.wait_migration({"active"})
    await src.cmd("migrate-start-postcopy")
    await src.wait_migration({"postcopy-active"})
