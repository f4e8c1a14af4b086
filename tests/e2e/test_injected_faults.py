"""100 injected faults against two `migrelay serve` processes over TLS: nothing leaks, and the pair recovers.

Why it matters: in production the far relay is killed (host crash, OOM), a destination QEMU
dies mid-migration, a source QEMU vanishes, the network between the hosts partitions. Each
must end the affected streams as errors at both ends, promptly; the surviving relay must
close every socket of theirs (a relay that loses a fd per failed migration runs out after
months) and go on serving: after every fault, a byte-exact stream goes through.

The relays run in two network namespaces joined by a veth pair (tests/netns.py), hvA
dialling hvB's veth address, so that the link between them can lose every packet without
a word, as a partition does; loopback cannot. The load generator stays outside: the overlay
sockets are in the shared filesystem. Faults, mixed in one shuffled sequence:
- a relay SIGKILLed with streams in flight (hvB and hvA in turn, each restarted in its
  namespace over its stale socket files); a new stream meanwhile fails at once;
- the destination target resetting mid-stream;
- the source client process SIGKILLed mid-stream;
- the peer blackholed (nftables drops every packet on the veth) with streams idle, one way
  and both ways in flight: every end of each sees its stream end within the configured
  dead-peer detection time (keepalive for the idle, the ACK watchdog for data in flight),
  both relays count them failed and close every fd while still cut off, and a new stream
  attempted meanwhile fails plainly for its client; the link restored, a stream is byte-exact.
"""

from __future__ import annotations

import enum
import random
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
import trio

from relay.core.config import Liveness
from relay.daemon.net import ACK_CHECKS_PER_TIMEOUT
from tests import netns
from tests.e2e.load import (
    ERRORS,
    KIB,
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
from tests.e2e.procs import ServeProcess, need, serve
from tests.support import Samples, connect, make_pki, metric_total, parse_metrics


class Fault(enum.Enum):
    RELAY_KILLED = "relay SIGKILLed with streams in flight, then restarted"
    TARGET_RESET = "destination target reset mid-stream"
    CLIENT_VANISHED = "source client process SIGKILLed mid-stream"
    PEER_BLACKHOLED = "every packet between the relays dropped, streams idle and in flight"


FAULTS: Final = 100
# How many of each kind. A blackhole takes ~4 s (DETECTION_S, then the restore and a healthy
# stream), a relay kill ~1 s (the restart), a batch of resets or vanished clients well under
# one: the blackholes set the test's length, ~1 m 45 s on this 2-core VM.
MIX: Final = {Fault.RELAY_KILLED: 15, Fault.TARGET_RESET: 35, Fault.CLIENT_VANISHED: 30, Fault.PEER_BLACKHOLED: 20}
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

# Dead-peer settings of both relays, short so that 20 blackholes take a minute and not
# twenty (the product's are 20 + 4 x 5 s and 40 s; see relay/config.py Liveness). Keepalive
# (1 + 1 x 1 = 2 s) gives up on an idle connection before the ACK watchdog could (it also
# times an unanswered keepalive probe, but needs 2 s of it and two looks: 2.5 s at the
# earliest), so each mechanism finds its own streams, as with the product's settings, and the
# relays' logs show both ("connection timed out", "acknowledged nothing"). One lost probe is
# fatal with a count of 1: fine on a veth, which loses nothing but what the blackhole drops.
LIVENESS: Final = Liveness(keepalive_idle_s=1, keepalive_interval_s=1, keepalive_count=1, ack_timeout_s=2.0)
# A new stream into the blackhole waits this long for hvB (its SYNs vanish), then fails.
HANDSHAKE_TIMEOUT_S: Final = 3
# When a relay gives up on a dead peer, from the peer's last packet: keepalive's probes for an
# idle connection; for data in flight the ACK watchdog, which looks ACK_CHECKS_PER_TIMEOUT times
# per timeout and wants two looks in a row past it (relay/net.py watch_acks).
KEEPALIVE_DETECTION_S: Final = LIVENESS.keepalive_idle_s + LIVENESS.keepalive_interval_s * LIVENESS.keepalive_count
WATCHDOG_DETECTION_S: Final = LIVENESS.ack_timeout_s * (1 + 2 / ACK_CHECKS_PER_TIMEOUT)
# What a blackhole waits for: both mechanisms, and hvA giving up on the new stream's dial.
DETECTION_S: Final = max(KEEPALIVE_DETECTION_S, WATCHDOG_DETECTION_S, HANDSHAKE_TIMEOUT_S)
# Scheduling on two shared cores, the nft call, the relays' wakeups: a bound on behaviour, not a benchmark.
BLACKHOLE_MARGIN_S: Final = 2.0
# The streams through the link when it goes dark: idle ones are keepalive's to find dead; one
# way (hvA sends, hvB only acknowledges) is the watchdog's on hvA and keepalive's on hvB; both
# ways, the watchdog's on both.
BLACKHOLE_STREAMS: Final = {Kind.IDLE: 2, Kind.ONE_WAY: 1, Kind.BULK: 2}
IDLE_SENT_BYTES: Final = 64 * KIB  # what the stopping ends send before they fall silent
IDLE_FRAME_BYTES: Final = 1 * MIB  # what each end of an idle stream waits for: more than will come

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
    link: netns.Link
    stack: ExitStack
    relays: dict[str, ServeProcess] = field(default_factory=dict)
    baseline: dict[str, int] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)  # (relay, log) of every process that ran

    def host(self, name: str) -> netns.Host:
        return self.link.a if name == "hvA" else self.link.b

    def start(self, name: str) -> ServeProcess:
        """Start (or restart) a relay in its own namespace; the stack SIGTERMs it at the end."""
        config = self.files.a if name == "hvA" else self.files.b
        (proc,) = self.stack.enter_context(serve(config, prefix=lambda _: self.host(name).argv()))
        self.relays[name] = proc
        return proc

    async def metrics(self, name: str) -> Samples:
        """The relay's /metrics, fetched from inside its namespace (its loopback is its own)."""
        port = self.files.metrics_a if name == "hvA" else self.files.metrics_b
        text = await trio.to_thread.run_sync(self.host(name).fetch, f"http://127.0.0.1:{port}/metrics")
        return parse_metrics(text)


@dataclass
class Report:
    faults: Counter[Fault] = field(default_factory=Counter)
    streams: list[tuple[Fault, Stream]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    kills: list[tuple[str, float, float]] = field(default_factory=list)  # victim, notice s, restart s
    while_down: Counter[str] = field(default_factory=Counter)
    # seconds from the blackhole to the end of each end of each stream through it, by stream kind
    blackhole_notice: defaultdict[Kind, list[float]] = field(default_factory=lambda: defaultdict(list))
    blackhole_s: list[float] = field(default_factory=list)  # each blackhole fault start to end, restore included
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


async def under_way(s: Stream) -> None:
    """Wait until each direction of s has carried what it will before the blackhole: a stopping
    end's IDLE_SENT_BYTES arrived whole (nothing of it left in flight), a sending end's MID_STREAM_BYTES."""
    a2b = IDLE_SENT_BYTES if s.kind == Kind.IDLE else MID_STREAM_BYTES
    b2a = IDLE_SENT_BYTES if s.kind in (Kind.IDLE, Kind.ONE_WAY) else MID_STREAM_BYTES
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while s.a2b_read < a2b or s.b2a_read < b2a:  # noqa: ASYNC110  (counters)
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
    active = metric_total(await pair.metrics(survivor), "migrelay_active_streams")
    if active:
        report.problems.append(f"{victim} killed: {survivor} still counts {active} active streams")
    await while_down(load, report, victim)
    # back over its stale socket files, in its namespace, with its new baseline
    started = trio.current_time()
    restarted = await trio.to_thread.run_sync(pair.start, victim)
    pair.baseline[victim] = await stable_fds(restarted.proc.pid)
    report.kills.append((victim, notice, trio.current_time() - started))
    await healthy_stream(load, report, f"after {victim} was killed")


async def unreachable_stream(load: Load, report: Report, label: str) -> Stream:
    """A new stream that hvA cannot take to hvB: its client must see a close without data.
    (Kind REFUSED: the client expects no byte; the name is one hvB would accept.)"""
    s = load.stream(Kind.REFUSED, name="migration.sock")
    with trio.move_on_after(NOTICE_S):
        await load.run_client(s)
    seen = s.client.recv if s.client else Half(Seen.OTHER, detail="no answer")
    report.while_down[f"{label}: client via hvA saw {seen.seen.value}, {seen.bytes} bytes"] += 1
    if seen.seen not in (Seen.SHORT, Seen.RESET) or seen.bytes:
        report.problems.append(f"{label}: a new stream through hvA: {s.describe()}")
    return s


async def while_down(load: Load, report: Report, victim: str) -> None:
    """A new stream while a relay is dead fails at once, and plainly, for the source client."""
    if victim == "hvB":
        # hvA's dial is refused (nothing listens on hvB's address): its client's connection closes
        await unreachable_stream(load, report, "hvB down")
        return
    # hvA's overlay socket file outlives it: connecting is refused
    try:
        sock = await connect(load.overlay / "migration.sock")
    except ConnectionRefusedError:
        report.while_down["hvA down: connect refused (ECONNREFUSED)"] += 1
    else:
        sock.close()
        report.problems.append("hvA down: a client could still connect to its overlay socket")


def failed_counts(samples: Samples, peer: str) -> tuple[float, float]:
    """(streams that ended as failed, connections that failed to set up) towards peer."""
    return (
        metric_total(samples, "migrelay_streams_closed_total", peer=peer, result="failed"),
        metric_total(samples, "migrelay_connections_total", peer=peer, result="failed"),
    )


def blackhole_stream(load: Load, kind: Kind) -> Stream:
    """A stream of one of BLACKHOLE_STREAMS's kinds; the sending ends have far more to send than time."""
    if kind == Kind.IDLE:
        return load.stream(kind, a2b=IDLE_FRAME_BYTES, b2a=IDLE_FRAME_BYTES, abort_at=IDLE_SENT_BYTES)
    if kind == Kind.ONE_WAY:
        return load.stream(kind, a2b=KILLED_STREAM_BYTES, b2a=IDLE_FRAME_BYTES, abort_at=IDLE_SENT_BYTES)
    return load.stream(kind, a2b=KILLED_STREAM_BYTES, b2a=KILLED_STREAM_BYTES)


async def peer_blackholed(pair: Pair, load: Load, report: Report, n: int) -> None:
    """Cut the link under streams idle and in flight; each end must see its stream end within the
    detection time, the relays count them failed and free their fds before the link is back."""
    began = trio.current_time()
    when = f"blackhole {n}"
    peers = {"hvA": "hvB", "hvB": "hvA"}
    before = {name: failed_counts(await pair.metrics(name), peers[name]) for name in pair.relays}
    streams = [blackhole_stream(load, kind) for kind, count in BLACKHOLE_STREAMS.items() for _ in range(count)]
    report.streams += [(Fault.PEER_BLACKHOLED, s) for s in streams]
    bound_s = DETECTION_S + BLACKHOLE_MARGIN_S
    attempt: list[Stream] = []
    async with trio.open_nursery() as nursery:
        for s in streams:
            nursery.start_soon(load.run_client, s)
        for s in streams:
            await under_way(s)
        cut = trio.current_time()  # counted from before the rules go in, as the detection is
        await trio.to_thread.run_sync(pair.link.blackhole)

        async def attempt_one() -> None:
            # hvA's SYNs vanish: it gives up after handshake_timeout_s and closes the client
            attempt.append(await unreachable_stream(load, report, "blackholed"))

        nursery.start_soon(attempt_one)
        with trio.move_on_after(bound_s) as waited:
            while not attempt or any(s.client is None or s.target is None for s in streams):  # noqa: ASYNC110
                await trio.sleep(0.01)
        if waited.cancelled_caught:
            left = [s.describe() for s in streams if s.client is None or s.target is None]
            report.problems.append(
                f"{when}: after {bound_s:.1f}s (detection {DETECTION_S:.1f}s + {BLACKHOLE_MARGIN_S:.1f}s) still "
                f"running: {'; '.join(left) or 'the new stream'}"
            )
            nursery.cancel_scope.cancel()
    for s in streams:
        for ended in (s.ended, s.target_ended):
            report.blackhole_notice[s.kind].append(ended - cut if ended else float("inf"))
    if attempt and attempt[0].ended - cut > bound_s:
        report.problems.append(f"{when}: the new stream took {attempt[0].ended - cut:.1f}s to fail")
    # still cut off: both relays counted every stream failed (and hvA the new one), none is
    # left active, and every socket of theirs is closed (a relay that frees them only when
    # the peer's RST arrives would hold them forever through a real partition)
    for name in pair.relays:
        samples = await pair.metrics(name)
        streams_failed, connections_failed = (
            a - b for a, b in zip(failed_counts(samples, peers[name]), before[name], strict=True)
        )
        expected = (len(streams), 1 if name == "hvA" else 0)
        if (streams_failed, connections_failed) != expected:
            report.problems.append(
                f"{when}: {name} counted {streams_failed:.0f} streams and {connections_failed:.0f} connections"
                f" failed, expected {expected[0]} and {expected[1]}"
            )
        if active := metric_total(samples, "migrelay_active_streams"):
            report.problems.append(f"{when}: {name} still counts {active} active streams")
    await fds_settle(pair, report, f"{when}, still blackholed")
    await trio.to_thread.run_sync(pair.link.restore)
    await healthy_stream(load, report, f"after {when}")
    await fds_settle(pair, report, f"after {when}")
    report.blackhole_s.append(trio.current_time() - began)


async def inject(pair: Pair, report: Report, seed: int) -> None:
    rng = random.Random(seed)
    plan = [fault for fault, n in MIX.items() for _ in range(n)]
    assert len(plan) == FAULTS, "MIX must add up to FAULTS"
    rng.shuffle(plan)
    load = Load.new(pair.files.overlay, seed)
    async with trio.open_nursery() as background:
        await start_targets(load, pair.files.target_dir, background)
        background.start_soon(load.watchdog)
        for name, proc in pair.relays.items():
            pair.baseline[name] = await stable_fds(proc.proc.pid)
        await healthy_stream(load, report, "before any fault")
        batch: list[Fault] = []
        kills = blackholes = 0
        for i, fault in enumerate(plan):
            report.faults[fault] += 1
            if fault == Fault.RELAY_KILLED:
                await relay_killed(pair, load, report, "hvB" if kills % 2 == 0 else "hvA")
                kills += 1
                continue
            if fault == Fault.PEER_BLACKHOLED:
                blackholes += 1
                await peer_blackholed(pair, load, report, blackholes)
                continue
            batch.append(fault)
            if len(batch) == BATCH or i == len(plan) - 1 or plan[i + 1] in (Fault.RELAY_KILLED, Fault.PEER_BLACKHOLED):
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
    must = {
        Fault.TARGET_RESET: ["client"],
        Fault.CLIENT_VANISHED: ["target"],
        Fault.RELAY_KILLED: ["client", "target"],
        Fault.PEER_BLACKHOLED: ["client", "target"],
    }
    for name in must[fault]:
        end = ends[name]
        if end is None or end.recv.seen not in ERRORS:
            return f"the {name} did not see an error"
    return None


def summary(report: Report, pair: Pair, seed: int, took: float) -> list[str]:
    kinds = ", ".join(f"{n} {k.name.lower()}" for k, n in BLACKHOLE_STREAMS.items())
    notices = [t for ts in report.blackhole_notice.values() for t in ts]
    lines = [
        f"faults: {sum(report.faults.values())} in {took:.1f} s, seed {seed}: "
        + ", ".join(f"{f.name.lower()} {report.faults[f]}" for f in Fault),
        f"  healthy byte-exact streams between faults: {report.healthy}",
        "  relay kills (victim: every stream's ends noticed within, restart took): "
        + ", ".join(f"{v} {n:.2f}s/{r:.1f}s" for v, n, r in report.kills),
        f"  peer blackholes ({kinds} streams each; detection {DETECTION_S:.1f}s: keepalive"
        f" {KEEPALIVE_DETECTION_S}s, ACK watchdog {WATCHDOG_DETECTION_S:.1f}s; bound"
        f" {DETECTION_S + BLACKHOLE_MARGIN_S:.1f}s): each took {statistics.median(report.blackhole_s or [0]):.1f}s"
        f" (median) with the restore and a healthy stream",
        "    every end noticed after (median / max): "
        + ", ".join(
            f"{k.name.lower()} {statistics.median(ts):.2f}/{max(ts):.2f}s" for k, ts in report.blackhole_notice.items()
        )
        + (f"; all {max(notices):.2f}s at most" if notices else ""),
        "  a new stream while a relay was down or cut off: "
        + "; ".join(f"{k} x{n}" for k, n in sorted(report.while_down.items())),
        "  streams hit, by fault (client | target):",
    ]
    table = Counter(
        (fault.name, s.kind.name, s.client.summary() if s.client else "-", s.target.summary() if s.target else "-")
        for fault, s in report.streams
    )
    for (fault, kind, client, target), n in sorted(table.items()):
        lines.append(f"    {n:5d} {fault} ({kind.lower()}): {client} | {target}")
    reasons: dict[str, Counter[str]] = {"hvA": Counter(), "hvB": Counter()}
    for name, log in pair.logs:
        reasons[name] += broken_reasons(log)
    for name, counts in reasons.items():
        for reason, n in counts.most_common():
            lines.append(f"  {name} broken streams: {n:4d} {reason}")
    return lines


def test_injected_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need("ip", "nft")
    if (reason := netns.missing()) is not None:
        pytest.skip(reason)
    seed = int(time.time())
    report = Report()
    started = time.monotonic()
    # the stack is left first: every relay is gone before the namespaces are deleted
    with netns.veth_pair() as link, ExitStack() as stack:
        files = write_pair(
            tmp_path,
            make_pki(tmp_path),
            peer_host=link.b.address,
            handshake_timeout_s=HANDSHAKE_TIMEOUT_S,
            liveness=LIVENESS,
        )
        pair = Pair(files, link, stack)
        pair.start("hvA")
        pair.start("hvB")
        trio.run(inject, pair, report, seed)
        live = dict(pair.relays)
    pair.logs += [(name, proc.output()) for name, proc in live.items()]
    took = time.monotonic() - started

    bad = [f"{fault.name} {s.describe()}: {why}" for fault, s in report.streams if (why := check(fault, s))]
    with capsys.disabled():
        print("\n" + "\n".join(summary(report, pair, seed, took)))

    assert not report.problems, "\n".join(report.problems[:30])
    assert not bad, f"{len(bad)} streams:\n" + "\n".join(bad[:30])
    for name, log in pair.logs:
        assert "Traceback" not in log, f"{name} logged a traceback"
    assert all(p.proc.returncode == 0 for p in live.values()), "a relay did not stop cleanly on SIGTERM"
