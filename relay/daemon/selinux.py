"""SELinux labels for the overlay sockets a confined QEMU connects to ([relay] socket_context).

On SELinux hosts QEMU runs confined (svirt_t) and may connect only to unix sockets of a
type its policy allows. A socket's label is fixed when socket() creates it, from the
creating thread's "sockcreate" attribute, which setsockcreatecon(3) sets: libvirt's
migration guide asks exactly this of whatever creates the sockets QEMU migrates through
("Migration using only UNIX sockets"), and virt-v2v does the same for the nbdkit sockets
its QEMU reads (`system_u:object_r:svirt_socket_t:s0`).

libselinux is called through ctypes rather than a Python binding: libselinux.so.1 is on
every SELinux host and on every Debian (dpkg, sed and util-linux need it), and its C ABI
does not depend on which Python runs the relay, while the distributions' binding
(python3-selinux, python3-libselinux) exists only for the system Python and the PyPI
`selinux` package is a shim that imports that very binding.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from relay.core.errors import LocalError

LIBSELINUX: Final = "libselinux.so.1"
KEY: Final = "[relay] socket_context"


class SocketLabeler(Protocol):
    """Sets the SELinux context of the sockets this thread creates (setsockcreatecon(3))."""

    def set_socket_context(self, context: str | None) -> None:
        """Sockets this thread creates from now on get `context`; None: the thread's default again.

        Raises LocalError, one line that names the key, when it cannot be done.
        """


@dataclass
class LibSelinux:
    """The real labeler: libselinux's setsockcreatecon_raw, loaded on first use."""

    library: str = LIBSELINUX  # a parameter so that a test can name a library that is not there
    _lib: ctypes.CDLL | None = field(default=None, init=False, repr=False)

    def _load(self) -> ctypes.CDLL:
        if self._lib is not None:
            return self._lib
        try:
            lib = ctypes.CDLL(self.library, use_errno=True)
        except OSError as e:
            raise LocalError(
                f"{KEY} needs libselinux, and {self.library} cannot be loaded ({e}); "
                "install libselinux (libselinux1 on Debian) or remove the key"
            ) from None
        lib.is_selinux_enabled.argtypes = []
        lib.is_selinux_enabled.restype = ctypes.c_int
        lib.setsockcreatecon_raw.argtypes = [ctypes.c_char_p]
        lib.setsockcreatecon_raw.restype = ctypes.c_int
        # Without SELinux the kernel refuses every context (EINVAL): say what is actually wrong.
        if lib.is_selinux_enabled() != 1:
            raise LocalError(f"{KEY} is set, but SELinux is not enabled on this host; remove the key")
        self._lib = lib
        return lib

    def set_socket_context(self, context: str | None) -> None:
        lib = self._load()
        # _raw: the context as the kernel spells it, with no mcstrans translation of the level
        if lib.setsockcreatecon_raw(None if context is None else context.encode()) == 0:
            return
        err = ctypes.get_errno()
        if context is None:
            raise LocalError(f"{KEY}: cannot reset the socket creation context: {os.strerror(err)}")
        raise LocalError(
            f"{KEY}: the kernel refused {context!r} ({os.strerror(err)}): "
            "not a context of the loaded policy, or this relay's domain may not create sockets with it"
        )


@dataclass(frozen=True)
class SocketLabel:
    """Sockets created inside `creating()` get `context`."""

    labeler: SocketLabeler
    context: str

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Create the socket inside, and nothing else; the thread's default is back afterwards.

        The attribute belongs to the thread, and every trio task of the relay runs on one
        thread: the body must not await, or another task's socket (a peer connection, the
        control socket) would be created with the label too.
        """
        self.labeler.set_socket_context(self.context)
        try:
            yield
        finally:
            self.labeler.set_socket_context(None)

    def check(self) -> None:
        """Set the context and reset it: fails now, at start, rather than at the first migration."""
        with self.creating():
            pass
