"""Local clients of the relay's own endpoints end their own connection, never the relay.

A Prometheus scraper, a port scanner or a confused script talks to /metrics; none of
them may end the daemon and, with it, every migration in flight.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from relay.core import config
from relay.daemon.metrics import HTTP_ANSWER_TIMEOUT_S, MAX_HTTP_CONNECTIONS
from tests.integration.conftest import counted, running, with_good_stream_in_flight
from tests.support import Pki, add_metrics, make_pki, pair_configs, scrape


def open_fds() -> int:
    """This process's fds: the in-process relay's and the test's own."""
    return len(os.listdir("/proc/self/fd"))


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


async def test_a_metrics_client_that_never_reads_does_not_hold_its_connection(tmp_path: Path) -> None:
    """A body larger than the socket buffers take (68 KiB here: what a relay in a 16-host cluster
    exposes once every peer has used every channel) blocks its send for as long as the client
    keeps its window shut. Anyone who can reach [metrics] listen (127.0.0.1: every local user,
    the QEMU user included) could so pin relay fds without limit. Now at most
    MAX_HTTP_CONNECTIONS are held, each for HTTP_ANSWER_TIMEOUT_S after its request at most.
    """
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    port = add_metrics(tmp_path / "hvB.toml")
    b = config.load(tmp_path / "hvB.toml")
    async with running(b) as (rb,):
        for i in range(15):
            for ch in ("libvirt", "migration", "nbd"):
                for d in ("tx", "rx"):
                    rb.metrics.bytes.labels(f"hv{i}", ch, d).inc(123456789)
                for r in ("ok", "refused", "failed"):
                    rb.metrics.connections.labels(f"hv{i}", ch, r).inc()
                    rb.metrics.streams_closed.labels(f"hv{i}", ch, r).inc()
                rb.metrics.active.labels(f"hv{i}", ch).set(0)
        assert len(rb.metrics.render()[0]) > 60_000
        clients = []
        before = open_fds()
        for _ in range(30):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the smallest window the kernel allows
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
            clients.append(s)
        await trio.sleep(1)
        # each newcomer over the cap was refused, or took the slot of one idling (its request
        # not read yet, or its answer all in the kernel's buffers): none waits unanswered
        states = [_state(s) for s in clients]
        assert "waiting" not in states, states
        assert counted(rb, "migrelay_refused_total", reason="metrics_connections") <= states.count("closed")
        assert open_fds() - before - len(clients) <= MAX_HTTP_CONNECTIONS
        await trio.sleep(HTTP_ANSWER_TIMEOUT_S + 1)
        held = open_fds() - before - len(clients)
        for s in clients:
            s.close()
    assert held <= 0, f"{held} of 30 metrics connections still held after their answer's deadline"


def _state(s: socket.socket) -> str:
    """'answered' (a byte of the answer is here), 'closed' (EOF or a reset, no answer) or 'waiting'."""
    try:
        return "closed" if s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"" else "answered"
    except BlockingIOError:
        return "waiting"
    except ConnectionResetError:
        return "closed"
