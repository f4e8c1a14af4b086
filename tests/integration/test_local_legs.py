"""The relay's local unix legs (to and from QEMU and libvirt) get a deep send buffer."""

from __future__ import annotations

import socket
from pathlib import Path

from relay.daemon import net


async def test_both_ends_of_a_local_leg_get_the_deep_send_buffer(tmp_path: Path) -> None:
    path = tmp_path / "leg.sock"
    listener = await net.listen_unix(path, 0o600)
    client = await net.connect_unix(str(path))
    server = await net.accept(listener)
    try:
        for end in (client, server):
            # Linux reports twice what was set (the other half is its bookkeeping)
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= net.UNIX_SEND_BUFFER_BYTES
    finally:
        for s in (client, server, listener):
            s.close()
