"""migrelay_handshake_failures_total{reason}: each reason, on the accepting and the dialling relay.

Why it matters: a TLS port on a hypervisor network sees scanners, misconfigured peers, a
forgotten certificate renewal and, rarely, a revoked host; an operator must tell these
apart from a graph, without reading logs. Each case is a real TLS client or server doing
the wrong thing, and each failed connection is counted exactly once, under its reason
(and still in migrelay_connections_total).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Config
from relay.core.errors import HANDSHAKE_REASONS, HandshakeReason, RemoteError
from relay.core.protocol import Request, encode_request
from relay.daemon.datapath import TlsConn
from relay.daemon.net import free_port
from relay.daemon.server import Daemon
from relay.tools import loopback, pki
from tests.integration.conftest import BadPeer, counted, eventually, running
from tests.support import Pki, connect, odd_version_certificate, pair_configs


@pytest.fixture
def patient_autojump() -> trio.abc.Clock:
    """Virtual time that jumps only after 50 ms of real idleness, so real loopback I/O still happens."""
    return trio.testing.MockClock(autojump_threshold=0.05)


def failures(relay: Daemon) -> dict[str, float]:
    """The non-zero handshake failure counts of a relay, by reason."""
    return {r: n for r in HANDSHAKE_REASONS if (n := counted(relay, "migrelay_handshake_failures_total", reason=r))}


def issue_odd_certificates(p: Pki) -> None:
    """Certificates a real peer should never hold: expired, not yet valid, from another CA."""
    now = dt.datetime.now(dt.UTC)
    for name in ("hvA", "hvB"):
        pki.issue(p.dir, f"{name}-old", dns=[name], days=1, not_before=now - dt.timedelta(days=10))
        pki.issue(p.dir, f"{name}-future", dns=[name], not_before=now + dt.timedelta(days=10))
    pki.issue(p.other_ca, "hvB")


def with_crl_revoking(path: Path, p: Pki, name: str) -> Config:
    pki.revoke(p.dir, name)
    tls = config.load(path).tls
    assert tls is not None
    return config.load(loopback.with_changes(path, tls=dataclasses.replace(tls, crl=p.dir / "crl.pem")))


# --- accepting: whoever connects to hvB's TLS port ---------------------------------------


async def tls_client(b: Config, p: Pki, source: str = "hvA", **open_args: object) -> None:
    """A TLS client with some certificate that asks for migration.sock as `source`; any refusal is fine."""
    bad = BadPeer(b, p)
    with contextlib.suppress(RemoteError):
        conn = await bad.open(**open_args)  # type: ignore[arg-type]
        try:
            # TLS 1.3: the client hears the server's verdict on its first read
            await bad.request(conn, encode_request(Request(source, "migration.sock", 1)))
        finally:
            conn.close()


async def raw_client(b: Config, data: bytes) -> None:
    """Send `data` to hvB's TLS port, half-close, and wait for hvB to close too."""
    address = b.listen[0]
    sock = trio.socket.socket()
    with sock:
        await sock.connect((address.host, address.port))
        await sock.send(data)
        sock.shutdown(socket.SHUT_WR)
        await closed_by_peer(sock, 10)


async def closed_by_peer(sock: trio.socket.SocketType, within_s: float) -> None:
    """Wait for the other end to close: a FIN, or a reset if it left our bytes unread."""
    with trio.fail_after(within_s), contextlib.suppress(ConnectionResetError):
        while await sock.recv(4096):
            pass


# a ClientHello record header announcing 512 bytes, and only 16 of them
TRUNCATED_CLIENT_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(10)
FATAL_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"  # alert record: fatal, handshake_failure


@dataclasses.dataclass(frozen=True)
class Client:
    """Something that connects to hvB's TLS port and fails the peer handshake in one way."""

    name: str
    reason: HandshakeReason
    result: str  # how hvB counts it in migrelay_connections_total
    logged: str  # in hvB's log line about it
    connect: Callable[[Config, Pki], Awaitable[None]]


CLIENTS = [
    Client(
        "no certificate",
        "bad_certificate",
        "failed",
        "TLS handshake failed: peer did not return a certificate",
        lambda b, p: tls_client(b, p, with_cert=False),
    ),
    Client(
        "not yet valid",
        "bad_certificate",
        "failed",
        "certificate is not yet valid (subject CN=hvA-future",
        lambda b, p: tls_client(b, p, cert="hvA-future"),
    ),
    Client(
        "unreadable",  # OpenSSL verifies it, the cryptography package cannot read it
        "bad_certificate",
        "failed",
        "the peer's certificate cannot be read",
        lambda b, p: tls_client(b, p, cert="hvA-odd"),
    ),
    Client(
        "another CA",
        "unknown_ca",
        "failed",
        "unable to get local issuer certificate (not from our CA) (subject CN=hvA",
        lambda b, p: tls_client(b, p, ca_dir=p.other_ca),
    ),
    Client(
        "expired",
        "expired",
        "failed",
        "TLS handshake failed: certificate verify failed: certificate has expired (subject CN=hvA-old",
        lambda b, p: tls_client(b, p, cert="hvA-old"),
    ),
    Client(
        "revoked",
        "revoked",
        "failed",
        "TLS handshake failed: certificate verify failed: certificate revoked (subject CN=hvC, serial ",
        lambda b, p: tls_client(b, p, cert="hvC", source="hvC"),
    ),
    Client(
        "names another host",
        "name_mismatch",
        "refused",
        "certificate names hvA, not hvC",
        lambda b, p: tls_client(b, p, cert="hvA", source="hvC"),
    ),
    Client(
        "not a configured peer",
        "unknown_peer",
        "refused",
        "hvC is not a configured peer of hvB",
        lambda b, p: tls_client(b, p, cert="hvC-valid", source="hvC"),
    ),
    Client(
        "not TLS",
        "protocol",
        "failed",
        "TLS handshake failed",
        lambda b, p: raw_client(b, b"GET / HTTP/1.1\r\nHost: hvB\r\n\r\n"),
    ),
    Client(
        "EOF mid-handshake",
        "protocol",
        "failed",
        "TLS handshake failed",
        lambda b, p: raw_client(b, TRUNCATED_CLIENT_HELLO),
    ),
    Client(
        "a TLS alert",
        "protocol",
        "failed",
        "TLS handshake failed",
        lambda b, p: raw_client(b, FATAL_ALERT),
    ),
    Client(
        "a garbage header after the handshake",
        "protocol",
        "refused",
        "not a migrelay header",
        lambda b, p: tls_client_sending(b, p, b"GET / HTTP/1.1\r\n\r\n"),
    ),
]


async def tls_client_sending(b: Config, p: Pki, data: bytes) -> None:
    bad = BadPeer(b, p)
    conn = await bad.open()
    try:
        with contextlib.suppress(RemoteError):
            await bad.request(conn, data)
    finally:
        conn.close()


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
async def test_the_accepting_relay_counts_each_failed_handshake_once_by_reason(
    tmp_path: Path, p: Pki, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    _, b = pair_configs(tmp_path, p, "tls")
    issue_odd_certificates(p)
    odd_version_certificate(p.dir, "hvA")
    pki.issue(p.dir, "hvC-valid", dns=["hvC"])  # hvC itself is revoked below
    b = with_crl_revoking(tmp_path / "hvB.toml", p, "hvC")
    async with running(b) as (rb,):
        await client.connect(b, p)
        await eventually(lambda: sum(failures(rb).values()) > 0)
        await trio.sleep(0.1)  # a second count would come now
        assert failures(rb) == {client.reason: 1}
        assert counted(rb, "migrelay_connections_total", result=client.result) == 1
        assert counted(rb, "migrelay_connections_total") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "migrelay.forward"]
    assert any(client.logged in line for line in lines), lines


async def test_a_client_that_never_finishes_its_handshake_counts_as_timeout(
    tmp_path: Path, p: Pki, autojump_clock: trio.abc.Clock
) -> None:
    _, b = pair_configs(tmp_path, p, "tls")
    async with running(b) as (rb,):
        for data in (b"", TRUNCATED_CLIENT_HELLO):  # silent; a ClientHello that never ends
            sock = trio.socket.socket()
            await sock.connect((b.listen[0].host, b.listen[0].port))
            await sock.send(data)
            await closed_by_peer(sock, b.handshake_timeout_s + 5)
            sock.close()
        assert failures(rb) == {"timeout": 2}
        assert counted(rb, "migrelay_connections_total", peer="unknown", result="failed") == 2


async def test_a_probe_and_refusals_of_an_identified_peer_are_no_handshake_failures(tmp_path: Path, p: Pki) -> None:
    """`migrelay check` completes a handshake and hangs up; hvA is refused, but it is hvA."""
    from relay.tools.check import run_check

    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, rb):
        await run_check(a)
        client = await connect(tmp_path / "hvA/hvB/migration.sock")  # nobody listens there on hvB
        with client, trio.fail_after(10):
            assert await client.recv(10) == b""
        await tls_client_sending(b, p, encode_request(Request("hvA", "other.sock", 1)))  # a channel not allowed
        await eventually(lambda: counted(rb, "migrelay_connections_total", result="refused") == 2)
        assert failures(ra) == failures(rb) == {}


# --- dialling: hvA connects to whatever answers at hvB's address ----------------------------


async def tls_server(cert: Path, key: Path, *, client_ca: Path | None, sock: trio.socket.SocketType) -> None:
    """A TLS server with a certificate of its choice; `client_ca` makes it demand a client certificate."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate_chain_file(str(cert))
    ctx.use_privatekey_file(str(key))
    if client_ca is not None:
        ctx.load_verify_locations(str(client_ca))
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: bool(args[-1]))
    conn = TlsConn.server(sock, ctx)
    with contextlib.suppress(RemoteError):
        await conn.handshake()
        while await conn.recv_into(memoryview(bytearray(4096))):
            pass


async def http_server(p: Pki, sock: trio.socket.SocketType) -> None:
    await sock.recv(4096)
    await sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@dataclasses.dataclass(frozen=True)
class Server:
    """Something that answers at hvB's address and is not a good hvB."""

    name: str
    reason: HandshakeReason
    logged: str  # in hvA's log line about the failed stream
    serve: Callable[[Pki, trio.socket.SocketType], Awaitable[None]]
    revoke_hvb: bool = False  # hvA's [tls] crl revokes hvB


def our(p: Pki, name: str) -> tuple[Path, Path]:
    return p.dir / f"{name}.pem", p.dir / f"{name}-key.pem"


SERVERS = [
    Server(
        "not yet valid",
        "bad_certificate",
        "certificate is not yet valid (subject CN=hvB-future",
        lambda p, s: tls_server(*our(p, "hvB-future"), client_ca=None, sock=s),
    ),
    Server(
        "unreadable",
        "bad_certificate",
        "the peer's certificate cannot be read",
        lambda p, s: tls_server(*our(p, "hvB-odd"), client_ca=None, sock=s),
    ),
    Server(
        "another CA",
        "unknown_ca",
        "unable to get local issuer certificate",
        lambda p, s: tls_server(p.other_ca / "hvB.pem", p.other_ca / "hvB-key.pem", client_ca=None, sock=s),
    ),
    Server(
        "expired",
        "expired",
        "certificate has expired (subject CN=hvB-old",
        lambda p, s: tls_server(*our(p, "hvB-old"), client_ca=None, sock=s),
    ),
    Server(
        "revoked",
        "revoked",
        "certificate revoked (subject CN=hvB",
        lambda p, s: tls_server(*our(p, "hvB"), client_ca=None, sock=s),
        revoke_hvb=True,
    ),
    Server(
        "names another host",
        "name_mismatch",
        "certificate at 127.0.0.1:",  # ... names hvC, not hvB
        lambda p, s: tls_server(*our(p, "hvC"), client_ca=None, sock=s),
    ),
    Server(
        "refuses our certificate",  # its alert arrives where the reply should
        "protocol",
        "alert unknown ca",
        lambda p, s: tls_server(*our(p, "hvB"), client_ca=p.other_ca / "ca.pem", sock=s),
    ),
    Server("not TLS", "protocol", "TLS handshake failed", http_server),
]


async def fake_peer(
    p: Pki,
    port: int,
    serve: Callable[[Pki, trio.socket.SocketType], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", port))
    listener.listen(8)
    task_status.started()
    with listener:
        while True:
            sock, _ = await listener.accept()
            with sock:
                await serve(p, sock)


def dialling_hva(tmp_path: Path, p: Pki, revoke_hvb: bool = False) -> tuple[Config, int]:
    """hvA, configured to dial hvB at a port where a test's fake peer listens."""
    pair_configs(tmp_path, p, "tls")
    port = free_port()
    path = tmp_path / "hvA.toml"
    hvb = config.load(path).peers["hvB"]
    assert hvb.address is not None
    moved = dataclasses.replace(hvb, address=dataclasses.replace(hvb.address, port=port))
    loopback.with_changes(path, peers={"hvB": moved})
    a = with_crl_revoking(path, p, "hvB") if revoke_hvb else config.load(path)
    return a, port


@pytest.mark.parametrize("server", SERVERS, ids=lambda s: s.name)
async def test_the_dialling_relay_counts_each_failed_handshake_once_by_reason(
    tmp_path: Path, p: Pki, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    issue_odd_certificates(p)
    odd_version_certificate(p.dir, "hvB")
    a, port = dialling_hva(tmp_path, p, server.revoke_hvb)
    async with running(a) as (ra,), trio.open_nursery() as n:
        await n.start(fake_peer, p, port, server.serve)
        client = await connect(tmp_path / "hvA/hvB/migration.sock")
        with client, trio.fail_after(10):
            assert await client.recv(10) == b""
        assert failures(ra) == {server.reason: 1}
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 1
        n.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "migrelay.forward"]
    assert any(server.logged in line for line in lines), lines


async def test_a_peer_that_never_finishes_the_handshake_counts_as_timeout_one_that_is_down_as_none(
    tmp_path: Path, p: Pki, patient_autojump: trio.abc.Clock
) -> None:
    """A timeout is counted only once the TCP connection is up: a peer that is down is no handshake failure."""
    a, port = dialling_hva(tmp_path, p)
    async with running(a) as (ra,):
        client = await connect(tmp_path / "hvA/hvB/migration.sock")  # nothing listens on the port yet
        with client, trio.fail_after(10):
            assert await client.recv(10) == b""
        assert failures(ra) == {}
        async with trio.open_nursery() as n:

            async def silent(p: Pki, sock: trio.socket.SocketType) -> None:
                await trio.sleep_forever()

            await n.start(fake_peer, p, port, silent)
            client = await connect(tmp_path / "hvA/hvB/migration.sock")
            with client, trio.fail_after(a.handshake_timeout_s + 5):
                assert await client.recv(10) == b""
            assert failures(ra) == {"timeout": 1}
            n.cancel_scope.cancel()
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 2
