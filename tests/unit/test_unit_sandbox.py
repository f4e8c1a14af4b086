"""tests/unit_sandbox.py reads a unit as systemd does: the parts the sandbox proof rests on."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit_sandbox import SandboxError, Unit, syscall_filter

GROUPS = {
    "@default": ["execve", "exit_group"],
    "@chown": ["chown", "fchownat"],
    "@privileged": ["@chown", "setuid"],
    "@system-service": ["@default", "@chown", "read", "setuid"],
}


def unit(tmp_path: Path, service: str) -> Unit:
    path = tmp_path / "x.service"
    path.write_text("[Unit]\nDescription=x\n\n[Service]\n" + service)
    return Unit.load(path)


def test_system_call_filter_lines_merge_as_systemd_merges_them(tmp_path: Path) -> None:
    # the first line makes an allow list (seeded with @default); `~` lines take away, plain lines add back
    shipped = "SystemCallFilter=@system-service\nSystemCallFilter=~@privileged\nSystemCallFilter=@chown\n"
    allowed = {"execve", "exit_group", "read", "chown", "fchownat"}
    assert syscall_filter(unit(tmp_path, shipped), GROUPS) == (True, allowed)
    # a first `~` line makes a deny list; plain lines then take away from it
    deny = "SystemCallFilter=~@privileged\nSystemCallFilter=@chown\n"
    assert syscall_filter(unit(tmp_path, deny), GROUPS) == (False, {"setuid"})
    # an empty assignment starts over
    reset = "SystemCallFilter=@chown\nSystemCallFilter=\nSystemCallFilter=~setuid\n"
    assert syscall_filter(unit(tmp_path, reset), GROUPS) == (False, {"setuid"})
    assert syscall_filter(unit(tmp_path, ""), GROUPS) is None


def test_a_directive_the_launcher_does_not_know_is_refused(tmp_path: Path) -> None:
    u = unit(tmp_path, "ProtectSystem=strict\nPrivateMounts=yes\n")
    with pytest.raises(SandboxError, match=r"\[Service\] PrivateMounts neither applied"):
        u.check_directives()


def test_comments_continuations_and_repeated_keys(tmp_path: Path) -> None:
    u = unit(tmp_path, "# a comment\n; another\nReadWritePaths=/a \\\n  /b\nReadWritePaths=-/c\nNoNewPrivileges=yes\n")
    assert u.words("ReadWritePaths") == ["/a", "/b", "-/c"]
    assert u.flag("NoNewPrivileges") and not u.flag("PrivateTmp")
