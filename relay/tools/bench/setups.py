"""The forwarder pairs under test. Each turns an entry unix socket into a sink unix socket.

Every pair mirrors a migration's path: source hypervisor -> unix -> forwarder A -> peer
transport -> forwarder B -> unix -> destination hypervisor. TLS pairs use TLS 1.3 with
mutual authentication against one CA, like migrelay.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, get_args

from relay.core import config
from relay.core.config import DATA_PATHS, DataPath, Transport
from relay.daemon.datapath import hotloop
from relay.daemon.net import free_port
from relay.tools import loopback, pki

START_TIMEOUT_S: Final = 20.0
SOCAT_BUFFER_BYTES: Final = 262144


@dataclass
class Setup:
    """A started pair: clients connect to `entry`; the sink must listen on `sink`."""

    name: str
    kind: str  # "tls", "plain" or "direct": which baseline a figure compares against
    entry: Path
    sink: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    peer_port: tuple[str, int] | None = None  # a migrelay pair's TLS/tcp port, for the flood bench

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = None if env is None else {**os.environ, **env}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def wait_for(path: Path, procs: list[subprocess.Popen[bytes]], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what} exited with status {p.returncode} (its log is beside its config)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path} within {START_TIMEOUT_S:.0f}s")
        time.sleep(0.05)


def make_pki(root: Path) -> Path:
    d = root / "pki"
    if not (d / "ca.pem").exists():
        pki.init_ca(d)
        for name in ("hvA", "hvB"):
            pki.issue(d, name)
            # HAProxy wants certificate and key in one file
            (d / f"{name}-combined.pem").write_bytes(
                (d / f"{name}.pem").read_bytes() + (d / f"{name}-key.pem").read_bytes()
            )
    return d


def direct(root: Path) -> Setup:
    """No forwarder: the ceiling of this machine's unix sockets and load generator."""
    path = root / "direct-sink.sock"
    return Setup("direct", "direct", path, path)


def socat(root: Path, transport: str) -> Setup:
    name = f"socat-{transport}"
    entry, sink = root / f"{name}-in.sock", root / f"{name}-sink.sock"
    b = ["-b", str(SOCAT_BUFFER_BYTES)]
    if transport == "tcp":
        port = free_port()
        a_cmd = ["socat", *b, f"UNIX-LISTEN:{entry},fork", f"TCP:127.0.0.1:{port},nodelay"]
        b_cmd = ["socat", *b, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay", f"UNIX-CONNECT:{sink}"]
        ready = None
    else:
        mid = root / f"{name}-mid.sock"
        a_cmd = ["socat", *b, f"UNIX-LISTEN:{entry},fork", f"UNIX-CONNECT:{mid}"]
        b_cmd = ["socat", *b, f"UNIX-LISTEN:{mid},fork", f"UNIX-CONNECT:{sink}"]
        ready = mid
    procs = [spawn(b_cmd, root / f"{name}-b.log")]
    if ready is not None:
        wait_for(ready, procs, name)
    else:
        time.sleep(0.3)
    procs.append(spawn(a_cmd, root / f"{name}-a.log"))
    wait_for(entry, procs, name)
    return Setup(name, "plain", entry, sink, procs)


def socat_tls(root: Path) -> Setup:
    """socat with OpenSSL on both ends, mutual authentication: the usual hand-made TLS pipe."""
    d = make_pki(root)
    entry, sink, port = root / "socat-tls-in.sock", root / "socat-tls-sink.sock", free_port()
    b = ["-b", str(SOCAT_BUFFER_BYTES)]
    server = [
        "socat",
        *b,
        f"OPENSSL-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,cert={d}/hvB.pem,key={d}/hvB-key.pem,"
        f"cafile={d}/ca.pem,verify=1",
        f"UNIX-CONNECT:{sink}",
    ]
    client = [
        "socat",
        *b,
        f"UNIX-LISTEN:{entry},fork",
        f"OPENSSL:127.0.0.1:{port},cert={d}/hvA.pem,key={d}/hvA-key.pem,cafile={d}/ca.pem,commonname=hvB",
    ]
    procs = [spawn(server, root / "socat-tls-b.log")]
    time.sleep(0.3)
    procs.append(spawn(client, root / "socat-tls-a.log"))
    wait_for(entry, procs, "socat-tls")
    return Setup("socat-tls", "tls", entry, sink, procs)


def stunnel(root: Path) -> Setup:
    d = make_pki(root)
    entry, sink, port = root / "stunnel-in.sock", root / "stunnel-sink.sock", free_port()
    common = f"foreground = yes\npid =\nsslVersionMin = TLSv1.3\nCAfile = {d}/ca.pem\nverifyChain = yes\n"
    (root / "stunnel-a.conf").write_text(
        f"{common}[a]\nclient = yes\naccept = {entry}\nconnect = 127.0.0.1:{port}\n"
        f"cert = {d}/hvA.pem\nkey = {d}/hvA-key.pem\ncheckHost = hvB\n"
    )
    (root / "stunnel-b.conf").write_text(
        f"{common}[b]\naccept = 127.0.0.1:{port}\nconnect = {sink}\ncert = {d}/hvB.pem\nkey = {d}/hvB-key.pem\n"
        "requireCert = yes\n"
    )
    procs = [spawn(["stunnel4", str(root / f"stunnel-{s}.conf")], root / f"stunnel-{s}.log") for s in "ba"]
    wait_for(entry, procs, "stunnel")
    time.sleep(0.3)  # the TCP side of B
    return Setup("stunnel", "tls", entry, sink, procs)


def haproxy(root: Path, tls: bool) -> Setup:
    d = make_pki(root)
    name = "haproxy-tls" if tls else "haproxy-tcp"
    entry, sink, port = root / f"{name}-in.sock", root / f"{name}-sink.sock", free_port()
    common = (
        "global\n  maxconn 1000\n"
        "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n"
    )
    client_tls = f" ssl crt {d}/hvA-combined.pem ca-file {d}/ca.pem verify required verifyhost hvB" if tls else ""
    server_tls = f" ssl crt {d}/hvB-combined.pem ca-file {d}/ca.pem verify required ssl-min-ver TLSv1.3" if tls else ""
    (root / f"{name}-a.cfg").write_text(
        f"{common}frontend in\n  bind unix@{entry}\n  default_backend out\n"
        f"backend out\n  server b 127.0.0.1:{port}{client_tls}\n"
    )
    (root / f"{name}-b.cfg").write_text(
        f"{common}frontend in\n  bind 127.0.0.1:{port}{server_tls}\n  default_backend out\n"
        f"backend out\n  server sink unix@{sink}\n"
    )
    procs = [spawn(["haproxy", "-db", "-f", str(root / f"{name}-{s}.cfg")], root / f"{name}-{s}.log") for s in "ba"]
    wait_for(entry, procs, name)
    time.sleep(0.3)
    return Setup(name, "tls" if tls else "plain", entry, sink, procs)


def migrelay(root: Path, transport: Transport, data_path: DataPath | None = None, python_loops: bool = False) -> Setup:
    """A migrelay pair; `data_path` None: the default, else named in the setup ("migrelay-tls-threads").

    `python_loops`: the threaded data path's loops in Python, not compiled ("...-threads-python").
    """
    d = make_pki(root)
    name = f"migrelay-{transport}" if data_path is None else f"migrelay-{transport}-{data_path}"
    name += "-python" if python_loops else ""
    env = {hotloop.PYTHON_LOOPS_ENV: "1"} if python_loops else None
    base = root / name
    base.mkdir(exist_ok=True)
    chosen = {} if data_path is None else {"data_path": data_path}
    a_conf, b_conf = loopback.write_pair(base, d, transport, channels=("bench.sock",), **chosen)
    cmd = [sys.executable, "-m", "relay", "--log-level", "warning", "serve", "--config"]
    procs = [spawn([*cmd, str(conf)], conf.with_suffix(".log"), env) for conf in (b_conf, a_conf)]
    wait_for(base / "hvA" / "hvB" / "bench.sock", procs, name)
    wait_for(base / "hvB" / "control.sock", procs, name)
    listen = config.load(b_conf).listen[0]
    return Setup(
        name,
        "tls" if transport == "tls" else "plain",
        base / "hvA/hvB/bench.sock",
        base / "hvB/hvB/bench.sock",
        procs,
        (listen.host, listen.port) if listen.kind != "unix" else None,
    )


def missing_tools() -> list[str]:
    return [t for t in ("socat", "stunnel4", "haproxy") if shutil.which(t) is None]


ALL: Final = (
    "direct",
    "socat-tcp",
    "socat-unix",
    "stunnel",
    "haproxy-tls",
    "haproxy-tcp",
    "migrelay-tls",
    "migrelay-tcp",
    "migrelay-unix",
)
# Not run unless named (--setups): each data path of a migrelay pair, and the threaded one with
# its loops in Python, for A/Bs (bench/README.md, "Threads per stream", "Compiled loops").
VARIANTS: Final = tuple(f"migrelay-{t}-{p}" for t in get_args(Transport) for p in (*DATA_PATHS, "threads-python"))


def start(name: str, root: Path) -> Setup:
    if name == "direct":
        return direct(root)
    if name == "socat-tls":  # the migration rows' baseline, not in ALL
        return socat_tls(root)
    if name.startswith("socat-"):
        return socat(root, name.removeprefix("socat-"))
    if name == "stunnel":
        return stunnel(root)
    if name.startswith("haproxy-"):
        return haproxy(root, name == "haproxy-tls")
    for transport in get_args(Transport):
        if name == f"migrelay-{transport}":
            return migrelay(root, transport)
        for data_path in DATA_PATHS:
            if name == f"migrelay-{transport}-{data_path}":
                return migrelay(root, transport, data_path)
        if name == f"migrelay-{transport}-threads-python":
            return migrelay(root, transport, "threads", python_loops=True)
    raise ValueError(f"unknown setup {name!r} (known: {', '.join(ALL + VARIANTS)})")
