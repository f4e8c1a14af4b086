"""Config is strict: unknown keys, wrong types and missing sections are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.core import config
from relay.core.config import Address, parse_address
from relay.core.errors import ConfigError

FULL = """
[relay]
name = "hv1"
socket_dir = "/run/migrelay"
listen = ["0.0.0.0:16515", "unix:/srv/shared/hv1.sock", "tcp://10.0.0.1:16516"]
libvirt = "/run/libvirt/libvirt-sock"

[tls]
ca = "/etc/pki/migrelay/ca.pem"
cert = "/etc/pki/migrelay/hv1.pem"
key = "/etc/pki/migrelay/hv1-key.pem"

[metrics]
listen = "127.0.0.1:9465"

[peers.hv2]
address = "192.0.2.2:16515"
channels = ["libvirt.sock", "migration.sock", "nbd.sock"]

[peers.hv3]
address = "tcp://192.0.2.3:16516"
insecure = true
"""


TLS = '[relay]\nname = "a"\n[tls]\nca = "ca.pem"\ncert = "a.pem"\nkey = "k.pem"\n'


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return config.load(path)


def test_full_example(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    assert cfg.name == "hv1" and cfg.socket_dir == Path("/run/migrelay")
    assert [a.kind for a in cfg.listen] == ["tls", "unix", "tcp"]
    assert cfg.peers["hv2"].address == Address("tls", host="192.0.2.2", port=16515)
    assert cfg.peers["hv3"].insecure and cfg.peers["hv3"].channels == ("libvirt.sock", "migration.sock", "nbd.sock")
    assert cfg.metrics_listen == config.HostPort("127.0.0.1", 9465)
    assert cfg.handshake_timeout_s == 10


def test_effective_config_round_trips(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    again = load(tmp_path, cfg.as_toml())
    assert again.as_toml() == cfg.as_toml()

    def comparable(c: config.Config) -> dict[str, object]:
        # the printed config names the effective control socket; the original left it implicit
        return {k: v for k, v in vars(c).items() if k not in ("source", "control")} | {"control": c.control_path}

    assert comparable(again) == comparable(cfg)


def test_relative_paths_are_relative_to_the_config(tmp_path: Path) -> None:
    text = '[relay]\nname = "a"\nsocket_dir = "run"\n[tls]\nca = "ca.pem"\ncert = "a.pem"\nkey = "k.pem"\n'
    cfg = load(tmp_path, text)
    assert cfg.socket_dir == tmp_path / "run"
    assert cfg.tls is not None and cfg.tls.ca == tmp_path / "ca.pem"


def test_tls_crl_is_optional_relative_and_printed(tmp_path: Path) -> None:
    assert load(tmp_path, TLS).tls == config.TlsFiles(tmp_path / "ca.pem", tmp_path / "a.pem", tmp_path / "k.pem")
    cfg = load(tmp_path, f'{TLS}crl = "crl.pem"\n')
    assert cfg.tls is not None and cfg.tls.crl == tmp_path / "crl.pem"
    assert f'crl = "{tmp_path / "crl.pem"}"' in cfg.as_toml()
    assert load(tmp_path, cfg.as_toml()).tls == cfg.tls


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[relay]\nname = "a"\nbogus = 1\n', r"\[relay\] unknown key\(s\): bogus"),
        ('[relay]\nname = "a"\n[extra]\n', r"\[top level\] unknown key\(s\): extra"),
        ("[relay]\nname = 5\n", r"\[relay\] name: expected a string, got int"),
        ("[relay]\n", r"\[relay\] name is required"),
        ('name = "a"\n', r"\[relay\] section is required"),
        ('[relay]\nname = "a"\nlisten = "x:1"\n', r"\[relay\] listen: expected a list of strings"),
        ('[relay]\nname = "a"\nhandshake_timeout_s = true\n', r"handshake_timeout_s: expected a number"),
        ('[relay]\nname = "a"\nhandshake_timeout_s = -1\n', r"handshake_timeout_s: must be positive"),
        ('[relay]\nname = "a b"\n', r"\[relay\] name: relay name 'a b'"),
        ('[relay]\nname = "a"\nlisten = ["nope"]\n', r"\[relay\] listen: 'nope' is not HOST:PORT"),
        ('[relay]\nname = "a"\nlisten = ["h:99999"]\n', r"port must be 1-65535"),
        ('[relay]\nname = "a"\nlisten = ["http://h:1"]\n', r"unknown scheme"),
        ('[relay]\nname = "a"\nlisten = ["h:1"]\n', r"\[tls\] section is required"),
        ('[relay]\nname = "a"\n[peers.b]\naddress = "tcp://h:1"\n', r"needs insecure = true in \[peers.b\]"),
        ('[relay]\nname = "a"\n[peers.a]\n', r"cannot be its own peer"),
        ('[relay]\nname = "a"\n[peers.b]\nchannels = ["../x"]\n', r"\[peers.b\] channels: socket name '../x'"),
        ('[relay]\nname = "a"\n[peers.b]\nchannels = ["x", "x"]\n', r"duplicate"),
        ('[relay]\nname = "a"\n[peers.b]\ninsecure = "yes"\n', r"insecure: expected true or false"),
        ('[relay]\nname = "a"\nsocket_mode = "rw"\n', r"socket_mode: 'rw' is not an octal mode"),
        ('[relay]\nname = "a"\nsocket_group = "no-such-group-here"\n', r"socket_group: no group 'no-such-group-here'"),
        ('[relay]\nname = "a"\n[metrics]\nlisten = "unix:/m"\n', r"\[metrics\] listen \(plain HTTP\): 'unix:/m'"),
        ('[relay]\nname = "a"\ntcp_keepalive_idle_s = 2.5\n', r"tcp_keepalive_idle_s: expected a whole number"),
        ('[relay]\nname = "a"\ntcp_keepalive_interval_s = 0\n', r"tcp_keepalive_interval_s: must be 1-32767"),
        ('[relay]\nname = "a"\ntcp_keepalive_count = 128\n', r"tcp_keepalive_count: must be 1-127"),
        ('[relay]\nname = "a"\ntcp_keepalive_count = true\n', r"tcp_keepalive_count: expected a whole number"),
        ('[relay]\nname = "a"\ntcp_ack_timeout_s = 0.01\n', r"tcp_ack_timeout_s: must be 0.1-86400"),
        ('[relay]\nname = "a"\ntcp_ack_timeout_s = -1\n', r"tcp_ack_timeout_s: must be positive"),
        ("[relay\n", r"not valid TOML"),
        (f"{TLS}crl = 1\n", r"\[tls\] crl: expected a string, got int"),
        (f"{TLS}rekey_after_bytes = 1.5e9\n", r"\[tls\] rekey_after_bytes: expected a whole number, got float"),
        (f'{TLS}rekey_after_bytes = "64G"\n', r"\[tls\] rekey_after_bytes: expected a whole number, got str"),
        (f"{TLS}rekey_after_bytes = true\n", r"\[tls\] rekey_after_bytes: expected a whole number, got bool"),
        (f"{TLS}rekey_after_bytes = 1048575\n", r"rekey_after_bytes: must be 1048576-137438953472, got 1048575"),
        (f"{TLS}rekey_after_bytes = 137438953473\n", r"rekey_after_bytes: must be 1048576-137438953472"),
        ('[relay]\nname = "a"\nsocket_context = "svirt_socket_t"\n', r"\[relay\] socket_context: 'svirt_socket_t'"),
        ('[relay]\nname = "a"\nsocket_context = "u::t:s0"\n', r"\[relay\] socket_context: 'u::t:s0' is not"),
        ('[relay]\nname = "a"\nsocket_context = "u:r:t :s0"\n', r"\[relay\] socket_context: 'u:r:t :s0' is not"),
        ('[relay]\nname = "a"\nsocket_context = 1\n', r"\[relay\] socket_context: expected a string"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_rekey_after_bytes(tmp_path: Path) -> None:
    """[tls] rekey_after_bytes: well under AES-GCM's bound by default, shown by `check --print`."""
    assert load(tmp_path, FULL).rekey_after_bytes == 64 << 30
    assert "rekey_after_bytes = 68719476736" in load(tmp_path, FULL).as_toml()
    cfg = load(tmp_path, FULL.replace("[metrics]", "rekey_after_bytes = 1048576\n\n[metrics]"))
    assert cfg.rekey_after_bytes == 1 << 20
    assert load(tmp_path, cfg.as_toml()).rekey_after_bytes == 1 << 20


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Failed to read config .*nope.toml: No such file"):
        config.load(tmp_path / "nope.toml")


def test_addresses() -> None:
    assert parse_address("[::1]:5", "k") == Address("tls", host="::1", port=5)
    assert str(parse_address("[::1]:5", "k")) == "[::1]:5"
    assert str(parse_address("tcp://h:5", "k")) == "tcp://h:5"
    assert parse_address("unix:/a/b", "k") == Address("unix", path="/a/b")
    with pytest.raises(ConfigError, match="empty unix socket path"):
        parse_address("unix:", "k")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "config").rglob("*.toml")), ids=str)
def test_shipped_examples_are_valid(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.peers


def test_dead_peer_detection_defaults_to_40_seconds(tmp_path: Path) -> None:
    """The issue asks for detection within 60 s: idle via keepalive, in flight via the ACK watchdog."""
    live = load(tmp_path, '[relay]\nname = "a"\n').liveness
    assert live.keepalive_idle_s + live.keepalive_interval_s * live.keepalive_count == 40
    assert live.ack_timeout_s == 40


def test_dead_peer_detection_keys(tmp_path: Path) -> None:
    text = (
        '[relay]\nname = "a"\ntcp_keepalive_idle_s = 7\ntcp_keepalive_interval_s = 3\n'
        "tcp_keepalive_count = 2\ntcp_ack_timeout_s = 12.5\n"
    )
    cfg = load(tmp_path, text)
    assert cfg.liveness == config.Liveness(7, 3, 2, 12.5)
    printed = cfg.as_toml()
    assert "tcp_keepalive_idle_s = 7\n" in printed and "tcp_ack_timeout_s = 12.5\n" in printed
    assert load(tmp_path, printed).liveness == cfg.liveness


def test_socket_context(tmp_path: Path) -> None:
    """Off unless set; shown by `check --print`; the kernel, not the config, judges the value."""
    assert load(tmp_path, FULL).socket_context is None
    assert "socket_context" not in load(tmp_path, FULL).as_toml()
    context = "system_u:object_r:svirt_socket_t:s0:c1,c2"
    cfg = load(tmp_path, FULL.replace("[tls]", f'socket_context = "{context}"\n\n[tls]'))
    assert cfg.socket_context == context
    assert load(tmp_path, cfg.as_toml()).socket_context == context


def test_socket_group(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[relay]\nname = "a"\nsocket_group = "0"\n')
    assert cfg.socket_gid == 0
    assert load(tmp_path, cfg.as_toml()).socket_group == "0"


@pytest.mark.parametrize(
    ("old", "new", "key", "path"),
    [
        # the longest: a session socket, hv1_<8 hex>-migration.sock (28 bytes) under <dir>/hv2/
        ('socket_dir = "/run/migrelay"', f'socket_dir = "/run/{"d" * 72}"', "[peers.hv2] channels", "/run/ddd"),
        ('"unix:/srv/shared/hv1.sock"', f'"unix:/srv/{"s" * 100}.sock"', "[relay] listen", "/srv/sss"),
        ('libvirt = "/run/libvirt/libvirt-sock"', f'libvirt = "/run/{"l" * 110}"', "[relay] libvirt", "/run/lll"),
    ],
)
def test_unix_socket_paths_must_fit_sun_path(tmp_path: Path, old: str, new: str, key: str, path: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, FULL.replace(old, new))
    message = str(e.value)
    assert message.startswith(key) and path in message and "over the AF_UNIX limit of 107" in message, message


def test_a_socket_dir_that_just_fits(tmp_path: Path) -> None:
    # /run/<x>/hv2/hv1_<8>-migration.sock is exactly 107 bytes
    fits = FULL.replace('socket_dir = "/run/migrelay"', f'socket_dir = "/run/{"d" * 70}"')
    assert len(f"/run/{'d' * 70}/hv2/hv1_12345678-migration.sock") == 107
    load(tmp_path, fits)


def test_limits_have_defaults_and_are_strict(tmp_path: Path) -> None:
    cfg = load(tmp_path, FULL)
    assert cfg.limits == config.Limits()
    assert "[limits]\nunauthenticated = 1024\n" in cfg.as_toml()
    cfg = load(tmp_path, FULL + "\n[limits]\nstreams_per_peer = 8\n")
    assert cfg.limits.streams_per_peer == 8 and cfg.limits.handshakes == config.Limits().handshakes
    for text, error in [
        ("streams = 8", "[limits] unknown key(s): streams"),
        ("handshakes = 0", "[limits] handshakes: must be 1-1000000, got 0"),
        ('handshakes = "8"', "[limits] handshakes: expected a whole number"),
    ]:
        with pytest.raises(ConfigError) as e:
            load(tmp_path, FULL + f"\n[limits]\n{text}\n")
        assert str(e.value).startswith(error), str(e.value)
