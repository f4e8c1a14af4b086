"""Peer TCP connections, dialled and accepted, carry the dead-peer detection options; local legs do not.

(That the kernel then finds a blackholed peer in time is tests/e2e/test_blackholed_peer_detected_in_time.py.)
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from relay.core.config import Address, Liveness
from relay.daemon import net

LIVENESS = Liveness(keepalive_idle_s=7, keepalive_interval_s=3, keepalive_count=2, ack_timeout_s=12.5)


def options(sock: trio.socket.SocketType) -> tuple[int, int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def test_dialled_and_accepted_peer_sockets_get_the_options() -> None:
    listener = await net.listen_tcp("127.0.0.1", 0)
    port = listener.getsockname()[1]
    for kind in ("tls", "tcp"):  # the two TCP transports share the dial path
        client = await net.dial(Address(kind, host="127.0.0.1", port=port), LIVENESS)
        server = await net.accept(listener, LIVENESS)
        try:
            for end in (client, server):
                # no TCP_USER_TIMEOUT: Linux would end a live, zero-window peer with it (see Liveness)
                assert options(end) == (1, 7, 3, 2, 0)
        finally:
            client.close()
            server.close()
    listener.close()


async def test_without_liveness_the_kernel_defaults_stay() -> None:
    """`migrelay check`'s probes and anything else that passes no settings keep keepalive off."""
    listener = await net.listen_tcp("127.0.0.1", 0)
    client = await net.connect_tcp("127.0.0.1", listener.getsockname()[1])
    server = await net.accept(listener)
    try:
        for end in (client, server):
            assert options(end)[0] == 0 and options(end)[4] == 0
    finally:
        for s in (client, server, listener):
            s.close()


async def test_unix_peers_and_legs_ignore_the_settings(tmp_path: Path) -> None:
    """A unix peer's death is seen at once (the kernel closes its end): there is nothing to probe."""
    path = tmp_path / "peer.sock"
    listener = await net.listen_unix(path, 0o600)
    client = await net.dial(Address("unix", path=str(path)), LIVENESS)
    server = await net.accept(listener, LIVENESS)
    try:
        for end in (client, server):
            assert end.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        for s in (client, server, listener):
            s.close()
