"""`migrelay serve` under the shipped unit's own sandbox carries a hypervisor's streams, then stops cleanly.

Why it matters: operators run the relay with systemd/migrelay.service, and its hardening decides
what the daemon may do. A sandbox that kills the daemon on the chown of its overlay sockets to
socket_group (SIGSYS), or leaves it unable to reach a QEMU socket that belongs to libvirt-qemu
(EACCES), is found on a hypervisor in the middle of a rollout: `systemd-analyze verify` checks
only the unit's syntax. Here two relays run under the unit's restrictions, read from the unit
file itself (tests/unit_sandbox.py: a mount namespace, setpriv, seccomp), with the features of
the shipped config/hypervisor.toml: socket_group = "libvirt-qemu", socket_dir = /run/migrelay
(the unit's RuntimeDirectory), a libvirt socket, metrics, the control socket. The QEMU stand-ins
run as libvirt-qemu, as libvirt runs QEMU: the source reaches the overlay through its group, the
destination listens in the relay's own folder on a 0660 socket of its own. And a relay must reload,
on SIGHUP and through `migrelay reload` (the unit's ExecReload=), inside its sandbox.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.daemon.net import free_port
from tests.e2e.procs import need, serve
from tests.e2e.reloading import counted, wait_for
from tests.support import connect, listen, make_pki, recv_stream, scrape, send_stream
from tests.unit_sandbox import Unit

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd/migrelay.service"
SHIPPED_CONFIG = REPO / "config/hypervisor.toml"
LAUNCHER = REPO / "tests/unit_sandbox.py"
STANDIN = REPO / "tests/e2e/qemu_standin.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # has Debian's python3-seccomp; the venv's Python does not
QEMU_USER = "libvirt-qemu"  # Debian's QEMU user (libvirt-daemon-system), and the shipped socket_group
MIGRATION_BYTES = 32 << 20
LIBVIRT_BYTES = (8 << 20, 4 << 20)  # the RPC connection carries both ways
STANDIN_TIMEOUT_S = 60


def require() -> None:
    need("systemd-analyze", "setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, and the relay runs as root, as under systemd")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import seccomp"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("not installed: python3-seccomp (make test installs it from Debian)")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"no user {QEMU_USER} (make test installs libvirt-daemon-system from Debian)")


@pytest.fixture
def root() -> Iterator[Path]:
    """Not tmp_path: PrivateTmp= gives the daemon its own /tmp, and config, certificates and the
    sockets it must reach have to be where the unit leaves them visible, as /etc and /run are."""
    d = Path(tempfile.mkdtemp(prefix="migrelay-unit-", dir="/run"))
    d.chmod(0o755)  # libvirt-qemu reaches its sockets below
    yield d
    shutil.rmtree(d, ignore_errors=True)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # plain ASCII here: a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def dump_toml(doc: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items() if not isinstance(v, dict))
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, body in doc.items():
        table(name, body)
    return "\n".join(lines) + "\n"


def hypervisor_config(root: Path, name: str, peer: str, port: int, peer_port: int, metrics_port: int) -> Path:
    """config/hypervisor.toml as shipped, made to run here: this host's name, loopback addresses,
    the test's certificates, a libvirt stand-in; socket_dir and socket_group stay as shipped."""
    doc = tomllib.loads(SHIPPED_CONFIG.read_text())
    relay = doc["relay"]
    assert relay["socket_dir"] == "/run/migrelay", "the shipped socket_dir is no longer the unit's RuntimeDirectory"
    assert relay.get("socket_group") == QEMU_USER, "the shipped config no longer sets socket_group"
    channels = next(iter(doc["peers"].values()))["channels"]
    relay.update(name=name, listen=[f"127.0.0.1:{port}"], libvirt=str(root / f"{name}-libvirt-sock"))
    pki = root / "pki"
    doc["tls"] = {"ca": str(pki / "ca.pem"), "cert": str(pki / f"{name}.pem"), "key": str(pki / f"{name}-key.pem")}
    doc["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    doc["peers"] = {peer: {"address": f"127.0.0.1:{peer_port}", "channels": channels}}
    path = root / f"{name}.toml"
    path.write_text(dump_toml(doc))
    return path


def sandboxed(root: Path) -> Callable[[Path], list[str]]:
    """The launcher before each relay's command line; each relay gets its own /run/migrelay."""
    # the venv's base Python: under /root on the test machines, which ProtectHome= hides
    visible = ["--visible", sys.base_prefix] if sys.base_prefix.startswith(("/root/", "/home/")) else []

    def prefix(config: Path) -> list[str]:
        runtime = root / f"{config.stem}-run"
        runtime.mkdir(exist_ok=True)
        return [SYSTEM_PYTHON, str(LAUNCHER), "--unit", str(UNIT), "--runtime-dir", str(runtime), *visible, "--"]

    return prefix


def as_qemu(*args: str) -> subprocess.Popen[str]:
    """The stand-in as libvirt runs QEMU: the QEMU user, its primary group and its other groups."""
    user = pwd.getpwnam(QEMU_USER)
    return subprocess.Popen(
        [SYSTEM_PYTHON, str(STANDIN), *args],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=os.getgrouplist(QEMU_USER, user.pw_gid),
        stdout=subprocess.PIPE,
        text=True,
    )


async def libvirt_rpc(target: Path, overlay: Path) -> None:
    """Root's connection to the peer's libvirt daemon through libvirt.sock: bytes both ways, exact."""
    daemon = await listen(target)
    await trio.Path(target).chmod(0o600)  # root's libvirt socket
    result: dict[str, object] = {}

    async def libvirtd() -> None:
        conn, _ = await daemon.accept()
        result["request"] = await recv_stream(conn)
        result["reply_sent"] = await send_stream(conn, 2, LIBVIRT_BYTES[1])
        conn.close()

    client = await connect(overlay)
    async with trio.open_nursery() as n:
        n.start_soon(libvirtd)
        result["request_sent"] = await send_stream(client, 1, LIBVIRT_BYTES[0])
        result["reply"] = await recv_stream(client)
    client.close()
    daemon.close()
    assert result["request"] == (LIBVIRT_BYTES[0], result["request_sent"])
    assert result["reply"] == (LIBVIRT_BYTES[1], result["reply_sent"])


def assert_confined(pid: int, unit: Unit) -> None:
    """The daemon itself, seen from outside, runs under the unit's restrictions (not just its launcher)."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    assert not unit.words("CapabilityBoundingSet") and not unit.words("AmbientCapabilities")
    assert {status[k] for k in ("CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb")} == {"0000000000000000"}, status
    wanted = {grp.getgrnam(g).gr_gid for g in unit.words("SupplementaryGroups")}
    assert set(map(int, status["Groups"].split())) == wanted, status
    mounts = {f.split()[4]: f.split()[5] for f in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}
    assert mounts["/"].startswith("ro") and mounts["/run/migrelay"].startswith("rw"), mounts
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")


def connections(port: int, peer: str, channel: str) -> float:
    labels = frozenset({"peer": peer, "channel": channel, "result": "ok"}.items())
    return scrape(port).get(("migrelay_connections_total", labels), 0.0)


def test_sandboxed_unit_carries_hypervisor_streams(root: Path) -> None:
    require()
    make_pki(root)
    port_a, port_b, metrics_a, metrics_b = (free_port() for _ in range(4))
    config_a = hypervisor_config(root, "hvA", "hvB", port_a, port_b, metrics_a)
    config_b = hypervisor_config(root, "hvB", "hvA", port_b, port_a, metrics_b)
    run_a, run_b = root / "hvA-run", root / "hvB-run"  # each relay's /run/migrelay
    qemu = pwd.getpwnam(QEMU_USER)
    group = grp.getgrnam(QEMU_USER).gr_gid
    with serve(config_a, config_b, prefix=sandboxed(root)) as relays:
        for relay in relays:
            assert_confined(relay.proc.pid, Unit.load(UNIT))
        # socket_group, as the sandboxed relays applied it: the chown, and the setgid folder
        own = (run_b / "hvB").stat()
        assert (own.st_gid, stat.S_IMODE(own.st_mode)) == (group, 0o3775)
        overlay = (run_a / "hvB" / "migration.sock").stat()
        assert (overlay.st_gid, stat.S_IMODE(overlay.st_mode)) == (group, 0o660)
        assert stat.S_IMODE((run_a / "hvB" / "libvirt.sock").stat().st_mode) == 0o600

        # the destination QEMU listens in hvB's own folder; the source QEMU dials hvA's overlay
        target = run_b / "hvB" / "migration.sock"
        destination = as_qemu("listen", str(target), "0660")
        try:
            assert destination.stdout is not None and destination.stdout.readline() == "listening\n"
            owner = target.stat()
            # QEMU's own socket: its user, the folder's group (setgid), no access for others
            assert (owner.st_uid, owner.st_gid, stat.S_IMODE(owner.st_mode)) == (qemu.pw_uid, group, 0o660)
            source = as_qemu("send", str(run_a / "hvB" / "migration.sock"), str(MIGRATION_BYTES))
            sent, _ = source.communicate(timeout=STANDIN_TIMEOUT_S)
            received, _ = destination.communicate(timeout=STANDIN_TIMEOUT_S)
        finally:
            destination.kill()
        assert sent.split() == received.split(), (sent, received, *(r.output() for r in relays))
        assert int(sent.split()[0]) == MIGRATION_BYTES

        trio.run(libvirt_rpc, root / "hvB-libvirt-sock", run_a / "hvB" / "libvirt.sock")

        # the metrics endpoint and the control socket work from inside the sandbox too
        assert connections(metrics_b, "hvA", "migration") == 1
        assert connections(metrics_b, "hvA", "libvirt") == 1
        status = subprocess.run(
            [sys.executable, "-m", "relay", "status", "--control", str(run_a / "control.sock")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0 and "relay hvA: up" in status.stdout, status.stderr

        # reloads under the sandbox (SIGHUP, and the unit's ExecReload= command): the config and
        # certificates are read again, from inside the mount namespace, in a worker thread
        relays[0].proc.send_signal(signal.SIGHUP)
        wait_for(lambda: counted(metrics_a, "migrelay_reloads_total") == 1, "hvA's reload on SIGHUP")
        reload = subprocess.run(
            [sys.executable, "-m", "relay", "reload", "--control", str(run_a / "control.sock")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert reload.stdout == "reloaded: config unchanged, TLS files unchanged\n", (reload, relays[0].output())
        assert relays[0].proc.poll() is None
    # serve() sent SIGTERM (the unit's KillSignal=) and waited: a clean, complete stop
    for relay in relays:
        log = relay.output()
        assert relay.proc.returncode == 0, log
        assert "SIGTERM received: stopping" in log and "Traceback" not in log, log
    assert not (run_a / "hvB" / "migration.sock").exists()
