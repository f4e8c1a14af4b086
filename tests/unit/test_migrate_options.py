"""`migrelay migrate` options -> libvirt migrateToURI3 flags and parameters (no daemon involved)."""

from __future__ import annotations

import pytest

from relay.core.errors import LocalError
from relay.tools.migrate import MigrateOptions, flags_and_params, one_line

libvirt = pytest.importorskip("libvirt", reason="the libvirt extra is installed by `make test`")

SESSION = {
    "id": "ab12",
    "peer": "hv2",
    "desturi": "qemu+unix:///system?socket=/run/migrelay/hv2/libvirt.sock",
    "migrateuri": "unix:///run/migrelay/hv2/ab12-migration.sock",
    "disks_uri": "unix:///run/migrelay/hv2/ab12-nbd.sock",
}


def test_defaults_are_p2p_live_through_the_session() -> None:
    flags, params = flags_and_params(libvirt, MigrateOptions(), SESSION)
    assert flags == libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_LIVE
    assert params == {libvirt.VIR_MIGRATE_PARAM_URI: SESSION["migrateuri"]}


def test_every_option_maps() -> None:
    options = MigrateOptions(
        copy_storage_all=True,
        migrate_disks=("vda", "vdb"),
        parallel=4,
        postcopy=True,
        persistent=True,
        undefinesource=True,
        bandwidth_mib_s=100,
        tls=True,
    )
    flags, params = flags_and_params(libvirt, options, SESSION)
    for flag in ("NON_SHARED_DISK", "PARALLEL", "POSTCOPY", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS", "LIVE"):
        assert flags & getattr(libvirt, f"VIR_MIGRATE_{flag}"), flag
    assert params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == SESSION["disks_uri"]
    assert params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda", "vdb"]
    assert params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 4
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 100
    # the unix migration URI names no host: QEMU verifies the destination as the peer
    assert params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] == SESSION["peer"]


def test_tls_destination_overrides_the_peer_name() -> None:
    _, params = flags_and_params(libvirt, MigrateOptions(tls=True, tls_destination="hv2.example.org"), SESSION)
    assert params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] == "hv2.example.org"


def test_offline_is_not_live_and_keeps_a_definition() -> None:
    flags, params = flags_and_params(libvirt, MigrateOptions(offline=True), SESSION)
    assert flags & libvirt.VIR_MIGRATE_OFFLINE and flags & libvirt.VIR_MIGRATE_PERSIST_DEST
    assert not flags & libvirt.VIR_MIGRATE_LIVE and libvirt.VIR_MIGRATE_PARAM_URI not in params


@pytest.mark.parametrize(
    "options",
    [
        MigrateOptions(offline=True, copy_storage_all=True),
        MigrateOptions(copy_storage_all=True, copy_storage_inc=True),
        MigrateOptions(tls_destination="hv2"),
    ],
)
def test_contradictions_are_local_errors(options: MigrateOptions) -> None:
    with pytest.raises(LocalError):
        flags_and_params(libvirt, options, SESSION)


def test_qemu_errors_quoted_by_libvirt_become_one_line() -> None:
    message = (
        "internal error: qemu unexpectedly closed the monitor: 2026-11-26T13:53:59.871596Z "
        "qemu-system-x86_64: Cannot read from TLS channel: Input/output error\n"
        "2026-11-26T13:53:59.871676Z qemu-system-x86_64: Cannot read from TLS channel: Input/output error\n"
        "2026-11-26T13:53:59.871741Z qemu-system-x86_64: Not a migration stream\n"
    )
    assert one_line(message) == (
        "internal error: qemu unexpectedly closed the monitor: "
        "qemu-system-x86_64: Cannot read from TLS channel: Input/output error; "
        "qemu-system-x86_64: Not a migration stream"
    )
