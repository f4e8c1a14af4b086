"""The command line: one-line errors with exit status 2, `check` findings, `pki` files.

Why it matters: operators run these by hand and from config management; a traceback or
a silent success on bad input costs them an outage.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from relay.tools import pki
from tests.e2e.procs import serve
from tests.support import make_pki, pair_configs


def migrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_missing_config(tmp_path: Path) -> None:
    one_line_error(migrelay("serve", "--config", str(tmp_path / "nope.toml")), "No such file or directory")


def test_unknown_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[relay]\nname = "a"\nlisten_on = []\n')
    one_line_error(migrelay("check", "--config", str(cfg)), "[relay] unknown key(s): listen_on")


@pytest.mark.parametrize("broken", ["missing cert", "wrong key", "missing crl", "expired crl", "another CA's crl"])
def test_serve_refuses_bad_certificates(tmp_path: Path, broken: str) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    cfg = tmp_path / "hvB.toml"
    with_crl = cfg.read_text().replace("[tls]\n", f'[tls]\ncrl = "{p.dir / "crl.pem"}"\n')
    if broken == "missing cert":
        cfg.write_text(cfg.read_text().replace("hvB.pem", "gone.pem"))
        expected = "gone.pem: no such file"
    elif broken == "wrong key":
        cfg.write_text(cfg.read_text().replace("hvB-key.pem", "hvA-key.pem"))
        expected = "does not match"
    elif broken == "missing crl":
        cfg.write_text(with_crl)
        expected = "Failed to load [tls] crl"
    elif broken == "expired crl":
        pki.reissue_crl(p.dir, days=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
        cfg.write_text(with_crl)
        expected = "expired on"
    else:
        pki.reissue_crl(p.other_ca)
        cfg.write_text(with_crl.replace(str(p.dir / "crl.pem"), str(p.other_ca / "crl.pem")))
        expected = "is not signed by a CA in [tls] ca"
    one_line_error(migrelay("serve", "--config", str(cfg)), expected)


@pytest.mark.skipif(Path("/sys/fs/selinux/enforce").exists(), reason="this host has SELinux")
def test_socket_context_on_a_host_without_selinux(tmp_path: Path) -> None:
    """[relay] socket_context is for SELinux hosts: here `serve` refuses to start, `check` says why."""
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "unix")
    cfg = tmp_path / "hvA.toml"
    cfg.write_text(
        cfg.read_text().replace("[relay]\n", '[relay]\nsocket_context = "system_u:object_r:svirt_socket_t:s0"\n')
    )
    reason = "[relay] socket_context is set, but SELinux is not enabled on this host; remove the key"
    one_line_error(migrelay("serve", "--config", str(cfg)), reason)
    assert not (tmp_path / "hvA").exists()  # it stopped before it made anything
    checked = migrelay("check", "--config", str(cfg))
    assert checked.returncode == 1 and f"error: {reason}" in checked.stdout.splitlines(), checked.stdout


def test_check_reports_each_finding(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    down = migrelay("check", "--config", str(tmp_path / "hvA.toml"))
    assert down.returncode == 1
    assert "ok: [tls] cert" in down.stdout and "error: peer hvB at 127.0.0.1" in down.stdout
    with serve(tmp_path / "hvB.toml"):
        up = migrelay("check", "--print", "--config", str(tmp_path / "hvA.toml"))
    assert up.returncode == 0, up.stdout + up.stderr
    assert '[peers.hvB]\naddress = "127.0.0.1:' in up.stdout
    assert "ok: peer hvB at 127.0.0.1" in up.stdout and "TLSv1.3 mutual auth ok" in up.stdout


def test_pki_commands(tmp_path: Path) -> None:
    assert migrelay("pki", "init", str(tmp_path)).returncode == 0
    issued = migrelay("pki", "issue", str(tmp_path), "hv9", "--dns", "hv9.example", "--ip", "192.0.2.9")
    assert issued.returncode == 0, issued.stderr
    assert stat.S_IMODE((tmp_path / "hv9-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    one_line_error(migrelay("pki", "init", str(tmp_path)), "already holds a CA")
    one_line_error(migrelay("pki", "issue", str(tmp_path), "bad name"), "must be a DNS name")
    one_line_error(migrelay("pki", "issue", str(tmp_path), "x", "--ip", "nope"), "--ip")
    revoked = migrelay("pki", "revoke", str(tmp_path), "hv9")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"hv9 revoked; wrote {tmp_path / 'crl.pem'}: 1 revoked, next update ")
    reissued = migrelay("pki", "crl", str(tmp_path), "--days", "30")
    assert reissued.returncode == 0 and ": 1 revoked, next update " in reissued.stdout, reissued
    one_line_error(migrelay("pki", "revoke", str(tmp_path), "hv8"), "hv8.pem is missing")
    one_line_error(migrelay("pki", "crl", str(tmp_path), "--days", "0"), "at least a day")


def test_session_and_status_commands(tmp_path: Path) -> None:
    p = make_pki(tmp_path)
    pair_configs(tmp_path, p, "tls")
    conf = str(tmp_path / "hvA.toml")
    with serve(tmp_path / "hvA.toml", tmp_path / "hvB.toml"):
        opened = migrelay("session", "open", "hvB", "--config", conf)
        assert opened.returncode == 0, opened.stderr
        session = json.loads(opened.stdout)
        assert session["migrateuri"] == f"unix://{tmp_path}/hvA/hvB/hvA_{session['id']}-migration.sock"
        assert Path(session["disks_uri"].removeprefix("unix://")).is_socket()
        listed = json.loads(migrelay("session", "list", "--control", str(tmp_path / "hvA/control.sock")).stdout)
        assert [s["id"] for s in listed] == [session["id"]]
        status = migrelay("status", "--config", conf)
        assert status.returncode == 0
        assert status.stdout.startswith("relay hvA: up ")
        assert re.search(rf"^{session['id']}\s+hvB\s+0\s+\d+s\s+{session['migrateuri']}$", status.stdout, re.M)
        assert migrelay("session", "close", session["id"], "--config", conf).returncode == 0
        one_line_error(migrelay("session", "open", "hvX", "--config", conf), "unknown peer 'hvX'")
        one_line_error(migrelay("session", "close", "feed", "--config", conf), "no session 'feed'")
    one_line_error(migrelay("status", "--config", conf), "is migrelay serve running?")
    # a watch that cannot start says why at once, rather than refreshing an error forever
    one_line_error(migrelay("status", "--watch", "0.2", "--config", conf), "is migrelay serve running?")
