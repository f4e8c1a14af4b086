"""A reload the relay must refuse leaves it serving as before, says why once, and counts it.

Why it matters: an operator who saves a config with a typo, or changes a setting that only a
restart can apply, and reloads must not take the relay down with every migration through it,
nor leave it half-reloaded. `systemctl reload` runs `migrelay reload` (the unit's ExecReload=),
so its exit status and one line are what the operator sees; SIGHUP has only the log, the
metric and systemd's STATUS=. Either way systemd hears RELOADING=1 then READY=1, or it would
wait for the end of a reload that never comes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from relay.core.config import Address
from relay.daemon.net import free_port
from relay.tools import loopback
from tests.e2e.procs import serve
from tests.e2e.reloading import (
    assert_reload_told,
    counted,
    echo_digests,
    listen_for_credentials,
    monotonic_us,
    notifications,
    through,
    wait_for,
)
from tests.support import add_metrics, make_pki, pair_configs

FAILED = "failed, still serving the previous configuration"


def migrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60)


def test_a_broken_reload_leaves_the_old_config_serving(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    port_a, port_b = add_metrics(tmp_path / "hvA.toml"), add_metrics(tmp_path / "hvB.toml")
    config_b = tmp_path / "hvB.toml"
    good = config_b.read_text()
    control_b = str(tmp_path / "hvB/control.sock")

    with serve(tmp_path / "hvA.toml", config_b) as (a, b):
        echo = echo_digests(tmp_path / "hvB/hvB/migration.sock")
        data = b"x" * 100_000
        digest = through(tmp_path / "hvA/hvB/migration.sock", data)

        # SIGHUP with a config that is not TOML: one log line, one count, systemd told both ways
        config_b.write_text(good + "\n[relay\n")
        notify = listen_for_credentials(b.notify)
        before = monotonic_us()
        b.proc.send_signal(signal.SIGHUP)
        told = notifications(notify, {b.proc.pid})[b.proc.pid]
        assert_reload_told(told, before, monotonic_us())
        assert "STATUS=serving 3 overlay sockets; the last reload failed: Config " in told[1]
        assert counted(port_b, "migrelay_reload_failures_total") == 1
        assert counted(port_b, "migrelay_reloads_total") == 0
        lines = [line for line in b.output().splitlines() if "migrelay.server: reload" in line]
        assert len(lines) == 1 and f"reload (SIGHUP) {FAILED}: Config {config_b} is not valid TOML" in lines[0], lines
        assert through(tmp_path / "hvA/hvB/migration.sock", data) == digest  # still serving, as before

        # `migrelay reload` (the unit's ExecReload=) with a change only a restart can make
        config_b.write_text(good)
        loopback.with_changes(config_b, listen=(Address("tls", host="127.0.0.1", port=free_port()),))
        refused = migrelay("reload", "--control", control_b)
        assert refused.returncode == 2, refused
        assert refused.stderr.splitlines() == [
            f"migrelay reload: reload {FAILED}: changing [relay] listen needs a restart (systemctl restart migrelay)"
        ]
        assert counted(port_b, "migrelay_reload_failures_total") == 2
        assert through(tmp_path / "hvA/hvB/migration.sock", data) == digest

        # fixed: the next reload takes, and says so
        config_b.write_text(good)
        done = migrelay("reload", "--config", str(config_b))
        assert (done.returncode, done.stdout) == (0, "reloaded: config unchanged, TLS files unchanged\n"), done
        assert counted(port_b, "migrelay_reloads_total") == 1
        wait_for(lambda: counted(port_a, "migrelay_connections_total", result="ok") == 3, "hvA's count")
        echo.close()
    for relay in (a, b):
        assert relay.proc.returncode == 0, relay.output()
        assert "Traceback" not in relay.output(), relay.output()
