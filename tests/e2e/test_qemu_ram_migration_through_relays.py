"""A real QEMU precopy migration through two relays: the destination ends completed, RAM identical.

Why it matters: QEMU's migration stream has no end-to-end checksum; only a byte-exact
relay yields a destination guest identical to the source. The guest's RAM is a file of
random bytes (no zero pages, every page distinct), so every byte must cross the relays.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from tests.e2e.procs import Qemu, need, serve
from tests.support import add_metrics, make_pki, pair_configs, scrape

RAM_MIB = 64


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("transport", ["tls", "unix"])
def test_qemu_ram_migration_through_relays(tmp_path: Path, transport: str) -> None:
    need("qemu-system-x86_64")
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, transport)
    port_a = add_metrics(tmp_path / "hvA.toml")
    src = Qemu("src", tmp_path, RAM_MIB)
    dst = Qemu("dst", tmp_path, RAM_MIB, incoming=True)
    src.ram_file.write_bytes(os.urandom(RAM_MIB << 20))
    with dst.ram_file.open("wb") as f:
        f.truncate(RAM_MIB << 20)

    async def migrate() -> dict[str, object]:
        await src.start()
        await dst.start()
        try:
            await dst.cmd("migrate-incoming", uri=f"unix:{tmp_path}/hvB/hvB/migration.sock")
            await src.cmd("migrate", uri=f"unix:{tmp_path}/hvA/hvB/migration.sock")
            info = await dst.wait_migration({"completed"})
            await src.wait_migration({"completed"})
            return info
        finally:
            await src.stop()
            await dst.stop()

    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml"):
        info = asyncio.run(migrate())
        connections = scrape(port_a)[
            ("migrelay_connections_total", frozenset({"peer": "hvB", "channel": "migration", "result": "ok"}.items()))
        ]
    assert info["status"] == "completed"
    assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert connections == 1
