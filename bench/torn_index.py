"""Are 16-bit ring indices read and written atomically between two processes?

The split virtqueue is shared memory: one side stores an index (avail.idx,
used.idx, the event indices) while the other loads it.  Each store and load
must be one 16-bit access.  ``struct.Struct("<H").pack_into`` is not one: it
zero-fills the field first and then writes it byte by byte; ``unpack_from``
reads it byte by byte.  A reader in another process can then see 0 or a torn
value, so an index seems to move backwards or jump by thousands.
``memoryview.cast("H")`` element access is one aligned 16-bit load or store
(CPython copies the item with a fixed-size memcpy).

``python bench/torn_index.py [seconds]`` runs a writer process that stores
16-bit values whose two bytes are equal and never zero (0x0101, 0x0202, ...,
0xffff, 0x0101, ...) as fast as it can, and a reader that counts values that
are not of that form: each one is a torn or zero-filled read.  It does this
for each way of accessing the field (0 means atomic).
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time

_U16 = struct.Struct("<H")


def measure(kind: str, seconds: float = 1.0) -> dict[str, int | str]:
    """``kind``: "struct" (pack_into/unpack_from, as protocol/virtqueue.py) or "cast" (memoryview.cast)."""
    fd = os.memfd_create("vuc-torn-index", os.MFD_CLOEXEC)
    os.ftruncate(fd, mmap.PAGESIZE)
    m = mmap.mmap(fd, mmap.PAGESIZE, flags=mmap.MAP_SHARED)
    view = memoryview(m)
    h = view.cast("H")
    pid = os.fork()
    if pid == 0:
        try:
            k = 1
            end = time.monotonic() + seconds + 0.05
            while time.monotonic() < end:
                if kind == "struct":
                    for _ in range(5000):
                        k = k % 255 + 1
                        _U16.pack_into(view, 2, k * 0x0101)
                else:
                    for _ in range(5000):
                        k = k % 255 + 1
                        h[1] = k * 0x0101
        finally:
            os._exit(0)
    h[1] = 0x0101
    reads = torn = zero = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(5000):
            x = _U16.unpack_from(view, 2)[0] if kind == "struct" else h[1]
            if x >> 8 != x & 0xFF:
                torn += 1
            elif x == 0:
                zero += 1
        reads += 5000
    os.waitpid(pid, 0)
    del h, view
    m.close()
    os.close(fd)
    return {"access": kind, "reads": reads, "torn_reads": torn, "zero_reads": zero}


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    for k in ("struct", "cast"):
        r = measure(k, secs)
        print(f"{k:6s}: {r['reads']} reads: {r['torn_reads']} torn, {r['zero_reads']} read as 0")
