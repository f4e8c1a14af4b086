"""A real QEMU live migration through each forwarder pair: total time, downtime, MB/s.

The guest has 1 GiB of file-backed RAM filled with random bytes (no zero pages, none
alike) and runs while it migrates (SeaBIOS, no disk: it idles and dirties little). The
destination listens on the pair's sink socket, the source migrates into its entry socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from relay.daemon.net import free_port
from relay.tools.bench.setups import SOCAT_BUFFER_BYTES, Setup, _spawn, _wait_for, make_pki

GUEST_MIB: Final = 1024
UNCAPPED_BYTES_PER_S: Final = 1 << 40
MIGRATION_TIMEOUT_S: Final = 300.0


def socat_tls(root: Path) -> Setup:
    """socat with OpenSSL on both ends, mutual authentication: the usual hand-made TLS pipe."""
    d = make_pki(root)
    entry, sink, port = root / "socat-tls-in.sock", root / "socat-tls-sink.sock", free_port()
    b = ["-b", str(SOCAT_BUFFER_BYTES)]
    server = [
        "socat", *b,
        f"OPENSSL-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,cert={d}/hvB.pem,key={d}/hvB-key.pem,"
        f"cafile={d}/ca.pem,verify=1",
        f"UNIX-CONNECT:{sink}",
    ]  # fmt: skip
    client = [
        "socat", *b, f"UNIX-LISTEN:{entry},fork",
        f"OPENSSL:127.0.0.1:{port},cert={d}/hvA.pem,key={d}/hvA-key.pem,cafile={d}/ca.pem,commonname=hvB",
    ]  # fmt: skip
    procs = [_spawn(server, root / "socat-tls-b.log")]
    time.sleep(0.3)
    procs.append(_spawn(client, root / "socat-tls-a.log"))
    _wait_for(entry, procs, "socat-tls")
    return Setup("socat-tls", "tls", entry, sink, procs)


async def _qemu(name: str, ram: Path, workdir: Path, incoming: bool) -> tuple[asyncio.subprocess.Process, Any]:
    from qemu.qmp import QMPClient

    qmp_path = workdir / f"{name}-qmp.sock"
    args = [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
        "-machine", "pc,memory-backend=ram", "-m", f"{GUEST_MIB}M",
        "-object", f"memory-backend-file,id=ram,size={GUEST_MIB}M,mem-path={ram},share=on",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    if incoming:
        args += ["-incoming", "defer"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = QMPClient(name)
    for _ in range(200):
        if qmp_path.exists():
            break
        await asyncio.sleep(0.05)
    await client.connect(str(qmp_path))
    return proc, client


async def _migrate(setup: Setup, workdir: Path, src_ram: Path) -> dict[str, float]:
    dst_ram = workdir / "dst.ram"
    with dst_ram.open("wb") as f:
        f.truncate(GUEST_MIB << 20)
    src, src_qmp = await _qemu("src", src_ram, workdir, incoming=False)
    dst, dst_qmp = await _qemu("dst", dst_ram, workdir, incoming=True)
    try:
        await dst_qmp.execute("migrate-incoming", {"uri": f"unix:{setup.sink}"})
        await src_qmp.execute("migrate-set-parameters", {"max-bandwidth": UNCAPPED_BYTES_PER_S})
        await src_qmp.execute("migrate", {"uri": f"unix:{setup.entry}"})
        info = await _completed(src_qmp, setup.name, timed=True)
        await _completed(dst_qmp, setup.name)  # the destination has really got everything
        total_s = info["total-time"] / 1000
        return {"total_s": total_s, "downtime_ms": float(info["downtime"]),
                "mbps": info["ram"]["transferred"] / total_s / 1e6}  # fmt: skip
    finally:
        for client in (src_qmp, dst_qmp):
            await client.disconnect()
        for proc in (src, dst):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        dst_ram.unlink(missing_ok=True)


async def _completed(qmp: Any, name: str, timed: bool = False) -> dict[str, Any]:
    """Wait for 'completed'; with `timed`, also for its total time, which the source QEMU
    fills in a moment after it reports the status (a run once read 0 and divided by it)."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        info: dict[str, Any] = await qmp.execute("query-migrate")
        if info.get("status") == "completed" and (not timed or info.get("total-time", 0) > 0):
            return info
        if info.get("status") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"{name}: migration {info.get('status')}: {info}")
        await asyncio.sleep(0.02)


def fill_guest_ram(path: Path) -> None:
    with path.open("wb") as f:
        for _ in range(GUEST_MIB):
            f.write(os.urandom(1 << 20))


def migrate_through(setup: Setup, src_ram: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-vm-", dir="/dev/shm") as tmp:
        return asyncio.run(_migrate(setup, Path(tmp), src_ram))


def available() -> str | None:
    """Why the migration benchmark cannot run here, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "qemu.qmp not installed (pip install 'migrelay[bench]')"
    return None
