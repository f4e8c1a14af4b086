"""Fixtures for the e2e tier: two real relays (hvA -> hvB) over a chosen transport, and guest RAM."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.core.config import Transport
from relay.daemon.net import free_port
from relay.tools import pki
from tests.e2e.libvirt_hosts import Cluster, LibvirtHost, qemu_tls_files, relay_config
from tests.e2e.procs import ServeProcess, serve
from tests.support import add_metrics, make_pki, pair_configs, scrape


@dataclass
class Hosts:
    """hvA (source host) and hvB (destination host), each with its own overlay root."""

    root: Path
    transport: str
    metrics_a: int
    metrics_b: int
    relays: list[ServeProcess]

    def source(self, name: str) -> Path:
        """Where a source hypervisor connects: hvA's overlay listener for hvB."""
        return self.root / "hvA" / "hvB" / name

    def destination(self, name: str) -> Path:
        """Where the destination hypervisor listens: hvB's own folder."""
        return self.root / "hvB" / "hvB" / name

    def connections(self, channel: str, result: str = "ok") -> float:
        labels = frozenset({"peer": "hvB", "channel": channel, "result": result}.items())
        return scrape(self.metrics_a).get(("migrelay_connections_total", labels), 0.0)


def start_hosts(root: Path, transport: Transport) -> tuple[Path, Path, int, int]:
    p = make_pki(root)
    pair_configs(root, p, transport, libvirt=root / "hvB-libvirt-sock")
    return root / "hvA.toml", root / "hvB.toml", add_metrics(root / "hvA.toml"), add_metrics(root / "hvB.toml")


@pytest.fixture(params=["tls", "unix"])
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hosts]:
    a, b, port_a, port_b = start_hosts(tmp_path, request.param)
    with serve(a, b) as relays:
        yield Hosts(tmp_path, request.param, port_a, port_b, relays)


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    """Guest RAM files live in tmpfs: postcopy needs shared memory it can userfault on."""
    d = Path(tempfile.mkdtemp(prefix="migrelay-ram-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for tool in ("libvirtd", "virsh", "qemu-system-x86_64", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"not installed: {tool} (make test installs libvirt-daemon-system from Debian)")
    root = tmp_path_factory.mktemp("libvirt")
    pki_dir = root / "pki"
    pki.init_ca(pki_dir)
    for name in ("hvA", "hvB"):
        pki.issue(pki_dir, name)
    port_a, port_b, metrics_a, metrics_b = free_port(), free_port(), free_port(), free_port()
    a, b = LibvirtHost("hvA", root / "hvA"), LibvirtHost("hvB", root / "hvB")
    for host in (a, b):
        host.qemu_pki = qemu_tls_files(pki_dir, host.name, root / f"{host.name}-qemu-pki")
    try:
        a.start()
        b.start()
        a.start_relay(relay_config(root, "hvA", "hvB", pki_dir, port_a, port_b, metrics_a))
        b.start_relay(relay_config(root, "hvB", "hvA", pki_dir, port_b, port_a, metrics_b))
        yield Cluster(a, b, root, metrics_a)
    except BaseException:
        print(a.dump_logs(), b.dump_logs())
        raise
    finally:
        a.stop()
        b.stop()
