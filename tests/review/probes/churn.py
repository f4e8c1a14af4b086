"""Review probe helper: silent TCP connections to HOST:PORT from ADDRS source addresses (127.x.y.z), at RATE a second.

usage: churn.py HOST PORT KEEP SECONDS RATE ADDRS (KEEP: how many stay open; older ones are closed)
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import resource
import socket
import sys
import time


def main() -> None:
    host, port, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    seconds, rate, addrs = float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    sources = [f"127.{x}.{y}.{z}" for x in range(20, 30) for y in range(256) for z in range(1, 255)][:addrs]
    held: collections.deque[socket.socket] = collections.deque()
    start = time.monotonic()
    n = 0
    for src in itertools.cycle(sources):
        now = time.monotonic()
        if now - start > seconds:
            break
        ahead = n / rate - (now - start)
        if ahead > 0:
            time.sleep(ahead)
        s = socket.socket()
        s.setblocking(False)
        s.bind((src, 0))
        with contextlib.suppress(BlockingIOError):
            s.connect((host, port))
        held.append(s)
        n += 1
        while len(held) > keep:
            held.popleft().close()
    print(f"churn: {n} connections in {seconds}s", file=sys.stderr)


if __name__ == "__main__":
    main()
