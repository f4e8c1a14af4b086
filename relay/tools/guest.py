"""A guest program that reads every page of its RAM, over and over, and never writes.

It is a multiboot kernel (QEMU's `-kernel` loads it at 1 MiB through SeaBIOS and enters it
in flat 32-bit protected mode). It visits the pages in a scattered order, page index
i -> i + stride (mod the page count) with the stride coprime with the count, so each pass
reads every page once. Scattered, because after each postcopy page request the source
pushes the pages that follow the requested one: a guest reading in order would mostly wait
on that push, a guest reading scattered pages waits on its requests (the return path).
It writes nothing, so the destination's RAM must equal the source's after a migration.
"""

from __future__ import annotations

import math
import struct
from typing import Final

PAGE: Final = 4096
LOAD_ADDRESS: Final = 0x100000
_MAGIC: Final = 0x1BADB002
_AOUT_KLUDGE: Final = 1 << 16  # the load addresses are in the header: the image is flat machine code
_HEADER_SIZE: Final = 32
ENTRY: Final = LOAD_ADDRESS + _HEADER_SIZE


def _code(ram_bytes: int, stride_bytes: int) -> bytes:
    """The machine code; offsets (from ENTRY) in the comments."""
    return b"".join(
        (
            b"\xfa",  # 00  cli                       (nothing may interrupt, nothing is written)
            b"\x31\xf6",  # 01 outer: xor esi, esi
            b"\xb9" + struct.pack("<I", ram_bytes // PAGE),  # 03  mov ecx, pages
            b"\x8b\x06",  # 08 scan: mov eax, [esi]    (the read that faults a missing page in)
            b"\x81\xc6" + struct.pack("<I", stride_bytes),  # 0a  add esi, stride
            b"\x81\xfe" + struct.pack("<I", ram_bytes),  # 10  cmp esi, ram
            b"\x72\x06",  # 16  jb 1e
            b"\x81\xee" + struct.pack("<I", ram_bytes),  # 18  sub esi, ram
            b"\xe2\xe8",  # 1e  loop scan (08)
            b"\xeb\xdf",  # 20  jmp outer (01)
        )
    )


_CODE_SIZE: Final = len(_code(PAGE, PAGE))
# where the vCPU's EIP is once the reader runs
READER_LOOP: Final = range(ENTRY, ENTRY + _CODE_SIZE)


def stride_pages(pages: int) -> int:
    """A stride coprime with `pages` near pages/phi: consecutive reads land far apart."""
    stride = max(round(pages / (1 + math.sqrt(5)) * 2), 1)
    while math.gcd(stride, pages) != 1:
        stride += 1
    return stride


def page_reader(ram_bytes: int) -> bytes:
    """The multiboot image for a guest of `ram_bytes` of RAM (a multiple of 4 KiB)."""
    if ram_bytes % PAGE or not 0 < ram_bytes < 1 << 31:
        raise ValueError(f"guest RAM of {ram_bytes} bytes: not whole pages below 2 GiB")
    flags = _AOUT_KLUDGE
    checksum = -(_MAGIC + flags) & 0xFFFFFFFF
    # magic, flags, checksum, header_addr, load_addr, load_end_addr (0: the whole file), bss_end_addr, entry_addr
    header = struct.pack("<8I", _MAGIC, flags, checksum, LOAD_ADDRESS, LOAD_ADDRESS, 0, 0, ENTRY)
    return header + _code(ram_bytes, stride_pages(ram_bytes // PAGE) * PAGE)
