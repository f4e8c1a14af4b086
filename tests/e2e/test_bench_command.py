"""`migrelay bench` runs and writes its table, JSON and plot.

Why it matters: operators benchmark their migrations with it; it has to work on a fresh
machine, not only on the one it was written on. This checks the outputs, never the
figures: speed targets are judged from the bench's own interleaved runs, not by tests.
The QEMU rows cost minutes at their sizes; the postcopy row runs here at a tiny one.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from relay.tools.bench import run
from tests.e2e.procs import need


def test_bench_command(tmp_path: Path) -> None:
    need("socat", "stunnel4", "haproxy")
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "bench",
            "--setups",
            "direct,socat-unix,stunnel,migrelay-tls,migrelay-unix",
            "--streams",
            "1,2",
            "--size",
            "8M",
            "--reps",
            "1",
            "--rtt-count",
            "20",
            "--migration-reps",
            "0",
            "--postcopy-reps",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "migrelay-tls" in result.stdout and "targets (ratios in this run)" in result.stdout
    data = json.loads((out / "bench.json").read_text())
    samples = {(s["setup"], s["test"]) for s in data["samples"]}
    assert ("migrelay-unix", "streams=2") in samples and ("stunnel", "rtt") in samples
    assert all(s["mbps"] > 0 for s in data["samples"] if s["test"].startswith("streams="))
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_postcopy_row() -> None:
    """The postcopy row's code path at a tiny size: a 32 MiB page-reading guest, direct, through
    socat-TLS and through migrelay-TLS; the push is capped so that the destination's vCPU
    must fault pages in through every setup. Each run checks the destination's RAM against
    the source's (and fails otherwise); here: QEMU's blocktime came back, and the report."""
    need("socat", "qemu-system-x86_64")
    report = run.Report(run.machine())
    run.run_migrations(report, 1, test="postcopy", guest_mib=32, postcopy_push_bytes_per_s=8 << 20)
    assert sorted(s.setup for s in report.samples) == sorted(run.MIGRATION_SETUPS)
    for s in report.samples:
        assert s.test == "postcopy" and s.guest_mib == 32
        assert s.blocktime_ms is not None and s.blocktime_ms > 0, s
        assert s.vcpu_blocktime_ms is not None and s.vcpu_blocktime_ms >= s.blocktime_ms, s
        assert s.postcopy_requests is not None and s.postcopy_requests > 0, s
        assert s.total_s is not None and s.total_s > 0, s
        assert s.ram_sha256 is not None and len(s.ram_sha256) == 64  # both sides' RAM, equal
    out = io.StringIO()
    run.table(report, out)
    assert "real QEMU postcopy, 32 MiB guest reading all its RAM" in out.getvalue()
    [target] = [row for row in run.target_rows(report) if row[0] == "postcopy blocktime"]
    assert target[1] == "migrelay-tls" and target[2] is not None and target[3] == "<= 1.0x socat-tls", target


def test_bench_precopy_row() -> None:
    """The precopy row's code path at a tiny size: each run compares both sides' RAM."""
    need("socat", "qemu-system-x86_64")
    report = run.Report(run.machine())
    run.run_migrations(report, 1, guest_mib=64)
    assert sorted(s.setup for s in report.samples) == sorted(run.MIGRATION_SETUPS)
    for s in report.samples:
        assert s.test == "migration" and s.guest_mib == 64
        assert s.mbps is not None and s.mbps > 0 and s.downtime_ms is not None, s
        assert s.ram_sha256 is not None and len(s.ram_sha256) == 64
    out = io.StringIO()
    run.table(report, out)
    assert "real QEMU migration, 64 MiB guest of random RAM" in out.getvalue()
