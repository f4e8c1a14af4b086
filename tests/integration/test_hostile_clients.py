"""Local clients of the relay's own endpoints end their own connection, never the relay.

A Prometheus scraper, a port scanner or a confused script talks to /metrics; none of
them may end the daemon and, with it, every migration in flight.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from relay import config
from tests.integration.test_hostile_peers import with_good_stream_in_flight
from tests.integration.test_relays import running
from tests.support import Pki, add_metrics, make_pki, pair_configs, scrape


@pytest.fixture
def p(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


async def reset_after(port: int, data: bytes) -> None:
    """Send `data` to 127.0.0.1:port, then reset the connection (SO_LINGER 0: RST, not FIN)."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    await sock.send(data)
    await trio.sleep(0.05)  # let the relay start reading before the reset arrives
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("data", [b"GET /metr", b"", b"\x16\x03\x01\x02\x00\x01"])
async def test_metrics_client_that_resets_mid_request(tmp_path: Path, p: Pki, data: bytes) -> None:
    a, _ = pair_configs(tmp_path, p, "tls")
    port = add_metrics(tmp_path / "hvB.toml")
    b = config.load(tmp_path / "hvB.toml")
    async with running(a, b):

        async def attack() -> None:
            for _ in range(20):
                await reset_after(port, data)
            # the endpoint still answers
            assert await trio.to_thread.run_sync(scrape, port)

        await with_good_stream_in_flight(tmp_path, attack)
