"""Load generator and sink for the benchmarks, run as their own processes.

    python -m relay.tools.bench.load sink PATH             accept; discard each stream (echo one that starts with b'P')
    python -m relay.tools.bench.load source PATH N BYTES   N streams of BYTES each, concurrently
    python -m relay.tools.bench.load pingpong PATH COUNT   1 KiB request / 1 KiB answer, COUNT times

Every stream's result is one JSON line on stdout. Streams use one preallocated buffer of
random bytes and big send/recv calls, so the generator itself costs little CPU.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Final

BUFFER_BYTES: Final = 1 << 20
PING_BYTES: Final = 1024


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("closed mid-message")
        got += n


def sink(path: str) -> None:
    """Discard everything; the first byte b'P' makes a connection an echo (ping-pong) instead."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(256)
    print(json.dumps({"ready": path}), flush=True)
    lock = threading.Lock()

    def serve(conn: socket.socket) -> None:
        with conn:
            buf = bytearray(BUFFER_BYTES)
            view = memoryview(buf)
            first = conn.recv_into(view)
            start = time.monotonic()
            if first and buf[0:1] == b"P":
                _echo(conn, view, first)
                return
            total = first
            while n := conn.recv_into(view):
                total += n
            end = time.monotonic()
            with lock:
                print(json.dumps({"bytes": total, "start": start, "end": end}), flush=True)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket, view: memoryview, have: int) -> None:
    while True:
        if have < PING_BYTES:
            _recv_exact(conn, view[have:PING_BYTES])
        conn.sendall(view[:PING_BYTES])
        have = conn.recv_into(view[:PING_BYTES])
        if have == 0:
            return


def source(path: str, streams: int, size: int) -> None:
    buf = bytearray(os.urandom(BUFFER_BYTES))
    buf[0] = ord("D")  # a stream starting with b"P" would be taken for a ping-pong (1 run in 256 hung)
    data = memoryview(buf)
    results: list[dict[str, float]] = []

    def one() -> None:
        start = time.monotonic()
        with _connect(path) as sock:
            left = size
            while left:
                n = min(left, BUFFER_BYTES)
                sock.sendall(data[:n])
                left -= n
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the far end closes when it has everything
        results.append({"bytes": size, "start": start, "end": time.monotonic()})

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r), flush=True)


def pingpong(path: str, count: int) -> None:
    message = memoryview(b"P" + os.urandom(PING_BYTES - 1))
    answer = memoryview(bytearray(PING_BYTES))
    rtts = []
    with _connect(path) as sock:
        sock.sendall(message)  # warm-up: connection setup through every hop
        _recv_exact(sock, answer)
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(message)
            _recv_exact(sock, answer)
            rtts.append(time.perf_counter() - t0)
    print(json.dumps({"rtts": rtts}), flush=True)


def main(argv: list[str]) -> None:
    role, path, *rest = argv
    if role == "sink":
        sink(path)
    elif role == "source":
        source(path, int(rest[0]), int(rest[1]))
    elif role == "pingpong":
        pingpong(path, int(rest[0]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
