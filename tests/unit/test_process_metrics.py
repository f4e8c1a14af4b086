"""The process series (CPU, RSS, fds) survive migrelay.service's sandbox.

systemd's `ProcSubset=pid` leaves a process its own /proc/self and hides the rest of
/proc, /proc/stat included; prometheus-client's collector reads the boot time from
there and, without it, reports nothing at all. A /proc laid out the same way (only
`self`) stands in for the sandbox's.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import ProcessCollector
from prometheus_client.registry import Collector

from relay.daemon.metrics import SandboxedProcessCollector


def sandboxed_proc(tmp_path: Path) -> str:
    root = tmp_path / "proc"
    root.mkdir()
    (root / "self").symlink_to("/proc/self")
    return str(root)


def series(collector: Collector) -> dict[str, float]:
    return {s.name: s.value for family in collector.collect() for s in family.samples}


def test_the_stock_collector_reports_nothing_there(tmp_path: Path) -> None:
    """Why migrelay has its own: this is what the sandboxed relay would expose."""
    assert series(ProcessCollector(proc=sandboxed_proc(tmp_path), registry=None)) == {}


def test_ours_reports_cpu_memory_and_fds_there(tmp_path: Path) -> None:
    got = series(SandboxedProcessCollector(proc=sandboxed_proc(tmp_path), registry=None))
    assert got["process_cpu_seconds_total"] > 0
    assert got["process_resident_memory_bytes"] > 1 << 20
    assert got["process_open_fds"] > 2
    assert got["process_max_fds"] >= got["process_open_fds"]
    # the start time agrees with what the stock collector computes from the real /proc/stat
    # (which counts boot time in whole seconds)
    stock = series(ProcessCollector(registry=None))
    assert abs(got["process_start_time_seconds"] - stock["process_start_time_seconds"]) < 1.5
