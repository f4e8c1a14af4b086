"""100 injected faults against two `migrelay serve` processes over TLS: nothing leaks, and the pair recovers.

Why it matters: in production the far relay is killed (host crash, OOM), a destination QEMU
dies mid-migration, a source QEMU vanishes. Each must end the affected streams as errors at
both ends, promptly; the surviving relay must close every socket of theirs (a relay that
loses a fd per failed migration runs out after months) and go on serving: after every
fault, a byte-exact stream goes through.

Faults, mixed in one shuffled sequence: a relay SIGKILLed with streams in flight (hvB and
hvA in turn, each restarted over its stale socket files), the destination target resetting
mid-stream, and the source client process SIGKILLed mid-stream. The fourth kind, the peer
blackholed, is an extension point (see PEER_BLACKHOLED; a blackholed peer on its own is
test_blackholed_peer_detected_in_time.py).
"""

from __future__ import annotations

import enum
import random
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.e2e.load import (
    ERRORS,
    MIB,
    End,
    Half,
    Kind,
    Load,
    PairFiles,
    Seen,
    Stream,
    broken_reasons,
    fd_count,
    start_targets,
    write_pair,
)
from tests.e2e.procs import ServeProcess, serve
from tests.support import connect, make_pki, scrape


class Fault(enum.Enum):
    RELAY_KILLED = "relay SIGKILLed with streams in flight, then restarted"
    TARGET_RESET = "destination target reset mid-stream"
    CLIENT_VANISHED = "source client process SIGKILLed mid-stream"
    # TODO(netns): PEER_BLACKHOLED is not injected yet. It needs the relays in network
    # namespaces, which the shared helper tests/netns.py (merged from wt-netns) now provides:
    # start the pair inside `netns.veth_pair()` (serve(config, prefix=lambda _: host.argv()),
    # hvA dialling hvB's veth address, metrics read with `host.fetch`; /proc works from
    # outside), give both relays short tcp_keepalive_* / tcp_ack_timeout_s so 100 faults
    # stay bounded, then per fault: streams in flight, `link.blackhole()`, every end sees an
    # error within the detection time (see test_blackholed_peer_detected_in_time.py for
    # how that is computed), `link.restore()`, fds back at baseline, a byte-exact stream.
    PEER_BLACKHOLED = "peer blackholed (not implemented: needs the netns helper)"


FAULTS: Final = 100
# How many of each kind; PEER_BLACKHOLED gets its share once it is implemented.
MIX: Final = {Fault.RELAY_KILLED: 20, Fault.TARGET_RESET: 40, Fault.CLIENT_VANISHED: 40, Fault.PEER_BLACKHOLED: 0}
# Target resets and vanishing clients run this many at a time, beside one healthy stream.
BATCH: Final = 9
STREAMS_WHEN_KILLED: Final = 4
KILLED_STREAM_BYTES: Final = 256 * MIB  # each way: far from done when the relay dies
MID_STREAM_BYTES: Final = 1 * MIB  # moved both ways before a fault is injected
HEALTHY_BYTES: Final = 4 * MIB
# Every end of a stream hit by a fault must have seen its error within this long.
NOTICE_S: Final = 10.0
FD_SETTLE_S: Final = 10.0
PROGRESS_TIMEOUT_S: Final = 30.0

# A client that is a separate process, so it can vanish as QEMU does: SIGKILL. It sends a
# frame header and then payload forever, and never reads what the target sends back, so
# its socket holds unread data when it dies.
VANISHING_CLIENT: Final = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
block = os.urandom(1 << 16)
while True:
    s.sendall(block)
"""


@dataclass
class Pair:
    files: PairFiles
    stack: ExitStack
    relays: dict[str, ServeProcess]
    baseline: dict[str, int] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)  # (relay, log) of every process that ran

    def config(self, name: str) -> Path:
        return self.files.a if name == "hvA" else self.files.b

    def pid(self, name: str) -> int:
        return self.relays[name].proc.pid


@dataclass
class Report:
    faults: Counter[Fault] = field(default_factory=Counter)
    streams: list[tuple[Fault, Stream]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kills: list[tuple[str, float, float]] = field(default_factory=list)  # victim, notice s, restart s
    while_down: Counter[str] = field(default_factory=Counter)
    healthy: int = 0


async def stable_fds(pid: int) -> int:
    """An idle relay's fd count: two equal readings in a row."""
    last = fd_count(pid)
    while True:
        await trio.sleep(0.2)
        if (n := fd_count(pid)) == last:
            return n
        last = n


async def fds_settle(pair: Pair, report: Report, when: str, only: str | None = None) -> None:
    """Every relay (or `only`) alive and back at its baseline fd count (polled: sockets close just after
    the streams end)."""
    for name, proc in pair.relays.items():
        if only is not None and name != only:
            continue
        if proc.proc.poll() is not None:
            report.problems.append(f"{when}: {name} died: {proc.output()[-2000:]}")
            continue
        with trio.move_on_after(FD_SETTLE_S):
            while fd_count(proc.proc.pid) != pair.baseline[name]:  # noqa: ASYNC110  (polling /proc)
                await trio.sleep(0.05)
        if (n := fd_count(proc.proc.pid)) != pair.baseline[name]:
            report.problems.append(f"{when}: {name} has {n} fds, baseline {pair.baseline[name]}")


async def mid_stream(s: Stream) -> None:
    """Wait until s has moved MID_STREAM_BYTES both ways (frame bytes, as the receivers counted)."""
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while s.a2b_read < MID_STREAM_BYTES or s.b2a_read + s.b2a_sent < MID_STREAM_BYTES:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def healthy_stream(load: Load, report: Report, when: str) -> None:
    """A byte-exact stream both ways: the pair still serves."""
    s = load.stream(Kind.BULK, a2b=HEALTHY_BYTES, b2a=HEALTHY_BYTES)
    await load.run_client(s)
    with trio.move_on_after(NOTICE_S):
        while s.target is None:  # noqa: ASYNC110  (the target records its end just after the client)
            await trio.sleep(0.01)
    views = [e for e in (s.client, s.target) if e is not None]
    if len(views) != 2 or any(h.seen != Seen.COMPLETE for e in views for h in (e.recv, e.send)):
        report.problems.append(f"{when}: the healthy stream failed: {s.describe()}")
    report.healthy += 1


async def target_reset(load: Load, report: Report) -> None:
    s = load.plan(Kind.ABORT_TARGET, 0)
    report.streams.append((Fault.TARGET_RESET, s))
    await load.run_client(s)


async def client_vanished(load: Load, report: Report) -> None:
    s = load.stream(Kind.VANISH_CLIENT, a2b=1 << 40, b2a=64 * MIB)  # the client never gets to the end
    report.streams.append((Fault.CLIENT_VANISHED, s))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", VANISHING_CLIENT, str(load.overlay / s.name), s.header().hex()],
        stdout=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(PROGRESS_TIMEOUT_S):
            while s.a2b_read < MID_STREAM_BYTES or s.b2a_sent < MID_STREAM_BYTES:  # noqa: ASYNC110
                await trio.sleep(0.01)
    finally:
        proc.kill()
        await proc.wait()
    s.client = End(Half(Seen.STOPPED, detail="SIGKILLed"), Half(Seen.STOPPED, detail="SIGKILLed"))


async def relay_killed(pair: Pair, load: Load, report: Report, victim: str) -> None:
    survivor = "hvB" if victim == "hvA" else "hvA"
    streams = [
        load.stream(Kind.BULK, a2b=KILLED_STREAM_BYTES, b2a=KILLED_STREAM_BYTES) for _ in range(STREAMS_WHEN_KILLED)
    ]
    report.streams += [(Fault.RELAY_KILLED, s) for s in streams]
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(load.run_client, s)
        for s in streams:
            await mid_stream(s)
        proc = pair.relays[victim]
        proc.proc.kill()
        killed = trio.current_time()
        await trio.to_thread.run_sync(proc.proc.wait)
        pair.logs.append((victim, proc.output()))
        with trio.move_on_after(NOTICE_S) as waited:
            while any(s.client is None or s.target is None for s in streams):  # noqa: ASYNC110
                await trio.sleep(0.01)
        if waited.cancelled_caught:
            report.problems.append(f"{victim} killed: streams still running after {NOTICE_S:.0f}s")
            nursery.cancel_scope.cancel()
    notice = trio.current_time() - killed
    # the survivor closed every socket of the killed streams; no stream is left active in it
    await fds_settle(pair, report, f"{victim} killed", only=survivor)
    metrics = pair.files.metrics_a if survivor == "hvA" else pair.files.metrics_b
    active = sum(v for (n, _), v in scrape(metrics).items() if n == "migrelay_active_streams")
    if active:
        report.problems.append(f"{victim} killed: {survivor} still counts {active} active streams")
    await while_down(load, report, victim)
    # back over its stale socket files, with its new baseline
    started = trio.current_time()
    (restarted,) = await trio.to_thread.run_sync(pair.stack.enter_context, serve(pair.config(victim)))
    pair.relays[victim] = restarted
    pair.baseline[victim] = await stable_fds(restarted.proc.pid)
    report.kills.append((victim, notice, trio.current_time() - started))
    await healthy_stream(load, report, f"after {victim} was killed")


async def while_down(load: Load, report: Report, victim: str) -> None:
    """A new stream while a relay is dead fails at once, and plainly, for the source client."""
    if victim == "hvB":
        # hvA cannot reach hvB: the client sees its connection closed without data
        s = load.stream(Kind.REFUSED, name="migration.sock")
        with trio.move_on_after(NOTICE_S):
            await load.run_client(s)
        seen = s.client.recv if s.client else Half(Seen.OTHER, detail="no answer")
        report.while_down[f"hvB down: client via hvA saw {seen.seen.value}, {seen.bytes} bytes"] += 1
        if seen.seen not in (Seen.SHORT, Seen.RESET) or seen.bytes:
            report.problems.append(f"hvB down: a new stream through hvA: {s.describe()}")
        return
    # hvA's overlay socket file outlives it: connecting is refused
    try:
        sock = await connect(load.overlay / "migration.sock")
    except ConnectionRefusedError:
        report.while_down["hvA down: connect refused (ECONNREFUSED)"] += 1
    else:
        sock.close()
        report.problems.append("hvA down: a client could still connect to its overlay socket")


async def inject(pair: Pair, report: Report, seed: int) -> None:
    rng = random.Random(seed)
    plan = [fault for fault, n in MIX.items() for _ in range(n)]
    assert len(plan) == FAULTS, "MIX must add up to FAULTS"
    rng.shuffle(plan)
    load = Load.new(pair.files.overlay, seed)
    async with trio.open_nursery() as background:
        await start_targets(load, pair.files.target_dir, background)
        background.start_soon(load.watchdog)
        for name in pair.relays:
            pair.baseline[name] = await stable_fds(pair.pid(name))
        await healthy_stream(load, report, "before any fault")
        batch: list[Fault] = []
        kills = 0
        for i, fault in enumerate(plan):
            report.faults[fault] += 1
            if fault == Fault.RELAY_KILLED:
                await relay_killed(pair, load, report, "hvB" if kills % 2 == 0 else "hvA")
                kills += 1
                continue
            batch.append(fault)
            if len(batch) == BATCH or i == len(plan) - 1 or plan[i + 1] == Fault.RELAY_KILLED:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(healthy_stream, load, report, f"beside faults {i + 1 - len(batch)}..{i}")
                    for f in batch:
                        nursery.start_soon(target_reset if f == Fault.TARGET_RESET else client_vanished, load, report)
                with trio.move_on_after(NOTICE_S):
                    while load.active_targets:  # noqa: ASYNC110  (a counter)
                        await trio.sleep(0.01)
                await fds_settle(pair, report, f"after faults {i + 1 - len(batch)}..{i}")
                batch = []
        await healthy_stream(load, report, "after all faults")
        await fds_settle(pair, report, "at the end")
        report.problems += load.anomalies
        background.cancel_scope.cancel()


def check(fault: Fault, s: Stream) -> str | None:
    """Each end the fault did not hit saw an error or a short stream, never a complete one."""
    ends = {"client": s.client, "target": s.target}
    if s.hung:
        return "hung"
    if any(h.seen in (Seen.CORRUPT, Seen.OTHER) for e in ends.values() if e for h in (e.recv, e.send)):
        return "corrupt or unexpected error"
    # which ends must have noticed
    must = {Fault.TARGET_RESET: ["client"], Fault.CLIENT_VANISHED: ["target"], Fault.RELAY_KILLED: ["client", "target"]}
    for name in must[fault]:
        end = ends[name]
        if end is None or end.recv.seen not in ERRORS:
            return f"the {name} did not see an error"
    return None


def test_injected_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = write_pair(tmp_path, make_pki(tmp_path))
    seed = int(time.time())
    report = Report()
    started = time.monotonic()
    with ExitStack() as stack:
        relays = {"hvA": stack.enter_context(serve(files.a))[0], "hvB": stack.enter_context(serve(files.b))[0]}
        pair = Pair(files, stack, relays)
        trio.run(inject, pair, report, seed)
        live = dict(pair.relays)
    pair.logs += [(name, proc.output()) for name, proc in live.items()]
    took = time.monotonic() - started

    bad = [f"{fault.name} {s.describe()}: {why}" for fault, s in report.streams if (why := check(fault, s))]
    lines = [
        f"faults: {sum(report.faults.values())} in {took:.1f} s, seed {seed}: "
        + ", ".join(f"{f.name.lower()} {n}" for f, n in report.faults.items())
        + f" ({Fault.PEER_BLACKHOLED.name.lower()}: not implemented yet)",
        f"  healthy byte-exact streams between faults: {report.healthy}",
        "  relay kills (victim: every stream's ends noticed within, restart took): "
        + ", ".join(f"{v} {n:.2f}s/{r:.1f}s" for v, n, r in report.kills),
        "  a new stream while a relay was down: " + "; ".join(f"{k} x{n}" for k, n in report.while_down.items()),
        "  streams hit, by fault (client | target):",
    ]
    table = Counter(
        (fault.name, s.client.summary() if s.client else "-", s.target.summary() if s.target else "-")
        for fault, s in report.streams
    )
    for (fault, client, target), n in sorted(table.items()):
        lines.append(f"    {n:5d} {fault}: {client} | {target}")
    reasons: dict[str, Counter[str]] = {"hvA": Counter(), "hvB": Counter()}
    for name, log in pair.logs:
        reasons[name] += broken_reasons(log)
    for name, counts in reasons.items():
        for reason, n in counts.most_common():
            lines.append(f"  {name} broken streams: {n:4d} {reason}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert not report.problems, "\n".join(report.problems[:30])
    assert not bad, f"{len(bad)} streams:\n" + "\n".join(bad[:30])
    for name, log in pair.logs:
        assert "Traceback" not in log, f"{name} logged a traceback"
    assert all(p.proc.returncode == 0 for p in live.values()), "a relay did not stop cleanly on SIGTERM"


def test_peer_blackholed() -> None:
    """The fourth fault kind; its TODO in Fault.PEER_BLACKHOLED says what it needs."""
    pytest.skip("peer blackholed is not among the injected faults yet: see the TODO at Fault.PEER_BLACKHOLED")
