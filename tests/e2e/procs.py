"""Real processes for the e2e tier: `migrelay serve` under a fake systemd, and QEMU over QMP."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.tools.qemu import Qemu
from relay.tools.qemu import sha256 as sha256  # the tests' RAM and disk checks

READY_TIMEOUT_S = 30.0


@dataclass
class ServeProcess:
    config: Path
    proc: subprocess.Popen[str]
    log: Path
    # the NOTIFY_SOCKET every relay of one serve() shares, for what they send after READY=1
    notify: socket.socket | None = None

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
            started.append(ServeProcess(cfg, proc, log, notify))
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


async def precopy(src: Qemu, dst: Qemu, source_uri: Path, dest_uri: Path) -> dict[str, Any]:
    """Start dst listening, migrate src into it, wait until the *destination* says completed."""
    await dst.cmd("migrate-incoming", uri=f"unix:{dest_uri}")
    await src.cmd("migrate", uri=f"unix:{source_uri}")
    info = await dst.wait_migration({"completed"})
    await src.wait_migration({"completed"})
    return info
