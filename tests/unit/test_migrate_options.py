"""`migrelay migrate` options -> libvirt migrateToURI3 flags and parameters (no daemon involved)."""

from __future__ import annotations

import pytest

from relay.errors import LocalError
from relay.libvirt_helper import MigrateOptions, flags_and_params

libvirt = pytest.importorskip("libvirt", reason="the libvirt extra is installed by `make test`")

SESSION = {
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
        copy_storage_all=True, migrate_disks=("vda", "vdb"), parallel=4, postcopy=True, persistent=True,
        undefinesource=True, bandwidth_mib_s=100, tls=True,
    )  # fmt: skip
    flags, params = flags_and_params(libvirt, options, SESSION)
    for flag in ("NON_SHARED_DISK", "PARALLEL", "POSTCOPY", "PERSIST_DEST", "UNDEFINE_SOURCE", "TLS", "LIVE"):
        assert flags & getattr(libvirt, f"VIR_MIGRATE_{flag}"), flag
    assert params[libvirt.VIR_MIGRATE_PARAM_DISKS_URI] == SESSION["disks_uri"]
    assert params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] == ["vda", "vdb"]
    assert params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] == 4
    assert params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] == 100


def test_offline_is_not_live_and_keeps_a_definition() -> None:
    flags, params = flags_and_params(libvirt, MigrateOptions(offline=True), SESSION)
    assert flags & libvirt.VIR_MIGRATE_OFFLINE and flags & libvirt.VIR_MIGRATE_PERSIST_DEST
    assert not flags & libvirt.VIR_MIGRATE_LIVE and libvirt.VIR_MIGRATE_PARAM_URI not in params


@pytest.mark.parametrize(
    "options",
    [MigrateOptions(offline=True, copy_storage_all=True), MigrateOptions(copy_storage_all=True, copy_storage_inc=True)],
)
def test_contradictions_are_local_errors(options: MigrateOptions) -> None:
    with pytest.raises(LocalError):
        flags_and_params(libvirt, options, SESSION)
