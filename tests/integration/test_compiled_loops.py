"""The compiled loops of the threaded data path (relay/daemon/datapath/_hotloop.c, hotloop.py).

The conformance suite (test_datapath.py) runs every case on them and on their Python twins;
here: that they are built where `make test` installs a compiler, and that a failure reads
the same whichever loop met it.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

import pytest
import trio

from relay.daemon.datapath import Meter, PlainConn, RekeyConn, StreamBroken, hotloop, threaded_bridge
from tests.integration.test_datapath import BRIDGES, tls_files, tls_leg


def test_the_compiled_loops_are_built_and_used() -> None:
    """`make test` installs gcc and python3-dev, so `pip install -e .` builds _hotloop: a build
    that silently fell back to Python (setup.py's optional=True) would lose the speed unseen."""
    assert not os.environ.get(hotloop.PYTHON_LOOPS_ENV), "unset MIGRELAY_PYTHON_LOOPS to test the build"
    assert hotloop.compiled() is not None
    assert hotloop.describe() == "compiled"


def test_the_lock_excludes_across_threads() -> None:
    """TlsConn's lock, taken from Python: a pthread mutex that waits without the GIL."""
    lock = hotloop.new_lock()
    inside = 0
    overlaps = 0

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(20_000):
            with lock:
                inside += 1
                if inside != 1:
                    overlaps += 1
                inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0 and inside == 0


def test_releasing_a_lock_not_held_is_an_error() -> None:
    """An error-checking mutex: a misuse raises, as threading.Lock's does, instead of undefined behaviour."""
    lock = hotloop.new_lock()
    with pytest.raises(RuntimeError):
        lock.__exit__(None, None, None)
    with lock:
        pass


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        (b"\x17\x03\x03\x00\x20" + bytes(32), "TLS read failed"),  # a record that fails its MAC
        (b"GET / HTTP/1.1\r\n\r\n", "TLS read failed"),  # not TLS at all
        (None, "without close_notify: Connection reset by peer"),  # an RST: errno through SSL_ERROR_SYSCALL
    ],
)
async def test_a_broken_peer_fails_the_same_in_c_and_python(
    tmp_path: Path, garbage: bytes | None, expected: str
) -> None:
    """After the handshake, bytes that are no valid TLS record, or a reset: the stream breaks
    with the message the Python loops give (OpenSSL's error queue read in the thread that made
    the call; errno as the C call saw it)."""
    files = tls_files(tmp_path)
    messages = []
    for compiled in (True, False):
        leg = await tls_leg(files)
        if garbage is None:
            leg.app_b_raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leg.app_b_raw.close()  # RST
        else:
            await leg.app_b_raw.send(garbage)  # under the TLS layer, as a broken or hostile peer would
        with pytest.raises(StreamBroken) as broke:
            await threaded_bridge(PlainConn(leg.end_a_raw), leg.end_b, Meter(), Meter(), compiled=compiled)
        messages.append(str(broke.value))
        leg.close()
    assert messages[0] == messages[1]
    assert expected in messages[0], messages


@pytest.mark.parametrize("bridge", list(BRIDGES))
async def test_a_bad_record_behind_full_ones_is_reported_after_them(tmp_path: Path, bridge: str) -> None:
    """A full 16 KiB record with a forged one right behind it, both queued before the relay
    reads: the good record is passed on, then the forgery fails the stream as a TLS error
    (not as a mere end without close_notify), on every data path."""
    leg = await tls_leg(tls_files(tmp_path))
    await leg.app_b.send_all(memoryview(bytes(16384)))
    await leg.app_b_raw.send(b"\x17\x03\x03\x00\x20" + bytes(32))
    b_to_a = Meter()
    with pytest.raises(StreamBroken, match="TLS read failed: decryption failed or bad record mac"):
        await BRIDGES[bridge](PlainConn(leg.end_a_raw), leg.end_b, Meter(), b_to_a)
    assert b_to_a.total == 16384
    leg.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
async def test_a_chain_aborted_under_running_threads_closes_after_they_stop(tmp_path: Path, compiled: bool) -> None:
    """trio aborts a rekeying chain (a switch that failed to settle: rekey.py's _settle) from
    another task while both pump threads sit on its sockets. Closing them there and then would
    leave the threads on fds the next accept may reuse: the abort stops the threads first, the
    sockets stay open until they have returned, then the bridge aborts both ends."""
    leg = await tls_leg(tls_files(tmp_path))
    app_raw, end_raw, first, peer = leg.app_a_raw, leg.end_a_raw, leg.end_b, leg.app_b
    chain = RekeyConn(first, label="chain", switch_timeout_s=5.0)
    outcome: list[BaseException] = []

    async def run_bridge() -> None:
        try:
            await threaded_bridge(PlainConn(end_raw), chain, Meter(), Meter(), compiled=compiled)
        except StreamBroken as e:
            outcome.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(run_bridge)
        await peer.send_all(memoryview(b"x" * 1000))  # both threads are running: one moved this
        received = bytearray()
        while len(received) < 1000:
            received += await app_raw.recv(1000)
        chain.abort()
        assert first.socket.fileno() != -1, "closed under a running thread"
    assert outcome and "aborted while it moved to a fresh TLS connection" in str(outcome[0])
    assert first.socket.fileno() == -1  # closed by the bridge, after the threads
    with pytest.raises(ConnectionResetError):
        await app_raw.recv(10)  # the plaintext end was aborted too
    leg.close()
