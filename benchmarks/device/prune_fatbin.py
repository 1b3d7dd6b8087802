"""Zero the GPU code a shared library carries for other cards, so it compresses to fewer call-sized parts.

cuSPARSELt 0.8.1's library is 234 MB, of which ~96 MB are SASS for other architectures (sm_75-89, sm_100-121) in
its `.nv_fatbin` and `.cask_resource` sections: ~150 MB xz-compressed, five parts a call each, against two once those
bytes are zeros. Nothing moves: every fatbin entry keeps its header and size, only the payloads the target card could
never load become zeros. The CUDA driver loads SASS of the card's own architecture, else JIT-compiles PTX of an
architecture at or below it, so an entry is kept when it is

  - SASS for `--sm` (e.g. 90 for H100 / H200), or
  - PTX at or below `--sm` in a fatbin that has no SASS for `--sm` (the JIT fallback).

  python3 benchmarks/device/prune_fatbin.py SRC DST [--sm 90]

The result runs on `--sm` cards only; it is a device-call carry, never something to ship.
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_SASS = 1, 2
SECTIONS = (b".nv_fatbin", b".cask_resource")  # the second: cuSPARSELt's kernel resources, fatbins among flatbuffers


def elf_sections(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Name -> (file offset, size) of a 64-bit little-endian ELF's sections."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit("prune_fatbin.py: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    str_off = headers[shstrndx][4]
    out = {}
    for name_off, _type, _flags, _addr, offset, size in headers:
        name = data[str_off + name_off:data.index(b"\0", str_off + name_off)]
        out[name] = (offset, size)
    return out


def fatbin_entries(data: bytes, start: int, end: int):
    """Per fatbin in [start, end), its entries: a list of (payload offset, size, kind, sm)."""
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic, start, end)
    while pos != -1:
        _, _version, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
        if header_size != 16 or pos + 16 + fat_size > end:  # a stray match inside other data
            pos = data.find(magic, pos + 4, end)
            continue
        entries, q, stop = [], pos + 16, pos + 16 + fat_size
        while q < stop:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, q)
            sm, = struct.unpack_from("<I", data, q + 28)
            entries.append((q + entry_header, size, kind, sm))
            q += entry_header + size
        yield entries
        pos = data.find(magic, stop, end)


def prune(data: bytes, sm: int) -> tuple[bytearray, int]:
    """A copy of `data` with every fatbin payload an `sm` card cannot load set to zeros; and how many bytes that was."""
    out, zeroed = bytearray(data), 0
    sections = elf_sections(data)
    for name in SECTIONS:
        if name not in sections:
            continue
        offset, size = sections[name]
        for entries in fatbin_entries(data, offset, offset + size):
            has_sass = any(kind == KIND_SASS and arch == sm for _, _, kind, arch in entries)
            for payload, length, kind, arch in entries:
                keep = arch == sm if (kind == KIND_SASS or has_sass) else arch <= sm
                if not keep:
                    out[payload:payload + length] = bytes(length)
                    zeroed += length
    return out, zeroed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--sm", type=int, default=90, help="the card's architecture (90: H100, H200)")
    args = ap.parse_args()
    data = args.src.read_bytes()
    out, zeroed = prune(data, args.sm)
    args.dst.write_bytes(out)
    print(f"prune_fatbin.py: {zeroed / 1e6:.1f} of {len(data) / 1e6:.1f} MB zeroed (code for cards other than sm_{args.sm})")


if __name__ == "__main__":
    main()
