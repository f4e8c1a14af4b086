"""What a reload may change, what needs a restart, and how it says what it did (relay/daemon/reload.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from relay.core.config import Address, Config, HostPort, Limits, PeerConfig
from relay.daemon.reload import RELOADABLE, RESTART_KEYS, Material, describe, restart_needed

BASE = Config(
    name="hvA",
    socket_dir=Path("/run/migrelay"),
    listen=(Address("tls", host="0.0.0.0", port=16515),),
    peers={"hvB": PeerConfig("hvB", Address("tls", host="192.0.2.2", port=16515))},
)


def test_every_config_field_is_either_reloadable_or_needs_a_restart() -> None:
    """A field added to Config must be classified: until it is, a reload that changes it is refused
    (restart_needed names it), and this test says which one to classify."""
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not RELOADABLE.keys() & RESTART_KEYS.keys()
    assert fields == RELOADABLE.keys() | RESTART_KEYS.keys(), "classify in relay/daemon/reload.py"


RESTART_CHANGES: dict[str, Any] = {
    "name": "hvZ",
    "socket_dir": Path("/srv/overlay"),
    "listen": (Address("tls", host="0.0.0.0", port=16516),),
    "control": Path("/run/migrelay-control.sock"),
    "socket_mode": 0o600,
    "socket_group": "kvm",
    "libvirt_group": "libvirt",
    "socket_context": "system_u:object_r:svirt_socket_t:s0",
    "metrics_listen": HostPort("127.0.0.1", 9465),
}


@pytest.mark.parametrize("key", sorted(RESTART_KEYS))
def test_a_change_that_needs_a_restart_is_named_as_the_config_names_it(key: str) -> None:
    assert set(RESTART_CHANGES) == set(RESTART_KEYS)
    changed = dataclasses.replace(BASE, **{key: RESTART_CHANGES[key]})
    # the control socket lives in socket_dir unless [relay] control says otherwise: it moves too
    moved = ["[relay] control"] if key == "socket_dir" else []
    assert restart_needed(BASE, changed) == [RESTART_KEYS[key], *moved]


def test_the_control_socket_is_compared_where_it_really_is() -> None:
    """Unset means <socket_dir>/control.sock: writing that path out is no change."""
    explicit = dataclasses.replace(BASE, control=Path("/run/migrelay/control.sock"))
    assert restart_needed(BASE, explicit) == []


def test_reloadable_changes_need_no_restart() -> None:
    changed = dataclasses.replace(
        BASE,
        libvirt=Path("/run/libvirt/virtqemud-sock"),
        handshake_timeout_s=3.0,
        drain_timeout_s=60.0,
        session_idle_s=60.0,
        rekey_after_bytes=1 << 30,
        limits=Limits(streams_per_peer=8),
        peers={},
        source=Path("/etc/migrelay/other.toml"),
    )
    assert restart_needed(BASE, changed) == []


def material(cfg: Config, digest: bytes = b"") -> Material:
    return Material(cfg, tls_digest=digest)


def test_the_log_line_says_what_changed() -> None:
    hv_c = PeerConfig("hvC", Address("unix", path="/run/hvC.sock"))
    hv_d = PeerConfig("hvD", None)
    old = dataclasses.replace(BASE, peers={**BASE.peers, "hvD": hv_d})
    hv_b = dataclasses.replace(BASE.peers["hvB"], channels=("migration.sock",))
    new = dataclasses.replace(BASE, peers={"hvB": hv_b, "hvC": hv_c}, limits=Limits(handshakes=8))
    assert describe(material(old), material(new), closed_sessions=2) == (
        "1 peer added (hvC), 1 peer removed (hvD), 1 peer changed (hvB), 2 sessions of removed peers closed, "
        "[limits] changed"
    )
    assert describe(material(old), material(old)) == "config unchanged"
