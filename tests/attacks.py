"""Hostile front-ends, each in its own process: ``python -m tests.attacks MODE SOCKET``.

Each mode connects to the back-end as QEMU would (the in-process front-end and
the guest driver model), then does one thing a hostile VMM can do to the
memory or fds it shares with the back-end.  It prints ``attacked`` once the
attack is delivered and then stays connected, so that whatever closes its
session is the back-end's decision.  An attack may fault the attacker itself
(it is touching memory it just took away): that is why it runs apart from the
test, which plays the victim VM.
"""

from __future__ import annotations

import array
import asyncio
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from vhost_user_cpufreq.guest.frontend import MemfdRam, ModelledGuest, connect_guest
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.memory import FlatMemory
from vhost_user_cpufreq.protocol.virtqueue import ring_sizes

F = vu.FrontendRequest
RING = 256


async def shrink_then_reset(path: str) -> None:
    """A record made available without a kick, guest RAM truncated, then SET_STATUS 0 (a VM reset):
    the back-end takes the ring back from the kick lane and drains it on the event loop."""
    g = await connect_guest(path, lazy_records=0, util_threshold=1)
    g.transport.notify = lambda index: None  # type: ignore[method-assign]  # publish, never kick
    g.driver.set_util(0, 900)
    g.driver.flush()
    os.ftruncate(g.transport.ram.fd, 0)
    await g.fe.request(F.SET_STATUS, vu.U64(0))
    # Where no lane held the ring, nothing read it yet: a kick makes the back-end look.
    try:
        await g.fe.request(F.GET_FEATURES)
        g.fe.kick(0)
    except ConnectionError:
        pass  # the lane's ring was drained on the event loop at SET_STATUS 0: the session is gone
    _done()


async def misaligned_ring(path: str) -> None:
    """The ring stopped, its avail ring moved to an odd address (the C drain refuses that, so the
    ring would be drained in Python), restarted, guest RAM truncated, kicked."""
    g = await connect_guest(path, lazy_records=0, util_threshold=1)
    base = await g.fe.stop_ring(0)
    r = g.fe.rings[0]
    ram = g.transport.ram
    try:
        await g.fe.request(F.SET_VRING_ADDR, vu.VringAddr(0, 0, ram.uva(r.desc), ram.uva(r.used),
                                                          ram.uva(r.avail) + 1, 0))
        await g.fe.request(F.SET_VRING_BASE, vu.VringState(0, base))
        await g.fe.request(F.SET_VRING_KICK, vu.U64(0), (r.kick,))
    except OSError:
        pass  # the back-end hung up already: the attack ends here
    os.ftruncate(ram.fd, 0)
    g.fe.kick(0)
    _done()


async def blocking_kick(path: str) -> None:
    """The kick eventfd made blocking again, and read by a thread of ours as soon as it is written:
    a back-end that reads it after its poll said readable finds it empty, and would block."""
    g = await _connected(path)
    kick = g.fe.rings[0].kick
    os.set_blocking(kick, True)
    stop = threading.Event()

    def steal() -> None:
        while not stop.is_set():
            os.read(kick, 8)

    threading.Thread(target=steal, daemon=True).start()
    _done()
    t_end = time.monotonic() + float(os.environ.get("ATTACK_SECONDS", "3"))
    i = 0
    while time.monotonic() < t_end:
        i += 1
        g.driver.set_util(i % 2, (i * 97) % 1025)
        g.driver.flush()
        os.eventfd_write(kick, 1)
        await asyncio.sleep(0.0005)
    print("kicks", i, flush=True)


async def full_call(path: str) -> None:
    """The call eventfd made blocking and filled to its maximum, then a record that asks for an
    interrupt: the back-end's write would block until we read, which we never do."""
    g = await _connected(path)
    g.transport.notify = lambda index: None  # type: ignore[method-assign]  # we kick below
    r = g.fe.rings[0]
    os.set_blocking(r.call, True)
    os.eventfd_write(r.call, 0xFFFF_FFFF_FFFF_FFFE)
    q = g.driver.queue
    _, a, _ = ring_sizes(q.size)
    mem = g.transport.ram.memory
    g.driver.set_util(0, 800)
    g.driver.flush()
    used_idx = int.from_bytes(mem.view(r.used + 2, 2), "little")
    mem.view(r.avail + a - 2, 2)[:] = used_idx.to_bytes(2, "little")  # used_event: interrupt me at the next one
    g.fe.kick(0)
    _done()


class _TmpfsRam(MemfdRam):
    """Guest RAM in a sparse file on a tmpfs of our own, with a request queue of BIG entries whose
    used ring puts entries 16-527 alone on page HOLE: the driver initialises the ring's flags, index
    and avail_event (other pages) and reads entries only once returned, so only the back-end's
    write of entry 16 touches HOLE first."""

    HOLE = 0x10000
    BIG = 1024

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.fd = fd
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self.memory = FlatMemory(memoryview(self._map), base=0)
        self.regions = [(0, size, 0x7F00_0000_0000, 0)]
        self._next = self.HOLE + 2 * mmap.PAGESIZE
        self.used_at = self.HOLE - 4 - 16 * 8

    def alloc(self, size: int, align: int = 16) -> int:
        if align == 4 and size == ring_sizes(self.BIG)[2]:
            return self.used_at
        return super().alloc(size, align)


async def tmpfs_full(path: str) -> None:
    """No truncation at all: a sparse guest RAM file on a tmpfs that is full (run in a mount namespace
    of our own, as root)."""
    d = tempfile.mkdtemp(prefix="vuc-tmpfs-")
    size = 1 << 20
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + 16 * mmap.PAGESIZE}", "vuc-attack", d], check=True)
    fd = os.open(os.path.join(d, "ram"), os.O_RDWR | os.O_CREAT, 0o600)
    filler = os.open(os.path.join(d, "filler"), os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    ram = _TmpfsRam(fd, size)
    for page in range(0, size, mmap.PAGESIZE):  # every page but the hole is backed
        if page != ram.HOLE:
            v = ram.memory.view(page, 1)
            v[0] = v[0]
    try:  # and then nothing is left for it
        while True:
            os.write(filler, b"\0" * mmap.PAGESIZE)
    except OSError:
        pass
    g = await connect_guest(path, ram=ram, lazy_records=0, util_threshold=1, queue_size=ram.BIG)
    used_idx = ram.memory.view(ram.used_at + 2, 2)
    # One buffer at a time until the back-end returns the 17th (its used entry is on the hole).  We
    # stop before reclaiming it: reading that entry would fault here.
    for i in range(64):
        if int.from_bytes(used_idx, "little") > 16:
            break
        g.driver.set_util(i % 2, 100 + i)
        g.driver.flush()
        await asyncio.sleep(0.005)
    _done()


async def pile_fds(path: str) -> None:
    """A message sent a byte at a time, each byte with as many fds as one recvmsg takes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    msg = vu.encode_message(F.SET_OWNER)
    fds = [os.eventfd(0) for _ in range(32)]
    for i in range(len(msg) - 1):
        try:
            sock.sendmsg([msg[i:i + 1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError:
            break
        time.sleep(0.01)
    _done()


async def _connected(path: str) -> ModelledGuest:
    """A guest whose set-up the back-end has applied in full (SET_VRING_CALL has no reply of its
    own: a request with one after it is answered only once it was handled)."""
    g = await connect_guest(path, lazy_records=0, util_threshold=1)
    await g.fe.request(F.GET_FEATURES)
    return g


def _done() -> None:
    print("attacked", flush=True)


MODES = {
    "shrink-then-reset": shrink_then_reset,
    "misaligned-ring": misaligned_ring,
    "blocking-kick": blocking_kick,
    "full-call": full_call,
    "tmpfs-full": tmpfs_full,
    "pile-fds": pile_fds,
}


async def _main(mode: str, path: str) -> None:
    await MODES[mode](path)
    await asyncio.sleep(3600)  # stay connected: the back-end decides what becomes of the session


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
