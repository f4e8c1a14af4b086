"""One conformance suite for every pump: ordering, EOF, half-close, reset, big payloads, cancellation.

Topology: app_a <-tcp-> [end_a | relay() | end_b] <-tcp(/TLS)-> app_b. Every leg is a
real loopback TCP connection, so a reset is a real RST.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from relay import ossl
from relay.config import TlsFiles
from relay.datapath import Conn, Meter, PlainConn, StreamBroken, TlsConn, relay
from relay.tlsconfig import client_context, server_context
from tests.support import make_pki, pattern

# tls-public: the TLS pump on pyOpenSSL's public recv_into, the fallback of relay/ossl.py
VARIANTS = ["splice", "copy", "tls", "tls-public"]


async def tcp_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return client, server


@dataclass
class Harness:
    app_a: Conn
    app_b: Conn
    a_to_b: Meter
    b_to_a: Meter
    done: trio.Event
    error: list[BaseException]
    scope: trio.CancelScope


@pytest.fixture(params=VARIANTS)
async def harness(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Harness]:
    variant: str = request.param
    if variant == "tls-public":
        monkeypatch.setattr(ossl, "recv_into", ossl._recv_into_public)
    app_a_raw, end_a_raw = await tcp_pair()
    end_b_raw, app_b_raw = await tcp_pair()
    end_a: Conn = PlainConn(end_a_raw)
    end_b: Conn
    app_b: Conn
    if variant.startswith("tls"):
        p = make_pki(tmp_path)
        files = TlsFiles(p.dir / "ca.pem", p.dir / "hvA.pem", p.dir / "hvA-key.pem")
        end_b_tls = TlsConn.client(end_b_raw, client_context(files))
        app_b_tls = TlsConn.server(app_b_raw, server_context(files))
        async with trio.open_nursery() as n:
            n.start_soon(end_b_tls.handshake)
            n.start_soon(app_b_tls.handshake)
        end_b, app_b = end_b_tls, app_b_tls
    else:
        end_b, app_b = PlainConn(end_b_raw), PlainConn(app_b_raw)
    h = Harness(PlainConn(app_a_raw), app_b, Meter(), Meter(), trio.Event(), [], trio.CancelScope())

    async def run_relay() -> None:
        try:
            with h.scope:
                await relay(end_a, end_b, h.a_to_b, h.b_to_a, allow_splice=variant == "splice")
        except StreamBroken as e:
            h.error.append(e)
        finally:
            h.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        yield h
        with trio.fail_after(10):
            await h.done.wait()
        h.app_a.close()
        h.app_b.close()


async def send(conn: Conn, data: bytes, eof: bool = True) -> None:
    await conn.send_all(memoryview(data))
    if eof:
        await conn.send_eof()


async def read_all(conn: Conn) -> tuple[int, str]:
    h = hashlib.sha256()
    buf = memoryview(bytearray(1 << 20))
    total = 0
    while n := await conn.recv_into(buf):
        h.update(buf[:n])
        total += n
    return total, h.hexdigest()


async def test_large_payload_both_ways_is_byte_exact(harness: Harness) -> None:
    size = 48 << 20
    data_ab, data_ba = pattern(1, size), pattern(2, size)
    results: dict[str, tuple[int, str]] = {}

    async def reader(name: str, conn: Conn) -> None:
        results[name] = await read_all(conn)

    async with trio.open_nursery() as n:
        n.start_soon(send, harness.app_a, data_ab)
        n.start_soon(send, harness.app_b, data_ba)
        n.start_soon(reader, "b", harness.app_b)
        n.start_soon(reader, "a", harness.app_a)
    assert results["b"] == (size, hashlib.sha256(data_ab).hexdigest())
    assert results["a"] == (size, hashlib.sha256(data_ba).hexdigest())
    await harness.done.wait()
    assert not harness.error
    assert (harness.a_to_b.total, harness.b_to_a.total) == (size, size)


@pytest.mark.parametrize("first", ["a", "b"])
async def test_half_close_keeps_the_other_direction_flowing(harness: Harness, first: str) -> None:
    """EOF one way is passed on as EOF while the answer still flows back (libvirt RPC, NBD)."""
    closer, answerer = (harness.app_a, harness.app_b) if first == "a" else (harness.app_b, harness.app_a)
    await send(closer, b"request, then EOF")
    assert await read_all(answerer) == (17, hashlib.sha256(b"request, then EOF").hexdigest())
    answer = pattern(3, 3 << 20)
    await send(answerer, answer)
    assert await read_all(closer) == (len(answer), hashlib.sha256(answer).hexdigest())
    await harness.done.wait()
    assert not harness.error


async def test_reset_aborts_both_ends(harness: Harness) -> None:
    """A peer that vanishes must look like an error on the other end, never like a clean EOF."""
    await send(harness.app_a, b"x" * 1000, eof=False)
    buf = memoryview(bytearray(1000))
    got = 0
    while got < 1000:
        got += await harness.app_b.recv_into(buf[got:])
    harness.app_b.abort()
    await harness.done.wait()
    assert harness.error and isinstance(harness.error[0], StreamBroken)
    with pytest.raises(ConnectionResetError):
        while await harness.app_a.recv_into(buf):
            pass


async def test_cancellation_aborts_both_ends(harness: Harness) -> None:
    await send(harness.app_a, b"partial", eof=False)
    await trio.sleep(0.05)
    harness.scope.cancel()
    await harness.done.wait()
    buf = memoryview(bytearray(64))
    for conn in (harness.app_a,):
        with pytest.raises(ConnectionResetError):
            while await conn.recv_into(buf):
                pass


async def test_tls_truncation_is_not_eof(tmp_path: Path) -> None:
    """Over TLS, a FIN without close_notify is a truncation: the relay must not report a clean end."""
    p = make_pki(tmp_path)
    files = TlsFiles(p.dir / "ca.pem", p.dir / "hvA.pem", p.dir / "hvA-key.pem")
    app_a_raw, end_a_raw = await tcp_pair()
    end_b_raw, app_b_raw = await tcp_pair()
    end_b = TlsConn.client(end_b_raw, client_context(files))
    app_b = TlsConn.server(app_b_raw, server_context(files))
    async with trio.open_nursery() as n:
        n.start_soon(end_b.handshake)
        n.start_soon(app_b.handshake)
    await app_b.send_all(memoryview(b"some bytes"))
    app_b_raw.shutdown(socket.SHUT_WR)  # FIN with no close_notify
    with pytest.raises(StreamBroken, match="without close_notify"):
        await relay(PlainConn(end_a_raw), end_b, Meter(), Meter())
    app_a_raw.close()
    app_b_raw.close()
