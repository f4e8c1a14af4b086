"""Sessions through the control socket: fresh per-migration sockets, closing, idle expiry, access."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from relay.core.errors import ControlError
from relay.tools.control_client import request
from tests.integration.conftest import counted, echo_server, eventually, roundtrip, running
from tests.support import Pki, connect, listen, pair_configs


@pytest.fixture
def patient_autojump() -> trio.abc.Clock:
    """Virtual time that jumps only after 50 ms of real idleness, so real loopback I/O still happens."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def ask(path: Path, op: str, **args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: request(path, op, 10.0, **args))


async def test_session_open_stream_close(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        session = await ask(a.control_path, "open", peer="hvB")
        assert isinstance(session, dict)
        sid = session["id"]
        assert session["migrateuri"] == f"unix://{tmp_path}/hvA/hvB/hvA_{sid}-migration.sock"
        assert session["disks_uri"] == f"unix://{tmp_path}/hvA/hvB/hvA_{sid}-nbd.sock"
        assert session["desturi"] == f"qemu+unix:///system?socket={tmp_path}/hvA/hvB/libvirt.sock"
        # the destination hypervisor listens on the same name in hvB's own folder
        servers.start_soon(echo_server, await listen(tmp_path / f"hvB/hvB/hvA_{sid}-migration.sock"), servers)
        await roundtrip(tmp_path / f"hvA/hvB/hvA_{sid}-migration.sock", 1, 3 << 20)
        labels = {"peer": "hvB", "channel": "migration", "direction": "tx"}
        await eventually(lambda: counted(ra, "migrelay_bytes_total", **labels) == 3 << 20)
        listed = await ask(a.control_path, "list")
        assert [s["id"] for s in listed] == [sid]
        await ask(a.control_path, "close", id=sid)
        await eventually(lambda: not (tmp_path / f"hvA/hvB/hvA_{sid}-migration.sock").exists())
        assert not (tmp_path / f"hvA/hvB/hvA_{sid}-nbd.sock").exists()
        assert await ask(a.control_path, "list") == []
        servers.cancel_scope.cancel()


async def test_two_sessions_to_one_peer_at_once(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b), trio.open_nursery() as servers:
        ids = []
        for _ in range(2):
            session = await ask(a.control_path, "open", peer="hvB")
            assert isinstance(session, dict)
            ids.append(session["id"])
            servers.start_soon(echo_server, await listen(tmp_path / f"hvB/hvB/hvA_{ids[-1]}-migration.sock"), servers)
        assert len(set(ids)) == 2
        async with trio.open_nursery() as clients:
            for i, sid in enumerate(ids):
                clients.start_soon(roundtrip, tmp_path / f"hvA/hvB/hvA_{sid}-migration.sock", i, 8 << 20)
        servers.cancel_scope.cancel()


async def test_idle_sessions_expire_busy_ones_do_not(tmp_path: Path, p: Pki, patient_autojump: trio.abc.Clock) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    idle_s = a.session_idle_s
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        assert ra.control is not None
        idle = await ra.control.open("hvB")
        busy = await ra.control.open("hvB")
        conns: list[trio.socket.SocketType] = []
        # bound before the client connects: trio binds unix sockets in a thread, and a connection
        # arriving between bind() and listen() is refused ("nothing listens")
        listener = await listen(tmp_path / f"hvB/hvB/hvA_{busy.id}-migration.sock")

        async def hold_open() -> None:  # a far end that keeps the stream running
            conn, _ = await listener.accept()
            conns.append(conn)
            await trio.sleep_forever()

        servers.start_soon(hold_open)
        client = await connect(busy.sockets["migration.sock"])
        await client.send(b"x")
        await eventually(lambda: busy.activity.active == 1)
        await trio.sleep(idle_s - 1)
        assert set(ra.control.sessions) == {idle.id, busy.id}
        await trio.sleep(2)
        assert set(ra.control.sessions) == {busy.id}
        assert not idle.sockets["migration.sock"].exists()
        client.close()
        await trio.sleep(idle_s + 1)
        # half-open (the far end has not ended its direction) is still a running stream
        assert set(ra.control.sessions) == {busy.id}
        conns[0].close()
        await eventually(lambda: busy.activity.active == 0)
        await trio.sleep(idle_s + 1)
        assert ra.control.sessions == {}
        servers.cancel_scope.cancel()


async def test_control_errors(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b):
        with pytest.raises(ControlError, match=r"unknown peer 'hvX' \(configured: hvB\)"):
            await ask(a.control_path, "open", peer="hvX")
        with pytest.raises(ControlError, match="no session 'nope'"):
            await ask(a.control_path, "close", id="nope")
        with pytest.raises(ControlError, match="unknown op 'explode'"):
            await ask(a.control_path, "explode")
    async with running(b):  # hvB has no address for hvA: it cannot dial it
        with pytest.raises(ControlError, match="has no address"):
            await ask(b.control_path, "open", peer="hvA")
    with pytest.raises(ControlError, match="is migrelay serve running"):
        await ask(a.control_path, "list")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
async def test_control_socket_is_root_only(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    os.chmod(tmp_path, 0o755)
    async with running(a, b):
        code = (
            "import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX);"
            f"s.connect({str(a.control_path)!r})"
        )
        result = await trio.run_process([sys.executable, "-c", code], capture_stderr=True, check=False)
        assert result.returncode != 0 and b"Permission denied" in result.stderr
