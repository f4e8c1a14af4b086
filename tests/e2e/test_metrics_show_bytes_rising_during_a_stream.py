"""`curl` on /metrics during a stream shows its bytes rising, on both relays.

Why it matters: an operator watching a migration, and Prometheus computing rate(), need the
byte counters to move while a stream runs, a slow one too: the libvirt RPC channel carries
a few KiB over a whole migration, and a throttled migration (`--bandwidth`) a few MiB/s.
Counters pushed in 16 MiB batches showed such a stream as flat, then one step at its end.
Two real `migrelay serve` processes over TLS carry a stream of about 1 MiB/s; curl scrapes
both relays twice while it runs (once with --compressed, as Prometheus asks for gzip) and
sees the counters grow with what was sent, then settle on exactly the total at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from tests.e2e.procs import need, serve
from tests.support import Samples, add_metrics, connect, listen, make_pki, metric_total, pair_configs, parse_metrics

PIECE_BYTES = 64 << 10
PIECE_EVERY_S = 0.05  # ~1.3 MB/s: a 16 MiB batch would take 13 s to fill
SCRAPE_EVERY_S = 1.0


def streamed(on_a: Samples, on_b: Samples) -> tuple[float, float]:
    """The stream's bytes as each relay counts them: sent by hvA to hvB, received by hvB from hvA."""
    return (
        metric_total(on_a, "migrelay_bytes_total", peer="hvB", channel="migration", direction="tx"),
        metric_total(on_b, "migrelay_bytes_total", peer="hvA", channel="migration", direction="rx"),
    )


async def curl(port: int, *options: str) -> Samples:
    result = await trio.run_process(
        ["curl", "--silent", "--show-error", "--fail", "--max-time", "5", *options, f"http://127.0.0.1:{port}/metrics"],
        capture_stdout=True,
    )
    return parse_metrics(result.stdout.decode())


def test_metrics_show_bytes_rising_during_a_stream(tmp_path: Path) -> None:
    need("curl")
    pair_configs(tmp_path, make_pki(tmp_path), "tls")
    port_a, port_b = add_metrics(tmp_path / "hvA.toml"), add_metrics(tmp_path / "hvB.toml")
    seen: list[tuple[int, float, float]] = []  # (bytes sent before the scrape, on hvA, on hvB)

    async def stream() -> int:
        dest = await listen(tmp_path / "hvB/hvB/migration.sock")
        sent = 0

        async def far_end() -> None:
            conn, _ = await dest.accept()
            with conn:
                while await conn.recv(1 << 20):
                    pass

        async def near_end() -> None:
            nonlocal sent
            sock = await connect(tmp_path / "hvA/hvB/migration.sock")
            with sock:
                for _ in range(int(3 * SCRAPE_EVERY_S / PIECE_EVERY_S)):
                    piece = memoryview(b"m" * PIECE_BYTES)
                    while piece:
                        piece = piece[await sock.send(piece) :]
                    sent += PIECE_BYTES
                    await trio.sleep(PIECE_EVERY_S)

        async def scrapes() -> None:
            for options in ((), ("--compressed",)):
                await trio.sleep(SCRAPE_EVERY_S)
                before = sent
                on_a, on_b = await curl(port_a, *options), await curl(port_b, *options)
                seen.append((before, *streamed(on_a, on_b)))

        async with trio.open_nursery() as n:
            n.start_soon(far_end)
            n.start_soon(near_end)
            n.start_soon(scrapes)
        dest.close()
        return sent

    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml"):
        total = trio.run(stream)
        (sent1, a1, b1), (sent2, a2, b2) = seen
        # each scrape saw what had passed so far (what was sent before it, at least up to the
        # socket buffers in between), and the second saw more than the first
        assert 0 < a1 < a2 < total and 0 < b1 < b2 < total, seen
        assert a1 >= sent1 - (4 << 20) and a2 >= sent2 - (4 << 20), seen
        deadline = time.monotonic() + 10
        while True:
            final = streamed(trio.run(curl, port_a), trio.run(curl, port_b))
            if final == (total, total) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert final == (total, total)
