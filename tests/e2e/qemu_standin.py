"""A QEMU stand-in for the sandbox test: one unix stream socket, as the QEMU user would hold it.

    listen PATH MODE     bind PATH, chmod MODE, print "listening", take one connection,
                         read it to EOF, print "BYTES SHA256"
    send PATH BYTES      connect PATH, send BYTES random bytes, half-close, print "BYTES SHA256"

Standard library only: the test runs it with /usr/bin/python3 as libvirt-qemu, who cannot
read the test venv's interpreter (it lives under /root on the test machines).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys

CHUNK = 1 << 20


def listen(path: str, mode: int) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, mode)
    server.listen(1)
    print("listening", flush=True)
    conn, _ = server.accept()
    h = hashlib.sha256()
    total = 0
    while data := conn.recv(CHUNK):
        h.update(data)
        total += len(data)
    print(total, h.hexdigest(), flush=True)


def send(path: str, size: int) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    h = hashlib.sha256()
    sent = 0
    while sent < size:
        data = os.urandom(min(CHUNK, size - sent))
        h.update(data)
        sock.sendall(data)
        sent += len(data)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # until the relay closes its end: every byte is through
    print(sent, h.hexdigest(), flush=True)


if __name__ == "__main__":
    command, path, number = sys.argv[1:4]
    if command == "listen":
        listen(path, int(number, 8))
    else:
        send(path, int(number))
