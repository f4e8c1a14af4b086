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

from relay.core.errors import printable

LIBVIRT_CHANNEL: Final = "libvirt.sock"
DEFAULT_CHANNELS: Final = ("libvirt.sock", "migration.sock", "nbd.sock")
MAX_NAME_BYTES: Final = 255

# A socket name is one path component of safe characters. This excludes "/",
# NUL, whitespace and names starting with "." (so "." and ".." are out too).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# A host (relay) name doubles as a folder name and a certificate DNS name.
_HOST_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")
# Session sockets are "<source>_<id>-<channel>": the relay that opened the session (a
# host name never contains "_"), a short lowercase id, and the channel. The destination
# serves a session socket only to the relay named in it.
_SESSION_RE: Final = re.compile(r"([A-Za-z0-9.-]+)_([a-z0-9]{1,32})-(.+)")
SESSION_ID_CHARS: Final = 8
# sun_path holds 108 bytes with the terminating NUL.
MAX_UNIX_PATH_BYTES: Final = 107


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid overlay socket name, or None if it is."""
    if not name:
        return "empty socket name"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"socket name longer than {MAX_NAME_BYTES} bytes"
    if "/" in name:
        return f"socket name '{printable(name)}' contains '/'"
    if not _NAME_RE.fullmatch(name):
        return f"socket name '{printable(name)}' has characters outside [A-Za-z0-9_.-] or starts with '.'"
    return None


def host_problem(host: str) -> str | None:
    """Why `host` is not a valid relay name, or None if it is."""
    if not host or len(host) > 253 or not _HOST_RE.fullmatch(host):
        return f"relay name '{printable(host)}' must be a DNS name (letters, digits, '-' and '.')"
    return None


def session_name(source: str, session_id: str, channel: str) -> str:
    """The socket name of one session's channel: `hvA_1fc21fb7-migration.sock`."""
    return f"{source}_{session_id}-{channel}"


def _session_parts(name: str) -> tuple[str, str] | None:
    """(source relay, channel) of a session socket name, or None if it is not one."""
    m = _SESSION_RE.fullmatch(name)
    if m is None or m.group(3) not in DEFAULT_CHANNELS or host_problem(m.group(1)) is not None:
        return None
    return m.group(1), m.group(3)


def channel_of(name: str) -> str:
    """The channel a socket name belongs to: `hvA_1fc21fb7-migration.sock` -> `migration.sock`."""
    parts = _session_parts(name)
    return parts[1] if parts is not None else name


def unix_path_problem(path: Path | str) -> str | None:
    """Why `path` cannot be a unix socket address (too long for sun_path), or None."""
    size = len(str(path).encode())
    if size > MAX_UNIX_PATH_BYTES:
        over = size - MAX_UNIX_PATH_BYTES
        return f"{path} is {size} bytes, {over} over the AF_UNIX limit of {MAX_UNIX_PATH_BYTES}"
    return None


def metric_channel(name: str) -> str:
    """The `channel` label for a socket name: the channel without `.sock`.

    Session sockets count under their channel, so label cardinality stays bounded.
    """
    channel = channel_of(name)
    return channel.removesuffix(".sock")


def peer_dir(socket_dir: Path, host: str) -> Path:
    """The overlay folder for `host`: real on `host`, relay listeners elsewhere."""
    return socket_dir / host


def refusal(name: str, allowed_channels: Iterable[str], have_libvirt: bool, source: str) -> str | None:
    """The destination policy for a socket name that relay `source` asks for; None means allowed.

    A peer may reach a name directly under our own overlay folder when the name's
    channel is one configured for that peer, and a session's socket only if it opened
    that session; `libvirt.sock` additionally needs a configured libvirt socket.
    """
    problem = name_problem(name)
    if problem is not None:
        return problem
    channel = channel_of(name)
    if channel not in set(allowed_channels):
        return f"channel '{printable(channel)}' is not allowed for this peer"
    parts = _session_parts(name)
    if parts is not None and parts[0] != source:
        return f"'{printable(name)}' belongs to a session of another relay"
    if name == LIBVIRT_CHANNEL and not have_libvirt:
        return "libvirt.sock is not served here ([relay] libvirt is not set)"
    return None
