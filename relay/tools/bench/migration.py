"""A real QEMU live migration through each forwarder pair: total time, downtime, MB/s.

The guest has 1 GiB of file-backed RAM filled with random bytes (no zero pages, none
alike) and runs while it migrates (SeaBIOS, no disk: it idles and dirties little). The
destination listens on the pair's sink socket, the source migrates into its entry socket.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

from relay.daemon.net import free_port
from relay.tools.bench.setups import SOCAT_BUFFER_BYTES, Setup, make_pki, spawn, wait_for
from relay.tools.qemu import UNCAPPED_BYTES_PER_S, Qemu

GUEST_MIB: Final = 1024
MIGRATION_TIMEOUT_S: Final = 300.0


def socat_tls(root: Path) -> Setup:
    """socat with OpenSSL on both ends, mutual authentication: the usual hand-made TLS pipe."""
    d = make_pki(root)
    entry, sink, port = root / "socat-tls-in.sock", root / "socat-tls-sink.sock", free_port()
    b = ["-b", str(SOCAT_BUFFER_BYTES)]
    server = [
        "socat",
        *b,
        f"OPENSSL-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,cert={d}/hvB.pem,key={d}/hvB-key.pem,"
        f"cafile={d}/ca.pem,verify=1",
        f"UNIX-CONNECT:{sink}",
    ]
    client = [
        "socat",
        *b,
        f"UNIX-LISTEN:{entry},fork",
        f"OPENSSL:127.0.0.1:{port},cert={d}/hvA.pem,key={d}/hvA-key.pem,cafile={d}/ca.pem,commonname=hvB",
    ]
    procs = [spawn(server, root / "socat-tls-b.log")]
    time.sleep(0.3)
    procs.append(spawn(client, root / "socat-tls-a.log"))
    wait_for(entry, procs, "socat-tls")
    return Setup("socat-tls", "tls", entry, sink, procs)


async def _migrate(setup: Setup, workdir: Path, src_ram: Path) -> dict[str, float]:
    """Migrate a running guest whose RAM is `src_ram` into a fresh destination, through `setup`."""
    src = Qemu("src", workdir, src_ram.parent, ram_mib=GUEST_MIB, paused=False)
    dst = Qemu("dst", workdir, workdir, ram_mib=GUEST_MIB, incoming=True)
    dst.blank_ram()
    try:
        await src.start()
        await dst.start()
        await dst.cmd("migrate-incoming", uri=f"unix:{setup.sink}")
        await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
        await src.cmd("migrate", uri=f"unix:{setup.entry}")
        info = await src.wait_migration({"completed"}, MIGRATION_TIMEOUT_S, timed=True)
        await dst.wait_migration({"completed"}, MIGRATION_TIMEOUT_S)  # the destination has really got everything
        total_s = info["total-time"] / 1000
        return {
            "total_s": total_s,
            "downtime_ms": float(info["downtime"]),
            "mbps": info["ram"]["transferred"] / total_s / 1e6,
        }
    finally:
        await src.stop()
        await dst.stop()
        dst.ram_file.unlink(missing_ok=True)


def fill_guest_ram(path: Path) -> None:
    """The source guest's RAM, filled once for every run (as `src.ram` in its folder)."""
    Qemu(path.stem, path.parent, path.parent, ram_mib=GUEST_MIB).fill_ram()


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
