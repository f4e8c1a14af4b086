"""Two libvirt "hosts" on one machine: each a libvirtd plus a migrelay in its own mount/UTS namespace.

Every host gets private copies of /etc/libvirt, /var/lib/libvirt, /var/log/libvirt,
/var/cache/libvirt and /run (bind-mounted from folders under its root), its own hostname
and host UUID; its overlay folder is bind-mounted at /run/migrelay, the same path on
every host, which is exactly what the socket overlay is for. The network namespace is
shared, so the two relays talk TLS over loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from relay.core.config import Address, Config, HostPort, PeerConfig
from relay.tools import loopback
from tests.support import scrape

CHECKOUT = Path(__file__).resolve().parents[2]
SOCKET_DIR = "/run/migrelay"
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
START_TIMEOUT_S = 30.0

QEMU_CONF = """
stdio_handler = "file"
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
remember_owner = 0
"""

# Mounts are private to the namespace; `exec` makes libvirtd the namespace's anchor process.
BOOT = """
set -e
root="$1"; name="$2"
mount --bind "$root/run" /run
mkdir -p /run/libvirt /run/migrelay
mount --bind "$root/overlay" /run/migrelay
for d in etc/libvirt var/lib/libvirt var/log/libvirt var/cache/libvirt; do
    mount --bind "$root/$d" "/$d"
done
hostname "$name"
echo $$ > "$root/anchor.pid"
exec libvirtd
"""


@dataclass
class LibvirtHost:
    name: str
    root: Path
    proc: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None
    pid: int = 0
    logs: list[Path] = field(default_factory=list)
    ram_dir: Path = Path("/nonexistent")
    qemu_pki: Path | None = None  # QEMU's own TLS files (VIR_MIGRATE_TLS), if any

    def path(self, inside: str) -> Path:
        """Where a path inside this host's namespace lives on the real filesystem."""
        for prefix, folder in (
            (SOCKET_DIR, "overlay"),
            ("/run", "run"),
            ("/etc/libvirt", "etc/libvirt"),
            ("/var/lib/libvirt", "var/lib/libvirt"),
            ("/var/log/libvirt", "var/log/libvirt"),
        ):
            if inside == prefix or inside.startswith(prefix + "/"):
                return self.root / folder / inside[len(prefix) :].lstrip("/")
        return Path(inside)

    def prepare(self) -> None:
        for d in ("run", "overlay", "var/lib/libvirt/images", "var/log/libvirt/qemu", "var/cache/libvirt"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.root / "etc/libvirt", dirs_exist_ok=True)
        # file-backed guest RAM lives in tmpfs (postcopy can only userfault on shared memory)
        self.ram_dir = Path(tempfile.mkdtemp(prefix=f"migrelay-{self.name}-ram-", dir="/dev/shm"))
        qemu_conf = QEMU_CONF + f'memory_backing_dir = "{self.ram_dir}"\n'
        if self.qemu_pki is not None:
            qemu_conf += f'default_tls_x509_cert_dir = "{self.qemu_pki}"\n'
        (self.root / "etc/libvirt/qemu.conf").write_text(qemu_conf)
        (self.root / "etc/libvirt/libvirtd.conf").write_text(
            f'host_uuid = "{uuid.uuid4()}"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n'
            'log_outputs = "3:stderr"\n'
        )
        # no autostarted networks or leftover domains from the real host
        for d in ("qemu/networks/autostart", "qemu/autostart"):
            shutil.rmtree(self.root / "etc/libvirt" / d, ignore_errors=True)
        for xml in (self.root / "etc/libvirt/qemu").glob("*.xml"):
            xml.unlink()

    def start(self) -> None:
        self.prepare()
        log = self.root / "libvirtd.log"
        self.logs.append(log)
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--fork",
                "bash",
                "-c",
                BOOT,
                "boot",
                str(self.root),
                self.name,
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.path(LIBVIRT_SOCK).is_socket():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd {self.name} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.pid = int((self.root / "anchor.pid").read_text())

    def inside(self, *cmd: str) -> list[str]:
        # Entering a mount namespace moves the working directory to its root, where `python -m
        # relay` imports the copy the venv's editable install names, not this checkout's: start
        # in the checkout (in a git worktree the two differ).
        return ["nsenter", "--target", str(self.pid), "--mount", "--uts", f"--wd={CHECKOUT}", *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.inside(*cmd), capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(cmd)} failed ({result.returncode}): {result.stderr}")
        return result

    def virsh(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("virsh", "-q", "-c", "qemu:///system", *args, check=check, timeout=timeout)

    def start_relay(self, config: Path) -> None:
        log = self.root / "relay.log"
        self.logs.append(log)
        self.relay = subprocess.Popen(
            self.inside(sys.executable, "-m", "relay", "serve", "--config", str(config)),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.path(f"{SOCKET_DIR}/control.sock").is_socket():
            if self.relay.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"relay {self.name} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.pid:
            # domains first: a QEMU left running would keep the namespace (and its mounts) alive
            for dom in self.virsh("list", "--name", check=False).stdout.split():
                self.virsh("destroy", dom, check=False)
        for proc in (self.relay, self.proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)  # libvirtd may linger on SIGTERM; its domains are gone already
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.ram_dir, ignore_errors=True)
        if self.pid:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            os.kill(self.pid, 9)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs if p.exists())


DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  {memory_backing}
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {disk}
    <memballoon model='none'/>
  </devices>
</domain>
"""

DISK_XML = """<disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>"""


# Guest RAM in a shared file under memory_backing_dir, so a test can fill it.
FILE_BACKED_RAM = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"


def qemu_tls_files(pki_dir: Path, name: str, folder: Path) -> Path:
    """The files libvirt hands QEMU for TLS migrations, from the relays' CA and this host's certificate.

    migrelay's certificates serve as server and client, so one pair fills both roles.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki_dir / "ca.pem", folder / "ca-cert.pem")
    for role in ("server", "client"):
        shutil.copy(pki_dir / f"{name}.pem", folder / f"{role}-cert.pem")
        shutil.copy(pki_dir / f"{name}-key.pem", folder / f"{role}-key.pem")
    return folder


def domain_xml(name: str, memory_mib: int = 96, disk: bool = False, file_ram: bool = False) -> str:
    return DOMAIN_XML.format(
        name=name,
        memory_mib=memory_mib,
        disk=DISK_XML.format(name=name) if disk else "",
        memory_backing=FILE_BACKED_RAM if file_ram else "",
    )


def fill_guest_ram(host: LibvirtHost, mib: int) -> None:
    """Random bytes into a running file-backed guest's RAM (above the first MiB, which the BIOS uses)."""
    files = [p for p in host.ram_dir.rglob("*") if p.is_file()]
    assert len(files) == 1, f"expected one guest RAM file under {host.ram_dir}: {files}"
    with files[0].open("r+b") as f:
        f.seek(1 << 20)
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def overlay_uris(peer: str, migration: str = "migration.sock", nbd: str = "nbd.sock") -> list[str]:
    """The three URIs of the seed's UNIX-socket migration, through the overlay."""
    return [
        "--desturi",
        f"qemu+unix:///system?socket={SOCKET_DIR}/{peer}/libvirt.sock",
        "--migrateuri",
        f"unix://{SOCKET_DIR}/{peer}/{migration}",
        "--disks-uri",
        f"unix://{SOCKET_DIR}/{peer}/{nbd}",
    ]


def relay_config(root: Path, name: str, peer: str, pki_dir: Path, port: int, peer_port: int, metrics: int) -> Path:
    """A relay of one libvirt host: the overlay at the hosts' common SOCKET_DIR, TLS to the peer's port."""
    cfg = Config(
        name=name,
        socket_dir=Path(SOCKET_DIR),
        listen=(Address("tls", host="127.0.0.1", port=port),),
        libvirt=Path(LIBVIRT_SOCK),
        tls=loopback.tls_files(pki_dir, name),
        metrics_listen=HostPort("127.0.0.1", metrics),
        peers={peer: PeerConfig(peer, Address("tls", host="127.0.0.1", port=peer_port))},
    )
    return loopback.write(cfg, root / f"{name}-relay.toml")


DISK_MIB = 64


@dataclass
class Cluster:
    a: LibvirtHost
    b: LibvirtHost
    root: Path
    metrics_a: int

    def connections(self, channel: str) -> float:
        labels = frozenset({"peer": "hvB", "channel": channel, "result": "ok"}.items())
        return scrape(self.metrics_a).get(("migrelay_connections_total", labels), 0.0)

    def define_disk(self, host: LibvirtHost, name: str, fill: bool) -> Path:
        image = host.path(f"/var/lib/libvirt/images/{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{DISK_MIB}M"], check=True)
        if fill:  # data the copy must carry: 16 MiB of a pattern, in several places
            for offset in (0, 20, 40):
                subprocess.run(
                    ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{offset + 17:x} {offset}M 5M", str(image)],
                    check=True,
                    capture_output=True,
                )
        return image


def start_transient(c: Cluster, name: str, disk: bool = False, file_ram: bool = False) -> None:
    xml = c.root / f"{name}.xml"
    xml.write_text(domain_xml(name, disk=disk, file_ram=file_ram))
    c.a.virsh("create", str(xml))


def state(host: LibvirtHost, name: str) -> str:
    result = host.virsh("domstate", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else "absent"


def settled_state(host: LibvirtHost, name: str, want: str, within: float = 30) -> str:
    """The domain's state once it is `want`, or whatever it is after `within` seconds: after an
    aborted migration the destination's libvirtd tears its paused copy down a moment after
    the source has already returned."""
    deadline = time.monotonic() + within
    while (now := state(host, name)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def persistent(host: LibvirtHost, name: str) -> bool:
    return "Persistent:     yes" in host.virsh("dominfo", name).stdout


def migrate(c: Cluster, *args: str, timeout: float = 240) -> None:
    result = c.a.virsh("migrate", *args, check=False, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"virsh migrate failed: {result.stderr}\n{c.a.dump_logs()}\n{c.b.dump_logs()}")


def disks_identical(c: Cluster, name: str) -> None:
    src = c.a.path(f"/var/lib/libvirt/images/{name}.qcow2")
    dst = c.b.path(f"/var/lib/libvirt/images/{name}.qcow2")
    # -U: both images are still open by running (or paused) guests
    compare = subprocess.run(["qemu-img", "compare", "-U", str(src), str(dst)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def cleanup(c: Cluster, name: str) -> None:
    for host in (c.a, c.b):
        host.virsh("destroy", name, check=False)
        host.virsh("undefine", name, check=False)
