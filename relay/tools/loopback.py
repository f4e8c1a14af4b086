"""Two relays on one machine, hvA -> hvB: the pair the demo, the bench and the tests share.

Built as `Config` objects and written with `Config.as_toml()`, so a pair runs exactly
what `migrelay check --print` would show for it. hvA dials, hvB listens; each relay's
socket_dir is `root/<name>`, so a client of "hvB's socket NAME" connects to
`root/hvA/hvB/NAME` and the destination listens on `root/hvB/hvB/NAME`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from relay.core.config import Address, Config, HostPort, PeerConfig, TlsFiles, Transport
from relay.core.overlay import DEFAULT_CHANNELS
from relay.daemon.net import free_port


def tls_files(pki_dir: Path, name: str) -> TlsFiles:
    """The files `migrelay pki issue pki_dir NAME` writes, with the CA beside them."""
    return TlsFiles(pki_dir / "ca.pem", pki_dir / f"{name}.pem", pki_dir / f"{name}-key.pem")


def pair(
    root: Path,
    pki_dir: Path,
    transport: Transport = "tls",
    *,
    channels: tuple[str, ...] = DEFAULT_CHANNELS,
    b_channels: tuple[str, ...] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    libvirt: Path | None = None,
    metrics: bool | int = False,
    **both: Any,
) -> tuple[Config, Config]:
    """hvA (dials, forwards `channels`) and hvB (listens, allows `b_channels`, default the same).

    `host`/`port` is where hvB listens (tls, tcp); `libvirt` is hvB's libvirt socket;
    `metrics` gives each a /metrics port of its own (True), or this port for both (relays in
    network namespaces of their own); `both` sets any other Config field on both.
    """

    def metrics_listen() -> HostPort | None:
        if metrics is False:
            return None
        return HostPort("127.0.0.1", free_port() if metrics is True else metrics)

    if transport == "unix":
        address = Address("unix", path=str(root / "hvB-peer.sock"))
    else:
        address = Address(transport, host=host, port=port or free_port())
    insecure = transport == "tcp"
    a = Config(
        name="hvA",
        socket_dir=root / "hvA",
        tls=tls_files(pki_dir, "hvA"),
        metrics_listen=metrics_listen(),
        peers={"hvB": PeerConfig("hvB", address, channels, insecure)},
        **both,
    )
    b = Config(
        name="hvB",
        socket_dir=root / "hvB",
        listen=(address,),
        libvirt=libvirt,
        tls=tls_files(pki_dir, "hvB"),
        metrics_listen=metrics_listen(),
        peers={"hvA": PeerConfig("hvA", None, b_channels or channels, insecure)},
        **both,
    )
    return a, b


def write(config: Config, path: Path) -> Path:
    """Write `config` as its TOML, for `migrelay serve --config`."""
    path.write_text(config.as_toml())
    return path


def write_pair(root: Path, pki_dir: Path, transport: Transport = "tls", **options: Any) -> tuple[Path, Path]:
    """`pair()`, written to root/hvA.toml and root/hvB.toml."""
    a, b = pair(root, pki_dir, transport, **options)
    return write(a, root / "hvA.toml"), write(b, root / "hvB.toml")


def with_changes(path: Path, **changes: Any) -> Path:
    """Rewrite a written config with some fields changed (a test's variation on the pair)."""
    from relay.core import config

    return write(dataclasses.replace(config.load(path), source=None, **changes), path)
