"""A short coverage-guided run of every fuzz target in `make test`; `make fuzz` runs them for longer.

Each target gets FUZZ_TEST_S seconds (default 4) from a fresh seed corpus. A finding fails the
test with libFuzzer's report (the traceback) and the input that caused it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ_TEST_S = int(os.environ.get("FUZZ_TEST_S", "4"))
TARGETS = ["request", "reply", "control"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (the test extra installs it on Linux x86_64: pip install -e '.[test]')",
)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        target,
        f"-max_total_time={FUZZ_TEST_S}",
        "-timeout=10",  # seconds for one input: a slow input is a finding too
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path / "corpus"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_TEST_S + 120)
    findings = {p.name: p.read_bytes()[:500] for p in tmp_path.iterdir() if p.name != "corpus"}
    assert result.returncode == 0 and not findings, (
        f"fuzz target {target!r} found a problem (exit {result.returncode}); inputs: {findings}\n"
        + result.stderr[-4000:]
    )
    assert "Done" in result.stderr, result.stderr[-2000:]
