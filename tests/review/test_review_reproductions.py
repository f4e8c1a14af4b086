"""Reproductions from the security review of the hardening work (branch wt-review).

Each test states what the README or the hardening issue promises and is a strict xfail while
the code does not keep that promise: it flips to XPASS (a failure under strict) once fixed,
so the marker must go with the fix.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from relay import config
from relay.admission import Admission
from relay.config import Limits
from tests import netns
from tests.e2e.procs import need, serve
from tests.e2e.test_blackholed_peer_detected_in_time import Case, establish, write_configs
from tests.integration.test_limits import open_from
from tests.integration.test_relays import running
from tests.support import add_metrics, listen, make_pki, pair_configs


def open_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


# --- 1. out of fds: the systemd watchdog ping ends the daemon ---------------------------------


@pytest.mark.xfail(strict=True, reason="relay/systemd.py Notifier.notify opens a socket per ping, outside any guard")
def test_a_watchdog_ping_while_out_of_fds_does_not_end_the_daemon(tmp_path: Path) -> None:
    """README, Hardening: 'Out of file descriptors ... fails that connection only'.

    systemd/migrelay.service sets WatchdogSec=30s, so the relay pings every 15 s, and each ping
    opens a new AF_UNIX socket. With the fd table full at that moment (a flood, a busy
    hypervisor, held /metrics connections) socket() fails with EMFILE in the watchdog task,
    which no guard covers: the accept nursery fails and `migrelay serve` exits with
    'internal error: OSError(24, ...)', taking every in-flight migration with it.
    """
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    with serve(tmp_path / "hvB.toml", env={"WATCHDOG_USEC": "1000000"}) as (b,):  # a ping every 0.5 s
        pid = b.proc.pid
        # the lowest free fd, sampled a few times: each ping holds one more fd for a moment
        first_free = 1 << 20
        for _ in range(5):
            used = open_fds(pid)
            first_free = min(first_free, min(n for n in range(max(used) + 2) if n not in used))
            time.sleep(0.05)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (first_free, hard))  # no fd left, for 2 s
        time.sleep(2)
        status = b.proc.poll()
        if status is None:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert status is None, f"the relay exited with {status}:\n{b.output()[-400:]}"


# --- 2. one log line per unauthenticated connection --------------------------------------------


@pytest.mark.xfail(strict=True, reason="relay/session.py:474 logs every failed handshake, unthrottled")
async def test_connections_that_fail_their_handshake_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """relay/guard.py: 'Reasons for closing or refusing connections that an attacker can trigger at
    will are logged through RateLimitedLog, so they cannot flood the journal.'

    A TCP connect and close (no byte sent) from anyone is one WARNING line "failed connection from
    ...: TLS handshake failed: unexpected EOF"; a silent one is "handshake timed out"; garbage is
    "http request" etc. Under journald's default rate limit (10000 per 30 s per service) a flood
    also makes journald drop the relay's real lines (a failed migration's reason).
    """
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
    assert len(lines) <= 5, f"{len(lines)} warning lines for 100 connect+close"


# --- 3. /metrics: a client that never reads holds its connection for good ------------------------


@pytest.mark.xfail(strict=True, reason="relay/metrics.py:115 send_all has no timeout; no cap on metrics connections")
async def test_a_metrics_client_that_never_reads_does_not_hold_its_connection(tmp_path: Path) -> None:
    """The request is bounded (5 s, 8 KiB); the answer is not. A body larger than what the
    socket buffers take (68 KiB here: what a relay in a 16-host cluster exposes once every
    peer has used every channel) blocks send_all for as long as the client keeps its window
    shut. Anyone who can reach [metrics] listen (127.0.0.1: every local user, including the
    QEMU user; a Prometheus network otherwise) can so pin relay fds without limit - and the
    relay out of fds refuses peers and, with finding 1, dies.
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
        assert len(rb.metrics.render()) > 60_000
        clients = []
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(30):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the smallest window the kernel allows
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            clients.append(s)
        await trio.sleep(8)  # past HTTP_REQUEST_TIMEOUT_S (5 s)
        held = len(os.listdir("/proc/self/fd")) - before - len(clients)
        for s in clients:
            s.close()
    assert held <= 2, f"{held} of 30 metrics connections still held 8 s after their request"


# --- 4. admission: a flood spread over many addresses makes a busy peer the victim ---------------


def _admission(**limits: int) -> Admission:
    return Admission(Limits(**limits), Counter("refused", "", ["reason"], registry=CollectorRegistry()))


@pytest.mark.xfail(strict=True, reason="relay/admission.py:107-113 evicts the busiest exact address")
def test_a_flood_with_one_connection_per_address_does_not_evict_a_peer() -> None:
    """README, Hardening: 'over the overall caps the oldest connection of the source that holds
    the most is closed instead, so a flood from a few addresses pays for itself and a peer
    relay ... still gets in.' From many addresses (IPv6: any /64 has 2^64; a botnet) the flood
    holds one slot per address, and a peer relay with two connections authenticating at once
    (libvirt.sock + migration.sock, two sessions, NBD beside multifd) is the busiest source:
    every new flood connection closes one of the peer's. tests/review/test_flood_from_many_addresses.py
    shows it end to end (opt-in, statistical).
    """
    adm = _admission(unauthenticated=64)
    closed: list[str] = []
    for i in range(62):
        adm.unauthenticated_slot(f"2001:db8::{i + 1:x}", lambda: closed.append("flood"))
    adm.unauthenticated_slot("192.0.2.2", lambda: closed.append("peer"))  # hv2: libvirt.sock
    adm.unauthenticated_slot("192.0.2.2", lambda: closed.append("peer"))  # hv2: migration.sock
    for i in range(2):
        adm.unauthenticated_slot(f"2001:db8::1:{i:x}", lambda: closed.append("flood"))
    assert closed == ["flood", "flood"], closed


@pytest.mark.xfail(strict=True, reason="relay/admission.py:107 evict_one scans every source address on each arrival")
def test_eviction_costs_the_same_whatever_the_number_of_source_addresses() -> None:
    """At the default cap (1024) with one connection per address, each arrival over the cap
    costs ~1 ms of the one thread that also runs every pump (measured 0.9 ms; 10 ms at a cap
    of 10000), against ~30 us with 32 addresses (the bench's flood). A relay that can evict
    only ~500 connections a second lets its accept backlog overflow, and real peers' SYNs
    are dropped with the flood's.
    """

    def per_admission(addresses: int) -> float:
        adm = _admission(unauthenticated=1024, unauthenticated_per_address=1024)
        for i in range(1024):
            adm.unauthenticated_slot(f"10.0.{(i % addresses) >> 8}.{(i % addresses) & 255}", lambda: None)
        t = time.perf_counter()
        for i in range(300):
            a = (1024 + i) % addresses
            adm.unauthenticated_slot(f"10.0.{a >> 8}.{a & 255}", lambda: None)
        return (time.perf_counter() - t) / 300

    few, many = per_admission(32), per_admission(4096)
    assert many < 5 * few, f"{many * 1e6:.0f} us per admission from 4096 addresses, {few * 1e6:.0f} us from 32"


# --- 5. the ACK watchdog: 'owed' is counted from the last ACK, not from when one fell due --------


@pytest.mark.xfail(strict=True, reason="relay/net.py:70-79 owed_ack_s is the time since the last ACK arrived")
def test_a_quiet_stream_survives_a_loss_shorter_than_the_ack_timeout(tmp_path: Path) -> None:
    """README, Dead peers: the relay 'ends the connection once the peer has owed an ACK ... for
    tcp_ack_timeout_s'. owed_ack_s returns tcpi_last_ack_recv whenever anything is outstanding,
    so after a quiet spell the first bytes sent are 'owed' for the whole spell. ack timeout 6 s,
    5 s quiet, then 3 s of loss while sending: the relay logs 'the peer acknowledged nothing
    for 8s' and aborts a live stream. With the defaults (keepalive every 20 s when idle) the
    effective timeout after a quiet spell is 20-40 s, not 40; with tcp_keepalive_idle_s >=
    tcp_ack_timeout_s (the config accepts it) a loss of about ack_timeout/2 ends it.
    """
    need("ip", "nft")
    if (reason := netns.missing()) is not None:
        pytest.skip(reason)
    p = make_pki(tmp_path)
    case = Case("quiet", 30, 10, 3, 6.0, in_flight=True)

    async def scenario(root: Path, link: netns.Link) -> str:
        with await listen(root / "hvB/hvB/migration.sock") as dest:
            client, target = await establish(root / "hvA/hvB/migration.sock", dest)
            with client, target:
                await trio.sleep(5)  # a quiet stream (a paused guest, an idle libvirt connection)
                link.blackhole()
                await client.send(b"x" * 1000)
                await trio.sleep(3)
                link.restore()
                got = b""
                with trio.move_on_after(5):
                    while len(got) < 1000 and (chunk := await target.recv(65536)):
                        got += chunk
                return "survived" if len(got) == 1000 else f"lost after {len(got)} bytes"

    with netns.veth_pair() as link:
        hosts = {tmp_path / "hvA.toml": link.a, tmp_path / "hvB.toml": link.b}
        a_cfg, b_cfg = write_configs(tmp_path, p, link, case)
        with serve(a_cfg, b_cfg, prefix=lambda cfg: hosts[cfg].argv()) as (ra, _):
            outcome = trio.run(scenario, tmp_path, link)
            log = ra.output()
    assert outcome == "survived", f"{outcome}; hvA: {log[log.find('broken') :][:120]}"
