"""What the integration tests share: relays in-process, a far end, waiting on facts, a bad peer.

Each relay runs in the test's own trio run, with real loopback sockets and real TLS.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from relay.core.config import Config
from relay.core.protocol import Reply, ReplyReader
from relay.daemon.datapath import TlsConn
from relay.daemon.forward import read_header
from relay.daemon.server import Daemon
from tests.support import Pki, connect, listen, make_pki, raw_client_context, recv_stream, send_stream


@pytest.fixture
def p(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@asynccontextmanager
async def running(*configs: Config) -> AsyncIterator[list[Daemon]]:
    async with trio.open_nursery() as nursery:
        relays = [await nursery.start(Daemon(c).run) for c in configs]
        yield relays
        for r in relays:
            r.stop()


def counted(relay: Daemon, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in relay.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until check() holds, e.g. for a meter flushed when a stream closes."""
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110  (the condition is a counter or a file, not an event)
            await trio.sleep(0.01)


async def echo_server(listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
    """The destination 'hypervisor': for each connection, read to EOF and answer with the digest."""

    async def one(conn: trio.socket.SocketType) -> None:
        with conn:
            _, digest = await recv_stream(conn)
            await conn.send(digest.encode())
            conn.shutdown(socket.SHUT_WR)

    while True:
        conn, _ = await listener.accept()
        nursery.start_soon(one, conn)


async def roundtrip(path: Path, seed: int, size: int) -> None:
    """Send through the overlay and check the far end saw exactly these bytes."""
    sock = await connect(path)
    with sock:
        digest = await send_stream(sock, seed, size)
        answer = await sock.recv(100)
        assert answer.decode() == digest


async def with_good_stream_in_flight(tmp_path: Path, body: Callable[[], Awaitable[None]]) -> None:
    """Run `body` while a stream through hvA -> hvB is half sent; then finish it and check it."""
    async with trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        await good.send(b"before the attack, ")
        await body()
        await good.send(b"after it")
        good.shutdown(socket.SHUT_WR)
        with trio.fail_after(10):
            assert (await good.recv(100)).decode() == hashlib.sha256(b"before the attack, after it").hexdigest()
        good.close()
        servers.cancel_scope.cancel()


class BadPeer:
    """Dials hvB's TLS listener directly, with any certificate, and speaks any bytes."""

    def __init__(self, b: Config, p: Pki) -> None:
        self.b, self.p = b, p

    async def open(self, cert: str = "hvA", ca_dir: Path | None = None, with_cert: bool = True) -> TlsConn:
        folder = ca_dir or self.p.dir
        if with_cert:
            ctx = raw_client_context(self.p.dir / "ca.pem", folder / f"{cert}.pem", folder / f"{cert}-key.pem")
        else:
            ctx = raw_client_context(self.p.dir / "ca.pem")
        addr = self.b.listen[0]
        sock = trio.socket.socket()
        await sock.connect((addr.host, addr.port))
        conn = TlsConn.client(sock, ctx)
        await conn.handshake()
        return conn

    async def request(self, conn: TlsConn, data: bytes) -> Reply:
        await conn.send_all(memoryview(data))
        reply = await read_header(conn, ReplyReader())
        return reply
