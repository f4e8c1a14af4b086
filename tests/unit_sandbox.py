"""Run `migrelay serve` under systemd/migrelay.service's own sandbox, read from the unit file.

The test machines have no systemd as PID 1, so this launcher does for the unit's [Service]
section what systemd's exec step does, with the same kernel mechanisms, then execs the
daemon in place of the unit's ExecStart:

    /usr/bin/python3 tests/unit_sandbox.py --unit systemd/migrelay.service \\
        --runtime-dir HOST_DIR [--visible PATH] -- PYTHON -m relay serve --config CONFIG

It runs in two stages, in one process (each stage execs the next, so the pid that systemd
would supervise is the daemon's):

1. as root with every capability: parse the unit, refuse any [Service] directive it does not
   know (so a line added to the unit cannot go untested), resolve the system-call filter with
   `systemd-analyze syscall-filter`, build the mount namespace (ProtectSystem=, PrivateTmp=,
   PrivateDevices=, ...), set the resource limit, umask, working directory, environment and
   stdin, then exec setpriv for the identity (SupplementaryGroups=, CapabilityBoundingSet=,
   AmbientCapabilities=, NoNewPrivileges=);
2. with no capabilities and no_new_privs: load the seccomp filters systemd would load
   (libseccomp's Python binding, Debian's python3-seccomp, hence /usr/bin/python3), one
   filter per directive as systemd stacks them, then execve the daemon. Seccomp filters
   survive execve.

Where the test machine forces a deviation, it is named here and printed on stderr:
- ProtectHome=yes hides /root, but the test machines' Python (the venv's base, a pyenv build)
  lives under /root: each --visible PATH is bound back read-only, behind directories that can
  be traversed but not listed. In production the interpreter is /usr/bin/python3 and the
  package is in /usr/local, outside every protected path.
- LimitNOFILE= above the current hard limit needs CAP_SYS_RESOURCE, which PID 1 has and a
  test machine's bounding set may lack: then soft = hard = the current hard limit.
- PYTHONPATH names this checkout, so the daemon runs the code under test.
- ExecStart's executable and its --config value are replaced (the relay runs from the venv,
  with a test config); every other argument must be the unit's.
- /run/<RuntimeDirectory> is created on the host if missing, empty, as the mount point of
  --runtime-dir (systemd creates it too, and the unit keeps it: RuntimeDirectoryPreserve=yes).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import grp
import json
import os
import re
import resource
import shlex
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What each [Service] directive of the unit becomes here. A directive in neither table makes
# the launcher refuse to run: the proof must change when the unit does.
APPLIED = {
    "ExecStart": "exec'd after the sandbox, its executable and --config value replaced",
    "LimitNOFILE": "setrlimit(RLIMIT_NOFILE)",
    "RuntimeDirectory": "--runtime-dir bound at /run/<name>, writable",
    "RuntimeDirectoryMode": "chmod of --runtime-dir",
    "ReadWritePaths": "bound onto themselves, left writable; a missing one fails, as systemd does",
    "ProtectSystem": "every other mount remounted read-only (strict)",
    "ProtectHome": "/home, /root, /run/user covered by empty mode-0 tmpfs",
    "PrivateTmp": "fresh tmpfs on /tmp and /var/tmp",
    "PrivateDevices": "fresh /dev with null, zero, full, random, urandom, tty; @raw-io -> EPERM",
    "ProtectKernelTunables": "/sys and /proc's kernel knobs read-only; _sysctl -> EPERM",
    "ProtectKernelModules": "/usr/lib/modules, /lib/modules inaccessible; @module -> EPERM",
    "ProtectKernelLogs": "/proc/kmsg, /dev/kmsg inaccessible; syslog -> EPERM",
    "ProtectControlGroups": "/sys/fs/cgroup read-only",
    "ProtectClock": "@clock -> EPERM",
    "ProtectHostname": "own UTS namespace; sethostname, setdomainname -> EPERM",
    "ProtectProc": "fresh procfs with hidepid=",
    "ProcSubset": "fresh procfs with subset=",
    "RestrictAddressFamilies": "socket() of any other family -> EAFNOSUPPORT (systemd's rules)",
    "RestrictNamespaces": "unshare/clone with a CLONE_NEW* flag, setns -> EPERM; clone3 -> ENOSYS",
    "RestrictRealtime": "sched_setscheduler to a realtime policy -> EPERM",
    "RestrictSUIDSGID": "chmod/mkdir/mknod/open(O_CREAT) with S_ISUID or S_ISGID -> EPERM",
    "LockPersonality": "personality() to anything else -> EPERM",
    "SystemCallArchitectures": "native only: filters are native, other ABIs hit the kill action",
    "SystemCallFilter": "systemd-analyze syscall-filter groups, merged line by line as systemd does",
    "SystemCallErrorNumber": "the action for filtered calls (default: kill the process)",
    "CapabilityBoundingSet": "setpriv --bounding-set",
    "AmbientCapabilities": "setpriv --inh-caps/--ambient-caps",
    "NoNewPrivileges": "setpriv --no-new-privs",
    "SupplementaryGroups": "setpriv --groups",
    "WatchdogSec": "WATCHDOG_USEC and WATCHDOG_PID in the environment",
}
NOT_APPLIED = {
    "Type": "the test waits for READY=1 on its own NOTIFY_SOCKET",
    "ExecReload": "a control-socket client, not the daemon; the reload tests send SIGHUP or run it themselves",
    "NotifyAccess": "only the main process notifies; it is the exec'd daemon",
    "KillSignal": "the test sends it",
    "TimeoutStopSec": "the test's stop wait is shorter",
    "Restart": "service-manager policy",
    "RestartSec": "service-manager policy",
    "RuntimeDirectoryPreserve": "concerns removal after stop",
}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"  # systemd's for system services
SERVICE_UMASK = 0o022  # systemd's default UMask=
HOME_DIRS = ("/home", "/root", "/run/user")
MODULE_DIRS = ("/usr/lib/modules", "/lib/modules")
KMSG = ("/proc/kmsg", "/dev/kmsg")
# ProtectKernelTunables=: systemd's read-only list under /proc (those that exist)
PROC_TUNABLES = (
    "/proc/acpi",
    "/proc/apm",
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/latency_stats",
    "/proc/mtrr",
    "/proc/scsi",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/timer_list",
    "/proc/timer_stats",
)
PRIVATE_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
PRIVATE_DEV_DIRS = ("pts", "shm")
PRIVATE_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}

# <sys/mount.h>, <sched.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 0x20, 0x1000, 0x4000, 0x80000
MNT_DETACH = 0x2
PER_MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
NAMESPACE_FLAGS = {
    "cgroup": 0x02000000,
    "ipc": 0x08000000,
    "net": 0x40000000,
    "mnt": CLONE_NEWNS,
    "pid": 0x20000000,
    "user": 0x10000000,
    "uts": CLONE_NEWUTS,
}
SCHED_OTHER, SCHED_BATCH, SCHED_IDLE = 0, 3, 5
S_ISUID, S_ISGID = 0o4000, 0o2000

# systemd's own exit statuses for a failed exec step, so a failure reads as it would in the journal
EXIT_NAMESPACE, EXIT_GROUP, EXIT_SECCOMP, EXIT_CONFIG = 226, 216, 228, 2


class SandboxError(Exception):
    def __init__(self, message: str, status: int = EXIT_NAMESPACE) -> None:
        super().__init__(message)
        self.status = status


# --- the unit file -------------------------------------------------------------------


@dataclass
class Unit:
    """A unit file's sections as ordered (key, value) assignments, as systemd reads them."""

    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Unit:
        unit = cls(path)
        section: list[tuple[str, str]] | None = None
        pending = ""
        for raw in path.read_text().splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):  # continuation: the backslash becomes a space
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = unit.sections.setdefault(line[1:-1], [])
                continue
            if section is None or "=" not in line:
                raise SandboxError(f"{path}: cannot parse {raw!r}", EXIT_CONFIG)
            key, _, value = line.partition("=")
            section.append((key.strip(), value.strip()))
        return unit

    def values(self, key: str, section: str = "Service") -> list[str]:
        """Every assignment of `key`, in order, after the last empty one (which resets a list)."""
        out: list[str] = []
        for k, v in self.sections.get(section, []):
            if k == key:
                out = [] if v == "" else [*out, v]
        return out

    def last(self, key: str, default: str = "", section: str = "Service") -> str:
        found = [v for k, v in self.sections.get(section, []) if k == key]
        return found[-1] if found else default

    def flag(self, key: str) -> bool:
        value = self.last(key, "no").lower()
        if value in ("yes", "true", "on", "1"):
            return True
        if value in ("no", "false", "off", "0"):
            return False
        raise SandboxError(f"{key}={value}: only a boolean is supported here", EXIT_CONFIG)

    def words(self, key: str) -> list[str]:
        return [w for v in self.values(key) for w in v.split()]

    def check_directives(self) -> None:
        unknown = sorted({k for k, _ in self.sections.get("Service", [])} - APPLIED.keys() - NOT_APPLIED.keys())
        if unknown:
            raise SandboxError(
                f"{self.path}: [Service] {', '.join(unknown)} neither applied by {Path(__file__).name} nor "
                "listed as not applied: teach it the directive (or say why it does not matter)",
                EXIT_CONFIG,
            )


def expect(unit: Unit, key: str, supported: tuple[str, ...]) -> str:
    value = unit.last(key)
    if value not in supported:
        raise SandboxError(f"{key}={value}: this launcher implements only {' or '.join(supported)}", EXIT_CONFIG)
    return value


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system-call groups (its own table, as this systemd version has it)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.startswith("    "):
            current = None  # a blank line or the trailing "# Ungrouped ..." notes
        elif current is not None and not line.strip().startswith("#"):  # not the group's description
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    if name not in groups:
        raise SandboxError(f"unknown system-call group {name}", EXIT_CONFIG)
    return set().union(*(expand(n, groups) for n in groups[name]))


def syscall_filter(unit: Unit, groups: dict[str, list[str]]) -> tuple[bool, set[str]] | None:
    """(allow_list, names) after merging every SystemCallFilter= line as systemd does, or None.

    The first line decides: without `~` it is an allow list (seeded with @default), with `~`
    a deny list. Each later line adds its names to that list if it has the same polarity and
    removes them if it has the other (load-fragment.c, seccomp_parse_syscall_filter()).
    """
    lines = unit.values("SystemCallFilter")
    if not lines:
        return None
    allow_list = not lines[0].startswith("~")
    names = expand("@default", groups) if allow_list else set()
    for line in lines:
        invert = line.startswith("~")
        for word in line.lstrip("~").split():
            if ":" in word:
                raise SandboxError(f"SystemCallFilter={line}: per-call errno is not implemented here", EXIT_CONFIG)
            if invert != allow_list:
                names |= expand(word, groups)
            else:
                names -= expand(word, groups)
    return allow_list, names


def parse_errno(value: str) -> int | None:
    """SystemCallErrorNumber=: None for the default (kill), else the errno."""
    if value in ("", "kill"):
        return None
    number = getattr(errno, value, None) if not value.isdigit() else int(value)
    if not isinstance(number, int):
        raise SandboxError(f"SystemCallErrorNumber={value}: unknown errno", EXIT_CONFIG)
    return number


def seconds(value: str) -> float:
    """A systemd time span as used in this unit (e.g. 30s, 2min, 500ms, 1min 30s)."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for number, suffix in re.findall(r"([\d.]+)\s*([a-z]*)", value):
        total += float(number) * units[suffix or "s"]
    return total


# --- stage 1: mounts, limits, environment ---------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def bind(source: str, target: str, flags: int = 0) -> None:
    mount(source, target, None, MS_BIND | flags)


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts() -> Iterator[tuple[str, int]]:
    """(mount point, its per-mount flags) for every mount in this namespace."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        flags = 0
        for option in fields[5].split(","):
            flags |= PER_MOUNT_FLAGS.get(option, 0)
        yield _unescape(fields[4]), flags


def under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def read_only(prefix: str, exempt: tuple[str, ...] = ()) -> None:
    """Remount every mount at or below `prefix` read-only, except those at or below `exempt`.

    The mounts' own nosuid/nodev/noexec are kept (a bind remount sets exactly what it is given).
    """
    for point, flags in list(mounts()):
        if under(point, prefix) and not any(under(point, e) for e in exempt) and not flags & MS_RDONLY:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def read_only_self(path: str) -> None:
    """Make one path (and whatever is mounted below it) read-only."""
    bind(path, path, MS_REC)
    read_only(path)


def empty_tmpfs(target: str, mode: int) -> None:
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"mode={mode:04o},size=4k")


@dataclass
class Sandbox:
    """Stage 1: everything that needs root's capabilities, in a new mount namespace."""

    unit: Unit
    runtime_dir: Path
    visible: list[Path]
    command: list[str]
    notes: list[str] = field(default_factory=list)

    def run(self) -> None:
        unit = self.unit
        unit.check_directives()
        argv = self.exec_start()
        groups = syscall_groups()
        spec = self.filters(groups)
        identity = self.identity(self.supplementary_gids())
        flags = CLONE_NEWNS | (CLONE_NEWUTS if unit.flag("ProtectHostname") else 0)
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")
        # hold what will be covered, to bind it back (from this namespace: a bind across namespaces is EINVAL)
        keep = {str(p): os.open(p, os.O_PATH | os.O_CLOEXEC) for p in self.visible}
        dev = {
            n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC)
            for n in PRIVATE_DEV_NODES + PRIVATE_DEV_DIRS
            if os.path.exists(f"/dev/{n}")
        }
        # as systemd: mounts from the host still propagate in, ours never out
        mount(None, "/", None, MS_REC | MS_SLAVE)
        writable = self.runtime_directory() + self.read_write_paths()
        inaccessible_file = self.stage_inaccessible_file()
        if unit.flag("ProtectHome"):
            for d in HOME_DIRS:
                self.cover(d, keep)
        if unit.flag("ProtectKernelModules"):
            for d in MODULE_DIRS:
                self.cover(d, keep)
        hidepid = unit.last("ProtectProc", "default")
        subset = unit.last("ProcSubset", "all")
        if hidepid != "default":
            expect(unit, "ProtectProc", ("noaccess", "invisible", "ptraceable"))
        if subset != "all":
            expect(unit, "ProcSubset", ("pid",))
        if (hidepid, subset) != ("default", "all"):
            options = [f"hidepid={hidepid}"] if hidepid != "default" else []
            options += ["subset=pid"] if subset == "pid" else []
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(options))
        if unit.flag("PrivateDevices"):
            self.private_dev(dev)
        for fd in (*keep.values(), *dev.values()):
            os.close(fd)
        if unit.flag("ProtectKernelLogs"):
            for path in KMSG:
                if os.path.exists(path):
                    bind(inaccessible_file, path)
        _check(_libc.umount2(b"/tmp", MNT_DETACH), "umount the staging /tmp")
        private_tmp = unit.flag("PrivateTmp")
        if private_tmp:
            for d in ("/tmp", "/var/tmp"):
                mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        if unit.flag("ProtectKernelTunables"):
            for path in PROC_TUNABLES:
                if os.path.exists(path):
                    read_only_self(path)
            read_only("/sys")
        if unit.flag("ProtectControlGroups") and os.path.isdir("/sys/fs/cgroup"):
            read_only("/sys/fs/cgroup")
        if unit.last("ProtectSystem"):
            expect(unit, "ProtectSystem", ("strict",))
            tmp = ("/tmp", "/var/tmp") if private_tmp else ()
            # the API file systems are protected by their own directives, as in systemd
            read_only("/", ("/dev", "/proc", "/sys", *tmp, *writable))
        self.limits()
        env = self.environment()
        os.umask(SERVICE_UMASK)
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for note in self.notes:
            print(f"unit_sandbox: {note}", file=sys.stderr, flush=True)
        stage2 = [
            sys.executable,
            "-I",
            str(Path(__file__).resolve()),
            "--stage2",
            json.dumps({"filters": spec, "argv": argv, "env": env}),
        ]
        os.execv("/usr/bin/setpriv", ["setpriv", *identity, "--", *stage2])

    def exec_start(self) -> list[str]:
        """The daemon's argv: the unit's ExecStart with the executable and --config value replaced."""
        shipped = shlex.split(self.unit.last("ExecStart"))
        if not shipped or not shipped[0].endswith("/migrelay") or "--config" not in shipped:
            raise SandboxError(f"ExecStart={shlex.join(shipped)}: expected .../migrelay ... --config FILE", EXIT_CONFIG)
        cmd = self.command
        if cmd[1:3] != ["-m", "relay"]:
            raise SandboxError("the command must be PYTHON -m relay ...", EXIT_CONFIG)

        def shape(args: list[str]) -> list[str]:
            return ["FILE" if i and args[i - 1] == "--config" else a for i, a in enumerate(args)]

        if shape(cmd[3:]) != shape(shipped[1:]):
            raise SandboxError(f"{shlex.join(cmd[3:])} is not ExecStart's {shlex.join(shipped[1:])}", EXIT_CONFIG)
        return cmd

    def runtime_directory(self) -> list[str]:
        names = self.unit.words("RuntimeDirectory")
        if len(names) != 1:
            raise SandboxError("expected exactly one RuntimeDirectory=", EXIT_CONFIG)
        target = f"/run/{names[0]}"
        mode = int(self.unit.last("RuntimeDirectoryMode", "0755"), 8)
        os.chmod(self.runtime_dir, mode)
        os.makedirs(target, mode=mode, exist_ok=True)  # the mount point (systemd creates the directory itself)
        bind(str(self.runtime_dir), target)
        return [target]

    def read_write_paths(self) -> list[str]:
        out = []
        for word in self.unit.words("ReadWritePaths"):
            optional = word.startswith("-")
            path = word.lstrip("-+")
            if not os.path.exists(path):
                if optional:
                    continue
                raise SandboxError(f"ReadWritePaths={path}: no such file or directory (systemd fails the start)")
            bind(path, path, MS_REC)
            out.append(path)
        return out

    def stage_inaccessible_file(self) -> str:
        """A mode-0 empty file to bind over files that must be inaccessible (systemd's inaccessible/reg).

        It lives on a tmpfs mounted on /tmp for the moment; the binds keep it alive after that
        tmpfs is detached.
        """
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0700,size=4k")
        path = "/tmp/inaccessible"
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0))
        os.chmod(path, 0)
        return path

    def cover(self, directory: str, keep: dict[str, int]) -> None:
        """Make `directory` empty and inaccessible, except the --visible paths below it."""
        if not os.path.isdir(directory):
            return
        inside = {p: fd for p, fd in keep.items() if under(p, directory)}
        # mode 0: nothing, not even for root without CAP_DAC_*; 0100: traversable, not listable
        empty_tmpfs(directory, 0o100 if inside else 0)
        for path, fd in inside.items():
            for parent in reversed(Path(path).parents):
                if under(str(parent), directory) and str(parent) != directory:
                    os.makedirs(parent, mode=0o100, exist_ok=True)
                    os.chmod(parent, 0o100)
            os.makedirs(path, exist_ok=True)
            bind(f"/proc/self/fd/{fd}", path, MS_REC)
            read_only(path)
            self.notes.append(f"ProtectHome: {path} stays readable (the test machine's Python lives there)")
        mount(None, directory, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def private_dev(self, dev: dict[str, int]) -> None:
        mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=0755")
        for name, fd in dev.items():
            target = f"/dev/{name}"
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))
            bind(f"/proc/self/fd/{fd}", target, MS_REC)
        for name, link in PRIVATE_DEV_LINKS.items():
            os.symlink(link, f"/dev/{name}")

    def limits(self) -> None:
        value = self.unit.last("LimitNOFILE")
        if not value:
            return
        soft, _, hard = value.partition(":")
        if not (soft.isdigit() and (hard or soft).isdigit()):
            raise SandboxError(f"LimitNOFILE={value}: only numbers are implemented here", EXIT_CONFIG)
        want = (int(soft), int(hard or soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
        except (ValueError, PermissionError):
            current = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (current, current))
            self.notes.append(f"LimitNOFILE={value}: hard limit {current} here (no CAP_SYS_RESOURCE); using {current}")

    def environment(self) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "PYTHONPATH": str(REPO)}
        if "NOTIFY_SOCKET" in os.environ:  # the test's stand-in for /run/systemd/notify
            env["NOTIFY_SOCKET"] = os.environ["NOTIFY_SOCKET"]
        watchdog = self.unit.last("WatchdogSec")
        if watchdog:
            env["WATCHDOG_USEC"] = str(int(seconds(watchdog) * 1e6))
            env["WATCHDOG_PID"] = str(os.getpid())  # every stage execs: this pid is the daemon's
        env["RUNTIME_DIRECTORY"] = ":".join(f"/run/{n}" for n in self.unit.words("RuntimeDirectory"))
        return env

    def supplementary_gids(self) -> list[int]:
        gids = []
        for name in self.unit.words("SupplementaryGroups"):
            try:
                gids.append(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
            except KeyError:
                raise SandboxError(f"SupplementaryGroups={name}: no such group", EXIT_GROUP) from None
        return gids

    def identity(self, gids: list[int]) -> list[str]:
        unit = self.unit
        bounding = unit.words("CapabilityBoundingSet")
        if any(c.startswith("~") for c in bounding):
            raise SandboxError("CapabilityBoundingSet=~...: only an allow list is implemented here", EXIT_CONFIG)

        def caps(names: list[str]) -> str:
            return ",".join(["-all", *(f"+{c.lower().removeprefix('cap_')}" for c in names)])

        ambient = caps(unit.words("AmbientCapabilities"))
        out = ["--inh-caps", ambient, "--ambient-caps", ambient]
        # no CapabilityBoundingSet= line keeps them all; an empty one (as shipped) leaves none
        if any(k == "CapabilityBoundingSet" for k, _ in unit.sections.get("Service", [])):
            out += ["--bounding-set", caps(bounding)]
        # a root service started by PID 1 has exactly SupplementaryGroups= (PID 1 has none of its own)
        out += ["--groups", ",".join(map(str, gids))] if gids else ["--clear-groups"]
        if not unit.flag("NoNewPrivileges"):
            # systemd loads seccomp from PID 1's privileges; stage 2 has none, so it needs no_new_privs
            raise SandboxError("NoNewPrivileges=no: not implemented (stage 2 loads seccomp unprivileged)", EXIT_CONFIG)
        return [*out, "--no-new-privs"]

    def filters(self, groups: dict[str, list[str]]) -> dict[str, Any]:
        """What stage 2 loads, as plain data."""
        unit = self.unit
        expect(unit, "SystemCallArchitectures", ("native",))
        merged = syscall_filter(unit, groups)
        errno_sets = []  # implied by other directives: systemd answers these with EPERM
        for directive, names in (
            ("PrivateDevices", ["@raw-io"]),
            ("ProtectClock", ["@clock"]),
            ("ProtectKernelModules", ["@module"]),
            ("ProtectKernelLogs", ["syslog"]),
            ("ProtectKernelTunables", ["_sysctl"]),
            ("ProtectHostname", ["sethostname", "setdomainname"]),
        ):
            if unit.flag(directive):
                errno_sets.append(sorted(set().union(*(expand(n, groups) for n in names))))
        families = unit.words("RestrictAddressFamilies")
        if families and families[0].startswith("~"):
            raise SandboxError("RestrictAddressFamilies=~...: only an allow list is implemented here", EXIT_CONFIG)
        if unit.last("RestrictNamespaces"):
            expect(unit, "RestrictNamespaces", ("yes", "true"))
        return {
            "syscalls": None if merged is None else {"allow_list": merged[0], "names": sorted(merged[1])},
            "deny_errno": parse_errno(unit.last("SystemCallErrorNumber")),
            "errno_sets": errno_sets,
            "families": [int(getattr(socket, f)) for f in families],
            "namespaces": unit.flag("RestrictNamespaces"),
            "realtime": unit.flag("RestrictRealtime"),
            "suid_sgid": unit.flag("RestrictSUIDSGID"),
            "personality": unit.flag("LockPersonality"),
        }


# --- stage 2: seccomp, then the daemon ------------------------------------------------


def load_filters(spec: dict[str, Any]) -> None:
    """Load each filter as systemd does: one per directive, stacked (the strictest verdict wins).

    libseccomp's default bad-architecture action (kill) stands in for systemd's separate
    SystemCallArchitectures=native filter: these filters hold the native ABI only.
    """
    import seccomp  # Debian's python3-seccomp (for /usr/bin/python3; untyped: see pyproject)

    from_errno = seccomp.ERRNO
    Arg = seccomp.Arg

    def new() -> Any:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.set_attr(seccomp.Attr.CTL_NNP, 0)  # no_new_privs is setpriv's job (NoNewPrivileges=)
        return f

    def known(name: str) -> bool:
        """Names this ABI has; systemd skips the others (e.g. the *32 calls on x86-64)."""
        return int(seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)) >= 0

    for names in spec["errno_sets"]:
        f = new()
        for name in filter(known, names):
            f.add_rule(from_errno(errno.EPERM), name)
        f.load()
    if spec["families"]:
        # seccomp_restrict_address_families(): everything outside [first, last], and every gap
        f = new()
        fams = sorted(spec["families"])
        deny = from_errno(errno.EAFNOSUPPORT)
        f.add_rule(deny, "socket", Arg(0, seccomp.LT, fams[0]))
        f.add_rule(deny, "socket", Arg(0, seccomp.GT, fams[-1]))
        for af in range(fams[0], fams[-1]):
            if af not in fams:
                f.add_rule(deny, "socket", Arg(0, seccomp.EQ, af))
        f.load()
    if spec["namespaces"]:
        f = new()
        f.add_rule(from_errno(errno.EPERM), "setns")
        # clone3 hides its flags behind a pointer: ENOSYS makes glibc fall back to clone
        f.add_rule(from_errno(errno.ENOSYS), "clone3")
        for flag in NAMESPACE_FLAGS.values():
            f.add_rule(from_errno(errno.EPERM), "unshare", Arg(0, seccomp.MASKED_EQ, flag, flag))
            f.add_rule(from_errno(errno.EPERM), "clone", Arg(0, seccomp.MASKED_EQ, flag, flag))
        f.load()
    if spec["realtime"]:
        f = new()
        allowed = (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE)
        for policy in range(max(allowed)):
            if policy not in allowed:
                f.add_rule(from_errno(errno.EPERM), "sched_setscheduler", Arg(1, seccomp.EQ, policy))
        f.add_rule(from_errno(errno.EPERM), "sched_setscheduler", Arg(1, seccomp.GT, max(allowed)))
        f.load()
    if spec["suid_sgid"]:
        # seccomp_restrict_suid_sgid(): the mode argument of every call that can set the bits
        f = new()
        eperm = from_errno(errno.EPERM)
        for bit in (S_ISUID, S_ISGID):
            for call, arg in (
                ("chmod", 1),
                ("fchmod", 1),
                ("fchmodat", 2),
                ("mkdir", 1),
                ("mkdirat", 2),
                ("mknod", 1),
                ("mknodat", 2),
                ("creat", 1),
            ):
                f.add_rule(eperm, call, Arg(arg, seccomp.MASKED_EQ, bit, bit))
            mode = Arg(2, seccomp.MASKED_EQ, bit, bit)
            f.add_rule(eperm, "open", Arg(1, seccomp.MASKED_EQ, os.O_CREAT, os.O_CREAT), mode)
            mode = Arg(3, seccomp.MASKED_EQ, bit, bit)
            f.add_rule(eperm, "openat", Arg(2, seccomp.MASKED_EQ, os.O_CREAT, os.O_CREAT), mode)
        f.add_rule(eperm, "openat2")  # its flags are behind a pointer
        f.load()
    if spec["personality"]:
        f = new()
        current = _libc.personality(ctypes.c_ulong(0xFFFFFFFF)) & 0xFF  # the base personality, as systemd keeps it
        f.add_rule(from_errno(errno.EPERM), "personality", Arg(0, seccomp.NE, current))
        f.load()
    syscalls = spec["syscalls"]
    if syscalls is not None:
        number = spec["deny_errno"]
        deny = seccomp.KILL_PROCESS if number is None else from_errno(number)
        allow_list = syscalls["allow_list"]
        f = seccomp.SyscallFilter(deny if allow_list else seccomp.ALLOW)
        f.set_attr(seccomp.Attr.CTL_NNP, 0)
        for name in filter(known, syscalls["names"]):
            f.add_rule(seccomp.ALLOW if allow_list else deny, name)
        f.load()


def stage2(payload: str) -> None:
    spec = json.loads(payload)
    try:
        load_filters(spec["filters"])
    except Exception as e:  # any failure here must stop the start, as systemd's 228/SECCOMP does
        print(f"unit_sandbox: loading the seccomp filters failed: {e!r}", file=sys.stderr)
        sys.exit(EXIT_SECCOMP)
    argv = spec["argv"]
    os.execve(argv[0], argv, spec["env"])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--stage2":
        stage2(sys.argv[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unit", type=Path, required=True)
    p.add_argument("--runtime-dir", type=Path, required=True, help="host folder that becomes RuntimeDirectory=")
    p.add_argument("--visible", type=Path, action="append", default=[], help="keep this path readable (see above)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- PYTHON -m relay serve --config FILE")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        Sandbox(Unit.load(args.unit), args.runtime_dir, args.visible, command).run()
    except SandboxError as e:
        print(f"unit_sandbox: {e}", file=sys.stderr)
        sys.exit(e.status)


if __name__ == "__main__":
    main()
