"""What the series say: live byte counts, stream durations, peer_up, build and process info.

Two relays in-process over real loopback TLS; each series read from the relay's own
registry (what its /metrics renders) or, where the endpoint matters, scraped.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from relay import __version__
from relay.core import config
from relay.core.config import TlsFiles
from relay.daemon.datapath import hotloop
from relay.daemon.metrics import openssl_version
from relay.daemon.probe import PEER_PROBE_INTERVAL_S
from relay.daemon.server import Daemon
from relay.tools import pki
from tests.integration.conftest import counted, echo_server, eventually, running, with_good_stream_in_flight
from tests.support import Pki, add_metrics, connect, listen, metric_total, pair_configs, scrape


@pytest.fixture
def patient_autojump() -> trio.abc.Clock:
    """Virtual time that jumps only after 50 ms of real idleness, so real loopback I/O still happens."""
    return trio.testing.MockClock(autojump_threshold=0.05)


def value(relay: Daemon, name: str, **labels: str) -> float | None:
    """The one sample of `name` with exactly these labels, or None if there is none."""
    for family in relay.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def peer_up(relay: Daemon) -> float | None:
    return value(relay, "migrelay_peer_up", peer="hvB")


async def test_bytes_rise_while_a_stream_runs(tmp_path: Path, p: Pki) -> None:
    """A slow stream (the libvirt RPC channel, a throttled migration) shows its bytes as they pass,
    not at its end; and at its end they are counted once, not twice."""
    a, b = pair_configs(tmp_path, p, "tls")
    tx_on_a = {"peer": "hvB", "channel": "migration", "direction": "tx"}
    rx_on_b = {"peer": "hvA", "channel": "migration", "direction": "rx"}
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        sock = await connect(tmp_path / "hvA/hvB/migration.sock")
        sent = 0
        for piece in (100_000, 50_000, 1):
            await sock.send(b"x" * piece)
            sent += piece
            await eventually(lambda: counted(ra, "migrelay_bytes_total", **tx_on_a) == sent)  # noqa: B023
            await eventually(lambda: counted(rb, "migrelay_bytes_total", **rx_on_b) == sent)  # noqa: B023
        assert counted(rb, "migrelay_active_streams") == 1, "the stream should still be running"
        sock.shutdown(socket.SHUT_WR)
        assert len(await sock.recv(100)) == 64  # the far end's digest: the stream ended
        sock.close()
        await eventually(lambda: counted(rb, "migrelay_streams_closed_total") == 1)
        await eventually(lambda: counted(ra, "migrelay_streams_closed_total") == 1)
        assert counted(ra, "migrelay_bytes_total", **tx_on_a) == sent
        assert counted(rb, "migrelay_bytes_total", **rx_on_b) == sent
        assert counted(ra, "migrelay_bytes_total", peer="hvB", channel="migration", direction="rx") == 64
        servers.cancel_scope.cancel()


async def test_stream_duration_is_observed_when_a_stream_ends(
    tmp_path: Path, p: Pki, patient_autojump: trio.abc.Clock
) -> None:
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a, b) as (ra, rb), trio.open_nursery() as servers:
        servers.start_soon(echo_server, await listen(tmp_path / "hvB/hvB/migration.sock"), servers)
        sock = await connect(tmp_path / "hvA/hvB/migration.sock")
        await sock.send(b"held open")
        await eventually(lambda: counted(rb, "migrelay_active_streams") == 1)
        await trio.sleep(90)
        assert value(ra, "migrelay_stream_duration_seconds_count", channel="migration") in (None, 0.0)
        sock.shutdown(socket.SHUT_WR)
        await sock.recv(100)
        sock.close()
        for relay in (ra, rb):
            await eventually(lambda: counted(relay, "migrelay_streams_closed_total") == 1)  # noqa: B023
            assert value(relay, "migrelay_stream_duration_seconds_count", channel="migration") == 1
            assert value(relay, "migrelay_stream_duration_seconds_bucket", channel="migration", le="60.0") == 0
            assert value(relay, "migrelay_stream_duration_seconds_bucket", channel="migration", le="120.0") == 1
            assert 90 <= (value(relay, "migrelay_stream_duration_seconds_sum", channel="migration") or 0) < 91
        servers.cancel_scope.cancel()


async def test_peer_up_follows_every_dial(tmp_path: Path, p: Pki) -> None:
    """A stream's dial says whether the peer is up at once, without waiting for the next probe.
    A refusal means up: the peer answered."""
    a, b = pair_configs(tmp_path, p, "tls")
    overlay = tmp_path / "hvA/hvB/migration.sock"
    async with running(a) as (ra,):
        await eventually(lambda: peer_up(ra) == 0)  # the probe at start found nobody
        async with running(b):
            sock = await connect(overlay)  # nothing listens on hvB's migration.sock: refused there
            assert await sock.recv(10) == b""
            sock.close()
            assert counted(ra, "migrelay_connections_total", result="refused") == 1
            assert peer_up(ra) == 1
        sock = await connect(overlay)  # hvB is gone: the dial fails
        assert await sock.recv(10) == b""
        sock.close()
        assert counted(ra, "migrelay_connections_total", result="failed") == 1
        assert peer_up(ra) == 0


async def test_probes_follow_a_peer_and_cost_it_nothing(
    tmp_path: Path, p: Pki, patient_autojump: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """With no migration running, a peer's death or return shows within a probe interval; the
    probes do not disturb a stream, are not counted by the peer, and its log sees them at debug.
    The prober logs a change, not every probe."""
    caplog.set_level(logging.DEBUG, logger="migrelay")
    a, b = pair_configs(tmp_path, p, "tls")
    async with running(a) as (ra,):
        await eventually(lambda: peer_up(ra) == 0)
        async with running(b) as (rb,):
            # virtual time: polling with eventually() would cost 50 ms of real time per look
            await trio.sleep(PEER_PROBE_INTERVAL_S + 1)
            assert peer_up(ra) == 1
            assert counted(ra, "migrelay_connections_total") == 0  # no stream: the probe found it

            async def probes_meanwhile() -> None:
                await trio.sleep(3 * PEER_PROBE_INTERVAL_S)

            await with_good_stream_in_flight(tmp_path, probes_meanwhile)
            await eventually(lambda: counted(rb, "migrelay_streams_closed_total", result="ok") == 1)
            # the peer counted the one stream, and none of the probes
            assert counted(rb, "migrelay_connections_total") == 1
            assert counted(rb, "migrelay_tls_handshakes_total", role="server") == 1
            assert counted(ra, "migrelay_tls_handshakes_total", role="client") == 1
        await trio.sleep(2 * PEER_PROBE_INTERVAL_S + 1)  # two probes find it gone: one line
        assert peer_up(ra) == 0
    probed = [r for r in caplog.records if "completed a handshake and closed" in r.getMessage()]
    assert len(probed) >= 4 and all(r.levelno == logging.DEBUG for r in probed)
    changes = [(r.levelname, r.getMessage().split(": ")[0]) for r in caplog.records if r.name == "migrelay.probe"]
    hvb = f"peer hvB at {a.peers['hvB'].address}"
    assert changes == [("WARNING", f"{hvb} is down"), ("INFO", f"{hvb} is up again"), ("WARNING", f"{hvb} is down")]


async def test_a_peer_that_refuses_our_certificate_is_down(
    tmp_path: Path, p: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """In TLS 1.3 our handshake completes before the peer has checked our certificate: the probe
    must wait for its verdict. Here hvB has moved to a new CA and hvA not yet (hvA trusts both)."""
    a, b = pair_configs(tmp_path, p, "tls")
    pki.issue(p.other_ca, "hvB")
    both = tmp_path / "both-cas.pem"
    both.write_bytes((p.dir / "ca.pem").read_bytes() + (p.other_ca / "ca.pem").read_bytes())
    a = dataclasses.replace(a, tls=TlsFiles(both, p.dir / "hvA.pem", p.dir / "hvA-key.pem"))
    new = p.other_ca
    b = dataclasses.replace(b, tls=TlsFiles(new / "ca.pem", new / "hvB.pem", new / "hvB-key.pem"))
    async with running(b), running(a) as (ra,):
        await eventually(lambda: peer_up(ra) is not None)
        assert peer_up(ra) == 0
    (why,) = [r.getMessage() for r in caplog.records if r.name == "migrelay.probe"]
    assert why.endswith("is down: it refused this relay's certificate: tlsv1 alert unknown ca"), why


async def test_build_and_process_series_on_every_relay(tmp_path: Path, p: Pki) -> None:
    """Two relays in one process: each registry has its own process collector (no clash)."""
    pair_configs(tmp_path, p, "tls")
    ports = [add_metrics(tmp_path / f"{name}.toml") for name in ("hvA", "hvB")]
    configs = [config.load(tmp_path / f"{name}.toml") for name in ("hvA", "hvB")]
    async with running(*configs):
        for port in ports:
            samples = await trio.to_thread.run_sync(scrape, port)
            build = {"version": __version__, "openssl": openssl_version(), "loops": hotloop.describe()}
            assert samples[("migrelay_build_info", frozenset(build.items()))] == 1
            assert openssl_version().startswith("OpenSSL ")
            assert metric_total(samples, "process_resident_memory_bytes") > 10 << 20
            assert metric_total(samples, "process_open_fds") > 5
            assert metric_total(samples, "process_cpu_seconds_total") > 0
            assert metric_total(samples, "process_max_fds") > 0
