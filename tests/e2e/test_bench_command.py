"""`migrelay bench` runs and writes its table, JSON and plot.

Why it matters: operators benchmark their migrations with it; it has to work on a fresh
machine, not only on the one it was written on. This checks the outputs, never the
figures: speed targets are judged from the bench's own interleaved runs, not by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
