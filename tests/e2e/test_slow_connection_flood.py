"""2,000 silent or trickling connections on the TLS port: each closed in time, real streams unharmed.

Why it matters: the relay's port is reachable from every host, and a slow-connection
flood (connections that never finish a handshake, or finish it one byte every two
seconds) is the cheapest attack there is. The relay must close every one of them
within handshake_timeout_s (or at once, over its [limits]), keep its memory bounded,
leave no fd behind, and carry a real stream beside them byte-exact. How fast that
stream goes beside the flood, against the same stream without it, is a figure of
`migrelay bench`, not of this test.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import trio

from relay.core import config
from relay.tools.bench.flood import FloodReport, flood
from tests.e2e.procs import serve
from tests.support import add_metrics, connect, listen, make_pki, pair_configs, recv_stream, scrape, send_stream

CONNECTIONS = 2000
STREAM_BYTES = 64 << 20
# Slack on top of handshake_timeout_s: the lifetime is counted from the client's connect(),
# which the kernel completes while the connection still waits in the accept backlog, and
# 2000 connections plus a stream load a 2-core machine.
CLOSE_MARGIN_S = 3.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_slow_connection_flood(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # the flood's own sockets
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    port_b = add_metrics(tmp_path / "hvB.toml")
    b_cfg = config.load(tmp_path / "hvB.toml")
    timeout_s = b_cfg.handshake_timeout_s
    address = b_cfg.listen[0]
    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml") as (_, b):
        pid = b.proc.pid
        fds_before = len(os.listdir(f"/proc/{pid}/fd"))
        rss_before = rss_mib(pid)
        peak = [rss_before]
        result: dict[str, object] = {}
        floods: list[FloodReport] = []

        async def watch_rss() -> None:
            while True:
                peak[0] = max(peak[0], rss_mib(pid))
                await trio.sleep(0.1)

        async def stream() -> None:
            dest = await listen(tmp_path / "hvB/hvB/migration.sock")
            async with trio.open_nursery() as n:

                async def far() -> None:
                    conn, _ = await dest.accept()
                    with conn:
                        result["far"] = await recv_stream(conn)

                async def near() -> None:
                    await trio.sleep(1)  # the flood is in place
                    with await connect(tmp_path / "hvA/hvB/migration.sock") as sock:
                        result["sent"] = await send_stream(sock, 7, STREAM_BYTES)
                        await sock.recv(1)

                n.start_soon(far)
                n.start_soon(near)

        async def scenario() -> None:
            async with trio.open_nursery() as n:
                n.start_soon(watch_rss)
                n.start_soon(stream)
                floods.append(await flood(address.host, address.port, CONNECTIONS, timeout_s + CLOSE_MARGIN_S + 5))
                n.cancel_scope.cancel()

        trio.run(scenario)
        report = floods[0]
        print(f"\nflood: {report.summary()}; relay RSS {rss_before:.0f} MiB -> peak {peak[0]:.0f} MiB")
        assert result["far"] == (STREAM_BYTES, result["sent"])
        assert report.opened == CONNECTIONS and report.still_open == 0, report.summary()
        assert report.longest_s <= timeout_s + CLOSE_MARGIN_S, report.summary()
        # over [limits] (1024 unauthenticated), the oldest were closed to make room for newcomers
        samples = scrape(port_b)
        refused = {dict(k[1])["reason"]: v for k, v in samples.items() if k[0] == "migrelay_refused_total"}
        assert refused.get("unauthenticated", 0) > 0, refused
        assert peak[0] - rss_before < 64, f"RSS grew by {peak[0] - rss_before:.0f} MiB"
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{pid}/fd")) > fds_before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(f"/proc/{pid}/fd")) <= fds_before
