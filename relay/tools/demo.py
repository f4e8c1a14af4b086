"""`migrelay demo`: two relays on loopback, fresh certificates, one stream, live throughput.

Runs anywhere (no libvirt, no QEMU): it plays both hypervisors itself. The "source
QEMU" writes a stream into `<A>/hvB/demo.sock`; relay A forwards it over TLS to
relay B, which connects it to `<B>/hvB/demo.sock` where the "destination QEMU"
listens. Both ends hash what they saw; the summary says whether they match.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import trio

from relay.core.config import Transport
from relay.core.errors import LocalError
from relay.tools import loopback, pki

CHUNK_BYTES: Final = 1 << 20
POOL_BYTES: Final = 32 << 20
READY_TIMEOUT_S: Final = 30.0
PROGRESS_INTERVAL_S: Final = 0.5


@dataclass
class DemoResult:
    bytes_sent: int
    bytes_received: int
    seconds: float
    sent_sha256: str
    received_sha256: str

    @property
    def ok(self) -> bool:
        return self.bytes_sent == self.bytes_received and self.sent_sha256 == self.received_sha256

    @property
    def mb_per_s(self) -> float:
        return self.bytes_received / self.seconds / 1e6 if self.seconds else 0.0


async def _wait_ready(notify: trio.socket.SocketType, count: int, procs: list[trio.Process]) -> None:
    ready = 0
    with trio.fail_after(READY_TIMEOUT_S):
        while ready < count:
            with trio.move_on_after(0.2):
                data = await notify.recv(4096)
                ready += b"READY=1" in data.split(b"\n")
            for p in procs:
                if p.returncode is not None:
                    raise LocalError(f"a demo relay exited early with status {p.returncode}")


async def _source(path: Path, size: int, pool: bytes, sent: dict[str, object]) -> None:
    h = hashlib.sha256()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    view = memoryview(pool)
    left, i = size, 0
    with sock:
        while left:
            # a different window of the pool each time, so repeats do not hide reordering
            start = (i * 7_340_033) % (POOL_BYTES - CHUNK_BYTES)
            length = min(CHUNK_BYTES, left)
            chunk = view[start : start + length]
            h.update(chunk)
            while chunk:
                n = await sock.send(chunk)
                chunk = chunk[n:]
            left -= length
            i += 1
        sock.shutdown(socket.SHUT_WR)
        await sock.recv(1)  # the sink closes once it has everything
    sent["sha256"] = h.hexdigest()


async def _sink(listener: trio.socket.SocketType, progress: list[int], received: dict[str, object]) -> None:
    h = hashlib.sha256()
    conn, _ = await listener.accept()
    buf = bytearray(CHUNK_BYTES)
    with conn:
        while n := await conn.recv_into(buf):
            h.update(memoryview(buf)[:n])
            progress[0] += n
    received["sha256"] = h.hexdigest()


async def _show_progress(progress: list[int], size: int, start: float, out: TextIO) -> None:
    last_bytes, last_t = 0, start
    while True:
        await trio.sleep(PROGRESS_INTERVAL_S)
        now = time.monotonic()
        rate = (progress[0] - last_bytes) / (now - last_t) / 1e6
        last_bytes, last_t = progress[0], now
        out.write(f"\r  {progress[0] / 2**30:6.2f} / {size / 2**30:.2f} GiB   {rate:8.0f} MB/s   ")
        out.flush()


async def run_demo(size: int, out: TextIO = sys.stdout, transport: Transport = "tls") -> DemoResult:
    with tempfile.TemporaryDirectory(prefix="migrelay-demo-") as tmp:
        root = Path(tmp)
        pki_dir = root / "pki"
        pki.init_ca(pki_dir)
        for name in ("hvA", "hvB"):
            pki.issue(pki_dir, name)
        a_conf, b_conf = loopback.write_pair(root, pki_dir, transport, channels=("demo.sock",))
        out.write(f"migrelay demo: fresh CA and certificates in {root}/pki; relays hvA -> hvB over {transport}\n")
        notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await notify.bind(str(root / "notify.sock"))
        env = dict(os.environ, NOTIFY_SOCKET=str(root / "notify.sock"))
        cmd = [sys.executable, "-m", "relay", "--log-level", "warning", "serve", "--config"]
        procs: list[trio.Process] = []
        try:
            # the destination first: hvA probes its peer as it starts, and would warn it is down
            for conf in (b_conf, a_conf):
                procs.append(await trio.lowlevel.open_process([*cmd, str(conf)], env=env))
                await _wait_ready(notify, 1, procs)
            dest = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await dest.bind(str(root / "hvB" / "hvB" / "demo.sock"))
            dest.listen(1)
            out.write(f"  stream: {size / 2**30:.2f} GiB through {root}/hvA/hvB/demo.sock, sha256 on both ends\n")
            pool = os.urandom(POOL_BYTES)
            sent: dict[str, object] = {}
            received: dict[str, object] = {}
            progress = [0]
            start = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_show_progress, progress, size, start, out)
                async with trio.open_nursery() as transfer:
                    transfer.start_soon(_sink, dest, progress, received)
                    transfer.start_soon(_source, root / "hvA" / "hvB" / "demo.sock", size, pool, sent)
                nursery.cancel_scope.cancel()
            seconds = time.monotonic() - start
            dest.close()
        finally:
            with trio.CancelScope(shield=True):
                for p in procs:
                    p.terminate()
                for p in procs:
                    with trio.move_on_after(10):
                        await p.wait()
                    if p.returncode is None:
                        p.kill()
                        await p.wait()
            notify.close()
    result = DemoResult(size, progress[0], seconds, str(sent["sha256"]), str(received["sha256"]))
    out.write("\n")
    out.write(
        f"  {result.bytes_received} bytes in {result.seconds:.2f} s = {result.mb_per_s:.0f} MB/s; "
        f"sha256 {'match' if result.ok else 'MISMATCH'} ({result.received_sha256[:16]}…)\n"
    )
    return result


def demo(size: int, out: TextIO = sys.stdout, transport: Transport = "tls") -> DemoResult:
    """`migrelay demo`: run it to the end, with live progress on `out`."""
    return trio.run(run_demo, size, out, transport)
