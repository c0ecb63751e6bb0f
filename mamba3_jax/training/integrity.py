"""Checksums of a checkpoint's files, written once the checkpoint is complete and checked before
it is restored: a truncated file, a deleted file or a flipped bit is found and named instead of
being restored silently (or failing deep inside tensorstore).

`<step dir>/checksums.json` maps every file of the step directory (relative path) to its size
and CRC-32. CRC-32 detects every single-bit flip and every burst up to 32 bits; it is not a
defence against deliberate tampering, and it costs little next to writing the checkpoint.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Optional

CHECKSUMS_FILE = "checksums.json"
_BLOCK = 1 << 22


def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def file_checksums(directory: str) -> dict[str, list]:
    """{relative path: [size, crc32 hex]} of every file under `directory` but the checksum file."""
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel in (CHECKSUMS_FILE, CHECKSUMS_FILE + ".tmp"):
                continue
            out[rel] = [os.path.getsize(path), _crc32(path)]
    return out


def write_checksums(directory: str) -> None:
    """Record the checksums of a complete checkpoint (atomically: a kill leaves none, not half)."""
    sums = file_checksums(directory)
    tmp = os.path.join(directory, CHECKSUMS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:  # one file per line, for people reading it
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                   for k, v in sorted(sums.items())) + "\n}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, CHECKSUMS_FILE))


def has_checksums(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CHECKSUMS_FILE))


def verify(directory: str) -> Optional[str]:
    """None if every recorded file is present with its size and checksum, else the first problem
    in words. A directory without a checksum file is not checked (see `has_checksums`)."""
    path = os.path.join(directory, CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            want = json.load(f)
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS_FILE} is unreadable ({e})"
    for rel, (size, crc) in sorted(want.items()):
        p = os.path.join(directory, rel)
        if not os.path.isfile(p):
            return f"file {rel} is missing"
        got_size = os.path.getsize(p)
        if got_size != size:
            return f"file {rel} has {got_size} bytes, {size} were written"
        if _crc32(p) != crc:
            return f"file {rel} has changed since it was written (checksum mismatch)"
    return None
