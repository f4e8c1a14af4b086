"""Opt-in probe (MIGRELAY_REVIEW_PROBES=1, ~40 s, statistical): a real peer beside a silent-connection
flood at the default [limits], from 32 source addresses against 5000.

Measured on the review machine (2 shared cores), 100 streams of a peer with 4 channels in use:
  no flood:        0 failed, setup median 50 ms, p90 57 ms
  32 addresses:    0 failed, setup median 27 ms, p90 100 ms     (7901 evictions)
  5000 addresses:  8 failed, setup median 65 ms, p90 1033 ms    (15009 evictions)
  (a second run: 32 addresses 0 failed, p90 103 ms; 5000 addresses 2 failed, p90 3249 ms)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import trio

from relay import config
from tests.integration.test_relays import counted, echo_server, roundtrip, running
from tests.support import listen, make_pki, pair_configs

pytestmark = pytest.mark.skipif(not os.environ.get("MIGRELAY_REVIEW_PROBES"), reason="opt-in review probe")
CHURN = Path(__file__).parent / "probes" / "churn.py"
CHANNELS = ("migration.sock", "nbd.sock", "x1.sock", "x2.sock")


@pytest.mark.parametrize("addresses", [0, 32, 5000])
async def test_peer_beside_a_flood(tmp_path: Path, addresses: int) -> None:
    pair_configs(tmp_path, make_pki(tmp_path), "tls", channels=CHANNELS)
    for n in ("hvA", "hvB"):
        text = (tmp_path / f"{n}.toml").read_text().replace("handshake_timeout_s = 3", "handshake_timeout_s = 10")
        (tmp_path / f"{n}.toml").write_text(text)
    a, b = config.load(tmp_path / "hvA.toml"), config.load(tmp_path / "hvB.toml")
    addr = b.listen[0]
    async with running(a, b) as (_, rb), trio.open_nursery() as nursery:
        for name in CHANNELS:
            nursery.start_soon(echo_server, await listen(tmp_path / f"hvB/hvB/{name}"), nursery)
        proc = None
        if addresses:
            # 1500 silent connections a second, each kept until 3000 newer ones exist
            argv = [sys.executable, str(CHURN), addr.host, str(addr.port), "3000", "25", "1500", str(addresses)]
            proc = await trio.lowlevel.open_process(argv)
            await trio.sleep(3)
        stats = {"ok": 0, "failed": 0}
        times: list[float] = []

        async def peer(name: str, seed: int) -> None:
            for i in range(25):
                t = time.monotonic()
                try:
                    with trio.fail_after(10):
                        await roundtrip(tmp_path / f"hvA/hvB/{name}", seed * 1000 + i, 4096)
                    stats["ok"] += 1
                    times.append(time.monotonic() - t)
                except (AssertionError, OSError, UnicodeDecodeError, trio.TooSlowError):
                    stats["failed"] += 1

        async with trio.open_nursery() as peers:
            for i, name in enumerate(CHANNELS):
                peers.start_soon(peer, name, i + 1)
        times.sort()
        evictions = counted(rb, "migrelay_refused_total", reason="unauthenticated")
        print(
            f"\nflood from {addresses} addresses: peer {stats}, setup median {times[len(times) // 2] * 1000:.0f} ms, "
            f"p90 {times[int(len(times) * 0.9)] * 1000:.0f} ms; evictions {evictions:.0f}"
        )
        if proc is not None:
            proc.kill()
            await proc.wait()
        nursery.cancel_scope.cancel()
