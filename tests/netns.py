"""Two hosts on one machine: network namespaces joined by a veth pair, with a link that can fail.

For tests that need a real network between relays — one that can lose packets silently,
which loopback cannot — without VMs:

    from tests import netns

    if (reason := netns.missing()) is not None:
        pytest.skip(reason)
    with netns.veth_pair() as link:                 # hosts link.a and link.b
        proc = subprocess.Popen(link.b.argv("python", "-m", "relay", "serve", ...))
        link.a.run("ip", "-brief", "addr")          # a command inside host a (check=True)
        body = link.b.fetch("http://127.0.0.1:9465/metrics")
        link.blackhole()                            # every packet between them vanishes
        link.restore()                              # and flows again
        with link.blackholed():                     # the same, for a block
            ...

Each host has its own loopback (up) and a veth end with an address on a /24; the rest of
the filesystem is shared, so unix sockets and files work across hosts as usual. The
namespace names carry the pid and a counter, so parallel runs do not clash. Leaving the
context always removes the blackhole rules and both namespaces, whatever happened inside.
Processes started in a host must be ended before that (a process still inside keeps its
namespace alive, nameless, until it exits).

Needs root, iproute2 (`ip`) and nftables (`nft`); `missing()` says what is not there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

COMMAND_TIMEOUT_S: Final = 30.0
FETCH_TIMEOUT_S: Final = 10.0
DEVICE: Final = "veth0"  # the same name on both hosts: interfaces are per namespace
BLACKHOLE_TABLE: Final = "migrelay_blackhole"  # an nftables table of its own, removed whole

_names = itertools.count(1)

# Drop at the receiving end only (prerouting, before anything else): the sender's packets
# leave as on a real network and vanish on the way. A rule on the sending side's output
# hook would instead fail the send locally (EPERM), which TCP treats differently from loss.
_BLACKHOLE_RULES: Final = f"""
table inet {BLACKHOLE_TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority -300; policy accept;
        iifname "{DEVICE}" drop
    }}
}}
"""

# Runs inside a host: GET a URL, body to stdout (the test process is not in the namespace).
_FETCH_SCRIPT: Final = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode())\n"
)


def missing() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    tools = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if tools:
        return f"not installed: {', '.join(tools)} (make test installs iproute2 and nftables from Debian)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def _run(
    *command: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Host:
    """One network namespace with one end of the veth pair."""

    netns: str  # the namespace's name, for `ip netns exec` / `ip -n`
    address: str  # its IPv4 address on the veth, e.g. "10.199.0.1"

    def argv(self, *command: str) -> list[str]:
        """`command` run inside this host (for Popen); `ip netns exec` execs it, so the pid is the command's."""
        return ["ip", "netns", "exec", self.netns, *command]

    def run(
        self, *command: str, check: bool = True, timeout_s: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` inside this host to its end; output captured as text; RuntimeError if it fails."""
        return _run(*self.argv(*command), check=check, timeout_s=timeout_s)

    def fetch(self, url: str, timeout_s: float = FETCH_TIMEOUT_S) -> str:
        """HTTP GET from inside this host (e.g. a /metrics endpoint bound to its loopback)."""
        return self.run(sys.executable, "-c", _FETCH_SCRIPT, url, str(timeout_s), timeout_s=timeout_s + 5).stdout


@dataclass
class Link:
    """Two hosts on a veth pair; `blackhole()` makes the link silently lose every packet."""

    a: Host
    b: Host
    _blackholed: bool = field(default=False, repr=False)

    @property
    def is_blackholed(self) -> bool:
        return self._blackholed

    def blackhole(self) -> None:
        """Drop every packet arriving over the veth, on both hosts: no RST, no ICMP, nothing."""
        for host in (self.a, self.b):
            self._blackholed = True  # set first: restore() must undo even a half-applied blackhole
            _run(*host.argv("nft", "-f", "-"), stdin=_BLACKHOLE_RULES)

    def restore(self) -> None:
        """Undo blackhole(): the link carries packets again (a no-op if it does already)."""
        if not self._blackholed:
            return
        for host in (self.a, self.b):
            # a host whose table was never made (a failed blackhole) has nothing to delete
            _run(*host.argv("nft", "delete", "table", "inet", BLACKHOLE_TABLE), check=False)
        self._blackholed = False

    @contextlib.contextmanager
    def blackholed(self) -> Iterator[None]:
        """The link is blackholed for the block, and restored after it whatever happens."""
        self.blackhole()
        try:
            yield
        finally:
            self.restore()


@contextlib.contextmanager
def veth_pair(subnet: str = "10.199.0", prefix: str = "mr") -> Iterator[Link]:
    """Two fresh namespaces `<prefix><pid>-<n>a` and `...b`, addresses `<subnet>.1` and `<subnet>.2`.

    The subnet exists only inside the two namespaces, so every pair may use the same one.
    """
    base = f"{prefix}{os.getpid()}-{next(_names)}"
    link = Link(Host(f"{base}a", f"{subnet}.1"), Host(f"{base}b", f"{subnet}.2"))
    made: list[Host] = []
    try:
        for host in (link.a, link.b):
            _run("ip", "netns", "add", host.netns)
            made.append(host)
        # created straight inside the namespaces: nothing ever appears in the caller's own
        peer = ("peer", "name", DEVICE, "netns", link.b.netns)
        _run("ip", "-n", link.a.netns, "link", "add", DEVICE, "type", "veth", *peer)
        for host in (link.a, link.b):
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", DEVICE)
            _run("ip", "-n", host.netns, "link", "set", DEVICE, "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
        yield link
    finally:
        link.restore()
        for host in made:
            # deleting one namespace destroys the veth pair with it
            _run("ip", "netns", "delete", host.netns, check=False)
