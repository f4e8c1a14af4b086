"""`migrelay migrate DOMAIN PEER`: one command, a fresh session, progress, a summary, and Ctrl-C.

Why it matters: composing three URIs per migration (and a distinct session per concurrent
migration) is where operators make mistakes; the command must do it for them, always
close its session, and abort cleanly — guest still running on the source — when
interrupted.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

from tests.e2e.libvirt_hosts import Cluster, cleanup, disks_identical, settled_state, start_transient, state


def migrelay_migrate(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    """`migrelay migrate` on host hvA (in its namespace, so /run/migrelay is hvA's overlay)."""
    return subprocess.Popen(
        cluster.a.inside(sys.executable, "-m", "relay", "migrate", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def open_sessions(cluster: Cluster) -> list[object]:
    out = cluster.a.run(sys.executable, "-m", "relay", "session", "list").stdout
    sessions: list[object] = json.loads(out)
    return sessions


def test_migrate_with_disk_copy(cluster: Cluster) -> None:
    name = "cmd-copy"
    cluster.define_disk(cluster.a, name, fill=True)
    cluster.define_disk(cluster.b, name, fill=False)
    start_transient(cluster, name, disk=True)
    try:
        proc = migrelay_migrate(cluster, name, "hvB", "--copy-storage-all")
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.startswith(f"{name} -> hvB: migrated in ") and "MB/s, downtime " in out, out
        assert "downtime n/a" not in out, out
        # 15 MiB of pattern were written to the disk: the summary counts what crossed the relay
        moved = re.search(r"([0-9.]+) MiB through the relay", out)
        assert moved is not None and float(moved.group(1)) >= 15, out
        assert "-migration.sock" in err  # the session it used, not the shared socket
        assert state(cluster.b, name) == "running" and state(cluster.a, name) == "absent"
        disks_identical(cluster, name)
        assert open_sessions(cluster) == []
        # The command read the destination's completed-job statistics for its summary; the
        # operator's record of the job must still be there, as after `virsh migrate`.
        completed = cluster.b.virsh("domjobinfo", name, "--completed").stdout
        assert re.search(r"^Job type:\s+Completed\s*$", completed, re.MULTILINE), completed
        assert re.search(r"^Operation:\s+Incoming migration\s*$", completed, re.MULTILINE), completed
    finally:
        cleanup(cluster, name)


def test_migrate_with_qemu_tls_checks_the_destination_name(cluster: Cluster) -> None:
    """--tls: QEMU's own TLS inside the relay's; a unix migration URI names no host, so the
    command gives QEMU the peer's name to check the destination's certificate against."""
    name = "cmd-tls"
    start_transient(cluster, name)
    try:
        proc = migrelay_migrate(cluster, name, "hvB", "--tls", "--tls-destination", "not-hvB")
        _, err = proc.communicate(timeout=240)
        assert proc.returncode != 0, err
        # libvirt reports whichever side failed first: the source's certificate check, or the
        # destination QEMU reading a TLS channel the source gave up on; either way one line
        assert "Certificate does not match the hostname not-hvB" in err or "TLS channel" in err, err
        assert len(err.strip().splitlines()) == 2, err  # "session ..." and the error
        assert state(cluster.a, name) == "running"
        assert settled_state(cluster.b, name, "absent") == "absent"
        proc = migrelay_migrate(cluster, name, "hvB", "--tls")
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert out.startswith(f"{name} -> hvB: migrated in "), out
        assert state(cluster.b, name) == "running" and state(cluster.a, name) == "absent"
        assert open_sessions(cluster) == []
    finally:
        cleanup(cluster, name)


def test_two_migrate_commands_at_once(cluster: Cluster) -> None:
    names = ["cmd-one", "cmd-two"]
    for name in names:
        start_transient(cluster, name)
    before = cluster.connections("migration")
    try:
        procs = [migrelay_migrate(cluster, name, "hvB", "--parallel", "2") for name in names]
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err
        assert [state(cluster.b, n) for n in names] == ["running", "running"]
        assert cluster.connections("migration") == before + 2 * 3
        assert open_sessions(cluster) == []
    finally:
        for name in names:
            cleanup(cluster, name)


def test_ctrl_c_aborts_and_the_guest_stays(cluster: Cluster) -> None:
    name = "cmd-interrupted"
    start_transient(cluster, name)
    try:
        proc = migrelay_migrate(cluster, name, "hvB", "--bandwidth", "1")
        deadline = time.monotonic() + 60
        while "Memory processed" not in cluster.a.virsh("domjobinfo", name, check=False).stdout:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the migration never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "aborted, the guest keeps running on the source" in err
        assert state(cluster.a, name) == "running"
        assert settled_state(cluster.b, name, "absent") == "absent"
        assert open_sessions(cluster) == []
    finally:
        cleanup(cluster, name)


def test_unknown_domain_is_a_one_line_error(cluster: Cluster) -> None:
    proc = migrelay_migrate(cluster, "no-such-domain", "hvB")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("migrelay migrate: qemu:///system: Domain not found")
    assert open_sessions(cluster) == []
