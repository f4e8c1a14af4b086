"""The page reader guest (relay/tools/guest.py) and the RAM comparison of the QEMU helper.

Why it matters: the postcopy bench counts on the reader to touch every page of its RAM on
the destination, and on the comparison to catch a destination whose RAM is not the
source's; a reader that skips pages or a check that passes corrupt RAM makes the figures
worthless. The machine code itself runs in the bench's test (tests/e2e/test_bench_command.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
from pathlib import Path

import pytest

from relay.tools import guest
from relay.tools.qemu import PC_HOLE, same_ram, sha256


def scan_order(image: bytes) -> list[int]:
    """The addresses one pass of the reader's loop reads, from the immediates in its code."""
    code = image[guest.ENTRY - guest.LOAD_ADDRESS :]
    pages = struct.unpack_from("<I", code, 0x04)[0]
    stride = struct.unpack_from("<I", code, 0x0C)[0]
    ram = struct.unpack_from("<I", code, 0x12)[0]
    assert struct.unpack_from("<I", code, 0x1A)[0] == ram
    addresses, esi = [], 0
    for _ in range(pages):
        addresses.append(esi)
        esi += stride
        if esi >= ram:
            esi -= ram
    return addresses


@pytest.mark.parametrize("mib", [1, 16, 32, 100, 256])
def test_one_pass_reads_every_page_once_scattered(mib: int) -> None:
    image = guest.page_reader(mib << 20)
    order = scan_order(image)
    assert sorted(order) == list(range(0, mib << 20, guest.PAGE))
    # consecutive reads land far apart: never on the next page
    assert min(abs(b - a) for a, b in itertools.pairwise(order)) > 16 * guest.PAGE


def test_multiboot_header() -> None:
    image = guest.page_reader(64 << 20)
    magic, flags, checksum, header, load, load_end, bss_end, entry = struct.unpack_from("<8I", image)
    assert magic == 0x1BADB002 and (magic + flags + checksum) % 2**32 == 0
    assert flags & (1 << 16) and header == load == guest.LOAD_ADDRESS and (load_end, bss_end) == (0, 0)
    assert entry == guest.ENTRY and guest.READER_LOOP.start == entry
    assert len(image) == guest.READER_LOOP.stop - guest.LOAD_ADDRESS


def test_stride_is_coprime() -> None:
    for pages in (256, 4096, 25600, 65536, 65537, 99991):
        assert math.gcd(guest.stride_pages(pages), pages) == 1


def test_refuses_sizes_it_cannot_scan() -> None:
    for size in (0, 4095, 1 << 31):
        with pytest.raises(ValueError):
            guest.page_reader(size)


def test_same_ram_names_the_first_page_that_differs(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 << 12)  # 3 MiB
    a, b = tmp_path / "a.ram", tmp_path / "b.ram"
    a.write_bytes(data)
    b.write_bytes(data)
    assert same_ram(a, b) == sha256(a)
    corrupt = bytearray(data)
    corrupt[(2 << 20) + 5 * guest.PAGE + 7] ^= 1
    b.write_bytes(corrupt)
    with pytest.raises(RuntimeError, match=r"byte 0x205007 \(page 517\)"):
        same_ram(a, b)
    b.write_bytes(data[:-1])
    with pytest.raises(RuntimeError, match="first differ"):
        same_ram(a, b)


def test_sha256_skips_a_range_across_chunks(tmp_path: Path) -> None:
    data = bytes(range(251)) * 9000  # not page- or chunk-aligned
    path = tmp_path / "ram"
    path.write_bytes(data)
    skip = range(PC_HOLE.start, (1 << 20) + 12345)  # ends inside the second 1 MiB chunk
    assert sha256(path, skip) == hashlib.sha256(data[: skip.start] + data[skip.stop :]).hexdigest()
    assert sha256(path) == hashlib.sha256(data).hexdigest()
