"""Two migrations to the same peer at once, each in its own session (`migrelay session open`).

Why it matters: two destination QEMUs cannot listen on one path, so concurrent migrations
need distinct names; a session gives each its own `<id>-migration.sock` on both hosts, and
the two streams must not leak into each other.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from relay.tools.qemu import UNCAPPED_BYTES_PER_S, Qemu
from tests.e2e.conftest import Hosts
from tests.e2e.procs import need, precopy, running, sha256, vm_pair


def open_session(hosts: Hosts) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "session", "open", "hvB", "--config", str(hosts.root / "hvA.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    session: dict[str, str] = json.loads(out.stdout)
    return session


def test_qemu_concurrent_migrations_with_sessions(hosts: Hosts, ram_dir: Path) -> None:
    need("qemu-system-x86_64")
    sessions = [open_session(hosts), open_session(hosts)]
    pairs = [vm_pair(hosts.root, ram_dir, prefix=f"{i}-") for i in range(2)]

    async def one(src: Qemu, dst: Qemu, session: dict[str, str]) -> None:
        async with running(src, dst):
            await src.parameters(max_bandwidth=UNCAPPED_BYTES_PER_S)
            source = Path(session["migrateuri"].removeprefix("unix://"))
            # libvirt hands the destination the same URI; the overlay maps it to hvB's own folder
            destination = hosts.destination(source.name)
            await precopy(src, dst, source, destination)

    async def both() -> None:
        await asyncio.gather(*(one(src, dst, s) for (src, dst), s in zip(pairs, sessions, strict=True)))

    asyncio.run(both())
    for src, dst in pairs:
        assert sha256(dst.ram_file) == sha256(src.ram_file)
    assert hosts.connections("migration") == 2
