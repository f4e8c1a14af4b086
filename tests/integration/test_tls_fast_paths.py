"""The TLS fast paths (relay/daemon/tls_fastpath.py): whole-chunk writes, and the internals still there."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from OpenSSL import SSL

from relay.core.config import TlsFiles
from relay.daemon import tls_fastpath
from relay.daemon.tlsconfig import client_context, server_context
from tests.support import make_pki, pattern


def test_one_send_writes_every_record_of_a_chunk(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    files = TlsFiles(p.dir / "ca.pem", p.dir / "hvA.pem", p.dir / "hvA-key.pem")
    a, b = socket.socketpair()
    client = SSL.Connection(client_context(files), a)
    server = SSL.Connection(server_context(files), b)
    client.set_connect_state()
    server.set_accept_state()
    chunk = pattern(7, 256 * 1024)
    received = bytearray()

    def serve() -> None:
        server.do_handshake()
        while len(received) < len(chunk):
            received.extend(server.recv(65536))

    reader = threading.Thread(target=serve)
    reader.start()
    client.do_handshake()
    sent = client.send(chunk)  # blocking socket: only a partial-write mode returns early
    reader.join(timeout=30)
    a.close()
    b.close()
    assert sent == len(chunk)
    assert bytes(received) == chunk


def test_the_fast_paths_are_in_use() -> None:
    """If pyOpenSSL moved the internals tls_fastpath.py uses, the relay stays correct but slower: say so here."""
    assert tls_fastpath.calls().fast
    assert tls_fastpath.probe() is not tls_fastpath.PUBLIC
