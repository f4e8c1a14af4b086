"""What a TLS file path may hold: a regular file of bounded size, read once, parsed in linear time.

Why it matters: the relay reads these files as root at start and at every reload, and a CRL is
often refreshed by a job less trusted than the relay; a FIFO must not hang a reload (or the
stop behind it), a device must not fill memory, and a crafted CRL must not hold the thread that
moves every stream.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay.core.config import TlsFiles
from relay.core.errors import PkiError
from relay.daemon.tlsconfig import MAX_TLS_FILE_BYTES, load_crls, read_tls_file
from relay.tools import pki


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"x" * 100_000)
    assert read_tls_file(path) == b"x" * 100_000


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "crl.pem"
    os.mkfifo(fifo)  # nobody writes to it: a read would block for ever
    with pytest.raises(OSError, match="not a regular file"):
        read_tls_file(fifo)


def test_a_device_is_refused(tmp_path: Path) -> None:
    zero = tmp_path / "crl.pem"
    zero.symlink_to("/dev/zero")
    with pytest.raises(OSError, match="not a regular file"):
        read_tls_file(zero)


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "crl.pem"
    with big.open("wb") as f:
        f.truncate(MAX_TLS_FILE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(OSError, match="larger than"):
        read_tls_file(big)


def test_crl_begin_lines_without_an_end_are_no_crl(tmp_path: Path) -> None:
    """200 KiB of BEGIN lines: the old lazy pattern took ~20 s on these (quadratic); this one
    reads them once and finds no CRL."""
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "hvA")
    crl = tmp_path / "crl.pem"
    crl.write_bytes(b"-----BEGIN X509 CRL-----\n" * 8000)
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "hvA.pem", tmp_path / "hvA-key.pem", crl)
    with pytest.raises(PkiError, match="no PEM CRL in it"):
        load_crls(files, [])
