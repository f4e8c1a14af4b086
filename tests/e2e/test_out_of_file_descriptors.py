"""A relay out of file descriptors fails the connections it cannot serve, and lives on.

Why it matters: a hypervisor under load (many guests, many multifd channels) or a flood
of connections can exhaust a relay's fd table. Every step of setting up a forwarded
connection needs an fd (accept, the duplicate the data path reads through, the dial to
the peer, the connect to the target): each one failing must cost that connection only,
and once fds are free again the relay must serve as before, with none leaked.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.e2e.procs import ServeProcess, serve
from tests.support import make_pki, pair_configs

CLIENT_WAIT_S = 2.0
# every step of a connection's setup, and then some: accept, dial, dup, target, pipes
EXTRA_FDS = range(0, 8)


def open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


@contextlib.contextmanager
def fd_limit(pid: int, extra: int) -> Iterator[None]:
    """Let process `pid` open only `extra` more fds (the soft RLIMIT_NOFILE, set from outside)."""
    used = open_fds(pid)
    free = [n for n in range(max(used) + extra + 2) if n not in used]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[extra], hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def echo_target(path: Path, stop: threading.Event) -> threading.Thread:
    """The destination hypervisor: echoes whatever each connection sends."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(64)
    listener.settimeout(0.1)

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(data)

    def loop() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def try_client(path: Path) -> socket.socket:
    """Connect and send a line; the relay may fail it (EOF), serve it (echo) or leave it waiting."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(CLIENT_WAIT_S)
    # a failed connection may be closed before the line is even sent (EPIPE)
    with contextlib.suppress(OSError):
        sock.connect(str(path))
        sock.sendall(b"ping\n")
        sock.recv(16)
    return sock


def echo_once(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def settle(relay: ServeProcess, baseline: set[int]) -> set[int]:
    deadline = time.monotonic() + 10
    while (now := open_fds(relay.proc.pid)) - baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_out_of_file_descriptors(tmp_path: Path) -> None:
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    stop = threading.Event()
    source = tmp_path / "hvA/hvB/migration.sock"
    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml") as (a, b):
        echo_target(tmp_path / "hvB/hvB/migration.sock", stop)
        try:
            assert echo_once(source, b"warm-up") == b"warm-up"  # TLS session ticket, lazy imports
            baselines = {r.config.name: open_fds(r.proc.pid) for r in (a, b)}
            for starved in (a, b):
                for extra in EXTRA_FDS:
                    with fd_limit(starved.proc.pid, extra):
                        clients = [try_client(source) for _ in range(3)]
                    for c in clients:
                        c.close()
                    for relay in (a, b):
                        assert relay.proc.poll() is None, (
                            f"{relay.config.name} died with {extra} fds to spare on {starved.config.name}:\n"
                            + relay.output()
                        )
            time.sleep(0.5)  # a relay that failed in its last step would be exiting now
            for relay in (a, b):
                assert relay.proc.poll() is None, f"{relay.config.name} died:\n{relay.output()}"
            payload = os.urandom(1 << 20)
            assert echo_once(source, payload) == payload
            for relay in (a, b):
                leaked = settle(relay, baselines[relay.config.name]) - baselines[relay.config.name]
                assert not leaked, f"{relay.config.name} leaked fds {sorted(leaked)}"
        finally:
            stop.set()
    assert "Too many open files" in a.output() + b.output()


def test_a_watchdog_ping_while_out_of_fds_does_not_end_the_daemon(tmp_path: Path) -> None:
    """systemd/migrelay.service sets WatchdogSec=30s: the relay pings every 15 s. A ping that
    needed an fd of its own (a socket per message, as it once did) failed with EMFILE when the
    table was full, outside every guard: `migrelay serve` exited and took every migration in
    flight with it. The notify socket is now opened once, and a ping that cannot go is logged.
    """
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    with serve(tmp_path / "hvB.toml", env={"WATCHDOG_USEC": "1000000"}) as (b,):  # a ping every 0.5 s
        pid = b.proc.pid
        # the lowest free fd, sampled a few times: each ping holds one more fd for a moment
        first_free = 1 << 20
        for _ in range(5):
            used = open_fds(pid)
            first_free = min(first_free, min(n for n in range(max(used) + 2) if n not in used))
            time.sleep(0.05)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (first_free, hard))  # no fd left, for 2 s
        time.sleep(2)
        status = b.proc.poll()
        if status is None:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert status is None, f"the relay exited with {status}:\n{b.output()[-400:]}"
