"""The benchmark harness: interleaved runs, medians and ratios, table, JSON and plot.

Runs are interleaved (setup A, B, C, A, B, C, ...) so slow drifts of a noisy machine hit
every setup alike; each figure is the median of its repetitions, with min-max spread.
CPU is the forwarders' own (user+system, from /proc/PID/stat, children included), per GB
moved; the load generator runs in separate processes and is not counted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TextIO

from relay.tools.bench import setups
from relay.tools.bench.setups import Setup

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE: Final = os.sysconf("SC_PAGE_SIZE")
RSS_SAMPLE_S: Final = 0.1
LOAD = [sys.executable, "-m", "relay.tools.bench.load"]

# the flood row: one stream through a migrelay TLS pair, quiet ("migrelay-tls") and beside
# FLOOD_CONNECTIONS silent/trickling connections on the destination relay's port (FLOODED)
FLOODED: Final = "migrelay-tls+flood"
FLOOD_CONNECTIONS: Final = 2000
FLOOD_WARMUP_S: Final = 3.0

# (figure, setup, baseline, test, how, target): how is "mbps", "cpu", "rtt", "rtt99", "blocktime" (those four:
# lower is better), "fairness" or "cores" (the busiest relay's CPU seconds per wall second, no baseline).
# The issue "Latency and cores" set the round-trip, TLS, postcopy and cores lines; the others are earlier targets.
TARGETS: Final = (
    ("1 KiB round trip, TLS pair, p50", "migrelay-tls", "stunnel", "rtt", "rtt", 1.0),
    ("1 KiB round trip, TLS pair, p99", "migrelay-tls", "stunnel", "rtt", "rtt99", 1.0),
    ("1 KiB round trip, tcp pair, p50", "migrelay-tcp", "socat-tcp", "rtt", "rtt", 1.1),
    ("1 KiB round trip, tcp pair, p99", "migrelay-tcp", "socat-tcp", "rtt", "rtt99", 1.1),
    ("1 KiB round trip, unix pair, p50", "migrelay-unix", "socat-unix", "rtt", "rtt", 1.1),
    ("1 KiB round trip, unix pair, p99", "migrelay-unix", "socat-unix", "rtt", "rtt99", 1.1),
    ("TLS pair, 1 stream, MB/s", "migrelay-tls", "stunnel", "streams=1", "mbps", 2.0),
    ("TLS pair, 1 stream, CPU-s/GB", "migrelay-tls", "stunnel", "streams=1", "cpu", 0.5),
    ("TLS pair, 4 streams, MB/s", "migrelay-tls", "stunnel", "streams=4", "mbps", 2.0),
    ("TLS pair, 16 streams, MB/s", "migrelay-tls", "stunnel", "streams=16", "mbps", 2.0),
    ("TLS pair, 4 streams, busiest relay CPU/wall", "migrelay-tls", None, "streams=4", "cores", 1.0),
    ("postcopy blocktime", "migrelay-tls", "socat-tls", "postcopy", "blocktime", 1.0),
    ("tcp pair, 1 stream, MB/s", "migrelay-tcp", "socat-tcp", "streams=1", "mbps", 1.1),
    ("unix pair, 1 stream, MB/s", "migrelay-unix", "socat-unix", "streams=1", "mbps", 1.1),
    ("16 plaintext streams, slowest/fastest", "migrelay-tcp", None, "streams=16", "fairness", 0.8),
    ("real 1 GiB migration, MB/s", "migrelay-tls", "socat-tls", "migration", "mbps", 2.0),
    ("TLS stream beside 2000 slow conns, MB/s", FLOODED, "migrelay-tls", "flood", "mbps", 0.7),
)
MIGRATION_SETUPS: Final = ("direct", "socat-tls", "migrelay-tls")
# the QEMU rows: precopy of an idle 1 GiB guest, postcopy of a 256 MiB guest reading all its RAM
QEMU_TESTS: Final = ("migration", "postcopy")
RSS_LIMIT_MIB: Final = 64


@dataclass
class Sample:
    setup: str
    test: str
    rep: int
    mbps: float | None = None
    cpu_s_per_gb: float | None = None
    fairness: float | None = None
    rss_mib: float | None = None
    # the busiest forwarder process's CPU seconds per wall-clock second: above 1.0 it ran
    # on more than one core at once (the threaded data path, bench/README.md)
    cpu_per_wall: float | None = None
    rtt_p50_us: float | None = None
    rtt_p99_us: float | None = None
    total_s: float | None = None
    downtime_ms: float | None = None
    guest_mib: int | None = None
    blocktime_ms: float | None = None  # postcopy: QEMU's postcopy-blocktime (all vCPUs blocked)
    vcpu_blocktime_ms: float | None = None  # postcopy: the most blocked vCPU's (the guest has one)
    postcopy_requests: float | None = None  # postcopy: pages the destination requested
    ram_sha256: str | None = None  # QEMU rows: the guest's RAM after the run, equal on both sides


@dataclass
class Report:
    machine: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)

    def values(self, setup: str, test: str, attr: str) -> list[float]:
        out = []
        for s in self.samples:
            value = getattr(s, attr)
            if s.setup == setup and s.test == test and value is not None:
                out.append(float(value))
        return out

    def median(self, setup: str, test: str, attr: str) -> float | None:
        vals = self.values(setup, test, attr)
        return statistics.median(vals) if vals else None


def _descendants(pids: Iterable[int]) -> set[int]:
    wanted = set(pids)
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # exited while we looked
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                grew = True
    return wanted


def cpu_seconds(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """user+system of the processes, their live descendants and their reaped children."""
    total = 0
    for pid in _descendants(p.pid for p in procs):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def rss_mib(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """The largest resident set among the forwarder processes (per process, as the target says)."""
    largest = 0
    for pid in _descendants(p.pid for p in procs):
        try:
            largest = max(largest, int(Path(f"/proc/{pid}/statm").read_text().split()[1]))
        except OSError:
            continue
    return largest * PAGE / 2**20


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def throughput(setup: Setup, streams: int, total_bytes: int, rep: int) -> Sample:
    per_stream = total_bytes // streams
    peak = [0.0]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(RSS_SAMPLE_S):
            peak[0] = max(peak[0], rss_mib(setup.procs))

    watcher = threading.Thread(target=sample_rss, daemon=True)
    cpu0 = cpu_seconds(setup.procs)
    each0 = [cpu_seconds([p]) for p in setup.procs]
    watcher.start()
    out = subprocess.run(
        [*LOAD, "source", str(setup.entry), str(streams), str(per_stream)], capture_output=True, text=True, timeout=600
    )
    done.set()
    watcher.join()
    time.sleep(0.2)  # let forked children (socat) be reaped into cutime
    cpu = cpu_seconds(setup.procs) - cpu0
    each = [cpu_seconds([p]) - c0 for p, c0 in zip(setup.procs, each0, strict=True)]
    results = _lines(out.stdout)
    if len(results) != streams:
        raise RuntimeError(f"{setup.name}: {len(results)}/{streams} streams finished: {out.stderr[-500:]}")
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    rates = [r["bytes"] / (r["end"] - r["start"]) for r in results]
    moved = per_stream * streams
    return Sample(
        setup.name,
        f"streams={streams}",
        rep,
        mbps=moved / wall / 1e6,
        cpu_s_per_gb=cpu / (moved / 1e9) if setup.procs else None,
        fairness=min(rates) / max(rates),
        rss_mib=peak[0] if setup.procs else None,
        cpu_per_wall=max(each) / wall if each else None,
    )


def round_trip(setup: Setup, count: int, rep: int) -> Sample:
    out = subprocess.run([*LOAD, "pingpong", str(setup.entry), str(count)], capture_output=True, text=True, timeout=600)
    rtts = sorted(_lines(out.stdout)[0]["rtts"])
    return Sample(
        setup.name, "rtt", rep, rtt_p50_us=rtts[len(rtts) // 2] * 1e6, rtt_p99_us=rtts[int(len(rtts) * 0.99)] * 1e6
    )


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run(
    names: Sequence[str],
    streams: Sequence[int] = (1, 4, 16),
    total_bytes: int = 1 << 30,
    reps: int = 3,
    rtt_count: int = 2000,
    progress: Callable[[int], Any] | None = None,
) -> Report:
    report = Report(machine())
    if reps == 0:
        return report  # only the QEMU or flood rows: no setup to start
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-") as tmp:
        root = Path(tmp)
        started: list[Setup] = []
        sinks: list[subprocess.Popen[str]] = []
        try:
            for name in names:
                setup = setups.start(name, root)
                started.append(setup)
                sink = subprocess.Popen([*LOAD, "sink", str(setup.sink)], stdout=subprocess.DEVNULL, text=True)
                sinks.append(sink)
                setups.wait_for(setup.sink, [], f"sink for {name}")
            plan: list[Callable[[], Sample]] = []
            for rep in range(reps):
                for n in streams:
                    plan += [partial(throughput, setup, n, total_bytes, rep) for setup in started]
                plan += [partial(round_trip, setup, rtt_count, rep) for setup in started]
            for step in plan:
                report.samples.append(step())
                if progress is not None:
                    progress(1)
        finally:
            for sink in sinks:
                sink.terminate()
            for setup in started:
                setup.stop()
    return report


def run_migrations(
    report: Report,
    reps: int,
    progress: Callable[[int], Any] | None = None,
    test: str = "migration",
    guest_mib: int | None = None,
    postcopy_push_bytes_per_s: int = 0,
) -> None:
    """Real QEMU migrations direct, through socat-TLS and through migrelay-TLS, interleaved.

    `test` is "migration" (precopy, 1 GiB guest) or "postcopy" (256 MiB guest reading all its
    RAM; its background push capped at `postcopy_push_bytes_per_s`, 0: uncapped);
    `guest_mib` overrides the guest's size.
    """
    from relay.tools.bench import migration

    if test not in QEMU_TESTS:
        raise ValueError(f"unknown QEMU row {test!r} (known: {', '.join(QEMU_TESTS)})")
    mib = guest_mib or (migration.GUEST_MIB if test == "migration" else migration.POSTCOPY_GUEST_MIB)
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-") as tmp:
        root = Path(tmp)
        started: list[Setup] = []
        guest = Path(tempfile.mkdtemp(prefix="migrelay-bench-guest-", dir="/dev/shm")) / "src.ram"
        try:
            migration.fill_guest_ram(guest, mib)
            for name in MIGRATION_SETUPS:
                started.append(setups.start(name, root))
            for rep in range(reps):
                for setup in started:
                    if test == "postcopy":
                        result = migration.postcopy_through(setup, guest, postcopy_push_bytes_per_s)
                    else:
                        result = migration.migrate_through(setup, guest)
                    report.samples.append(Sample(setup.name, test, rep, guest_mib=mib, **result))
                    if progress is not None:
                        progress(1)
        finally:
            for setup in started:
                setup.stop()
            shutil.rmtree(guest.parent, ignore_errors=True)


def run_flood(report: Report, reps: int, total_bytes: int, progress: Callable[[int], Any] | None = None) -> None:
    """One stream through a migrelay TLS pair, quiet and beside a slow-connection flood, interleaved."""
    with tempfile.TemporaryDirectory(prefix="migrelay-bench-") as tmp:
        setup = setups.start("migrelay-tls", Path(tmp))
        sink = subprocess.Popen([*LOAD, "sink", str(setup.sink)], stdout=subprocess.DEVNULL, text=True)
        try:
            setups.wait_for(setup.sink, [], "sink for the flood bench")
            assert setup.peer_port is not None
            host, port = setup.peer_port
            for rep in range(reps):
                quiet = throughput(setup, 1, total_bytes, rep)
                quiet.test = "flood"
                report.samples.append(quiet)
                attack = subprocess.Popen(
                    [sys.executable, "-m", "relay.tools.bench.flood", host, str(port), str(FLOOD_CONNECTIONS), "3600"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    time.sleep(FLOOD_WARMUP_S)  # the flood is in place: held, trickling, reopening
                    flooded = throughput(setup, 1, total_bytes, rep)
                finally:
                    attack.terminate()
                    attack.wait()
                flooded.setup, flooded.test = FLOODED, "flood"
                report.samples.append(flooded)
                if progress is not None:
                    progress(1)
        finally:
            sink.terminate()
            setup.stop()


def ratio(report: Report, setup: str, baseline: str | None, test: str, how: str) -> float | None:
    attr = {
        "mbps": "mbps",
        "cpu": "cpu_s_per_gb",
        "rtt": "rtt_p50_us",
        "rtt99": "rtt_p99_us",
        "fairness": "fairness",
        "cores": "cpu_per_wall",
        "blocktime": "blocktime_ms",
    }[how]
    mine = report.median(setup, test, attr)
    if baseline is None:
        return mine
    theirs = report.median(baseline, test, attr)
    return mine / theirs if mine is not None and theirs else None


def target_rows(report: Report) -> list[tuple[str, str, float | None, str, bool | None]]:
    rows = []
    for figure, setup, baseline, test, how, target in TARGETS:
        value = ratio(report, setup, baseline, test, how)
        lower_is_better = how in ("cpu", "rtt", "rtt99", "blocktime")
        goal = f"{'<=' if lower_is_better else '>='} {target}" + ("x " + baseline if baseline else "")
        if how == "cores":
            goal = f"> {target} (more than one core)"
        if value is None:
            ok = None
        elif how == "cores":
            ok = value > target
        else:
            ok = value <= target if lower_is_better else value >= target
        rows.append((figure, setup, value, goal, ok))
    rss = [s.rss_mib for s in report.samples if s.setup.startswith("migrelay") and s.test == "streams=16" and s.rss_mib]
    if rss:
        rows.append(
            ("relay RSS with 16 streams, MiB", "migrelay-*", max(rss), f"<= {RSS_LIMIT_MIB}", max(rss) <= RSS_LIMIT_MIB)
        )
    flooded = report.values(FLOODED, "flood", "rss_mib")
    if flooded:
        rows.append(("relay RSS beside 2000 slow conns, MiB", FLOODED, max(flooded), "(reported)", None))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: Report, out: TextIO) -> None:
    tests = sorted({s.test for s in report.samples if s.test.startswith("streams=")}, key=lambda t: int(t[8:]))
    names = list(dict.fromkeys(s.setup for s in report.samples if s.test.startswith("streams=") or s.test == "rtt"))
    m = report.machine
    out.write(f"\nmachine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, {m['date']}\n")
    if names:
        _throughput_table(report, tests, names, out)
    _qemu_rows(report, out)
    out.write("\ntargets (ratios in this run):\n")
    for figure, setup, value, goal, ok in target_rows(report):
        verdict = "n/a" if ok is None else ("met" if ok else "MISSED")
        out.write(f"  {figure:<40} {setup:<14} {_fmt(value, '.2f'):>6}  {goal:<18} {verdict}\n")


def _throughput_table(report: Report, tests: list[str], names: list[str], out: TextIO) -> None:
    out.write("medians of interleaved runs (min-max); MB/s aggregate, CPU-s/GB of both forwarders\n\n")
    head = f"{'setup':<15}" + "".join(f"{t + ' MB/s':>22}{'CPU-s/GB':>10}" for t in tests)
    head += f"{'RTT p50 us':>12}{'p99':>8}{'RSS MiB':>9}"
    out.write(head + "\n" + "-" * len(head) + "\n")
    for name in names:
        row = f"{name:<15}"
        for t in tests:
            vals = report.values(name, t, "mbps")
            spread = f"({min(vals):.0f}-{max(vals):.0f})" if vals else ""
            row += f"{_fmt(report.median(name, t, 'mbps'), '.0f'):>10} {spread:>11}"
            row += f"{_fmt(report.median(name, t, 'cpu_s_per_gb'), '.2f'):>10}"
        row += f"{_fmt(report.median(name, 'rtt', 'rtt_p50_us'), '.0f'):>12}"
        row += f"{_fmt(report.median(name, 'rtt', 'rtt_p99_us'), '.0f'):>8}"
        rss = report.values(name, "streams=16", "rss_mib") or report.values(name, "streams=1", "rss_mib")
        row += f"{_fmt(max(rss) if rss else None, '.0f'):>9}"
        out.write(row + "\n")


def _guest_size(report: Report, test: str) -> str:
    mib = next((s.guest_mib for s in report.samples if s.test == test and s.guest_mib), None)
    return "?" if mib is None else f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


def _qemu_rows(report: Report, out: TextIO) -> None:
    if any(s.test == "migration" for s in report.samples):
        out.write(
            f"\nreal QEMU migration, {_guest_size(report, 'migration')} guest of random RAM, running, TCG (medians):\n"
        )
        for name in MIGRATION_SETUPS:
            if report.values(name, "migration", "mbps"):
                out.write(
                    f"  {name:<14} {_fmt(report.median(name, 'migration', 'total_s'), '.2f'):>6} s total, "
                    f"downtime {_fmt(report.median(name, 'migration', 'downtime_ms'), '.0f'):>4} ms, "
                    f"{_fmt(report.median(name, 'migration', 'mbps'), '.0f'):>5} MB/s\n"
                )
    if any(s.test == "postcopy" for s in report.samples):
        out.write(
            f"\nreal QEMU postcopy, {_guest_size(report, 'postcopy')} guest reading all its RAM on the destination, TCG"
            " (medians, min-max):\n"
        )
        for name in MIGRATION_SETUPS:
            if vals := report.values(name, "postcopy", "blocktime_ms"):
                blocktime, spread = _fmt(statistics.median(vals), ".0f"), f"({min(vals):.0f}-{max(vals):.0f})"
                requests = _fmt(report.median(name, "postcopy", "postcopy_requests"), ".0f")
                out.write(
                    f"  {name:<14} blocktime {blocktime:>5} ms {spread:<11} {requests:>6} page requests, "
                    f"{_fmt(report.median(name, 'postcopy', 'total_s'), '.2f'):>6} s total\n"
                )


def write_json(report: Report, path: Path) -> None:
    data = {
        "machine": report.machine,
        "samples": [asdict(s) for s in report.samples],
        "targets": [
            dict(zip(("figure", "setup", "value", "goal", "met"), row, strict=True)) for row in target_rows(report)
        ],
    }
    path.write_text(json.dumps(data, indent=1))


def plot(report: Report, path: Path) -> None:
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = sorted({s.test for s in report.samples if s.test.startswith("streams=")}, key=lambda t: int(t[8:]))
    names = list(dict.fromkeys(s.setup for s in report.samples if s.test.startswith("streams=")))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(len(tests), 1)
    for i, t in enumerate(tests):
        xs = [j + i * width for j in range(len(names))]
        ax1.bar(xs, [report.median(n, t, "mbps") or 0 for n in names], width, label=t.replace("=", " "))
    ax1.set_xticks([j + width * (len(tests) - 1) / 2 for j in range(len(names))], names, rotation=35, ha="right")
    ax1.set_ylabel("MB/s (median, aggregate)")
    ax1.set_title("Throughput through a forwarder pair")
    if tests:
        ax1.legend()
    cpu_names = [n for n in names if report.median(n, "streams=1", "cpu_s_per_gb") is not None]
    ax2.bar(cpu_names, [report.median(n, "streams=1", "cpu_s_per_gb") or 0 for n in cpu_names], color="tab:red")
    ax2.set_ylabel("CPU seconds per GB (both forwarders)")
    ax2.set_title("CPU cost, 1 stream")
    ax2.tick_params(axis="x", rotation=35)
    m = report.machine
    fig.suptitle(f"migrelay bench — {m['cpu']}, {m['cores']} cores, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(
    setup_names: Sequence[str],
    streams: Sequence[int],
    size: int,
    reps: int,
    rtt_count: int,
    migration_reps: int,
    flood_reps: int | None,
    out: Path,
    postcopy_reps: int = 0,
) -> None:
    """`migrelay bench`: every benchmark in one interleaved run; the table, then JSON and a plot in `out`."""
    from relay.core.errors import LocalError
    from relay.tools.bench import migration

    names = list(setup_names) or list(setups.ALL)
    unknown = [n for n in names if n not in setups.ALL + setups.VARIANTS]
    if unknown:
        raise LocalError(f"unknown setup(s) {', '.join(unknown)} (known: {', '.join(setups.ALL + setups.VARIANTS)})")
    missing = setups.missing_tools()
    if missing:
        raise LocalError(f"baselines not installed: {', '.join(missing)} (apt-get install socat stunnel4 haproxy)")
    try:
        from tqdm import tqdm
    except ImportError:
        raise LocalError("migrelay bench needs its extra: pip install 'migrelay[bench]'") from None
    migrations, postcopies = migration_reps, postcopy_reps
    if (migrations or postcopies) and (why := migration.available()) is not None:
        print(f"migrelay bench: skipping the QEMU migration benchmarks: {why}", file=sys.stderr)
        migrations = postcopies = 0
    floods = (reps if flood_reps is None else flood_reps) if "migrelay-tls" in names else 0
    steps = reps * (len(streams) + 1) * len(names) + (migrations + postcopies) * len(MIGRATION_SETUPS) + floods
    with tqdm(total=steps, desc="bench", unit="run", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        report = run(names, streams, size, reps, rtt_count, progress=bar.update)
        if migrations:
            run_migrations(report, migrations, progress=bar.update)
        if postcopies:
            run_migrations(report, postcopies, progress=bar.update, test="postcopy")
        if floods:
            run_flood(report, floods, size, progress=bar.update)
    table(report, sys.stdout)
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "bench.json")
    plot(report, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'}")
