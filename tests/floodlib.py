"""A flooding guest, in a process of its own: what tests/test_flood.py and bench/flood.py run.

``python -c "from tests.floodlib import flooder_main; flooder_main(sock, seconds, mode)"``
connects to a VM's socket as its front-end and guest, prints ``ready``, floods for
``seconds`` and prints ``torn N sent N`` (batches sent).  Modes (:data:`MODES`):

* ``kick-storm``: kicks without buffers, 1,000 at a time;
* ``small``: the 256-entry ring kept full of 1-record batches;
* ``full-ring``: kept full of 256-record batches (every vCPU many times over, half asking
  for the top frequency);
* ``indirect-zero``: every chain an indirect table of 32,768 zero-length descriptors then the
  batch (longer than the device takes: each is refused, ``chain-too-long``);
* ``indirect-max``: the same with 4,096 entries, the longest table the device walks.

It kicks after every refill, wanted or not, as fast as it can.  ``cpu`` pins it first.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
import time

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import virtqueue as vq

MODES = ("kick-storm", "small", "full-ring", "indirect-zero", "indirect-max")
#: indirect table entries of the indirect modes
TABLE_ENTRIES = {"indirect-zero": vq.MAX_INDIRECT_DESCS, "indirect-max": 4096}


def flooder_main(path: str, seconds: float, mode: str, cpu: int | None = None) -> None:
    """Entry point of the flooding guest process: prints "ready", floods, prints the batches sent."""
    if mode not in MODES:
        raise ValueError(f"unknown flood mode {mode!r}")
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(_flood(path, seconds, mode))


async def _flood(path: str, seconds: float, mode: str) -> None:
    import ctypes
    import mmap

    from vhost_user_cpufreq.guest.driver import CpufreqDriver
    from vhost_user_cpufreq.guest.frontend import InProcessTransport, VhostUserFrontend
    from vhost_user_cpufreq.protocol.errors import RingError

    fe = VhostUserFrontend()
    await fe.connect(path)
    await fe.handshake()
    t = InProcessTransport(fe)
    d = CpufreqDriver(t, queue_size=256, util_threshold=1)
    await d.probe()
    q, mem = d.queue, t.ram.memory
    ring = fe.rings[0]
    assert d.config is not None
    n = d.config.num_vcpus
    # avail.idx is published with one 16-bit store, as a real driver does (DriverQueue.publish
    # stores it a byte at a time, which the back-end could read torn: see the test below).
    shared = mmap.mmap(t.ram.fd, t.ram.size, flags=mmap.MAP_SHARED)
    avail_idx = ctypes.c_uint16.from_buffer(shared, ring.avail + 2)
    rng = random.Random(7)
    # Max-size batches: 256 records, every vCPU many times over, half of them asking for the top frequency.
    per_batch = 1 if mode == "small" else abi.MAX_RECORDS_PER_BATCH
    templates = [
        bytearray(abi.encode_batch(abi.Batch(0, 0, tuple(
            abi.Record((k + i) % n, rng.randrange(abi.UTIL_SCALE + 1), 2802000 if rng.random() < 0.5 else 0)
            for i in range(per_batch)))))
        for k in range(8)
    ]
    size = len(templates[0])
    free = [t.ram.alloc(size, 8) for _ in range(q.size)]
    table = 0
    nd = TABLE_ENTRIES.get(mode, 0)
    if nd:
        # One indirect table shared by every buffer: nd - 1 zero-length entries, then the batch.
        table = t.ram.alloc(16 * nd, 16)
        buf = bytearray(16 * nd)
        for i in range(nd - 1):
            struct.pack_into("<QIHH", buf, 16 * i, 0, 0, vq.VIRTQ_DESC_F_NEXT, i + 1)
        mem.view(table, len(buf))[:] = buf
    inflight: dict[int, int] = {}
    seq = sent = torn = 0
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if mode == "kick-storm":
            for _ in range(1000):
                t.notify(0)
            await asyncio.sleep(0)
            continue
        try:
            for head, _ in q.reclaim():
                free.append(inflight.pop(head))
        except RingError:
            torn += 1  # used.idx read half-written (the back-end stores it byte by byte); read again later
        while free and q.num_free:
            gpa = free.pop()
            data = templates[seq % len(templates)]
            struct.pack_into("<IHHQ", data, 0, seq & 0xFFFFFFFF, per_batch,
                             abi.BATCH_F_RESYNC if seq == 0 else 0, time.monotonic_ns())
            mem.view(gpa, size)[:] = data
            head = q.add([(gpa, size)])
            if nd:
                # A well-formed chain: nd - 1 zero-length indirect descriptors, then a batch (the
                # table is shared, so all but the first are stale duplicates: the walk costs the same).
                if seq == 0:
                    struct.pack_into("<QIHH", mem.view(table + 16 * (nd - 1), 16), 0, gpa, size, 0, 0)
                struct.pack_into("<QIHH", mem.view(ring.desc + 16 * head, 16), 0, table,
                                 16 * nd, vq.VIRTQ_DESC_F_INDIRECT, 0)
            inflight[head] = gpa
            seq += 1
            sent += 1
        avail_idx.value = q.avail_idx
        t.notify(0)  # every time, wanted or not: as fast as it can
        await asyncio.sleep(0)
    print(f"torn {torn} sent {sent}", flush=True)
    del avail_idx
    await d.remove()
    await fe.close()
