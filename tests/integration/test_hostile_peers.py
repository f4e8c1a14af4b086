"""Whatever answers or connects on the TLS port ends its own connection, never the relay.

A certificate that OpenSSL parses but the cryptography package refuses (a version
field out of range) once made the verify callback raise, and pyOpenSSL re-raised it
from the handshake: one packet from anyone on the network ended every migration in
flight. Here each such peer is tried while a good stream is running, and the good
stream must finish byte-exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Config
from relay.core.errors import STATUS_FORBIDDEN, RemoteError
from relay.core.protocol import Reply, Request, encode_reply, encode_request
from relay.daemon.datapath import TlsConn
from relay.daemon.net import free_port
from tests.integration.conftest import counted, eventually, running, with_good_stream_in_flight
from tests.support import Pki, connect, listen, odd_version_certificate, pair_configs, raw_client_context


async def dial_with(b: Config, cert: Path, key: Path, ca: Path) -> TlsConn:
    """A TLS client with whatever certificate it likes: OpenSSL loads what cryptography (and so
    a relay) refuses, so it is built here by path, as any other TLS stack would."""
    ctx = raw_client_context(ca, cert, key)
    addr = b.listen[0]
    sock = trio.socket.socket()
    await sock.connect((addr.host, addr.port))
    conn = TlsConn.client(sock, ctx)
    await conn.handshake()
    return conn


@pytest.mark.parametrize("issuer", ["another CA", "our CA"])
async def test_a_client_certificate_cryptography_cannot_read_ends_only_its_connection(
    tmp_path: Path, p: Pki, issuer: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    ca_dir = p.other_ca if issuer == "another CA" else p.dir
    cert, key = odd_version_certificate(ca_dir, "hvA")
    async with running(a, b) as (_, rb):

        async def attack() -> None:
            with pytest.raises(RemoteError):
                conn = await dial_with(b, cert, key, p.dir / "ca.pem")
                # TLS 1.3: the client hears the server's verdict on its first read
                await conn.send_all(memoryview(encode_request(Request("hvA", "migration.sock", 1))))
                with trio.fail_after(5):
                    got = await conn.recv_into(memoryview(bytearray(100)))
                assert got == 0, "the relay answered a peer whose certificate it cannot read"
                raise RemoteError("closed without an answer")
            await eventually(lambda: counted(rb, "migrelay_connections_total", peer="unknown", result="failed") == 1)

        await with_good_stream_in_flight(tmp_path, attack)
    messages = " ".join(r.getMessage() for r in caplog.records)
    expected = "unreadable: 5 is not a valid X509 version" if issuer == "another CA" else "cannot be read"
    assert expected in messages


class FakePeer:
    """Something else answering at a peer's address: a TLS server with a certificate of its choice."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.ctx = SSL.Context(SSL.TLS_METHOD)
        self.ctx.use_certificate_chain_file(str(cert))
        self.ctx.use_privatekey_file(str(key))
        self.port = free_port()
        self.handshakes = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        task_status.started()
        with listener:
            while True:
                sock, _ = await listener.accept()
                conn = TlsConn.server(sock, self.ctx)
                try:
                    with trio.move_on_after(5):
                        await conn.handshake()
                except RemoteError:
                    pass  # the relay refused us, as it should
                self.handshakes += 1
                conn.close()


@pytest.mark.parametrize("issuer", ["another CA", "our CA"])
async def test_a_server_certificate_cryptography_cannot_read_fails_only_that_dial(
    tmp_path: Path, p: Pki, issuer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """hvA dials hvB's address and something else answers there, with an unreadable certificate."""
    ca_dir = p.other_ca if issuer == "another CA" else p.dir
    fake = FakePeer(*odd_version_certificate(ca_dir, "hvB"))
    pair_configs(tmp_path, p, "tls")
    text = (tmp_path / "hvA.toml").read_text()
    real_address = config.load(tmp_path / "hvB.toml").listen[0]
    (tmp_path / "hvA.toml").write_text(text.replace(f"{real_address.port}", f"{fake.port}"))
    a = config.load(tmp_path / "hvA.toml")
    async with trio.open_nursery() as n:
        await n.start(fake.serve)
        async with running(a) as (ra,):
            for _ in range(2):  # the relay survives the first and fails the second the same way
                sock = await connect(tmp_path / "hvA/hvB/migration.sock")
                with trio.fail_after(10):
                    assert await sock.recv(10) == b""
                sock.close()
            assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 2
            assert counted(ra, "migrelay_peer_up", peer="hvB") == 0
        n.cancel_scope.cancel()
    assert fake.handshakes == 3  # the relay's probe at start, then the two dials
    assert "cannot be read" in caplog.text or "unreadable: 5 is not a valid X509 version" in caplog.text


FORGED = "x\nmigrelay ERROR migrelay.forward: forged line \x1b[31m\u202e"


async def test_a_socket_name_cannot_forge_log_lines(tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b):
        conn = await dial_with(b, p.dir / "hvA.pem", p.dir / "hvA-key.pem", p.dir / "ca.pem")
        await conn.send_all(memoryview(encode_request(Request("hvA", FORGED + "y" * 200, 1))))
        with trio.fail_after(5):
            while await conn.recv_into(memoryview(bytearray(2048))):
                pass
        conn.close()
    # hvB's refusal (not, say, the probe's "connection refused" while hvB was starting)
    refusals = [r.getMessage() for r in caplog.records if r.name == "migrelay.forward" and "refused" in r.getMessage()]
    assert refusals, caplog.text
    for message in refusals:
        assert "\n" not in message and "\x1b" not in message and "\u202e" not in message
        assert "\\nmigrelay ERROR" in message and "\\x1b[31m" in message and "\\u202e" in message
        assert "y" * 121 not in message  # cut: a peer cannot flood the journal through one line


async def test_a_refusal_reason_cannot_forge_log_lines(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Something answering at the peer's unix address replies with a reason full of control characters."""
    a, _ = pair_configs(tmp_path, p, "unix")
    async with running(a), trio.open_nursery() as n:
        listener = await listen(tmp_path / "hvB-peer.sock")

        async def fake_peer() -> None:
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(4096)
                await conn.send(encode_reply(Reply(STATUS_FORBIDDEN, FORGED)))

        n.start_soon(fake_peer)
        sock = await connect(tmp_path / "hvA/hvB/migration.sock")
        with trio.fail_after(10):
            assert await sock.recv(10) == b""
        sock.close()
    lines = [r.getMessage() for r in caplog.records if "refused by hvB" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "\\nmigrelay ERROR" in lines[0], lines
