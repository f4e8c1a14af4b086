"""`systemd-analyze verify` accepts the shipped units, systemd/migrelay.service and migrelay.socket.

Why it matters: a unit that systemd cannot load, or that names a directive or a system-call
group this systemd does not know, fails at `systemctl start` on every hypervisor. (What its
sandbox lets the daemon do is test_sandboxed_unit_carries_hypervisor_streams.py's concern.)

`verify` also checks that the programs of ExecStart and ExecReload exist. The unit names
/usr/local/bin/migrelay, where `pip install` as root puts it on Debian; the tests run the venv's.
Where it is installed the shipped files are verified as they are; elsewhere they must fail for
that one reason only, and a copy whose ExecStart and ExecReload name the venv's migrelay, every
other byte the same, must pass.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from tests.e2e.procs import need
from tests.unit_sandbox import Unit

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").iterdir())


def verify(*units: Path) -> str:
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    out = (result.stdout + result.stderr).strip()
    assert (result.returncode == 0) == (out == ""), (result.returncode, out)
    return out


def test_shipped_units_pass_verify(tmp_path: Path) -> None:
    need("systemd-analyze")
    service = REPO / "systemd/migrelay.service"
    program = shlex.split(Unit.load(service).last("ExecStart"))[0]
    if os.access(program, os.X_OK):
        assert verify(*UNITS) == ""
        return
    # one line per command that names it (ExecStart, ExecReload), all saying the same
    complaint = f"migrelay.service: Command {program} is not executable: No such file or directory"
    assert set(verify(*UNITS).splitlines()) == {complaint}
    venv_program = Path(sys.executable).with_name("migrelay")
    assert os.access(venv_program, os.X_OK), f"{venv_program}: the venv's console script (make venv)"
    for unit in UNITS:
        text = unit.read_text()
        if unit == service:
            for directive in ("ExecStart", "ExecReload"):
                assert text.count(f"{directive}={program} ") == 1, directive
                text = text.replace(f"{directive}={program} ", f"{directive}={venv_program} ")
        (tmp_path / unit.name).write_text(text)
    assert verify(*sorted(tmp_path.iterdir())) == ""
