"""`migrelay serve` under systemd-socket-activate takes over the peer port systemd bound.

Why it matters: with migrelay.socket, systemd owns the port and peers' connections queue
across a relay restart instead of failing; a relay that rebinds instead (or ignores a
passed socket) breaks that promise, and one that silently ignores an unexpected socket
hides a misconfiguration.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from tests.e2e.procs import need, serve
from tests.support import connect, listen, make_pki, pair_configs, recv_stream, send_stream


def socket_activated(config: Path, address: str, notify: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            address,
            "-E",
            f"NOTIFY_SOCKET={notify}",
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_socket_activation(tmp_path: Path) -> None:
    need("systemd-socket-activate")
    p = make_pki(tmp_path)
    _, b = pair_configs(tmp_path, p, "tls")
    address = f"{b.listen[0].host}:{b.listen[0].port}"
    notify_path = tmp_path / "notify-b.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    relay_b = socket_activated(tmp_path / "hvB.toml", address, notify_path)
    try:
        # systemd-socket-activate starts the service on the first connection: hvA's stream is it
        with serve(tmp_path / "hvA.toml"):

            async def stream() -> None:
                os.makedirs(tmp_path / "hvB/hvB", exist_ok=True)
                dest = await listen(tmp_path / "hvB/hvB/migration.sock")
                sock = await connect(tmp_path / "hvA/hvB/migration.sock")
                result: dict[str, object] = {}

                async def far() -> None:
                    conn, _ = await dest.accept()
                    result["far"] = await recv_stream(conn)
                    conn.close()

                async with trio.open_nursery() as n:
                    n.start_soon(far)
                    result["sent"] = await send_stream(sock, 1, 8 << 20)
                assert result["far"] == (8 << 20, result["sent"])
                sock.close()

            trio.run(stream)
        assert b"READY=1" in notify.recv(4096)
    finally:
        relay_b.terminate()
        out, _ = relay_b.communicate(timeout=15)
        notify.close()
    assert b"using the socket-activated listener for 127.0.0.1:" in out, out


def test_an_unexpected_passed_socket_is_an_error(tmp_path: Path) -> None:
    need("systemd-socket-activate")
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    proc = socket_activated(tmp_path / "hvB.toml", "127.0.0.1:1", tmp_path / "unused.sock")
    # the service starts at the first connection to the (wrong) passed socket
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", 1), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert b"that no [relay] listen entry names" in out, out
