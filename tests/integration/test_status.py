"""What the control socket's status tells about streams in flight and about each peer.

Why it matters: during a migration the operator's first question is "is it moving, and
through which relay?"; after a failure, "could this relay reach its peer, and when did it
last?". The answer must be exact for the stream (bytes as the pumps moved them, the same
stream id on both relays) and must not outlive the stream.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from relay.core.config import Transport
from relay.core.errors import ControlError
from relay.daemon.server import Daemon
from relay.tools.control_client import request
from tests.integration.conftest import eventually
from tests.integration.test_sessions import ask
from tests.support import Pki, connect, listen, pair_configs

TO_B = 3 << 20  # bytes the source's client sends
TO_A = 1 << 20  # bytes the destination sends back


def status(relay: Daemon) -> dict[str, Any]:
    assert relay.control is not None
    return relay.control.status()


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def read_exactly(sock: trio.socket.SocketType, size: int) -> None:
    while size:
        chunk = await sock.recv(min(size, 1 << 20))
        assert chunk, "closed early"
        size -= len(chunk)


@pytest.mark.parametrize("transport", ["tls", "unix"])
async def test_a_stream_in_flight_on_both_relays(tmp_path: Path, p: Pki, transport: Transport) -> None:
    a, b = pair_configs(tmp_path, p, transport)
    async with trio.open_nursery() as nursery:
        ra = await nursery.start(Daemon(a).run)
        rb = await nursery.start(Daemon(b).run)
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        client = await connect(tmp_path / "hvA/hvB/migration.sock")
        with trio.fail_after(10):
            far, _ = await dest.accept()
            async with trio.open_nursery() as both_ways:
                both_ways.start_soon(send_all, client, b"x" * TO_B)
                both_ways.start_soon(send_all, far, b"y" * TO_A)
                both_ways.start_soon(read_exactly, far, TO_B)
                both_ways.start_soon(read_exactly, client, TO_A)

        def one_stream(relay: Daemon) -> dict[str, Any]:
            streams = status(relay)["streams"]
            assert len(streams) == 1, streams
            stream: dict[str, Any] = streams[0]
            return stream

        # exact counts, no batching: the pumps add each chunk to the meter just after sending it
        await eventually(lambda: (one_stream(ra)["tx_bytes"], one_stream(ra)["rx_bytes"]) == (TO_B, TO_A))
        await eventually(lambda: (one_stream(rb)["tx_bytes"], one_stream(rb)["rx_bytes"]) == (TO_A, TO_B))
        out, into = one_stream(ra), one_stream(rb)
        # the peer's totals too, though its byte counters take a stream's bytes 16 MiB at a time
        totals = status(ra)["peers"]["hvB"]
        assert (totals["bytes_tx"], totals["bytes_rx"], totals["active_streams"]) == (TO_B, TO_A, 1)
        assert {k: out[k] for k in ("peer", "socket", "channel", "direction")} == {
            "peer": "hvB",
            "socket": "migration.sock",
            "channel": "migration",
            "direction": "outbound",
        }
        assert {k: into[k] for k in ("peer", "socket", "channel", "direction")} == {
            "peer": "hvA",
            "socket": "migration.sock",
            "channel": "migration",
            "direction": "inbound",
        }
        assert out["id"] == into["id"]  # the source's id: one stream, one number in both relays' logs
        await trio.sleep(0.2)
        snapshot = await ask(a.control_path, "status")  # as the CLI gets it, over the socket
        [shown] = snapshot["streams"]
        assert shown["age_s"] >= out["age_s"] + 0.2
        assert abs(shown["started_at"] - out["started_at"]) < 0.01  # one start, whenever it is asked
        # the stream ends: it leaves the status of both relays
        client.close()
        far.close()
        await eventually(lambda: status(ra)["streams"] == [] and status(rb)["streams"] == [])
        totals = status(ra)["peers"]["hvB"]
        assert (totals["bytes_tx"], totals["bytes_rx"], totals["active_streams"]) == (TO_B, TO_A, 0)
        ra.stop()
        rb.stop()


async def test_each_peer_last_dial_and_last_handshake(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as b_nursery:
            rb = await b_nursery.start(Daemon(b).run)
            before = time.time()
            ra = await nursery.start(Daemon(a).run)
            # hvA probes its peers as it starts (relay/daemon/probe.py): a dial, and a handshake
            await eventually(lambda: status(ra)["peers"]["hvB"]["last_dial"] == "up")
            probed = status(ra)["peers"]["hvB"]
            assert before <= probed["last_dial_at"] == probed["last_handshake_at"] <= time.time()
            # hvB never dials hvA (it has no address for it), and a probe is no stream: nothing yet
            never = {"last_dial": "never", "last_dial_at": None, "last_dial_error": None, "last_handshake_at": None}
            assert {k: status(rb)["peers"]["hvA"][k] for k in never} == never

            # hvB answers with a refusal (nothing listens on its nbd.sock): it is up all the same
            before = time.time()
            refused = await connect(tmp_path / "hvA/hvB/nbd.sock")
            assert await refused.recv(1) == b""
            refused.close()
            hvb = status(ra)["peers"]["hvB"]
            assert hvb["last_dial"] == "up" and hvb["last_dial_error"] is None
            assert before <= hvb["last_dial_at"] == hvb["last_handshake_at"] <= time.time()
            # hvB never dials hvA (it has no address for it), but it saw the handshake
            hva = status(rb)["peers"]["hvA"]
            assert hva["last_dial"] == "never" and before <= hva["last_handshake_at"] <= time.time()
            rb.stop()

        # hvB is gone: the next dial fails, and the last handshake is still the one before
        failed = await connect(tmp_path / "hvA/hvB/migration.sock")
        assert await failed.recv(1) == b""
        failed.close()
        down = status(ra)["peers"]["hvB"]
        assert down["last_dial"] == "down" and down["last_dial_at"] > hvb["last_dial_at"]
        error = down["last_dial_error"]
        assert error.startswith(f"cannot reach hvB at {a.peers['hvB'].address}: ") and "Connection refused" in error
        assert down["last_handshake_at"] == hvb["last_handshake_at"]
        ra.stop()


def test_a_relay_gone_mid_request_is_a_control_error(tmp_path: Path) -> None:
    """What `status --watch` sees when the relay stops while it asks: an error it can show, not a crash."""
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)

        def hang_up_unread() -> None:
            conn, _ = server.accept()
            time.sleep(0.2)  # the request has arrived, unread: closing now resets the client
            conn.close()

        stopping = threading.Thread(target=hang_up_unread)
        stopping.start()
        expected = f"the relay's control socket {path} failed mid-request: "
        with pytest.raises(ControlError, match=f"^{re.escape(expected)}"):
            request(path, "status", 5.0)
        stopping.join()
