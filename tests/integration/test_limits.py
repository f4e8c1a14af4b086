"""[limits]: what anyone who can reach the TLS port may hold, and what a peer may run.

Each cap is set small here and exceeded while a real stream runs beside: the
connection over the cap is closed at once (before authentication) or refused with a
reason (after), counted in migrelay_refused_total{reason}, and the real stream and
the daemon are undisturbed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
from pathlib import Path

import pytest
import trio
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Limits
from relay.core.errors import STATUS_OVER_LIMIT
from relay.core.protocol import Request, encode_request
from relay.daemon.admission import Admission
from relay.daemon.server import Daemon
from relay.tools import loopback
from tests.integration.conftest import BadPeer, counted, echo_server, eventually, roundtrip, running
from tests.support import Pki, connect, listen, make_pki, pair_configs

ATTACKER = "127.0.0.2"  # loopback is a /8: the attacker gets an address of its own


def limited(tmp_path: Path, name: str, **limits: int) -> config.Config:
    path = tmp_path / f"{name}.toml"
    loopback.with_changes(path, limits=Limits(**limits))
    return config.load(path)


async def open_from(address: str, b: config.Config, first_bytes: bytes = b"") -> trio.socket.SocketType:
    port = b.listen[0]
    sock = trio.socket.socket()
    await sock.bind((address, 0))
    await sock.connect((port.host, port.port))
    if first_bytes:
        await sock.send(first_bytes)
    return sock


def admission(relay: Daemon) -> Admission:
    assert relay.context is not None
    return relay.context.admission


async def closed_at_once(sock: trio.socket.SocketType, wait_s: float = 1.0) -> bool:
    """Did the relay close this connection (within a moment)? Before authentication it says
    nothing; a handshake it had begun may have sent its first flight (read past it)."""
    with trio.move_on_after(wait_s):
        try:
            while await sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True
    return False


async def test_connections_over_the_per_address_cap_are_closed_at_once(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = pair_configs(tmp_path, p, "tls")
    b = limited(tmp_path, "hvB", unauthenticated_per_address=3)
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        held = [await open_from(ATTACKER, b) for _ in range(3)]
        await eventually(lambda: admission(rb).unauthenticated_from(ATTACKER) == 3)
        over = [await open_from(ATTACKER, b) for _ in range(3)]
        for sock in over:
            assert await closed_at_once(sock)
        assert counted(rb, "migrelay_refused_total", reason="unauthenticated_per_address") == 3
        # at most one log line a second for one reason, however many are closed
        assert len([r for r in caplog.records if "[limits] unauthenticated_per_address" in r.getMessage()]) == 1
        for sock in held:  # still held: well within handshake_timeout_s (3 s here)
            assert not await closed_at_once(sock, wait_s=0.1)
        # the cap is per address: hvA, dialling from 127.0.0.1, gets through
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1 << 20)
        for sock in held + over:
            sock.close()
        servers.cancel_scope.cancel()


def client_hello() -> bytes:
    """A real TLS ClientHello: a client that sends it and then stalls holds a handshake slot."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


@pytest.mark.parametrize(
    ("cap", "first_bytes"),
    [
        ("unauthenticated", b""),
        # a whole ClientHello, then nothing: a handshake begun and stalled
        ("handshakes", client_hello()),
    ],
)
async def test_over_an_overall_cap_the_oldest_connection_makes_room(
    tmp_path: Path, p: Pki, cap: str, first_bytes: bytes
) -> None:
    """A flood must not lock a real peer out: over the cap, the flood pays, not the newcomer."""
    a, _ = pair_configs(tmp_path, p, "tls")
    b = limited(tmp_path, "hvB", **{cap: 3})
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        oldest = [await open_from(ATTACKER, b, first_bytes) for _ in range(3)]
        await eventually(lambda: getattr(admission(rb), cap) == 3)
        newer = [await open_from(ATTACKER, b, first_bytes) for _ in range(3)]
        for sock in oldest:
            assert await closed_at_once(sock)
        for sock in newer:
            assert not await closed_at_once(sock, wait_s=0.1)
        assert getattr(admission(rb), cap) == 3
        # the real peer, one connection at a time from its own address, gets through
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 2, 1 << 20)
        assert counted(rb, "migrelay_refused_total", reason=cap) >= 3
        for sock in oldest + newer:
            sock.close()
        servers.cancel_scope.cancel()


async def test_streams_per_peer_are_refused_with_a_reason_over_the_cap(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = pair_configs(tmp_path, p, "tls")
    b = limited(tmp_path, "hvB", streams_per_peer=2)
    caplog.set_level(logging.WARNING)
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        running_streams = []
        for _ in range(2):
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            await sock.send(b"x")
            running_streams.append(sock)
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 2)
        bad = BadPeer(b, p)
        conn = await bad.open()
        reply = await bad.request(conn, encode_request(Request("hvA", "migration.sock", 99)))
        conn.close()
        assert reply.status == STATUS_OVER_LIMIT
        assert "2 streams of hvA running ([limits] streams_per_peer)" in reply.reason
        assert counted(rb, "migrelay_refused_total", reason="streams_per_peer") == 1
        for sock in running_streams:
            await sock.send(b"y")
            sock.shutdown(socket.SHUT_WR)
            assert (await sock.recv(100)).decode() == hashlib.sha256(b"xy").hexdigest()
            sock.close()
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 0)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 3, 1 << 20)
        servers.cancel_scope.cancel()


async def test_the_source_relay_caps_streams_per_peer_too(tmp_path: Path, p: Pki) -> None:
    _, b = pair_configs(tmp_path, p, "tls")
    a = limited(tmp_path, "hvA", streams_per_peer=1)
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        first = await connect(tmp_path / "hvA/hvB/migration.sock")
        await first.send(b"x")
        await eventually(lambda: counted(ra, "migrelay_active_streams") == 1)
        second = await connect(tmp_path / "hvA/hvB/migration.sock")
        assert await closed_at_once(second)
        assert counted(ra, "migrelay_refused_total", reason="streams_per_peer") == 1
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="refused") == 1
        first.shutdown(socket.SHUT_WR)
        assert (await first.recv(100)).decode() == hashlib.sha256(b"x").hexdigest()
        first.close()
        await eventually(lambda: counted(ra, "migrelay_active_streams") == 0)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 4, 1 << 20)
        servers.cancel_scope.cancel()


async def test_connections_that_fail_their_handshake_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can connect and close without a byte: a WARNING line each (as it once was) would let
    them flood the journal, and journald's own rate limit would then drop the relay's real lines
    (a failed migration's reason). At most a line a second per kind; every one is counted."""
    p = make_pki(tmp_path)
    _, b = pair_configs(tmp_path, p, "tls")
    caplog.set_level(logging.INFO)
    async with running(b):
        for _ in range(100):
            sock = await open_from("127.0.0.2", b)  # one address, well under every [limits] cap
            sock.close()
            await trio.sleep(0.002)
        await trio.sleep(0.5)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING and "failed connection from" in r.getMessage()]
    assert 1 <= len(lines) <= 5, f"{len(lines)} warning lines for 100 connect+close"
    assert "more like it not logged" in lines[-1].getMessage() or len(lines) == 1


async def test_a_trickled_client_hello_holds_no_handshake_slot(tmp_path: Path, p: Pki) -> None:
    """A slow-handshake client (its ClientHello a byte at a time) costs the relay no OpenSSL
    state and no handshake slot until its whole first record is in: it only waits, and is
    closed at handshake_timeout_s."""
    a, _ = pair_configs(tmp_path, p, "tls")
    b = limited(tmp_path, "hvB", handshakes=1)
    hello = client_hello()
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        tricklers = [await open_from(ATTACKER, b, hello[:-1]) for _ in range(5)]  # all but its last byte
        await eventually(lambda: admission(rb).unauthenticated_from(ATTACKER) == 5)
        assert admission(rb).handshakes == 0
        # the one handshake slot is free for the real peer
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 5, 1 << 20)
        assert counted(rb, "migrelay_refused_total", reason="handshakes") == 0
        for sock in tricklers:
            sock.close()
        servers.cancel_scope.cancel()
