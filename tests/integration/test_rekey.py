"""Rekeying by reconnection, between two relays in one process (real sockets, real TLS).

With `[tls] rekey_after_bytes` tiny, a long stream moves onto a fresh TLS connection
again and again while bytes flow both ways, and must stay byte-exact. A request to
continue a stream is honoured only for the live stream of the peer that opened it.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import pytest
import trio

from relay.core import config
from relay.core.config import Config
from relay.core.errors import STATUS_FORBIDDEN, STATUS_NO_TARGET
from relay.core.protocol import Continue, RequestReader, encode_request
from relay.daemon.datapath import StreamTruncated, SwitchDeclined, TlsConn
from relay.daemon.forward import Forwarding, continue_outbound
from relay.daemon.metrics import Metrics
from relay.daemon.net import free_port
from relay.daemon.tlsconfig import client_context, server_context
from tests.integration.conftest import BadPeer, counted, echo_server, eventually, running
from tests.support import CHUNK, Pki, connect, listen, pair_configs, pattern

REKEY_BYTES = 1 << 20


def rekeying_pair(
    root: Path, p: Pki, rekey_after_bytes: int = REKEY_BYTES, data_path: str = config.DEFAULT_DATA_PATH
) -> tuple[Config, Config]:
    """pair_configs over TLS, both relays with a tiny [tls] rekey_after_bytes."""
    return pair_configs(root, p, "tls", rekey_after_bytes=rekey_after_bytes, data_path=data_path)


def live_stream_id(caplog: pytest.LogCaptureFixture) -> int:
    """The id hvB logged for the stream it opened (ids start at random)."""
    for record in caplog.records:
        if m := re.fullmatch(r"hvA->hvB #(\d+) migration\.sock: open", record.getMessage()):
            return int(m.group(1))
    raise AssertionError("hvB logged no open stream")


@pytest.mark.parametrize("data_path", list(config.DATA_PATHS))
async def test_256_mib_both_ways_switch_connections_mid_stream(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture, data_path: str
) -> None:
    """Both directions force switches: hvB -> hvA starts only at half of hvA -> hvB, and runs on after it.

    So the first switches are due to hvA's writes (tx), the last ones to its reads (rx),
    the latter after hvA's direction has ended (its close_notify must move along).
    """
    caplog.set_level("INFO", logger="migrelay")
    a, b = rekeying_pair(tmp_path, p, data_path=data_path)
    size = 256 << 20
    async with running(a, b) as (ra, rb):
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        sent: dict[str, str] = {}
        got: dict[str, tuple[int, str]] = {}
        far_has = [0]
        half_way = trio.Event()
        most_sockets = [0]  # the most TLS connections hvB held for the stream at once

        async def send_all(sock: trio.socket.SocketType, seed: int, name: str) -> None:
            h = hashlib.sha256()
            block = pattern(seed, CHUNK)
            for i in range(size // CHUNK):
                off = (i * 4099) % CHUNK  # no two chunks alike
                piece = block[off:] + block[:off]
                h.update(piece)
                view = memoryview(piece)
                while view:
                    view = view[await sock.send(view) :]
            sock.shutdown(socket.SHUT_WR)
            sent[name] = h.hexdigest()

        async def recv_all(sock: trio.socket.SocketType, name: str, progress: list[int] | None = None) -> None:
            h = hashlib.sha256()
            buf = bytearray(CHUNK)
            total = 0
            while n := await sock.recv_into(buf):
                h.update(memoryview(buf)[:n])
                total += n
                if progress is not None:
                    progress[0] = total
                    if total >= size // 2:
                        half_way.set()
            got[name] = (total, h.hexdigest())

        async def far_end() -> None:
            conn, _ = await dest.accept()
            with conn:
                async with trio.open_nursery() as n:
                    n.start_soon(recv_all, conn, "far", far_has)
                    await half_way.wait()
                    await send_all(conn, 2, "far")

        async def near_end() -> None:
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            with sock, trio.move_on_after(120):
                async with trio.open_nursery() as n:
                    n.start_soon(recv_all, sock, "near")
                    await send_all(sock, 1, "near")

        async def watch_sockets() -> None:
            while True:
                for _, chain in list(rb.control.ctx.live_streams.values()) if rb.control else []:
                    most_sockets[0] = max(most_sockets[0], chain.open_connections)
                await trio.sleep(0.01)

        async with trio.open_nursery() as n:
            n.start_soon(watch_sockets)
            async with trio.open_nursery() as ends:
                ends.start_soon(far_end)
                ends.start_soon(near_end)
            n.cancel_scope.cancel()

        assert got["far"] == (size, sent["near"])
        assert got["near"] == (size, sent["far"])
        await eventually(lambda: counted(rb, "migrelay_streams_closed_total", result="ok") == 1)
        assert counted(ra, "migrelay_streams_closed_total", result="ok") == 1
        switched = counted(ra, "migrelay_tls_rekeys_total", role="client", result="ok")
        assert switched == counted(rb, "migrelay_tls_rekeys_total", role="server", result="ok")
        # a connection carries a threshold, plus a chunk and what is in flight while the peer moves
        assert switched >= size // (2 * REKEY_BYTES)
        assert counted(ra, "migrelay_tls_rekeys_total", result="failed") == 0
        triggers = [
            m.group(1)
            for r in caplog.records
            if r.name == "migrelay.rekey" and (m := re.search(r"\((tx|rx) reached 1048576\)", r.getMessage()))
        ]
        assert len(triggers) == switched
        # With a thread per direction the relays' directions race the test's own trio tasks
        # for the GIL (both relays and both ends share this process), and hvB -> hvA, which
        # needs no switching work on its writer, can finish first; in the trio pumps it does
        # not. Either way the reader must have started switches of its own.
        least_rx = 32 if data_path == "trio" else 1
        assert triggers.count("tx") >= 64 and triggers.count("rx") >= least_rx, (
            triggers.count("tx"),
            triggers.count("rx"),
        )
        # every switch resumed the TLS session: a fresh key exchange, no certificate round trip
        assert counted(ra, "migrelay_tls_handshakes_total", role="client", resumed="yes") >= switched
        # old connections are closed as both directions leave them, not kept for the whole stream
        assert 1 <= most_sockets[0] <= 3


async def test_requests_to_continue_another_stream_are_refused(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the peer that opened a stream can move it, and only a stream that is live; the reasons
    name no local path, and the stream in flight does not notice."""
    caplog.set_level("INFO", logger="migrelay.forward")
    _, b = rekeying_pair(tmp_path, p)
    (tmp_path / "hvB.toml").write_text((tmp_path / "hvB.toml").read_text() + "\n[peers.hvC]\n")
    b = config.load(tmp_path / "hvB.toml")
    a = config.load(tmp_path / "hvA.toml")
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        await good.send(b"first half ")
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 1)
        live = live_stream_id(caplog)
        bad = BadPeer(b, p)
        cases = [
            ("hvA", Continue("hvA", "migration.sock", live + 1), STATUS_NO_TARGET, f"no live stream #{live + 1}"),
            ("hvA", Continue("hvA", "nbd.sock", live), STATUS_NO_TARGET, f"no live stream #{live} on nbd.sock"),
            ("hvC", Continue("hvC", "migration.sock", live), STATUS_NO_TARGET, f"#{live} on migration.sock from hvC"),
            ("hvC", Continue("hvA", "migration.sock", live), STATUS_FORBIDDEN, "certificate names hvC, not hvA"),
        ]
        for cert, request, status, reason in cases:
            conn = await bad.open(cert=cert)
            reply = await bad.request(conn, encode_request(request))
            conn.close()
            assert (reply.status, reason in reply.reason) == (status, True), (request, reply)
            assert str(tmp_path) not in reply.reason
        # the first three got as far as the stream registry; the last was stopped by its certificate
        assert counted(rb, "migrelay_tls_rekeys_total", role="server", result="refused") == 3
        assert counted(rb, "migrelay_tls_rekeys_total", result="ok") == 0
        await good.send(b"second half")
        good.shutdown(socket.SHUT_WR)
        assert (await good.recv(100)).decode() == hashlib.sha256(b"first half second half").hexdigest()
        good.close()
        servers.cancel_scope.cancel()


async def test_continue_over_plaintext_is_refused(tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A peer allowed plaintext tcp is not authenticated there: it must not take over its TLS stream."""
    caplog.set_level("INFO", logger="migrelay.forward")
    a, b = rekeying_pair(tmp_path, p)
    port, tcp_port = b.listen[0].port, free_port()
    b_text = (tmp_path / "hvB.toml").read_text()
    b_text = b_text.replace(
        f'listen = ["127.0.0.1:{port}"]', f'listen = ["127.0.0.1:{port}", "tcp://127.0.0.1:{tcp_port}"]'
    )
    (tmp_path / "hvB.toml").write_text(b_text.replace("[peers.hvA]\n", "[peers.hvA]\ninsecure = true\n"))
    b = config.load(tmp_path / "hvB.toml")
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        await good.send(b"first half ")
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 1)
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", tcp_port))
        await sock.send(encode_request(Continue("hvA", "migration.sock", live_stream_id(caplog))))
        answer = await sock.recv(2048)
        sock.close()
        assert b"only a stream over TLS can be continued" in answer
        await good.send(b"second half")
        good.shutdown(socket.SHUT_WR)
        assert (await good.recv(100)).decode() == hashlib.sha256(b"first half second half").hexdigest()
        good.close()
        servers.cancel_scope.cancel()


# --- the dialling side's verdict: declined (stay) or unknown (abort) -----------------------


async def test_continue_outbound_declined_when_refused_or_unreachable(tmp_path: Path, p: Pki) -> None:
    a, b = rekeying_pair(tmp_path, p)
    async with running(a, b) as (ra, _):
        assert ra.control is not None
        ctx, peer = ra.control.ctx, a.peers["hvB"]
        with pytest.raises(SwitchDeclined, match=r"no live stream #7 on migration\.sock from hvA") as refused:
            await continue_outbound(ctx, peer, "migration.sock", 7)
        assert refused.value.refused
    async with running(a) as (ra,):  # hvB is down
        assert ra.control is not None
        with pytest.raises(SwitchDeclined, match="no fresh connection to hvB") as unreachable:
            await continue_outbound(ra.control.ctx, peer, "migration.sock", 7)
        assert not unreachable.value.refused


@pytest.mark.parametrize("ending", ["reset", "close_notify"])
async def test_continue_outbound_after_asking(tmp_path: Path, p: Pki, ending: str) -> None:
    """A peer that read the request and then reset may have moved the stream: that is no "no".
    A clean close before any reply is one (an OK would have come first)."""
    a, b = rekeying_pair(tmp_path, p)
    assert b.tls is not None
    listener = trio.socket.socket()
    await listener.bind((b.listen[0].host, b.listen[0].port))
    listener.listen(1)

    async def fake_hvb() -> None:
        raw, _ = await listener.accept()
        conn = TlsConn.server(raw, server_context(b.tls))  # type: ignore[arg-type]
        await conn.handshake()
        reader = RequestReader()
        buf = memoryview(bytearray(1024))
        while reader.message is None:
            reader.feed(bytes(buf[: await conn.recv_into(buf[: reader.wanted()])]))
        assert isinstance(reader.message, Continue)
        if ending == "reset":
            conn.abort()
        else:
            await conn.send_eof()
            conn.close()

    assert a.tls is not None
    ctx = Forwarding(a, Metrics(), client_tls=client_context(a.tls))
    async with trio.open_nursery() as n:
        n.start_soon(fake_hvb)
        if ending == "reset":
            with pytest.raises(StreamTruncated, match="hvB did not answer the switch"):
                await continue_outbound(ctx, a.peers["hvB"], "migration.sock", 7)
        else:
            with pytest.raises(SwitchDeclined, match="hvB gave no reply"):
                await continue_outbound(ctx, a.peers["hvB"], "migration.sock", 7)
    listener.close()


def test_stream_ids_start_at_random(tmp_path: Path, p: Pki) -> None:
    """A restarted relay must not name its new streams like the live ones of its last run."""
    a, _ = rekeying_pair(tmp_path, p)
    firsts = {Forwarding(a, Metrics()).next_stream_id() for _ in range(8)}
    assert len(firsts) == 8  # equal by chance with probability ~2^-27
