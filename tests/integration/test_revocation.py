"""[tls] crl: a revoked host is refused at every full handshake, whichever side it is on.

Why it matters: a hypervisor that is stolen, compromised or decommissioned keeps a valid
certificate for years; revoking it is the only way to keep it from receiving a guest's
memory. The CRL is read when the TLS contexts are built, so contexts rebuilt after
`migrelay pki revoke` (what a reload does) refuse the host, and the ones built before
do not: that is what the first test shows, with real handshakes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio
from cryptography import x509
from OpenSSL import SSL

from relay.core import config
from relay.core.config import Config, TlsFiles
from relay.core.errors import HANDSHAKE_REASONS, HandshakeFailed, HandshakeReason
from relay.daemon.datapath import TlsConn
from relay.daemon.reload import ReloadFailed
from relay.daemon.server import Daemon
from relay.daemon.tlsconfig import client_context, resumed, server_context
from relay.tools import loopback, pki
from tests.integration.conftest import counted, echo_server, eventually, roundtrip, running
from tests.support import Pki, connect, listen, pair_configs


def files(p: Pki, name: str, crl: Path | None) -> TlsFiles:
    return dataclasses.replace(loopback.tls_files(p.dir, name), crl=crl)


async def handshake(
    server_tls: SSL.Context, client_tls: SSL.Context, ticket: SSL.Session | None = None
) -> dict[str, HandshakeReason | None]:
    """One real TLS handshake over a socket pair: how each side's ended (None: it succeeded)."""
    left, right = trio.socket.socketpair()
    ends = {"server": TlsConn.server(left, server_tls), "client": TlsConn.client(right, client_tls, ticket)}
    outcome: dict[str, HandshakeReason | None] = {}

    async def run(role: str) -> None:
        try:
            await ends[role].handshake()
            outcome[role] = None
        except HandshakeFailed as e:
            outcome[role] = e.reason
            ends[role].close()  # the other side must not wait for a Finished that never comes

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(run, "server")
            n.start_soon(run, "client")
    left.close()
    right.close()
    return outcome


async def test_contexts_built_after_the_crl_changes_refuse_the_revoked_peer(p: Pki) -> None:
    crl = p.dir / "crl.pem"
    pki.reissue_crl(p.dir)  # checking on, nothing revoked yet
    server_before = server_context(files(p, "hvB", crl))
    client_before = client_context(files(p, "hvA", crl))
    assert await handshake(server_before, client_context(files(p, "hvA", crl))) == {"server": None, "client": None}

    pki.revoke(p.dir, "hvA")
    # accepting: a context built now refuses hvA; the one built before still has the old CRL
    assert (await handshake(server_context(files(p, "hvB", crl)), client_before))["server"] == "revoked"
    assert await handshake(server_before, client_before) == {"server": None, "client": None}

    pki.revoke(p.dir, "hvB")
    # dialling: a client context built now refuses hvB as a server (whose own context checks nothing)
    unchecked_server = server_context(files(p, "hvB", None))
    assert (await handshake(unchecked_server, client_context(files(p, "hvC", crl))))["client"] == "revoked"
    assert (await handshake(unchecked_server, client_context(files(p, "hvC", None))))["client"] is None


def with_crl(path: Path, crl: Path) -> Config:
    """The config written at `path`, now with [tls] crl."""
    tls = config.load(path).tls
    assert tls is not None
    return config.load(loopback.with_changes(path, tls=dataclasses.replace(tls, crl=crl)))


def failures(relay: Daemon) -> dict[str, float]:
    return {r: n for r in HANDSHAKE_REASONS if (n := counted(relay, "migrelay_handshake_failures_total", reason=r))}


@pytest.mark.parametrize("revoker", ["hvB", "hvA"], ids=["accepting relay revokes", "dialling relay revokes"])
async def test_a_revoked_peer_is_refused_with_the_reason_logged_and_counted(
    tmp_path: Path, p: Pki, revoker: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The revoking relay counts `revoked` and logs the subject and serial; the revoked one sees an alert."""
    a, b = pair_configs(tmp_path, p, "tls")
    revoked = "hvA" if revoker == "hvB" else "hvB"
    pki.revoke(p.dir, revoked)
    if revoker == "hvB":
        b = with_crl(tmp_path / "hvB.toml", p.dir / "crl.pem")
    else:
        a = with_crl(tmp_path / "hvA.toml", p.dir / "crl.pem")
    async with running(a, b) as (ra, rb):
        client = await connect(tmp_path / "hvA/hvB/migration.sock")
        with client, trio.fail_after(10):
            assert await client.recv(10) == b""  # refused: closed without a byte
        ours, theirs = (rb, ra) if revoker == "hvB" else (ra, rb)
        await eventually(lambda: failures(ours) == {"revoked": 1} and failures(theirs) == {"protocol": 1})
        assert counted(ra, "migrelay_connections_total", peer="hvB", result="failed") == 1
        assert counted(rb, "migrelay_connections_total", peer="unknown", result="failed") == 1
    serial = f"{x509.load_pem_x509_certificate((p.dir / f'{revoked}.pem').read_bytes()).serial_number:x}"
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"certificate revoked (subject CN={revoked}, serial {serial})" in m for m in lines), lines


async def test_a_relay_with_a_crl_still_serves_the_hosts_it_does_not_list(tmp_path: Path, p: Pki) -> None:
    """CRL checking on (both relays, hvC revoked): hvA and hvB carry a stream as before."""
    pair_configs(tmp_path, p, "tls")
    pki.revoke(p.dir, "hvC")
    a = with_crl(tmp_path / "hvA.toml", p.dir / "crl.pem")
    b = with_crl(tmp_path / "hvB.toml", p.dir / "crl.pem")
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 3, 1 << 20)
        servers.cancel_scope.cancel()
        assert failures(ra) == failures(rb) == {}


async def ticket_from(
    server_tls: SSL.Context, client_tls: SSL.Context, ticket: SSL.Session | None = None
) -> SSL.Session:
    """A handshake that succeeds, offering `ticket`: the client's ticket for the next one (and whether it resumed)."""
    left, right = trio.socket.socketpair()
    with left, right:
        server, client = TlsConn.server(left, server_tls), TlsConn.client(right, client_tls, ticket)
        async with trio.open_nursery() as n:
            n.start_soon(server.handshake)
            await client.handshake()
        await server.send_all(memoryview(b"x"))  # TLS 1.3 tickets come after the handshake, before data
        assert await client.recv_into(memoryview(bytearray(1))) == 1
        assert resumed(client.ssl) == (ticket is not None), "resumption expected exactly when a ticket is offered"
        new_ticket = client.ssl.get_session()
        for end in (client, server):  # OpenSSL spoils the ticket of a connection freed without close_notify
            await end.send_eof()
    assert new_ticket is not None
    return new_ticket


async def test_a_session_ticket_from_before_the_new_crl_is_not_resumed(p: Pki) -> None:
    """A resumed handshake checks no certificate: a context built after the CRL changed must not resume old tickets.

    It does not: each server context has ticket keys of its own. (The dialling side's
    tickets are Forwarding.tls_tickets, which whatever rebuilds client_tls must empty.)
    """
    crl = p.dir / "crl.pem"
    pki.reissue_crl(p.dir)
    client_tls = client_context(files(p, "hvA", crl))
    server_before = server_context(files(p, "hvB", crl))
    ticket = await ticket_from(server_before, client_tls)
    ticket = await ticket_from(server_before, client_tls, ticket)  # the same context resumes it
    pki.revoke(p.dir, "hvA")
    outcome = await handshake(server_context(files(p, "hvB", crl)), client_tls, ticket)
    assert outcome["server"] == "revoked"


async def test_a_host_revoked_then_reloaded_is_refused_at_once(tmp_path: Path, p: Pki) -> None:
    """`migrelay pki revoke` and a reload: the revoked host's next connection is refused,
    even though it holds a session ticket from before (the reload drops tickets and keys)."""
    pki.reissue_crl(p.dir)  # an empty CRL to start with
    a_cfg, b_cfg = pair_configs(tmp_path, p, "tls")
    b_path = loopback.with_changes(tmp_path / "hvB.toml", tls=files(p, "hvB", p.dir / "crl.pem"))
    b_cfg = config.load(b_path)
    async with running(a_cfg, b_cfg) as (_, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        await roundtrip(tmp_path / "hvA/hvB/migration.sock", 1, 1 << 20)  # hvA now holds a ticket
        pki.revoke(p.dir, "hvA")
        await rb.reload("test")
        client = await connect(tmp_path / "hvA/hvB/migration.sock")
        with trio.fail_after(10):
            assert await client.recv(10) == b""  # refused: closed without a byte
        client.close()
        await eventually(lambda: counted(rb, "migrelay_handshake_failures_total", reason="revoked") == 1)
        servers.cancel_scope.cancel()


async def test_an_older_crl_put_back_is_refused_at_reload(tmp_path: Path, p: Pki) -> None:
    """CRL 2 revokes hvA; CRL 1, from before, is copied back over it: the reload is refused, so
    hvA stays out (it came back in, found by the attacker review). A newer CRL still reloads."""
    pki.reissue_crl(p.dir)
    first = (p.dir / "crl.pem").read_bytes()
    pair_configs(tmp_path, p, "tls")
    b_path = loopback.with_changes(tmp_path / "hvB.toml", tls=files(p, "hvB", p.dir / "crl.pem"))
    pki.revoke(p.dir, "hvA")
    async with running(config.load(b_path)) as (rb,):
        (p.dir / "crl.pem").write_bytes(first)
        with pytest.raises(ReloadFailed, match=r"is number \d+, older than number \d+ in force"):
            await rb.reload("test")
        assert counted(rb, "migrelay_reload_failures_total") == 1
        pki.revoke(p.dir, "hvA")  # from the older file: a new number, hvA listed again
        await rb.reload("test")
        assert counted(rb, "migrelay_reloads_total") == 1
