"""Two relays in one process, real sockets and real TLS on loopback.

hvA's overlay has `<A>/hvB/<name>` listeners; hvB's own folder `<B>/hvB/` is where
the "destination hypervisor" (this test) listens.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import grp
import hashlib
import logging
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from relay.core import config
from relay.core.config import Address, Config, PeerConfig, Transport
from relay.core.errors import STATUS_BAD_REQUEST, STATUS_FORBIDDEN, STATUS_UNSUPPORTED_VERSION, RemoteError
from relay.core.overlay import DEFAULT_CHANNELS
from relay.core.protocol import REQUEST_FIXED, ReplyReader, Request, encode_request
from relay.daemon.net import free_port
from relay.tools import loopback, pki
from tests.integration.conftest import BadPeer, counted, echo_server, eventually, roundtrip, running
from tests.support import Pki, connect, listen, pair_configs, recv_stream, send_stream

TRANSPORTS = ["tls", "unix", "tcp"]
# [relay] data_path: the trio pumps, or a thread per direction (relay/daemon/datapath/threaded.py)
DATA_PATHS = list(config.DATA_PATHS)


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_large_payload_both_ways(tmp_path: Path, p: Pki, transport: Transport, data_path: str) -> None:
    a, b = pair_configs(tmp_path, p, transport, data_path=data_path)
    size = 96 << 20
    async with running(a, b) as (ra, rb):
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        results: dict[str, object] = {}

        async def far_end() -> None:
            conn, _ = await dest.accept()
            with conn:
                async with trio.open_nursery() as n:

                    async def rx() -> None:
                        results["b_got"] = await recv_stream(conn)

                    async def tx() -> None:
                        results["b_sent"] = await send_stream(conn, 2, size)

                    n.start_soon(rx)
                    n.start_soon(tx)

        async def near_end() -> None:
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            with sock:
                async with trio.open_nursery() as n:

                    async def rx() -> None:
                        results["a_got"] = await recv_stream(sock)

                    async def tx() -> None:
                        results["a_sent"] = await send_stream(sock, 1, size)

                    n.start_soon(rx)
                    n.start_soon(tx)

        async with trio.open_nursery() as n:
            n.start_soon(far_end)
            n.start_soon(near_end)
        assert results["b_got"] == (size, results["a_sent"])
        assert results["a_got"] == (size, results["b_sent"])
        for relay, out, peer in ((ra, "tx", "hvB"), (rb, "rx", "hvA")):
            labels = {"peer": peer, "channel": "migration", "direction": out}
            await eventually(lambda: counted(relay, "migrelay_bytes_total", **labels) == size)  # noqa: B023
        assert counted(ra, "migrelay_connections_total", peer="hvB", channel="migration", result="ok") == 1
        assert counted(rb, "migrelay_connections_total", peer="hvA", channel="migration", result="ok") == 1


@pytest.mark.parametrize("data_path", DATA_PATHS)
async def test_32_concurrent_connections_are_byte_exact(tmp_path: Path, p: Pki, data_path: str) -> None:
    a, b = pair_configs(tmp_path, p, "tls", data_path=data_path)
    async with running(a, b), trio.open_nursery() as servers:
        dest = await listen(tmp_path / "hvB/hvB/nbd.sock")
        servers.start_soon(echo_server, dest, servers)
        async with trio.open_nursery() as clients:
            for i in range(32):
                clients.start_soon(roundtrip, tmp_path / "hvA/hvB/nbd.sock", i, (1 << 20) + i * 4099)
        servers.cancel_scope.cancel()


async def test_connections_arrive_in_the_order_they_were_accepted(tmp_path: Path, p: Pki) -> None:
    """QEMU tells the main migration stream from multifd channels by arrival order."""
    a, b = pair_configs(tmp_path, p, "tls")
    count = 16
    async with running(a, b):
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        clients = []
        for i in range(count):  # queued in the backlog in this order, without waiting for the far end
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            await sock.send(b"%04d" % i)
            clients.append(sock)
        arrived = []
        for _ in range(count):
            conn, _ = await dest.accept()
            arrived.append(int(await conn.recv(4)))
            conn.close()
        assert arrived == list(range(count))
        for sock in clients:
            sock.close()


async def test_libvirt_sock_is_mapped_to_the_configured_daemon_socket(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls", libvirt=tmp_path / "libvirt-sock")
    async with running(a, b), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "libvirt-sock"), servers)
        await roundtrip(tmp_path / "hvA/hvB/libvirt.sock", 7, 100_000)
        servers.cancel_scope.cancel()


# --- refusals: each is answered with a reason, and everything else keeps working -----


async def assert_refused_close(path: Path) -> None:
    """The source client sees a refused/failed target as a connection closed without data."""
    sock = await connect(path)
    with sock, trio.fail_after(10):
        assert await sock.recv(10) == b""


async def test_a_target_nobody_listens_on_is_refused_with_the_reason_on_both_relays(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, rb):
        await assert_refused_close(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_connections_total", peer="hvB", channel="migration", result="refused") == 1
        assert counted(rb, "migrelay_connections_total", peer="hvA", channel="migration", result="refused") == 1
        # the reason is logged on both relays; only the destination's log names the local path
        messages = [r.getMessage() for r in caplog.records]
        assert any("refused by hvB: no-target: nothing usable listens on migration.sock here" in m for m in messages)
        path = tmp_path / "hvB/hvB/migration.sock"
        assert any("refused hvA" in m and f"nothing listens on {path}" in m for m in messages)


async def test_symlink_and_non_socket_targets_are_refused(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "elsewhere.sock"), servers)
        os.symlink(tmp_path / "elsewhere.sock", tmp_path / "hvB/hvB/migration.sock")
        (tmp_path / "hvB/hvB/nbd.sock").write_text("a regular file")
        await assert_refused_close(tmp_path / "hvA/hvB/migration.sock")
        await assert_refused_close(tmp_path / "hvA/hvB/nbd.sock")
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "is a symlink" in messages and "is not a socket" in messages
        servers.cancel_scope.cancel()


async def test_a_peer_that_is_down_closes_the_client_at_once_and_counts_a_failure(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, _unused_b = pair_configs(tmp_path, p, "tls")
    async with running(a) as (ra,):
        await assert_refused_close(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_connections_total", peer="hvB", channel="migration", result="failed") == 1
        assert any("cannot reach hvB" in r.getMessage() for r in caplog.records)


async def test_libvirt_sock_is_refused_where_no_libvirt_is_configured(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b):
        await assert_refused_close(tmp_path / "hvA/hvB/libvirt.sock")
        assert any("[relay] libvirt is not set" in r.getMessage() for r in caplog.records)


async def test_peer_certificate_must_name_the_peer(tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """hvA dials 'hvB' but the relay there presents hvC's (valid, same-CA) certificate."""
    a, _unused_b = pair_configs(tmp_path, p, "tls")
    b_text = (tmp_path / "hvB.toml").read_text().replace("hvB.pem", "hvC.pem").replace("hvB-key.pem", "hvC-key.pem")
    (tmp_path / "hvB.toml").write_text(b_text)
    async with running(a, config.load(tmp_path / "hvB.toml")) as (ra, _):
        await assert_refused_close(tmp_path / "hvA/hvB/migration.sock")
        assert any("names hvC, not hvB" in r.getMessage() for r in caplog.records)
        assert counted(ra, "migrelay_connections_total", peer="hvB", channel="migration", result="failed") == 1


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", STATUS_BAD_REQUEST, "not a migrelay header"),
        (REQUEST_FIXED.pack(b"MGRL", 1, 1, 3, 60000, 1) + b"hvA", STATUS_BAD_REQUEST, "too large"),
        (REQUEST_FIXED.pack(b"MGRL", 7, 1, 3, 3, 1) + b"hvAabc", STATUS_UNSUPPORTED_VERSION, "version 7"),
        (encode_request(Request("hvA", "../hvC/migration.sock", 1)), STATUS_FORBIDDEN, "contains '/'"),
        (encode_request(Request("hvA", "other.sock", 1)), STATUS_FORBIDDEN, "not allowed for this peer"),
        (encode_request(Request("hvC", "migration.sock", 1)), STATUS_FORBIDDEN, "certificate names hvA, not hvC"),
    ],
)
async def test_bad_requests_get_a_reason(
    tmp_path: Path, p: Pki, data: bytes, status: int, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        # a good stream is in flight while the bad peer tries its luck
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        await good.send(b"first half ")
        bad = BadPeer(b, p)
        conn = await bad.open()
        reply = await bad.request(conn, data)
        conn.close()
        assert (reply.status, reason in reply.reason) == (status, True), reply
        assert any(reason in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert counted(rb, "migrelay_connections_total", result="refused") == 1
        await good.send(b"second half")
        good.shutdown(socket.SHUT_WR)
        assert (await good.recv(100)).decode() == hashlib.sha256(b"first half second half").hexdigest()
        good.close()
        servers.cancel_scope.cancel()


async def test_an_unconfigured_peer_with_a_valid_certificate_is_refused(tmp_path: Path, p: Pki) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b):
        bad = BadPeer(b, p)
        conn = await bad.open(cert="hvC")
        reply = await bad.request(conn, encode_request(Request("hvC", "migration.sock", 1)))
        conn.close()
        assert reply.status == STATUS_FORBIDDEN and "hvC is not a configured peer of hvB" in reply.reason


@dataclasses.dataclass(frozen=True)
class BadClient:
    """A TLS client that fails authentication: what it presents, the alert it hears, what hvB logs."""

    name: str
    open_args: dict[str, object]
    alert: str  # TLS 1.3: the client finishes its handshake first and hears the alert on its next read
    logged: str


EXPIRED_CERT = "hvA-old"
BAD_CLIENTS = [
    BadClient(
        "no client certificate", {"with_cert": False}, "certificate required", "peer did not return a certificate"
    ),
    BadClient("another CA", {"ca_dir": "other"}, "unknown ca", "unable to get local issuer certificate"),
    BadClient("expired", {"cert": EXPIRED_CERT}, "certificate expired", "certificate has expired"),
]


@pytest.mark.parametrize("client", BAD_CLIENTS, ids=lambda c: c.name)
async def test_tls_clients_that_fail_authentication_are_refused_and_logged(
    tmp_path: Path, p: Pki, client: BadClient, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    pki.issue(p.dir, EXPIRED_CERT, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    args = {k: (p.other_ca if v == "other" else v) for k, v in client.open_args.items()}
    async with running(a, b) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        bad = BadPeer(b, p)
        with pytest.raises(RemoteError, match=client.alert):
            conn = await bad.open(**args)  # type: ignore[arg-type]
            await bad.request(conn, encode_request(Request("hvA", "migration.sock", 1)))
        await eventually(lambda: counted(rb, "migrelay_connections_total", peer="unknown", result="failed") == 1)
        assert any(client.logged in r.getMessage() for r in caplog.records if r.name == "migrelay.forward")
        # and the relay still serves a good stream
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 5, 1 << 20)
        servers.cancel_scope.cancel()


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout(
    tmp_path: Path, p: Pki, autojump_clock: trio.abc.Clock
) -> None:
    """A connection that never starts its handshake is dropped after handshake_timeout_s."""
    _unused_a, b = pair_configs(tmp_path, p, "tls")
    async with running(b) as (rb,):
        addr = b.listen[0]
        sock = trio.socket.socket()
        await sock.connect((addr.host, addr.port))
        with trio.fail_after(b.handshake_timeout_s + 5):
            assert await sock.recv(10) == b""
        assert counted(rb, "migrelay_connections_total", peer="unknown", result="failed") == 1
        sock.close()


async def test_metrics_endpoint_shows_bytes_and_connections(tmp_path: Path, p: Pki) -> None:
    a, _unused_b = pair_configs(tmp_path, p, "tls")
    port = free_port()
    text = (tmp_path / "hvB.toml").read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    (tmp_path / "hvB.toml").write_text(text)
    async with running(a, config.load(tmp_path / "hvB.toml")), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 123_456)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := await stream.receive_some():
            body += chunk
        assert body.startswith(b"HTTP/1.1 200 OK")
        assert b'migrelay_bytes_total{channel="migration",direction="rx",peer="hvA"} 123456.0' in body
        assert b'migrelay_connections_total{channel="migration",peer="hvA",result="ok"} 1.0' in body
        servers.cancel_scope.cancel()


async def test_tls_sessions_are_resumed(tmp_path: Path, p: Pki) -> None:
    """Many short connections (multifd, NBD, libvirt) must not each pay a full handshake."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        for i in range(3):
            await roundtrip(tmp_path / "hvA/hvB/migration.sock", i, 1000)
        for relay, role in ((ra, "client"), (rb, "server")):
            assert counted(relay, "migrelay_tls_handshakes_total", role=role, resumed="no") == 1
            assert counted(relay, "migrelay_tls_handshakes_total", role=role, resumed="yes") == 2
        servers.cancel_scope.cancel()


async def test_one_relay_listens_on_every_transport_at_once(tmp_path: Path, p: Pki) -> None:
    """hvB serves a TLS port, a unix socket and a plaintext port together; three hvA relays use one each."""
    sources: list[Config] = []
    listeners: list[Address] = []
    for kind in ("tls", "unix", "tcp"):
        a, b = loopback.pair(tmp_path, p.dir, kind)
        sources.append(dataclasses.replace(a, socket_dir=tmp_path / f"hvA-{kind}"))
        listeners += b.listen
    hv_a = PeerConfig("hvA", None, DEFAULT_CHANNELS, insecure=True)  # tcp:// needs it; the others ignore it
    b = dataclasses.replace(b, listen=tuple(listeners), peers={"hvA": hv_a})
    async with running(b, *sources), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/nbd.sock"), servers)
        async with trio.open_nursery() as clients:
            for i, kind in enumerate(("tls", "unix", "tcp")):
                clients.start_soon(roundtrip, tmp_path / f"hvA-{kind}/hvB/nbd.sock", i, 4 << 20)
        servers.cancel_scope.cancel()


async def test_plaintext_tcp_is_refused_for_a_peer_without_insecure(tmp_path: Path, p: Pki) -> None:
    pair_configs(tmp_path, p, "tcp")
    (tmp_path / "hvB.toml").write_text((tmp_path / "hvB.toml").read_text().replace("insecure = true\n", ""))
    async with running(config.load(tmp_path / "hvB.toml")):
        addr = config.load(tmp_path / "hvB.toml").listen[0]
        sock = trio.socket.socket()
        await sock.connect((addr.host, addr.port))
        await sock.send(encode_request(Request("hvA", "migration.sock", 1)))
        reply = ReplyReader().feed(await sock.recv(2048))
        sock.close()
        assert reply is not None and reply.status == STATUS_FORBIDDEN and "may not use plaintext tcp" in reply.reason


@pytest.mark.parametrize("data_path", DATA_PATHS)
async def test_stop_drains_in_flight_streams(tmp_path: Path, p: Pki, data_path: str) -> None:
    """SIGTERM mid-migration: no new connections, but the running stream finishes byte-exact."""
    a, b = pair_configs(tmp_path, p, "tls", data_path=data_path)
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        sock = await connect(tmp_path / "hvA/hvB/migration.sock")
        await sock.send(b"before the stop, ")
        # established end to end (not just queued in A's backlog)
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 1)
        ra.stop()
        rb.stop()
        await eventually(lambda: not (tmp_path / "hvA/hvB/migration.sock").exists())
        await sock.send(b"after the stop")
        sock.shutdown(socket.SHUT_WR)
        assert (await sock.recv(100)).decode() == hashlib.sha256(b"before the stop, after the stop").hexdigest()
        sock.close()
        servers.cancel_scope.cancel()


@pytest.mark.parametrize("data_path", DATA_PATHS)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drain_deadline_aborts_a_stream_stuck_both_ways(
    tmp_path: Path, p: Pki, transport: Transport, data_path: str
) -> None:
    """A stream that outlives the drain deadline, its pumps blocked on a reader that never
    reads and on a writer that never writes, is aborted at the deadline: both ends see an
    error, and the relays stop (a pump thread that ignored the stop would hang this)."""
    a, b = pair_configs(tmp_path, p, transport, data_path=data_path)
    async with running(a, b) as (ra, rb):
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        sock = await connect(tmp_path / "hvA/hvB/migration.sock")
        far, _ = await dest.accept()
        # fill every buffer on the way hvA -> hvB: hvA's pump waits to write, hvB's too
        chunk = memoryview(bytes(1 << 16))
        with trio.move_on_after(1.0):
            while True:
                await sock.send(chunk)
        await eventually(lambda: counted(ra, "migrelay_active_streams") == 1)
        with trio.fail_after(3 * a.drain_timeout_s + 5):
            ra.stop()
            rb.stop()
            # the far end reads what was queued, then an error or an early EOF (AF_UNIX has no RST)
            with pytest.raises(OSError):
                while await far.recv(1 << 20):
                    pass
                await far.send(b"x")
                raise ConnectionResetError("an EOF, then EPIPE")
        sock.close()
        far.close()


async def test_a_check_probe_is_logged_as_a_probe_not_a_failure(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """`migrelay check` handshakes and hangs up: the peer must not log or count that as a failure.

    Its relays' own periodic probes do the same, once per peer every PEER_PROBE_INTERVAL_S:
    from a configured peer's certificate that is a debug line, and no handshake is counted.
    """
    from relay.tools.check import run_check

    caplog.set_level(logging.DEBUG, logger="migrelay.forward")
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(b) as (rb,):
        findings = await run_check(a)
        assert any("mutual auth ok" in str(f) for f in findings)
        await eventually(lambda: any("completed a handshake and closed" in r.getMessage() for r in caplog.records))
        assert counted(rb, "migrelay_connections_total") == 0
        assert counted(rb, "migrelay_tls_handshakes_total") == 0
        assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name == "migrelay.forward"]


async def test_a_probe_with_a_certificate_of_no_peer_is_counted_and_named(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A host of our CA that is not a peer (hvX) handshakes and hangs up: not a routine probe. It is
    counted as a handshake of an unknown peer and logged with the names its certificate carries."""
    from relay.tools.check import run_check

    caplog.set_level(logging.INFO, logger="migrelay.forward")
    a, b = pair_configs(tmp_path, p, "tls")
    pki.issue(p.dir, "hvX")
    stranger = dataclasses.replace(a, name="hvX", tls=loopback.tls_files(p.dir, "hvX"))
    async with running(b) as (rb,):
        await run_check(stranger)
        await eventually(lambda: counted(rb, "migrelay_handshake_failures_total", reason="unknown_peer") == 1)
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert any("certificate naming hvX, not a peer" in line for line in lines), lines
        assert counted(rb, "migrelay_connections_total") == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give sockets to another group")
async def test_socket_group_owns_the_overlay(tmp_path: Path, p: Pki) -> None:
    """With socket_group, a hypervisor running as that group can use the overlay (Debian: libvirt-qemu)."""
    group = grp.getgrgid(65534).gr_name  # nogroup
    pair_configs(tmp_path, p, "tls")
    text = (tmp_path / "hvA.toml").read_text().replace("[relay]\n", f'[relay]\nsocket_group = "{group}"\n', 1)
    (tmp_path / "hvA.toml").write_text(text)
    async with running(config.load(tmp_path / "hvA.toml")):
        overlay_socket = (tmp_path / "hvA/hvB/migration.sock").stat()
        assert overlay_socket.st_gid == 65534 and stat.S_IMODE(overlay_socket.st_mode) == 0o660
        own = (tmp_path / "hvA/hvA").stat()
        assert own.st_gid == 65534 and stat.S_IMODE(own.st_mode) & 0o070 == 0o070
