"""Reload in-process: what it swaps, what it leaves alone, and what it refuses.

Each relay runs in the test's trio run with real sockets and real TLS; its config is a file
the test rewrites before calling `Daemon.reload()` (what SIGHUP and `migrelay reload` call).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Address, Config, Limits, PeerConfig, TlsFiles
from relay.core.errors import STATUS_OK, ControlError
from relay.core.overlay import DEFAULT_CHANNELS
from relay.core.protocol import Reply, ReplyReader, RequestReader, encode_reply
from relay.daemon.datapath import TlsConn
from relay.daemon.forward import ClosedBeforeHeader, read_header
from relay.daemon.net import free_port
from relay.daemon.reload import ReloadFailed
from relay.daemon.server import Daemon
from relay.daemon.tlsconfig import client_context, resumed, server_context
from relay.tools import loopback
from relay.tools.control_client import request
from tests.integration.conftest import counted, echo_server, eventually, roundtrip, running
from tests.support import TEST_TIMEOUTS, Pki, connect, listen, pair_configs

OVERLAY = ("libvirt.sock", "migration.sock", "nbd.sock")


def rewrite(path: Path, **changes: object) -> None:
    """Change fields of a relay's config file, as an operator would before a reload."""
    loopback.with_changes(path, **changes)


def overlay(tmp_path: Path, relay: str, peer: str) -> set[str]:
    """The socket files in `relay`'s overlay folder for `peer`."""
    folder = tmp_path / relay / peer
    return {p.name for p in folder.iterdir() if p.is_socket()} if folder.is_dir() else set()


def peers_up(relay: Daemon) -> set[str]:
    """The peers that have a migrelay_peer_up series."""
    return {
        sample.labels["peer"]
        for family in relay.metrics.registry.collect()
        if family.name == "migrelay_peer_up"
        for sample in family.samples
    }


def handshakes(relay: Daemon, role: str, resumed: str) -> float:
    return counted(relay, "migrelay_tls_handshakes_total", role=role, resumed=resumed)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def closed_without_a_byte(path: Path) -> None:
    """How a source client sees a refused or failed stream."""
    sock = await connect(path)
    with sock, trio.fail_after(10):
        assert await sock.recv(10) == b""


def third_relay(tmp_path: Path, p: Pki) -> Config:
    """hvC: listens on a TLS port of its own, takes streams from hvA on every channel."""
    return Config(
        name="hvC",
        socket_dir=tmp_path / "hvC",
        listen=(Address("tls", host="127.0.0.1", port=free_port()),),
        tls=loopback.tls_files(p.dir, "hvC"),
        peers={"hvA": PeerConfig("hvA", None, DEFAULT_CHANNELS)},
        **TEST_TIMEOUTS,  # type: ignore[arg-type]
    )


async def test_peers_and_channels_added_and_removed_take_effect_at_once(tmp_path: Path, p: Pki) -> None:
    """Added: their overlay sockets appear and carry streams. Removed: their sockets go at once."""
    a, b = pair_configs(tmp_path, p, "tls")
    c = third_relay(tmp_path, p)
    async with running(a, b, c) as (ra, _, _), trio.open_nursery() as servers:
        for where in ("hvB/hvB/migration.sock", "hvC/hvC/nbd.sock"):
            servers.start_soon(echo_server, await listen(tmp_path / where), servers)
        assert overlay(tmp_path, "hvA", "hvB") == set(OVERLAY)
        hv_b = a.peers["hvB"]
        hv_c = PeerConfig("hvC", c.listen[0], ("nbd.sock",))
        rewrite(
            (tmp_path / "hvA.toml"), peers={"hvB": dataclasses.replace(hv_b, channels=("migration.sock",)), "hvC": hv_c}
        )
        summary = await ra.reload()
        assert summary == "1 peer added (hvC), 1 peer changed (hvB), TLS files unchanged"
        assert overlay(tmp_path, "hvA", "hvB") == {"migration.sock"}
        assert overlay(tmp_path, "hvA", "hvC") == {"nbd.sock"}
        with pytest.raises(FileNotFoundError):
            await connect(tmp_path / "hvA/hvB/nbd.sock")
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1 << 20)  # kept: still carries
        await roundtrip(tmp_path / "hvA/hvC/nbd.sock", 2, 1 << 20)  # added: carries at once

        await eventually(lambda: "hvC" in peers_up(ra))  # a dial went there
        rewrite((tmp_path / "hvA.toml"), peers={"hvB": hv_b})
        assert await ra.reload() == "1 peer removed (hvC), 1 peer changed (hvB), TLS files unchanged"
        assert "hvC" not in peers_up(ra)  # no stale series for a peer that is gone
        assert overlay(tmp_path, "hvA", "hvC") == set()
        assert overlay(tmp_path, "hvA", "hvB") == set(OVERLAY)
        assert counted(ra, "migrelay_reloads_total") == 2
        assert counted(ra, "migrelay_reload_failures_total") == 0
        servers.cancel_scope.cancel()
    # the stop still removes every overlay socket, those bound by a reload too
    assert overlay(tmp_path, "hvA", "hvB") == set()


async def test_a_peer_made_accept_only_loses_its_peer_up_series(tmp_path: Path, p: Pki) -> None:
    """hvA stops dialling hvB (no address): migrelay_peer_up{peer="hvB"} goes, rather than staying
    at whatever the last probe found while nothing probes it any more."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(b, a) as (_, ra):
        await eventually(lambda: "hvB" in peers_up(ra))  # the probe at start
        rewrite((tmp_path / "hvA.toml"), peers={"hvB": dataclasses.replace(a.peers["hvB"], address=None)})
        await ra.reload()
        assert "hvB" not in peers_up(ra)
        assert ra.control is not None and ra.control.status()["peers"]["hvB"]["last_dial"] == "never"


async def test_a_removed_channel_whose_path_was_replaced_still_reloads_whole(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder now sits where a removed channel's socket was: the reload still applies whole (it
    half-applied and reported a failure), and says it could not remove that path."""
    a, b = pair_configs(tmp_path, p, "tls")
    c = third_relay(tmp_path, p)
    async with running(a, b, c) as (ra, _, _):
        nbd = tmp_path / "hvA/hvB/nbd.sock"
        nbd.unlink()
        nbd.mkdir()
        hv_b = a.peers["hvB"]
        hv_c = PeerConfig("hvC", c.listen[0], ("nbd.sock",))
        rewrite(
            (tmp_path / "hvA.toml"), peers={"hvB": dataclasses.replace(hv_b, channels=("migration.sock",)), "hvC": hv_c}
        )
        assert await ra.reload() == "1 peer added (hvC), 1 peer changed (hvB), TLS files unchanged"
        assert overlay(tmp_path, "hvA", "hvC") == {"nbd.sock"}
        assert overlay(tmp_path, "hvA", "hvB") == {"migration.sock"}
        assert any("could not be removed" in r.getMessage() for r in caplog.records)
        assert counted(ra, "migrelay_reload_failures_total") == 0


async def test_a_changed_peer_address_applies_to_the_next_connection(tmp_path: Path, p: Pki) -> None:
    """The overlay listener stays (no window in which clients find no socket); the next dial goes to the new address."""
    a, b = pair_configs(tmp_path, p, "tls")
    right = a.peers["hvB"]
    nobody = Address("tls", host="127.0.0.1", port=free_port())
    rewrite((tmp_path / "hvA.toml"), peers={"hvB": dataclasses.replace(right, address=nobody)})
    async with running(config.load(tmp_path / "hvA.toml"), b) as (ra, _), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        await closed_without_a_byte(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 1
        inode = (tmp_path / "hvA/hvB/migration.sock").stat().st_ino
        rewrite((tmp_path / "hvA.toml"), peers={"hvB": right})
        assert await ra.reload() == "1 peer changed (hvB), TLS files unchanged"
        assert (tmp_path / "hvA/hvB/migration.sock").stat().st_ino == inode
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1 << 20)
        servers.cancel_scope.cancel()


async def test_a_removed_peer_is_refused_and_its_stream_in_flight_completes(tmp_path: Path, p: Pki) -> None:
    """hvB drops hvA: hvA's next stream is refused by hvB's policy; the one already running ends byte-exact,
    on its own TLS connection (the switches to fresh connections that it asks for are declined)."""
    mib = 1 << 20
    a, b = pair_configs(tmp_path, p, "tls", rekey_after_bytes=mib)
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        digest = hashlib.sha256()
        chunk = b"x" * mib
        for _ in range(3):  # through two switches onto fresh connections
            await send_all(good, chunk)
            digest.update(chunk)
        await eventually(lambda: counted(ra, "migrelay_tls_rekeys_total", role="client", result="ok") >= 2)

        rewrite((tmp_path / "hvB.toml"), peers={})
        assert await rb.reload() == "1 peer removed (hvA), TLS files unchanged"
        await closed_without_a_byte(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="refused") == 1

        for _ in range(3):
            await send_all(good, chunk)
            digest.update(chunk)
        good.shutdown(socket.SHUT_WR)
        with trio.fail_after(10):
            assert (await good.recv(100)).decode() == digest.hexdigest()
        good.close()
        assert counted(ra, "migrelay_tls_rekeys_total", role="client", result="refused") >= 1
        assert counted(ra, "migrelay_tls_rekeys_total", role="client", result="failed") == 0
        servers.cancel_scope.cancel()


async def test_a_source_left_with_no_tls_peer_keeps_its_stream_running(tmp_path: Path, p: Pki) -> None:
    """hvA's reload removes hvB, its only TLS peer, so hvA builds no TLS context any more: the
    stream's next switch onto a fresh connection is declined on hvA's side, and it ends byte-exact
    on the connection it has (an assertion ended it, found by the attacker review)."""
    mib = 1 << 20
    a, b = pair_configs(tmp_path, p, "tls", rekey_after_bytes=mib)
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        good = await connect(tmp_path / "hvA/hvB/migration.sock")
        digest = hashlib.sha256()
        chunk = b"x" * mib
        for _ in range(3):
            await send_all(good, chunk)
            digest.update(chunk)
        await eventually(lambda: counted(ra, "migrelay_tls_rekeys_total", role="client", result="ok") >= 2)
        rewrite((tmp_path / "hvA.toml"), peers={})
        assert (await ra.reload()).startswith("1 peer removed (hvB)")
        assert ra.context is not None and ra.context.client_tls is None
        for _ in range(3):
            await send_all(good, chunk)
            digest.update(chunk)
        good.shutdown(socket.SHUT_WR)
        with trio.fail_after(10):
            assert (await good.recv(100)).decode() == digest.hexdigest()
        good.close()
        assert counted(ra, "migrelay_tls_rekeys_total", role="client", result="refused") >= 1
        assert counted(ra, "migrelay_internal_errors_total", where="stream") == 0
        servers.cancel_scope.cancel()


def broken_toml(path: Path) -> str:
    path.write_text(path.read_text() + "\n[relay\n")
    return "is not valid TOML"


def unknown_key(path: Path) -> str:
    path.write_text(path.read_text().replace("[relay]", "[relay]\nlisten_on = []", 1))
    return "[relay] unknown key(s): listen_on"


def missing_cert(path: Path) -> str:
    path.write_text(path.read_text().replace("hvA.pem", "gone.pem"))
    return "gone.pem: no such file"


def wrong_key(path: Path) -> str:
    path.write_text(path.read_text().replace("hvA-key.pem", "hvB-key.pem"))
    return "does not match"


def _crl_at(path: Path, name: str) -> Path:
    """Point [tls] crl at `name` beside the config; the caller puts something there."""
    crl = path.parent / name
    cfg = config.load(path)
    assert cfg.tls is not None
    rewrite(path, tls=dataclasses.replace(cfg.tls, crl=crl))
    return crl


def crl_is_a_fifo(path: Path) -> str:
    """Whoever refreshes a CRL put a FIFO there: reading it would hang the reload (and a stop)."""
    os.mkfifo(_crl_at(path, "crl-fifo.pem"))
    return "crl-fifo.pem: not a regular file"


def crl_is_dev_zero(path: Path) -> str:
    """A symlink to a device that reads without end."""
    _crl_at(path, "crl-zero.pem").symlink_to("/dev/zero")
    return "crl-zero.pem: not a regular file"


def listen_changed(path: Path) -> str:
    rewrite(path, listen=(Address("tls", host="127.0.0.1", port=free_port()),))
    return "changing [relay] listen needs a restart"


def name_and_metrics_changed(path: Path) -> str:
    rewrite(path, name="hvZ", metrics_listen=config.HostPort("127.0.0.1", free_port()))
    return "changing [relay] name and [metrics] listen needs a restart"


def new_overlay_socket_blocked(path: Path) -> str:
    """A good config whose new peer's overlay path holds a file: nothing of it may apply,
    not even the other peer's channel removal that comes with it."""
    blocked = path.parent / "hvA/hvC/migration.sock"
    blocked.parent.mkdir()
    blocked.write_text("not a socket")
    hv_b = dataclasses.replace(config.load(path).peers["hvB"], channels=("migration.sock",))
    hv_c = PeerConfig("hvC", Address("tls", host="127.0.0.1", port=free_port()), ("migration.sock",))
    rewrite(path, peers={"hvB": hv_b, "hvC": hv_c})
    return "exists and is not a socket"


@pytest.mark.parametrize(
    "breakage",
    [
        broken_toml,
        unknown_key,
        missing_cert,
        wrong_key,
        crl_is_a_fifo,
        crl_is_dev_zero,
        listen_changed,
        name_and_metrics_changed,
        new_overlay_socket_blocked,
    ],
)
async def test_a_broken_reload_leaves_the_old_configuration_serving(
    tmp_path: Path, p: Pki, breakage: Callable[[Path], str]
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    good = (tmp_path / "hvA.toml").read_text()
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        before = ra.config
        reason = breakage(tmp_path / "hvA.toml")
        with pytest.raises(ReloadFailed, match=re.escape(reason)):
            await ra.reload()
        assert ra.config is before
        assert counted(ra, "migrelay_reload_failures_total") == 1
        assert counted(ra, "migrelay_reloads_total") == 0
        assert overlay(tmp_path, "hvA", "hvB") == set(OVERLAY)
        assert overlay(tmp_path, "hvA", "hvC") == set()
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1 << 20)
        # the failure is not sticky: the file fixed, the next reload takes
        (tmp_path / "hvA.toml").write_text(good)
        assert await ra.reload() == "config unchanged, TLS files unchanged"
        servers.cancel_scope.cancel()


async def test_a_reloaded_relay_offers_no_ticket_from_before(tmp_path: Path, p: Pki) -> None:
    """Resuming skips the certificate check, so a ticket from before a reload would let a peer that
    the new CA or CRL distrusts through (and pyOpenSSL refuses a session of the old context: the
    stream would fail). hvB does not reload here: it would honour the ticket, so a stream that works
    over a full handshake shows that hvA did not offer it."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        for i in range(2):
            await roundtrip(tmp_path / "hvA/hvB/migration.sock", i, 1000)
        assert (handshakes(ra, "client", "no"), handshakes(ra, "client", "yes")) == (1, 1)
        await ra.reload()
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 3, 1000)
        assert (handshakes(ra, "client", "no"), handshakes(ra, "client", "yes")) == (2, 1)
        assert (handshakes(rb, "server", "no"), handshakes(rb, "server", "yes")) == (2, 1)
        # and resumption works again, with a ticket from after the reload
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 4, 1000)
        assert handshakes(ra, "client", "yes") == 2
        servers.cancel_scope.cancel()


async def test_a_peer_the_new_ca_distrusts_cannot_come_back_through_resumption(tmp_path: Path, p: Pki) -> None:
    """hvA's certificate is from a second CA that hvB trusts, until hvB reloads without it. hvA still
    holds hvB's ticket from before: it must meet a full handshake, and be refused, as a newcomer is."""
    pair_configs(tmp_path, p, "tls")
    bundle = tmp_path / "both-cas.pem"
    bundle.write_bytes((p.dir / "ca.pem").read_bytes() + (p.other_ca / "ca.pem").read_bytes())
    rewrite((tmp_path / "hvA.toml"), tls=TlsFiles(bundle, p.other_ca / "hvA.pem", p.other_ca / "hvA-key.pem"))
    rewrite((tmp_path / "hvB.toml"), tls=TlsFiles(bundle, p.dir / "hvB.pem", p.dir / "hvB-key.pem"))
    async with (
        running(config.load(tmp_path / "hvA.toml"), config.load(tmp_path / "hvB.toml")) as (ra, rb),
        trio.open_nursery() as servers,
    ):
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        for i in range(2):
            await roundtrip(tmp_path / "hvA/hvB/migration.sock", i, 1000)
        assert handshakes(rb, "server", "yes") == 1  # hvA holds a ticket, and hvB honours it

        rewrite((tmp_path / "hvB.toml"), tls=TlsFiles(p.dir / "ca.pem", p.dir / "hvB.pem", p.dir / "hvB-key.pem"))
        assert await rb.reload() == "[tls] paths changed, TLS files changed"
        await closed_without_a_byte(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 1
        assert handshakes(rb, "server", "yes") == 1  # no resumption got through
        assert counted(rb, "migrelay_connections_total", peer="hvA", result="ok") == 2
        servers.cancel_scope.cancel()


async def test_an_old_ticket_is_not_honoured_by_the_reloaded_server(tmp_path: Path, p: Pki) -> None:
    """The same, seen from a TLS client of the test's own: the ticket hvB issued before its reload
    resumes a session before it, and no longer after it (a full handshake, certificate and all)."""
    _, b = pair_configs(tmp_path, p, "tls")
    address = b.listen[0]
    context = client_context(loopback.tls_files(p.dir, "hvA"))

    async def handshake(ticket: SSL.Session | None) -> tuple[bool, SSL.Session | None]:
        """(resumed?, the ticket for the next one)"""
        sock = trio.socket.socket()
        await sock.connect((address.host, address.port))
        tls = TlsConn.client(sock, context, ticket)
        try:
            with trio.fail_after(10):
                await tls.handshake()
                # TLS 1.3 tickets come after the handshake: read until hvB has refused these bytes
                await tls.send_all(memoryview(b"\0" * 64))
                # a client that closes without close_notify marks its session not resumable
                await tls.send_eof()
                assert not (await read_header(tls, ReplyReader())).ok
            return resumed(tls.ssl), tls.ssl.get_session()
        finally:
            tls.close()

    async with running(b) as (rb,):
        first, ticket = await handshake(None)
        again, ticket = await handshake(ticket)
        assert (first, again) == (False, True)  # tickets work while nothing changes
        await rb.reload()
        # a ticket not used yet (one used once does not resume again anyway): refused all the same
        after, _ = await handshake(ticket)
        assert after is False


async def test_a_ticket_from_a_handshake_that_spans_the_reload_is_not_kept(tmp_path: Path, p: Pki) -> None:
    """hvA dials, the reload swaps hvA's TLS material, then that dial's handshake completes: the
    ticket it brings belongs to the old material, so hvA must not keep it for the next dial (which
    would fail on it, or resume without checking hvB against the new CA). The far end is the
    test's own TLS server with hvB's certificate, so that it can hold the handshake."""
    pair_configs(tmp_path, p, "tls")
    server = server_context(loopback.tls_files(p.dir, "hvB"))
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    rewrite(tmp_path / "hvA.toml", peers={"hvB": PeerConfig("hvB", Address("tls", host="127.0.0.1", port=port))})
    dialled, reloaded = trio.Event(), trio.Event()
    seen_resumed: list[bool] = []

    async def far_end(hold: bool) -> None:
        raw, _ = await listener.accept()
        if hold:
            dialled.set()
            await reloaded.wait()  # hvA's ClientHello waits in the socket meanwhile
        tls = TlsConn.server(raw, server)
        try:
            await tls.handshake()
            seen_resumed.append(resumed(tls.ssl))
            await read_header(tls, RequestReader())
            await tls.send_all(memoryview(encode_reply(Reply(STATUS_OK))))
            await tls.send_eof()
        finally:
            tls.close()

    async def probed() -> None:
        """The probe hvA sends its peers as it starts (relay/daemon/probe.py): a handshake, no request."""
        raw, _ = await listener.accept()
        tls = TlsConn.server(raw, server)
        try:
            await tls.handshake()
            with pytest.raises(ClosedBeforeHeader):
                await read_header(tls, RequestReader())
        finally:
            tls.close()

    async with running(config.load(tmp_path / "hvA.toml")) as (ra,), trio.open_nursery() as servers:
        await probed()
        servers.start_soon(far_end, True)
        client = await connect(tmp_path / "hvA/hvB/migration.sock")
        await dialled.wait()  # hvA's handshake is under way, on the material from before
        await ra.reload()
        reloaded.set()
        await eventually(lambda: handshakes(ra, "client", "no") == 1)
        client.close()
        servers.start_soon(far_end, False)
        second = await connect(tmp_path / "hvA/hvB/migration.sock")
        await eventually(lambda: len(seen_resumed) == 2)
        assert seen_resumed == [False, False]
        second.close()
        servers.cancel_scope.cancel()
    listener.close()


async def test_lower_limits_apply_to_the_streams_already_counted(tmp_path: Path, p: Pki) -> None:
    """[limits] apply to the running Admission: two streams open, the cap lowered to two, the third is refused."""
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, _), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        held = [await connect(tmp_path / "hvA/hvB/migration.sock") for _ in range(2)]
        for sock in held:
            await sock.send(b"open")
        assert ra.context is not None
        admission = ra.context.admission
        await eventually(lambda: admission.streams.get("hvB") == 2)
        rewrite((tmp_path / "hvA.toml"), limits=Limits(streams_per_peer=2))
        assert await ra.reload() == "[limits] changed, TLS files unchanged"
        await closed_without_a_byte(tmp_path / "hvA/hvB/migration.sock")
        assert counted(ra, "migrelay_refused_total", reason="streams_per_peer") == 1
        first = held.pop()
        first.shutdown(socket.SHUT_WR)
        assert len(await first.recv(100)) == 64  # its digest: it ended cleanly
        first.close()
        await eventually(lambda: admission.streams.get("hvB") == 1)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1000)
        held[0].close()
        servers.cancel_scope.cancel()


async def test_migrelay_reload_closes_the_sessions_of_a_removed_peer(tmp_path: Path, p: Pki) -> None:
    """The control socket's reload answers with what changed, or with why it did not."""
    a, b = pair_configs(tmp_path, p, "tls")

    async def ask(op: str, **args: str) -> object:
        return await trio.to_thread.run_sync(lambda: request(a.control_path, op, 10.0, **args))

    async with running(a, b):
        session = await ask("open", peer="hvB")
        assert isinstance(session, dict)
        sid = session["id"]
        assert (tmp_path / f"hvA/hvB/hvA_{sid}-migration.sock").is_socket()

        listen_changed(tmp_path / "hvA.toml")
        with pytest.raises(ControlError, match=r"reload failed, still serving .*: changing \[relay\] listen"):
            await ask("reload")
        assert await ask("list") != []

        rewrite((tmp_path / "hvA.toml"), listen=(), peers={})
        assert await ask("reload") == {"reloaded": "1 peer removed (hvB), 1 session of removed peers closed"}
        await eventually(lambda: not (tmp_path / f"hvA/hvB/hvA_{sid}-migration.sock").exists())
        assert not (tmp_path / f"hvA/hvB/hvA_{sid}-nbd.sock").exists()
        assert await ask("list") == []


async def test_a_relay_not_started_from_a_file_cannot_reload(tmp_path: Path, p: Pki) -> None:
    a, _ = pair_configs(tmp_path, p, "tls")
    async with running(dataclasses.replace(a, source=None)) as (ra,):
        with pytest.raises(ReloadFailed, match="not started from a config file"):
            await ra.reload()


async def test_a_reload_before_the_relay_is_ready_is_refused(tmp_path: Path, p: Pki) -> None:
    """Nothing to swap yet, and a READY=1 from it would tell systemd that the start is done."""
    a, _ = pair_configs(tmp_path, p, "tls")
    relay = Daemon(a)
    with pytest.raises(ReloadFailed, match="still starting"):
        await relay.reload()
    assert counted(relay, "migrelay_reload_failures_total") == 1
