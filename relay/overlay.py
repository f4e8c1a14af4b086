"""Socket-overlay naming and the destination policy, as pure functions.

`<socket_dir>/<host>/<name>` means "socket <name> on host <host>" on every host.
On <host> itself that folder is real (the hypervisor listens there); everywhere
else the relay listens on that path and forwards to <host>'s relay. This module
decides which names are valid and which a peer may reach; it touches no files
(the symlink/socket check on the real target happens where the I/O is, in
session.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Final

LIBVIRT_CHANNEL: Final = "libvirt.sock"
DEFAULT_CHANNELS: Final = ("libvirt.sock", "migration.sock", "nbd.sock")
MAX_NAME_BYTES: Final = 255

# A socket name is one path component of safe characters. This excludes "/",
# NUL, whitespace and names starting with "." (so "." and ".." are out too).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# A host (relay) name doubles as a folder name and a certificate DNS name.
_HOST_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
# Session sockets are "<id>-<channel>"; ids are short lowercase hex/alnum strings.
_SESSION_RE: Final = re.compile(r"([a-z0-9]{1,32})-(.+)")


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid overlay socket name, or None if it is."""
    if not name:
        return "empty socket name"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"socket name longer than {MAX_NAME_BYTES} bytes"
    if "/" in name:
        return f"socket name {name!r} contains '/'"
    if not _NAME_RE.fullmatch(name):
        return f"socket name {name!r} has characters outside [A-Za-z0-9_.-] or starts with '.'"
    return None


def host_problem(host: str) -> str | None:
    """Why `host` is not a valid relay name, or None if it is."""
    if not host or len(host) > 253 or not _HOST_RE.fullmatch(host):
        return f"relay name {host!r} must be a DNS name (letters, digits, '-' and '.')"
    return None


def channel_of(name: str) -> str:
    """The channel a socket name belongs to: `<id>-migration.sock` -> `migration.sock`."""
    m = _SESSION_RE.fullmatch(name)
    if m is not None and m.group(2) in DEFAULT_CHANNELS:
        return m.group(2)
    return name


def metric_channel(name: str) -> str:
    """The `channel` label for a socket name: the channel without `.sock`.

    Session sockets count under their channel, so label cardinality stays bounded.
    """
    channel = channel_of(name)
    return channel.removesuffix(".sock")


def peer_dir(socket_dir: Path, host: str) -> Path:
    """The overlay folder for `host`: real on `host`, relay listeners elsewhere."""
    return socket_dir / host


def refusal(name: str, allowed_channels: Iterable[str], have_libvirt: bool) -> str | None:
    """The destination policy for a requested socket name; None means allowed.

    A peer may reach a name directly under our own overlay folder when the name's
    channel is one configured for that peer; `libvirt.sock` additionally needs a
    configured libvirt socket.
    """
    problem = name_problem(name)
    if problem is not None:
        return problem
    channel = channel_of(name)
    if channel not in set(allowed_channels):
        return f"channel {channel!r} is not allowed for this peer"
    if name == LIBVIRT_CHANNEL and not have_libvirt:
        return "libvirt.sock is not served here ([relay] libvirt is not set)"
    return None
