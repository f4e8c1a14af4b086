"""TOML configuration -> frozen dataclasses. Strict: unknown keys and wrong types name the key.

Relative paths are taken relative to the config file's folder, so an example
config and its certificates can live side by side.
"""

from __future__ import annotations

import grp
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal

from relay.core.errors import ConfigError
from relay.core.overlay import (
    DEFAULT_CHANNELS,
    SESSION_ID_CHARS,
    host_problem,
    name_problem,
    peer_dir,
    session_name,
    unix_path_problem,
)

DEFAULT_SOCKET_DIR: Final = "/run/migrelay"
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
DEFAULT_DRAIN_TIMEOUT_S: Final = 30.0
DEFAULT_SOCKET_MODE: Final = 0o660
DEFAULT_SESSION_IDLE_S: Final = 600.0
# How an established stream's bytes move (bench/README.md, "Threads per stream"):
# "threads" = an OS thread per direction doing the syscalls itself (datapath/threaded.py),
# "trio" = the pumps as trio tasks (datapath/pump.py).
DataPath = Literal["trio", "threads"]
DATA_PATHS: Final[tuple[DataPath, ...]] = ("threads", "trio")
DEFAULT_DATA_PATH: Final[DataPath] = "threads"
CONTROL_SOCKET_NAME: Final = "control.sock"
MAX_LIMIT: Final = 1_000_000
# Dead-peer detection on peer TCP connections; see Liveness for how they add up.
DEFAULT_TCP_KEEPALIVE_IDLE_S: Final = 20
DEFAULT_TCP_KEEPALIVE_INTERVAL_S: Final = 5
DEFAULT_TCP_KEEPALIVE_COUNT: Final = 4
DEFAULT_TCP_ACK_TIMEOUT_S: Final = 40.0
# Linux's limits for TCP_KEEPIDLE / TCP_KEEPINTVL (seconds) and TCP_KEEPCNT (probes)
MAX_TCP_KEEPALIVE_S: Final = 32767
MAX_TCP_KEEPALIVE_COUNT: Final = 127
MAX_TCP_ACK_TIMEOUT_S: Final = 86400.0
MIN_TCP_ACK_TIMEOUT_S: Final = 0.1
# A TLS stream moves onto a fresh connection (fresh keys) after this many bytes in either
# direction: AES-GCM keys should protect at most 2^24.5 full records, ~361 GiB (RFC 8446
# section 5.5). The maximum leaves room for a failed attempt, retried a threshold later.
DEFAULT_REKEY_AFTER_BYTES: Final = 64 << 30
MIN_REKEY_AFTER_BYTES: Final = 1 << 20
MAX_REKEY_AFTER_BYTES: Final = 128 << 30

Transport = Literal["tls", "unix", "tcp"]


@dataclass(frozen=True)
class Address:
    """A peer transport endpoint: `HOST:PORT` (tls), `unix:PATH` or `tcp://HOST:PORT`."""

    kind: Transport
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = "tcp://" if self.kind == "tcp" else ""
        return f"{prefix}{host}:{self.port}"


@dataclass(frozen=True)
class HostPort:
    """A TCP endpoint with no transport of its own to choose (the /metrics listener)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, key: str) -> HostPort:
    """`HOST:PORT` or `[V6]:PORT`; `key` names the config key in errors."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: {text!r}: port must be 1-65535")
    return HostPort(host, int(port_text))


def parse_address(text: str, key: str, base: Path | None = None) -> Address:
    """Parse one transport address; `key` names the config key in errors."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ConfigError(f"{key}: {text!r} has an empty unix socket path")
        return Address("unix", path=str(_resolve(path, base)))
    if text.startswith("tcp://"):
        endpoint = parse_host_port(text[len("tcp://") :], key)
        return Address("tcp", host=endpoint.host, port=endpoint.port)
    if "://" in text:
        raise ConfigError(f"{key}: {text!r}: unknown scheme (use HOST:PORT, unix:PATH or tcp://HOST:PORT)")
    endpoint = parse_host_port(text, key)
    return Address("tls", host=endpoint.host, port=endpoint.port)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    crl: Path | None = None  # PEM, one or more CRLs (one from each CA in `ca`); None: no revocation check


@dataclass(frozen=True)
class Liveness:
    """How a dead peer is noticed on a peer TCP connection (tls and tcp:// transports).

    A migration stream can sit idle for hours (a paused guest, a parked libvirt
    connection), so no idle timeout may end it; the kernel tells a silent peer from a
    dead one instead:
    - nothing in flight: after `keepalive_idle_s` without a packet from the peer, a
      probe every `keepalive_interval_s`; `keepalive_count` unanswered probes and the
      connection fails (ETIMEDOUT): 20 + 4 x 5 = 40 s by default;
    - data sent and never acknowledged, or window probes never answered (keepalive does
      not probe while anything waits to be sent): the relay ends the connection once the
      peer has owed an ACK for `ack_timeout_s` (net.watch_acks, from TCP_INFO), 40 s by
      default; TCP alone would retransmit for about 15 minutes (tcp_retries2).
    Not TCP_USER_TIMEOUT: Linux applies it to zero-window probing too, so it ends the
    connection to a live peer that merely stopped reading (a destination QEMU or NBD
    server stalled on its disk) once its window stays closed that long. A live peer
    answers every window probe, so the watchdog leaves it alone however long it waits;
    a peer that dies during such a stall is found when its next probe goes unanswered,
    and probes back off to one every two minutes in a long stall.
    """

    keepalive_idle_s: int = DEFAULT_TCP_KEEPALIVE_IDLE_S
    keepalive_interval_s: int = DEFAULT_TCP_KEEPALIVE_INTERVAL_S
    keepalive_count: int = DEFAULT_TCP_KEEPALIVE_COUNT
    ack_timeout_s: float = DEFAULT_TCP_ACK_TIMEOUT_S


@dataclass(frozen=True)
class Limits:
    """Caps on what anyone who can reach a port may hold ([limits]); see relay/admission.py.

    The defaults never bite a real workload: four concurrent migrations of 16 multifd
    channels each (plus NBD and libvirt) are under 100 streams per peer, and a peer
    relay opens its connections one at a time per overlay socket, so it has at most a
    handful unauthenticated at once.
    """

    unauthenticated: int = 1024  # connections not yet authenticated, all sources together
    unauthenticated_per_address: int = 64  # the same, per source IP address
    handshakes: int = 128  # TLS handshakes under way (a silent connection holds none)
    streams_per_peer: int = 512  # forwarded connections per peer, on each relay's own side


@dataclass(frozen=True)
class PeerConfig:
    name: str
    address: Address | None
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    insecure: bool = False


@dataclass(frozen=True)
class Config:
    name: str
    socket_dir: Path
    listen: tuple[Address, ...] = ()
    libvirt: Path | None = None
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None  # group that owns the overlay sockets (e.g. libvirt-qemu)
    libvirt_group: str | None = None  # group that may use <peer>/libvirt.sock (root libvirt there); None: root
    control: Path | None = None  # None: <socket_dir>/control.sock
    session_idle_s: float = DEFAULT_SESSION_IDLE_S
    # SELinux context of the overlay sockets a local QEMU connects to (daemon/selinux.py); None: the default
    socket_context: str | None = None
    data_path: DataPath = DEFAULT_DATA_PATH  # read per stream: a reload applies to new streams
    liveness: Liveness = Liveness()  # [relay] tcp_keepalive_* and tcp_ack_timeout_s
    tls: TlsFiles | None = None
    rekey_after_bytes: int = DEFAULT_REKEY_AFTER_BYTES  # [tls]; only the TLS transport uses it
    metrics_listen: HostPort | None = None
    peers: Mapping[str, PeerConfig] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    source: Path | None = None

    @property
    def socket_gid(self) -> int | None:
        return None if self.socket_group is None else _gid(self.socket_group)

    @property
    def libvirt_gid(self) -> int | None:
        return None if self.libvirt_group is None else _gid(self.libvirt_group)

    @property
    def control_path(self) -> Path:
        return self.control if self.control is not None else self.socket_dir / CONTROL_SOCKET_NAME

    def needs_tls(self) -> bool:
        return any(a.kind == "tls" for a in self.listen) or any(
            p.address is not None and p.address.kind == "tls" for p in self.peers.values()
        )

    def as_toml(self) -> str:
        """The effective configuration, as TOML (for `migrelay check --print`)."""
        q = _toml_str
        lines = [
            "[relay]",
            f"name = {q(self.name)}",
            f"socket_dir = {q(str(self.socket_dir))}",
            "listen = [" + ", ".join(q(str(a)) for a in self.listen) + "]",
        ]
        if self.libvirt is not None:
            lines.append(f"libvirt = {q(str(self.libvirt))}")
        lines += [
            f"handshake_timeout_s = {self.handshake_timeout_s}",
            f"drain_timeout_s = {self.drain_timeout_s}",
            f"socket_mode = {q(oct(self.socket_mode)[2:].rjust(4, '0'))}",
            *([f"socket_group = {q(self.socket_group)}"] if self.socket_group is not None else []),
            *([f"libvirt_group = {q(self.libvirt_group)}"] if self.libvirt_group is not None else []),
            f"control = {q(str(self.control_path))}",
            f"session_idle_s = {self.session_idle_s}",
            *([f"socket_context = {q(self.socket_context)}"] if self.socket_context is not None else []),
            f"data_path = {q(self.data_path)}",
            *_liveness_toml(self.liveness),
        ]
        if self.tls is not None:
            lines += ["", "[tls]", f"ca = {q(str(self.tls.ca))}", f"cert = {q(str(self.tls.cert))}"]
            lines.append(f"key = {q(str(self.tls.key))}")
            if self.tls.crl is not None:
                lines.append(f"crl = {q(str(self.tls.crl))}")
            lines.append(f"rekey_after_bytes = {self.rekey_after_bytes}")
        if self.metrics_listen is not None:
            lines += ["", "[metrics]", f"listen = {q(str(self.metrics_listen))}"]
        lines += ["", "[limits]"]
        lines += [f"{f.name} = {getattr(self.limits, f.name)}" for f in fields(self.limits)]
        for peer in self.peers.values():
            lines += ["", f"[peers.{peer.name}]"]
            if peer.address is not None:
                lines.append(f"address = {q(str(peer.address))}")
            lines.append("channels = [" + ", ".join(q(c) for c in peer.channels) + "]")
            if peer.insecure:
                lines.append("insecure = true")
        return "\n".join(lines) + "\n"


def _liveness_toml(liveness: Liveness) -> list[str]:
    return [
        f"tcp_keepalive_idle_s = {liveness.keepalive_idle_s}",
        f"tcp_keepalive_interval_s = {liveness.keepalive_interval_s}",
        f"tcp_keepalive_count = {liveness.keepalive_count}",
        f"tcp_ack_timeout_s = {liveness.ack_timeout_s}",
    ]


def _gid(group: str) -> int:
    """A group name or number -> gid; KeyError if there is no such group."""
    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base is None else base / p


class _Section:
    """Pops typed keys out of one TOML table; whatever is left over is an error."""

    def __init__(self, table: object, where: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] must be a table")
        self._items: dict[str, Any] = dict(table)
        self.where = where

    def _take(self, key: str, types: tuple[type, ...], what: str, default: Any) -> Any:
        if key not in self._items:
            return default
        value = self._items.pop(key)
        # bool is an int subclass; a number key must not accept true/false
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ConfigError(f"[{self.where}] {key}: expected {what}, got {type(value).__name__} {value!r}")
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if required and key not in self._items:
            raise ConfigError(f"[{self.where}] {key} is required")
        value: str | None = self._take(key, (str,), "a string", default)
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._take(key, (list,), "a list of strings", None)
        if value is None:
            return default
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(f"[{self.where}] {key}: expected a list of strings, found {item!r}")
        return tuple(value)

    def number(self, key: str, default: float) -> float:
        value = float(self._take(key, (int, float), "a number", default))
        if value <= 0:
            raise ConfigError(f"[{self.where}] {key}: must be positive, got {value}")
        return value

    def integer(self, key: str, default: int, highest: int, lowest: int = 1) -> int:
        """A whole number from `lowest` to `highest` (counts, whole seconds, byte sizes)."""
        value: int = self._take(key, (int,), "a whole number", default)
        if not lowest <= value <= highest:
            raise ConfigError(f"[{self.where}] {key}: must be {lowest}-{highest}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value: bool = self._take(key, (bool,), "true or false", default)
        return value

    def table(self, key: str) -> object | None:
        """Remove and return a sub-table (None if absent); the caller wraps it in a _Section."""
        table: object | None = self._items.pop(key, None)
        return table

    def done(self) -> None:
        if self._items:
            names = ", ".join(sorted(self._items))
            raise ConfigError(f"[{self.where}] unknown key(s): {names}")


def load(path: Path) -> Config:
    """Read and validate a config file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"Failed to read config {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config {path} is not valid TOML: {e}") from None
    return parse(data, base=path.resolve().parent, source=path)


def parse(data: Mapping[str, Any], base: Path | None = None, source: Path | None = None) -> Config:
    """Validate a parsed TOML document (a dict) into a Config."""
    top = _Section(dict(data), "top level")
    relay_table = top.table("relay")
    if relay_table is None:
        raise ConfigError("[relay] section is required")
    relay = _Section(relay_table, "relay")
    name = relay.string("name", required=True)
    assert name is not None
    if (problem := host_problem(name)) is not None:
        raise ConfigError(f"[relay] name: {problem}")
    socket_dir = _resolve(relay.string("socket_dir", DEFAULT_SOCKET_DIR) or DEFAULT_SOCKET_DIR, base)
    listen = tuple(parse_address(text, "[relay] listen", base) for text in relay.strings("listen", ()))
    libvirt_text = relay.string("libvirt")
    libvirt = _resolve(libvirt_text, base) if libvirt_text else None
    handshake = relay.number("handshake_timeout_s", DEFAULT_HANDSHAKE_TIMEOUT_S)
    drain = relay.number("drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)
    socket_group = _group(relay, "socket_group")
    libvirt_group = _group(relay, "libvirt_group")
    control_text = relay.string("control")
    control = _resolve(control_text, base) if control_text else None
    session_idle = relay.number("session_idle_s", DEFAULT_SESSION_IDLE_S)
    socket_context = _socket_context(relay)
    data_path = _data_path(relay)
    liveness = _parse_liveness(relay)
    mode_text = relay.string("socket_mode", oct(DEFAULT_SOCKET_MODE)[2:])
    assert mode_text is not None
    try:
        socket_mode = int(mode_text, 8)
    except ValueError:
        raise ConfigError(f'[relay] socket_mode: {mode_text!r} is not an octal mode like "0660"') from None
    relay.done()

    tls = None
    rekey_after = DEFAULT_REKEY_AFTER_BYTES
    if (tls_table := top.table("tls")) is not None:
        section = _Section(tls_table, "tls")
        ca, cert, key = (section.string(k, required=True) for k in ("ca", "cert", "key"))
        assert ca is not None and cert is not None and key is not None
        crl = section.string("crl")
        crl_path = _resolve(crl, base) if crl else None
        tls = TlsFiles(_resolve(ca, base), _resolve(cert, base), _resolve(key, base), crl_path)
        rekey_after = section.integer(
            "rekey_after_bytes", DEFAULT_REKEY_AFTER_BYTES, MAX_REKEY_AFTER_BYTES, MIN_REKEY_AFTER_BYTES
        )
        section.done()

    metrics_listen = None
    if (metrics_table := top.table("metrics")) is not None:
        section = _Section(metrics_table, "metrics")
        text = section.string("listen")
        if text is not None:
            metrics_listen = parse_host_port(text, "[metrics] listen (plain HTTP)")
        section.done()

    limits = Limits()
    if (limits_table := top.table("limits")) is not None:
        section = _Section(limits_table, "limits")
        limits = Limits(**{f.name: section.integer(f.name, getattr(limits, f.name), MAX_LIMIT) for f in fields(Limits)})
        section.done()

    peers: dict[str, PeerConfig] = {}
    peers_table = top.table("peers") or {}
    if not isinstance(peers_table, dict):
        raise ConfigError("[peers] must be a table of [peers.NAME] sections")
    for peer_name, table in peers_table.items():
        peers[peer_name] = _parse_peer(peer_name, table, name, base)
    top.done()

    config = Config(
        name=name,
        socket_dir=socket_dir,
        listen=listen,
        libvirt=libvirt,
        handshake_timeout_s=handshake,
        drain_timeout_s=drain,
        socket_mode=socket_mode,
        socket_group=socket_group,
        libvirt_group=libvirt_group,
        control=control,
        session_idle_s=session_idle,
        socket_context=socket_context,
        data_path=data_path,
        liveness=liveness,
        tls=tls,
        rekey_after_bytes=rekey_after,
        metrics_listen=metrics_listen,
        peers=peers,
        limits=limits,
        source=source,
    )
    if config.needs_tls() and tls is None:
        raise ConfigError("[tls] section is required: a listener or peer uses the TLS transport (HOST:PORT)")
    _check_unix_paths(config)
    return config


def _group(section: _Section, key: str) -> str | None:
    group = section.string(key)
    if group is not None:
        try:
            _gid(group)
        except KeyError:
            raise ConfigError(f"[{section.where}] {key}: no group {group!r} on this host") from None
    return group


def _data_path(section: _Section) -> DataPath:
    text = section.string("data_path", DEFAULT_DATA_PATH)
    for known in DATA_PATHS:
        if text == known:
            return known
    raise ConfigError(f"[{section.where}] data_path: {text!r} is not one of {', '.join(map(repr, DATA_PATHS))}")


def _socket_context(section: _Section) -> str | None:
    """[relay] socket_context: only its shape here; whether this host can use it is the daemon's to find out.

    The kernel is the judge of a context (is SELinux on, does the loaded policy know it),
    so this catches only what no kernel would take: a value that is not USER:ROLE:TYPE[:LEVEL].
    """
    context = section.string("socket_context")
    if context is not None:
        parts = context.split(":")
        if len(parts) < 3 or not all(parts[:3]) or not context.isprintable() or any(c.isspace() for c in context):
            raise ConfigError(
                f"[{section.where}] socket_context: {context!r} is not an SELinux context like "
                '"system_u:object_r:svirt_socket_t:s0" (USER:ROLE:TYPE:LEVEL)'
            )
    return context


def _check_unix_paths(config: Config) -> None:
    """Every unix socket path the relay or a local hypervisor will use must fit in sun_path.

    Otherwise `serve` would fail late with a bare OSError, or a migration would fail
    when the destination QEMU cannot listen on its overlay path.
    """
    paths: list[tuple[str, Path | str]] = [("[relay] control", config.control_path)]
    paths += [("[relay] listen", a.path) for a in config.listen if a.kind == "unix"]
    if config.libvirt is not None:
        paths.append(("[relay] libvirt", config.libvirt))
    longest_session = session_name(config.name, "x" * SESSION_ID_CHARS, "migration.sock")
    for peer in config.peers.values():
        where = f"[peers.{peer.name}]"
        if peer.address is not None and peer.address.kind == "unix":
            paths.append((f"{where} address", peer.address.path))
        names = list(peer.channels)
        if "migration.sock" in peer.channels or "nbd.sock" in peer.channels:
            names.append(longest_session)  # `migrelay session open` / `migrate` sockets
        # where this relay listens for the peer, and where a local hypervisor listens for it
        for name in names:
            paths.append((f"{where} channels (overlay socket)", peer_dir(config.socket_dir, peer.name) / name))
            paths.append((f"{where} channels (local target)", peer_dir(config.socket_dir, config.name) / name))
    for key, path in paths:
        if (problem := unix_path_problem(path)) is not None:
            raise ConfigError(f"{key}: socket path {problem}; use a shorter socket_dir or name")


def _parse_liveness(relay: _Section) -> Liveness:
    """The [relay] tcp_keepalive_* and tcp_ack_timeout_s keys (see Liveness)."""
    idle = relay.integer("tcp_keepalive_idle_s", DEFAULT_TCP_KEEPALIVE_IDLE_S, MAX_TCP_KEEPALIVE_S)
    interval = relay.integer("tcp_keepalive_interval_s", DEFAULT_TCP_KEEPALIVE_INTERVAL_S, MAX_TCP_KEEPALIVE_S)
    count = relay.integer("tcp_keepalive_count", DEFAULT_TCP_KEEPALIVE_COUNT, MAX_TCP_KEEPALIVE_COUNT)
    ack_timeout = relay.number("tcp_ack_timeout_s", DEFAULT_TCP_ACK_TIMEOUT_S)
    if not MIN_TCP_ACK_TIMEOUT_S <= ack_timeout <= MAX_TCP_ACK_TIMEOUT_S:
        raise ConfigError(
            f"[relay] tcp_ack_timeout_s: must be {MIN_TCP_ACK_TIMEOUT_S}-{MAX_TCP_ACK_TIMEOUT_S:.0f}, got {ack_timeout}"
        )
    return Liveness(idle, interval, count, ack_timeout)


def _parse_peer(peer_name: str, table: object, self_name: str, base: Path | None) -> PeerConfig:
    where = f"peers.{peer_name}"
    if (problem := host_problem(peer_name)) is not None:
        raise ConfigError(f"[{where}]: {problem}")
    if peer_name == self_name:
        raise ConfigError(f"[{where}]: a relay cannot be its own peer ([relay] name is {self_name!r})")
    section = _Section(table, where)
    address_text = section.string("address")
    address = parse_address(address_text, f"[{where}] address", base) if address_text else None
    channels = section.strings("channels", DEFAULT_CHANNELS)
    insecure = section.flag("insecure", False)
    section.done()
    for channel in channels:
        if (problem := name_problem(channel)) is not None:
            raise ConfigError(f"[{where}] channels: {problem}")
    if len(set(channels)) != len(channels):
        raise ConfigError(f"[{where}] channels: duplicate names")
    if address is not None and address.kind == "tcp" and not insecure:
        raise ConfigError(f"[{where}] address: plaintext tcp:// needs insecure = true in [{where}]")
    if insecure and address is not None and address.kind == "tls":
        raise ConfigError(f"[{where}] insecure = true only applies to tcp:// addresses")
    return PeerConfig(peer_name, address, channels, insecure)
