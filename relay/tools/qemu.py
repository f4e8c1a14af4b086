"""A small x86 QEMU under TCG, driven over QMP: the guest of the bench and of the e2e tests.

RAM is a file (in tmpfs) of random bytes, page-distinct and with no zero pages, so a
migration must carry all of it and the destination's copy can be compared by sha256.
Needs qemu-system-x86 and the `qemu.qmp` package (the `bench` and `test` extras).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# QEMU 7.2 caps precopy at 32 MiB/s by default; whoever does not want a cap lifts it.
UNCAPPED_BYTES_PER_S: Final = 1 << 40


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
        if self.incoming:
            args += ["-incoming", "defer"]
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv_prefix, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.qmp = QMPClient(self.name)
        for _ in range(200):
            if self.qmp_path.exists():
                break
            await asyncio.sleep(0.05)
        await self.qmp.connect(str(self.qmp_path))

    async def cmd(self, command: str, **args: Any) -> Any:
        return await self.qmp.execute(command, args or None)

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
