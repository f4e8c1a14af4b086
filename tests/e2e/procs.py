"""Real processes for the e2e tier: `migrelay serve` under a fake systemd, and QEMU over QMP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 30.0


@dataclass
class ServeProcess:
    config: Path
    proc: subprocess.Popen[str]
    log: Path

    def output(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def serve(
    *configs: Path,
    env: dict[str, str] | None = None,
    prefix: Callable[[Path], Sequence[str]] | None = None,
) -> Iterator[list[ServeProcess]]:
    """Start `migrelay serve` per config; wait for each READY=1 on a NOTIFY_SOCKET; SIGTERM at the end.

    `prefix(config)` goes before each command line, e.g. `ip netns exec NS` (tests/netns.py:
    `Host.argv()`); the prefix must exec the relay, so that the pid is the relay's.
    """
    root = configs[0].parent
    notify_path = root / f"notify-{os.getpid()}-{time.monotonic_ns()}.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    started: list[ServeProcess] = []
    try:
        for cfg in configs:
            log = cfg.with_suffix(".log")
            proc = subprocess.Popen(
                [*(prefix(cfg) if prefix else ()), sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                env=dict(os.environ, NOTIFY_SOCKET=str(notify_path), **(env or {})),
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                text=True,
            )
            started.append(ServeProcess(cfg, proc, log))
        ready = 0
        deadline = time.monotonic() + READY_TIMEOUT_S
        while ready < len(configs):
            if time.monotonic() > deadline:
                raise AssertionError("relays not ready: " + " | ".join(s.output() for s in started))
            for s in started:
                if (status := s.proc.poll()) is not None:
                    how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exited with {status}"
                    raise AssertionError(f"relay {s.config.name} {how}: {s.output()}")
            with contextlib.suppress(TimeoutError):
                ready += b"READY=1" in notify.recv(4096).split(b"\n")
        yield started
    finally:
        for s in started:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        for s in started:
            try:
                s.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        notify.close()
        notify_path.unlink(missing_ok=True)


def need(*tools: str) -> None:
    """Skip with the reason when a real component is not installed (`make test` installs them)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (make test installs them from Debian)")


@dataclass
class Qemu:
    """A small x86 QEMU under TCG with file-backed RAM (random, page-distinct), driven through qemu.qmp."""

    name: str
    workdir: Path  # QMP socket, disk image
    ram_dir: Path  # RAM file (tmpfs)
    ram_mib: int = 64
    incoming: bool = False
    disk: Path | None = None
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
            "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
            "-machine", "pc,memory-backend=ram", "-m", f"{self.ram_mib}M",
            "-object", f"memory-backend-file,id=ram,size={self.ram_mib}M,mem-path={self.ram_file},share=on",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.disk is not None:
            args += [
                "-blockdev", f"driver=file,node-name=file0,filename={self.disk}",
                "-blockdev", "driver=raw,node-name=disk0,file=file0",
                "-device", "virtio-blk-pci,drive=disk0,id=vblk0",
            ]  # fmt: skip
        if self.incoming:
            args += ["-incoming", "defer"]
        self.proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL)
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

    async def wait_migration(self, statuses: set[str], timeout_s: float = 120, fail_ok: bool = False) -> dict[str, Any]:
        """Poll query-migrate until its status is one of `statuses`; fail on 'failed' unless expected."""
        deadline = time.monotonic() + timeout_s
        while True:
            info: dict[str, Any] = await self.cmd("query-migrate")
            status = info.get("status", "none")
            if not self.statuses or self.statuses[-1] != status:
                self.statuses.append(status)
            if status in statuses:
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


def vm_pair(workdir: Path, ram_dir: Path, prefix: str = "", **disks: Path) -> tuple[Qemu, Qemu]:
    """A source with random RAM and an incoming destination with blank RAM (disks: src=, dst=)."""
    src = Qemu(f"{prefix}src", workdir, ram_dir, disk=disks.get("src"))
    dst = Qemu(f"{prefix}dst", workdir, ram_dir, incoming=True, disk=disks.get("dst"))
    src.fill_ram()
    dst.blank_ram()
    return src, dst


@contextlib.asynccontextmanager
async def running(*vms: Qemu) -> AsyncIterator[None]:
    """Start the VMs; stop every one of them whatever happens."""
    try:
        for vm in vms:
            await vm.start()
        yield
    finally:
        for vm in vms:
            await vm.stop()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# QEMU 7.2 caps precopy at 32 MiB/s by default; tests that do not want a cap lift it.
UNCAPPED_BYTES_PER_S = 1 << 40


async def precopy(src: Qemu, dst: Qemu, source_uri: Path, dest_uri: Path) -> dict[str, Any]:
    """Start dst listening, migrate src into it, wait until the *destination* says completed."""
    await dst.cmd("migrate-incoming", uri=f"unix:{dest_uri}")
    await src.cmd("migrate", uri=f"unix:{source_uri}")
    info = await dst.wait_migration({"completed"})
    await src.wait_migration({"completed"})
    return info
