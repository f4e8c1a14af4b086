"""64 streams in flight through two `migrelay serve` processes over TLS for SOAK_S seconds.

Why it matters: a relay sits in the path of every migration on a host, for months. A fd or a
buffer kept per stream, a stream that hangs instead of failing, a broken stream that looks
complete to QEMU, or a counter that lies would each show only after thousands of streams;
this run makes thousands, of every kind at once (bulk both ways 1 KiB .. 1 GiB, tiny,
empty, refused names, aborts by either end, slow readers), and checks every one of them at
both ends, the relays' fds, RSS and counters. `make test` runs it bounded (SOAK_S=90, about
two minutes); `make soak` for ten minutes (SOAK_S=600).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.e2e.load import (
    ABORTS,
    BIG_BYTES,
    COMPLETE_KINDS,
    ERRORS,
    GIB,
    MIB,
    Kind,
    Load,
    Seen,
    Stream,
    broken_reasons,
    fd_count,
    outcome_table,
    rss_bytes,
    start_targets,
    write_pair,
)
from tests.e2e.procs import serve
from tests.support import make_pki, scrape

SOAK_S: Final = float(os.environ.get("SOAK_S", "90"))
SOAK_SEED: Final = int(os.environ.get("SOAK_SEED", "0")) or int(time.time())
STREAMS_IN_FLIGHT: Final = 64
MAX_STREAM_BYTES: Final = 1 * GIB
# Stream kinds by how often they are drawn (not by the time they take: bulk and slow ones
# hold their slot far longer, so most slots carry bytes at any moment).
WEIGHTS: Final = {
    Kind.BULK: 25,
    Kind.TINY: 20,
    Kind.EMPTY: 15,
    Kind.REFUSED: 15,
    Kind.ABORT_CLIENT: 10,
    Kind.ABORT_TARGET: 10,
    Kind.SLOW_CLIENT: 2.5,
    Kind.SLOW_TARGET: 2.5,
}
# No new big stream this close to the end, so the run drains within seconds, not minutes.
BIG_CUTOFF_S: Final = min(30.0, SOAK_S / 3)
# After the deadline, streams in flight finish (the stall watchdog catches a hang sooner).
DRAIN_BOUND_S: Final = 300.0
SAMPLE_PERIOD_S: Final = 1.0
# RSS grows while allocator arenas and TLS buffers reach their working size (here ~20 s: a
# 15 s run saw +10 MiB between 5 s and its end, 90 s runs nothing after 30 s); after that it
# must be flat. A run too short for two windows after warm-up prints RSS but does not judge it.
WARMUP_S: Final = 30.0
RSS_JUDGED_FROM_S: Final = 2 * WARMUP_S
# Growth allowed from the median RSS of the first third after warm-up to that of the last
# third. Measured on this 2-core VM (five runs of 20-90 s): after warm-up each relay's RSS
# stayed within a 7 MiB band and the two medians differed by 1.7 MiB at most; 8 MiB is
# about 4x that drift. A leak of L bytes per stream adds L x (streams between the windows'
# middles): ~800 in the bounded run catch ~10 KiB per stream; at the same rate SOAK_S=600
# would put ~7,000 between them, ~1 KiB (the summary prints the bound of each run).
# Checked by planting a 32 KiB-per-stream leak in session._pump: a 45 s run failed, +22 MiB.
RSS_GROWTH_TOLERANCE_BYTES: Final = 8 * MIB
FD_SETTLE_S: Final = 15.0
DRAIN_ACTIVE_S: Final = 30.0


@dataclass
class Sample:
    t: float
    rss: tuple[int, int]
    fds: tuple[int, int]
    streams_done: int
    in_flight: int


@dataclass
class Run:
    load: Load
    seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    leftover: list[str] = field(default_factory=list)


async def soak(files_overlay: Path, target_dir: Path, pids: tuple[int, int]) -> Run:
    load = Load.new(files_overlay, SOAK_SEED)
    run = Run(load)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    start = trio.current_time()
    deadline = start + SOAK_S
    done = [0]

    async def slot() -> None:
        while trio.current_time() < deadline:
            kind = load.rng.choices(kinds, weights)[0]
            allow_big = trio.current_time() < deadline - BIG_CUTOFF_S
            await load.run_client(load.plan(kind, MAX_STREAM_BYTES, allow_big))
            done[0] += 1

    async def sampler() -> None:
        while True:
            run.samples.append(
                Sample(
                    trio.current_time() - start,
                    (rss_bytes(pids[0]), rss_bytes(pids[1])),
                    (fd_count(pids[0]), fd_count(pids[1])),
                    done[0],
                    load.clients_in_flight,
                )
            )
            await trio.sleep(SAMPLE_PERIOD_S)

    async with trio.open_nursery() as background:
        await start_targets(load, target_dir, background)
        background.start_soon(load.watchdog)
        background.start_soon(sampler)
        with trio.move_on_after(SOAK_S + DRAIN_BOUND_S):
            async with trio.open_nursery() as slots:
                for _ in range(STREAMS_IN_FLIGHT):
                    slots.start_soon(slot)
        run.seconds = trio.current_time() - start
        with trio.move_on_after(DRAIN_ACTIVE_S):
            while load.active_targets:  # noqa: ASYNC110  (a counter, not an event)
                await trio.sleep(0.05)
        run.leftover = [w.what for w in load.watches]
        background.cancel_scope.cancel()
    return run


def total(metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and labels.items() <= dict(ls).items())


def settle_fds(pid: int, baseline: int) -> int:
    deadline = time.monotonic() + FD_SETTLE_S
    while (n := fd_count(pid)) != baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def stable_fds(pid: int) -> int:
    """An idle relay's fd count (two equal readings, so no transient scrape is included)."""
    last = fd_count(pid)
    while True:
        time.sleep(0.2)
        if (n := fd_count(pid)) == last:
            return n
        last = n


def check_streams(streams: list[Stream], empty_targets: int) -> list[str]:
    """Every invariant on the streams themselves; returns what is wrong."""
    bad: list[str] = []
    for s in streams:
        ends = [e for e in (s.client, s.target) if e is not None]
        if s.hung or any(h.seen in (Seen.CORRUPT, Seen.OTHER) for e in ends for h in (e.recv, e.send)):
            bad.append(s.describe())
        elif s.client is None:
            bad.append(s.describe() + " (the client did not finish)")
        elif s.kind in COMPLETE_KINDS:
            if s.target is None or {s.client.recv.seen, s.client.send.seen, s.target.recv.seen, s.target.send.seen} != {
                Seen.COMPLETE
            }:
                bad.append(s.describe())
        elif s.kind == Kind.ABORT_CLIENT:
            # the target must see an error or a short stream, never a complete one
            if s.target is None or s.target.recv.seen not in ERRORS:
                bad.append(s.describe())
        elif s.kind == Kind.ABORT_TARGET:
            if s.client.recv.seen not in ERRORS:
                bad.append(s.describe())
        elif s.kind == Kind.REFUSED:
            if s.target is not None or s.client.recv.seen not in (Seen.SHORT, Seen.RESET) or s.client.recv.bytes:
                bad.append(s.describe())
        elif s.kind == Kind.EMPTY and s.client.recv.seen not in (Seen.COMPLETE, Seen.STOPPED):
            bad.append(s.describe())
    empties = sum(s.kind == Kind.EMPTY for s in streams)
    if empty_targets != empties:
        bad.append(f"{empties} empty streams, but the target saw {empty_targets} empty connections")
    return bad


def rss_verdict(samples: list[Sample], pid_index: int) -> tuple[int, int, int, int, int, int]:
    """(first-third median, last-third median, min, max, end, streams between the windows), from
    warm-up to the end of the load: all 64 streams in flight, so the windows compare like with like."""
    after = [s for s in samples if WARMUP_S <= s.t <= SOAK_S] or samples[-1:]
    third = max(1, len(after) // 3)
    first, last = after[:third], after[-third:]
    values = [s.rss[pid_index] for s in after]
    return (
        int(statistics.median(s.rss[pid_index] for s in first)),
        int(statistics.median(s.rss[pid_index] for s in last)),
        min(values),
        max(values),
        values[-1],
        last[len(last) // 2].streams_done - first[len(first) // 2].streams_done,
    )


def test_soak_tls_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_pair(tmp_path, make_pki(tmp_path))
    with serve(files.a, files.b) as relays:
        pids = (relays[0].proc.pid, relays[1].proc.pid)
        baseline = (stable_fds(pids[0]), stable_fds(pids[1]))
        rss_before = (rss_bytes(pids[0]), rss_bytes(pids[1]))
        run = trio.run(soak, files.overlay, files.target_dir, pids)
        end_fds = (settle_fds(pids[0], baseline[0]), settle_fds(pids[1], baseline[1]))
        rss_after = (rss_bytes(pids[0]), rss_bytes(pids[1]))
        on_a, on_b = scrape(files.metrics_a), scrape(files.metrics_b)
        alive = [r.proc.poll() is None for r in relays]
        logs = [r.output() for r in relays]
    exit_codes = [r.proc.returncode for r in relays]

    streams = list(run.load.streams.values())
    by_kind = Counter(s.kind for s in streams)
    forwarded = [s for s in streams if s.kind != Kind.REFUSED]
    refused = by_kind[Kind.REFUSED]
    aborted = [s for s in streams if s.kind in ABORTS]
    clean = len(forwarded) - len(aborted)
    rss = [rss_verdict(run.samples, i) for i in (0, 1)]
    moved = run.load.payload_bytes
    big = [s for s in streams if s.big]
    largest = max((max(s.a2b, s.b2a) for s in streams), default=0)
    largest_complete = max(
        (max(s.a2b, s.b2a) for s in streams if s.kind == Kind.BULK and s.client and s.client.recv.bytes == s.b2a),
        default=0,
    )
    lags = sorted(s.max_lag for s in streams if s.kind in (Kind.SLOW_CLIENT, Kind.SLOW_TARGET))
    size_classes = Counter(
        "<1 MiB" if max(s.a2b, s.b2a) < MIB else "<64 MiB" if max(s.a2b, s.b2a) <= BIG_BYTES else ">64 MiB"
        for s in streams
        if s.kind == Kind.BULK
    )

    loaded = [s.in_flight for s in run.samples if 1.0 <= s.t <= SOAK_S]
    lines = [
        f"soak: {SOAK_S:.0f} s of load + drain = {run.seconds:.1f} s, seed {SOAK_SEED}, "
        f"{len(streams)} streams; in flight while loading (1 s samples): min {min(loaded, default=0)}, "
        f"median {statistics.median(loaded) if loaded else 0:.0f}",
        "  by kind: " + ", ".join(f"{k.name.lower()} {by_kind[k]}" for k in Kind if by_kind[k]),
        "  bulk sizes (larger direction): "
        + ", ".join(f"{c} {n}" for c, n in sorted(size_classes.items()))
        + f"; largest {largest / MIB:.0f} MiB one way (completed: {largest_complete / MIB:.0f} MiB); "
        f"{len(big)} big (> 64 MiB)",
        f"  payload verified: {moved / GIB:.2f} GiB (both directions), {moved / run.seconds / 1e6:.0f} MB/s aggregate",
        "  slow readers, most bytes in flight between sender and reader: "
        + (f"median {statistics.median(lags) / MIB:.1f} MiB, max {lags[-1] / MIB:.1f} MiB" if lags else "none"),
    ]
    for i, name in enumerate(("hvA", "hvB")):
        first, last, lo, hi, end, between = rss[i]
        peak = max((s.fds[i] for s in run.samples), default=0)
        lines.append(
            f"  {name}: fds {baseline[i]} before, peak {peak}, {end_fds[i]} after; RSS {rss_before[i] / MIB:.1f} MiB "
            f"before, from {WARMUP_S:.0f} s to the end of the load min {lo / MIB:.1f} max {hi / MIB:.1f} "
            f"end {end / MIB:.1f}, idle after {rss_after[i] / MIB:.1f}; medians of the first and last third "
            f"{first / MIB:.1f} -> {last / MIB:.1f} MiB ({(last - first) / MIB:+.1f}"
            f"{'' if SOAK_S >= RSS_JUDGED_FROM_S else ', not judged: SOAK_S < 60'}; {between} streams between: "
            f"a leak of {RSS_GROWTH_TOLERANCE_BYTES / max(between, 1) / 1024:.1f} KiB per stream would exceed "
            f"{RSS_GROWTH_TOLERANCE_BYTES / MIB:.0f} MiB)"
        )
    for name, side, peer in (("hvA", on_a, "hvB"), ("hvB", on_b, "hvA")):
        lines.append(
            f"  {name} counters: connections "
            + ", ".join(
                f"{r} {total(side, 'migrelay_connections_total', result=r):.0f}" for r in ("ok", "refused", "failed")
            )
            + "; streams closed "
            + ", ".join(
                f"{r} {total(side, 'migrelay_streams_closed_total', peer=peer, result=r):.0f}" for r in ("ok", "failed")
            )
        )
    lines.append("  outcomes (kind: client | target):")
    for (kind, client, target), n in sorted(outcome_table(streams).items()):
        lines.append(f"    {n:6d} {kind}: {client} | {target}")
    for name, log in zip(("hvA", "hvB"), logs, strict=True):
        for reason, n in broken_reasons(log).most_common():
            lines.append(f"  {name} broken streams: {n:5d} {reason}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert all(alive), "a relay died during the soak"
    assert min(loaded) == STREAMS_IN_FLIGHT, f"only {min(loaded)} streams in flight at one point"
    assert exit_codes == [0, 0], logs
    for name, log in zip(("hvA", "hvB"), logs, strict=True):
        assert "Traceback" not in log, f"{name} logged a traceback"
    assert not run.load.anomalies, run.load.anomalies[:20]
    assert not run.leftover, f"still running after the drain: {run.leftover[:20]}"
    bad = check_streams(streams, run.load.empty_targets)
    assert not bad, f"{len(bad)} bad streams:\n" + "\n".join(bad[:30])
    assert end_fds == baseline, f"fds before {baseline}, after {end_fds}"
    if SOAK_S >= RSS_JUDGED_FROM_S:
        for i in (0, 1):
            first, last = rss[i][0], rss[i][1]
            assert last - first <= RSS_GROWTH_TOLERANCE_BYTES, f"RSS grew {(last - first) / MIB:.1f} MiB"

    # the relays' own counters agree with what the generator did
    conn = "migrelay_connections_total"
    closed = "migrelay_streams_closed_total"
    for side, peer in ((on_a, "hvB"), (on_b, "hvA")):
        assert total(side, conn, peer=peer, result="ok") == len(forwarded)
        assert total(side, conn, peer=peer, result="refused") == refused
        assert total(side, conn, result="failed") == 0
        assert total(side, closed, peer=peer, result="ok") == clean
        assert total(side, closed, peer=peer, result="failed") == len(aborted)
        assert total(side, "migrelay_active_streams") == 0
    # every refusal reason was exercised, counted under its channel label on hvA
    for name in ("gone", "stale", "secret"):
        assert total(on_a, conn, peer="hvB", channel=name, result="refused") > 0
