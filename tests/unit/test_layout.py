"""The layout's rules: the core is pure, imports point one way, the command line starts light.

relay/core is sans-IO (no trio, no sockets library, no OpenSSL, no libvirt); relay/daemon is
what runs inside `migrelay serve` and never needs the tools; relay/tools are the operator's
commands around it. `migrelay --help` and `migrelay pki` start without trio or OpenSSL.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

RELAY = Path(__file__).parents[2] / "relay"
IO_FRAMEWORKS = {"trio", "OpenSSL", "libvirt", "prometheus_client"}


def imported_modules(package: str) -> dict[Path, set[str]]:
    """Every relay module a file of `package` imports, by file (from its source, at any depth)."""
    out: dict[Path, set[str]] = {}
    for path in (RELAY / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        out[path] = names
    return out


def loaded_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_the_core_imports_no_io_framework_and_nothing_outside_it() -> None:
    modules = sorted(p.stem for p in (RELAY / "core").glob("*.py") if p.stem != "__init__")
    assert not IO_FRAMEWORKS & loaded_after("; ".join(f"import relay.core.{m}" for m in modules))
    for path, names in imported_modules("core").items():
        outside = {n for n in names if n.startswith("relay.") and not n.startswith("relay.core")}
        assert not outside, f"{path.name} imports {outside}"


def test_the_daemon_does_not_import_the_tools() -> None:
    for path, names in imported_modules("daemon").items():
        tools = {n for n in names if n.startswith("relay.tools")}
        assert not tools, f"{path.name} imports {tools}"


@pytest.mark.parametrize("argv", [["--help"], ["pki", "--help"]])
def test_the_command_line_starts_light(argv: list[str]) -> None:
    loaded = loaded_after(
        f"import contextlib, relay.cli\nwith contextlib.suppress(SystemExit): relay.cli.main({argv!r})"
    )
    assert not {"trio", "OpenSSL"} & loaded
