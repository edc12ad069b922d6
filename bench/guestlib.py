"""The guest side of the benchmark: modelled guests, a lean ring producer, latency probes.

Everything here runs in the benchmark's own process, never in the back-end's.

* :func:`connect_guest` - our vhost-user front-end (memfd guest RAM, real
  eventfds) plus the guest driver model, probed: what tests/helpers.py does,
  with the RAM size and queue size as parameters.
* :class:`Blaster` - a lean in-order producer that keeps the request ring full
  of pre-encoded batches, honouring EVENT_IDX for kicks and sleeping on the
  used-buffer interrupt only when the ring is full.  It measures the back-end's
  capacity, not the driver model's (whose Python costs more per record than
  the back-end's; see ``driver_flush_rate`` in the report).
* :func:`latency_inprocess` / :func:`latency_qemu` - one request at a time to an
  idle back-end: driver-model ``set_util`` + ``flush`` (its own EVENT_IDX kick;
  none is forced), the decision stamp read back from shared memory, the
  used-buffer interrupt as the ack.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os
import random
import select
import struct
import time
import weakref
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from vhost_user_cpufreq.guest.driver import CpufreqDriver
from vhost_user_cpufreq.guest.frontend import MemfdRam, ModelledGuest
from vhost_user_cpufreq.guest.frontend import connect_guest as _connect
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.virtqueue import vring_need_event
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

from backend_proc import SLOT, slot_offset  # type: ignore[import-not-found]

_U16 = struct.Struct("<H")
_HDR = struct.Struct("<IHHQ")  # seq, num_records, flags, timestamp_ns
_REC = struct.Struct("<HHI")
_USED_ELEM = struct.Struct("<II")


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


Guest = ModelledGuest


async def connect_guest(sock: str, *, ram_size: int = 4 << 20, queue_size: int = 64,
                        timeout: float = 10.0, **driver_kw: object) -> Guest:
    return await _connect(sock, ram=MemfdRam(ram_size, regions=2), timeout=timeout, queue_size=queue_size,
                          **driver_kw)


# -- lean producer ------------------------------------------------------------------


class Blaster:
    """Keeps a request ring full of batches of ``batch`` records (in-order buffer reuse).

    Takes over a freshly probed driver's queue (nothing in flight): descriptor
    ``i`` permanently points at buffer ``i`` and avail slot ``i`` always names
    descriptor ``i``, which is valid because the device returns buffers in
    order (checked on every reclaim).
    """

    def __init__(self, queue: DriverQueue, ram, notify: Callable[[], None],  # type: ignore[no-untyped-def]
                 wait_used: Callable[[], Awaitable[None]], num_vcpus: int, first_seq: int) -> None:
        if queue.num_free != queue.size:
            raise RuntimeError("the queue must be idle")
        self.size = queue.size
        self.mask = queue.size - 1
        # DriverQueue has no public accessors for its ring views: a benchmark may peek.
        self.desc = queue._desc  # noqa: SLF001
        # 16-bit ring fields go through memoryview.cast("H"): one aligned 16-bit load or
        # store each.  struct.pack_into zero-fills the field and then writes it byte by
        # byte, so the peer process can read 0 or a torn index (see torn_index.py).
        self.avail16 = queue._avail.cast("H")  # noqa: SLF001
        self.used16 = queue._used.cast("H")  # noqa: SLF001
        self.used_event_i = 2 + self.size  # avail ring: flags, idx, ring[size], used_event
        self.avail_event_i = 2 + 4 * self.size  # used ring: flags, idx, ring[size] of 8 bytes, avail_event
        self.avail_idx = queue.avail_idx
        self.kicked_at = self.avail_idx
        self.last_used = queue.last_used_idx
        self.notify = notify
        self.wait_used = wait_used
        self.num_vcpus = num_vcpus
        self.seq = first_seq
        self.max_records = min(64, num_vcpus)
        self.buf_len = abi.BATCH_HEADER_SIZE + abi.RECORD_SIZE * self.max_records
        self.gpas = [ram.alloc(self.buf_len, 8) for _ in range(self.size)]
        self.views = [ram.memory.view(g, self.buf_len) for g in self.gpas]
        self.batch = 0
        self.kicks = 0
        self.waits = 0
        self.batches = 0
        self._suppress()

    def set_batch(self, batch: int) -> None:
        """Records per buffer; call with nothing in flight."""
        assert self.in_flight == 0
        batch = min(batch, self.max_records)
        self.batch = batch
        length = abi.BATCH_HEADER_SIZE + abi.RECORD_SIZE * batch
        for i, (gpa, view) in enumerate(zip(self.gpas, self.views)):
            struct.pack_into("<QIHH", self.desc, 16 * i, gpa, length, 0, 0)
            for r in range(batch):
                _REC.pack_into(view, abi.BATCH_HEADER_SIZE + abi.RECORD_SIZE * r,
                               r % self.num_vcpus, (100 + 37 * (i + r)) % 1025, 0)

    @property
    def in_flight(self) -> int:
        return (self.avail_idx - self.last_used) & 0xFFFF

    def _suppress(self) -> None:
        self.avail16[self.used_event_i] = (self.last_used - 1) & 0xFFFF

    def reclaim(self) -> int:
        used_idx = self.used16[1]
        n = (used_idx - self.last_used) & 0xFFFF
        if n > self.in_flight:
            raise RuntimeError(f"used.idx {used_idx} is {n} ahead of {self.last_used}, {self.in_flight} in flight")
        if n:
            # in-order check on the last element of the run (cheap, catches reordering)
            last = (used_idx - 1) & 0xFFFF
            head = self.used16[2 + 4 * (last & self.mask)]  # low half of the element's u32 id
            if head != last & self.mask:
                raise RuntimeError(f"device returned buffer {head} out of order (expected {last & self.mask})")
            self.last_used = used_idx
            self._suppress()
        return n

    def fill(self) -> None:
        free = self.size - self.in_flight
        if not free:
            return
        ts = mono_ns()
        idx = self.avail_idx
        b = self.batch
        avail16 = self.avail16
        for _ in range(free):
            slot = idx & self.mask
            _HDR.pack_into(self.views[slot], 0, self.seq & 0xFFFFFFFF, b, 0, ts)
            avail16[2 + slot] = slot
            idx = (idx + 1) & 0xFFFF
            self.seq += 1
        self.batches += free
        self.avail_idx = idx
        avail16[1] = idx  # publish: one 16-bit store
        avail_event = self.used16[self.avail_event_i]
        if vring_need_event(avail_event, idx, self.kicked_at):
            self.kicks += 1
            self.notify()
        self.kicked_at = idx

    async def wait_some(self, timeout: float = 2.0) -> None:
        """Sleep until the device has used half the ring.

        ``wait_used`` may return early (its own timeout: an interrupt merged
        into one still being acknowledged is never reported again through
        qtest), so the used index is checked again after each wake-up.
        """
        half = max(1, self.size // 2)
        self.avail16[self.used_event_i] = (self.last_used + half - 1) & 0xFFFF
        end = time.monotonic() + timeout
        while True:
            used_idx = self.used16[1]
            if (used_idx - self.last_used) & 0xFFFF >= half or time.monotonic() > end:
                break
            self.waits += 1
            await self.wait_used()
        self.reclaim()

    async def run(self, seconds: float) -> int:
        """Produce for ``seconds``; returns batches produced."""
        start = self.batches
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.reclaim()
            self.fill()
            if self.in_flight == self.size:
                await self.wait_some()
        return self.batches - start

    async def drain(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > end:
                raise TimeoutError(f"{self.in_flight} buffers still in flight")
            self.reclaim()
            if self.in_flight:
                await asyncio.sleep(0.001)


def eventfd_waiter(fd: int, timeout: float = 1.0) -> Callable[[], Awaitable[None]]:
    """An awaitable wait for eventfd ``fd`` (the used-buffer interrupt of our front-end)."""

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass

    return wait


# -- latency -------------------------------------------------------------------------


@dataclass
class LatencySamples:
    kick_to_decision_ns: list[int]
    kick_to_ack_ns: list[int]
    #: requests that found the device not waiting for a kick on the next buffer (kick batching
    #: active); the driver then does not kick and the request is timed from its publication
    not_armed: int
    not_kicked: int
    #: from the driver model's notify call instead of the eventfd write (kicked requests only)
    notify_to_decision_ns: list[int] = field(default_factory=list)
    #: kicked requests the kick lane decided, split where its thread woke (epoll_wait returned):
    #: kick -> woke is the scheduler's wake-up, woke -> decision the back-end's own work
    kick_to_lane_woke_ns: list[int] = field(default_factory=list)
    lane_woke_to_decision_ns: list[int] = field(default_factory=list)
    #: CLOCK_MONOTONIC of each split request's kick, in the same order (bench/tail_trace.py)
    split_kick_at_ns: list[int] = field(default_factory=list)


class CKick:
    """bench/kick_wait.c, compiled at bench time: the kick and the wait for its ack in C."""

    def __init__(self, so_path: str) -> None:
        from cffi import FFI

        self.ffi = FFI()
        self.ffi.cdef("int vuc_bench_kick_wait(int kick_fd, int call_fd, int timeout_ms, int64_t out[2]);")
        self.lib = self.ffi.dlopen(so_path)
        self.out = self.ffi.new("int64_t[2]")
        self.calls = 0

    @staticmethod
    def build(tmpdir: str) -> str | None:
        """The shared object's path, or None if there is no C compiler."""
        import shutil
        import subprocess

        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            return None
        so = os.path.join(tmpdir, "kick_wait.so")
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kick_wait.c")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", so, src], check=True, capture_output=True)
        return so

    def kick_wait(self, kick_fd: int, call_fd: int, timeout_ms: int) -> tuple[int, int]:
        """(time of the write, time the ack showed or 0), both ns."""
        self.calls += 1
        if self.lib.vuc_bench_kick_wait(kick_fd, call_fd, timeout_ms, self.out) != 0:
            raise OSError("kick eventfd write failed")
        return int(self.out[0]), int(self.out[1])


class KickClock:
    """Stamps the guest model's kicks, at the eventfd write itself and at the driver's notify call.

    The write is the kick: the floors stamp right before theirs, and so does
    this, after the transport found the ring's kick fd.  The notify stamp is
    taken where the driver model hands the kick to its transport, so
    ``notify_to_*`` figures add the model's own Python bookkeeping on the way
    (a few microseconds, more when its code is cache-cold after a sleep).
    ``after_kick`` runs right after the write, inside the kick, as the floor's
    parent blocks right after its own.  With ``c_kick`` the write and the wait
    for ``ack_fd`` are one C call instead (:class:`CKick`); ``t_ack`` is then
    when that wait returned.
    """

    def __init__(self, g: Guest, after_kick: Callable[[], None] | None = None, c_kick: CKick | None = None,
                 ack_fd: int = -1) -> None:
        self.g = g
        self.after_kick = after_kick
        self.c_kick, self.ack_fd = c_kick, ack_fd
        self.t_notify = self.t_kick = self.t_ack = 0
        self._orig_notify = g.transport.notify

    def _notify(self, index: int) -> None:
        self.t_notify = mono_ns()
        self._orig_notify(index)

    def _kick(self, index: int) -> None:  # VhostUserFrontend.kick, stamped
        fd = self.g.fe.rings[index].kick
        if self.c_kick is not None:
            self.t_kick, self.t_ack = self.c_kick.kick_wait(fd, self.ack_fd, 1000)
            return
        self.t_kick = mono_ns()
        os.eventfd_write(fd, 1)
        if self.after_kick is not None:
            self.after_kick()

    def reset(self) -> None:
        self.t_notify = self.t_kick = self.t_ack = 0

    def __enter__(self) -> "KickClock":
        self.g.transport.notify = self._notify  # type: ignore[method-assign]
        self.g.fe.kick = self._kick  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self.g.transport.notify = self._orig_notify  # type: ignore[method-assign]
        del self.g.fe.kick  # back to the class's method


def _wait_armed(queue: DriverQueue, limit_s: float = 0.002) -> bool:
    """Wait briefly until the device asked for a kick on our next buffer (it is idle, waiting)."""
    end = time.monotonic() + limit_s
    while queue.avail_event != queue.avail_idx:
        if time.monotonic() > end:
            return False
    return True


#: each driver's own request sequence (guests may take turns, each must still alternate)
_req: "weakref.WeakKeyDictionary[CpufreqDriver, itertools.count[int]]" = weakref.WeakKeyDictionary()


def _utils(d: CpufreqDriver, vcpus: int) -> tuple[int, int]:
    """vCPU and util of ``d``'s next request: a util far from the vCPU's previous one, so it is always sent."""
    k = next(_req.setdefault(d, itertools.count()))
    v = k % vcpus
    return v, (200 if (k // vcpus) % 2 == 0 else 800)


def _decision_stamp(stamps: mmap.mmap, off: int, count: int, limit_s: float) -> tuple[int, int]:
    """Spin until the decision slot at ``off`` has counted ``count`` decisions.

    Returns its stamps (ns): the decision, and when the kick lane woke for it (0: decided on
    the event loop).  The slot is read again once the count shows, because the writer stores
    the stamps before the count and a read that overlapped the write may hold older stamps.
    """
    deadline = time.monotonic() + limit_s
    while True:
        if SLOT.unpack_from(stamps, off)[1] >= count:
            ts, _, woke = SLOT.unpack_from(stamps, off)
            return int(ts), int(woke)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no decision stamp within {limit_s} s")


def latency_inprocess(g: Guest, stamps: mmap.mmap, vm_index: int, slot_vcpus: int, vcpus: int,
                      n: int, gap_us: int, warmup: int = 50, poll_period_us: int = 0,
                      c_kick: CKick | None = None) -> LatencySamples:
    """Blocking loop (the asyncio loop is not needed while it runs).

    A request is timed from its kick, the eventfd write (:class:`KickClock`),
    and also from the driver's notify call.  The guest blocks for the ack
    right after the write, as the floor's parent (bench/eventfd_rtt.c) blocks
    right after its own: Python bookkeeping the driver model does after a
    kick would otherwise keep a device woken on this CPU waiting, and be
    counted as device latency.
    """
    d = g.driver
    q = d.queue
    q.set_interrupt_suppression(False)  # the device interrupts on each used buffer: our ack
    call_fd = g.fe.rings[abi.REQUEST_QUEUE].call
    poller = select.poll()
    poller.register(call_fd, select.POLLIN)
    try:
        os.eventfd_read(call_fd)
    except BlockingIOError:
        pass
    t_acked = [0]

    def wait_ack() -> None:
        if poller.poll(1000):
            t_acked[0] = mono_ns()

    clock = KickClock(g, after_kick=wait_ack, c_kick=c_kick, ack_fd=call_fd)
    counts = [SLOT.unpack_from(stamps, slot_offset(vm_index, v, slot_vcpus))[1] for v in range(vcpus)]
    k2d: list[int] = []
    k2a: list[int] = []
    n2d: list[int] = []
    k2w: list[int] = []
    w2d: list[int] = []
    at: list[int] = []
    not_armed = not_kicked = 0
    gap = gap_us / 1e6
    # ``poll_period_us``: the device polls the ring on a grid of that period and never asks for a
    # kick.  A request at a fixed pace would lock onto the grid's phase (published just before each
    # poll, or just after): a seeded jitter of up to one period spreads it evenly.
    jitter = poll_period_us / 1e6
    rng = random.Random(1)
    try:
        with clock:
            for i in range(n + warmup):
                time.sleep(gap + rng.uniform(0, jitter))
                v, util = _utils(d, vcpus)
                d.set_util(v, util)
                armed = _wait_armed(q, 0.0 if poll_period_us else 0.002)
                kicks = d.stats.kicks
                clock.reset()
                t_acked[0] = 0
                sent = d.flush()
                t_pub = mono_ns()
                assert sent == 1, sent
                kicked = d.stats.kicks != kicks
                if clock.t_ack:
                    t_acked[0] = clock.t_ack
                if t_acked[0]:
                    t_ack = t_acked[0]
                else:  # no kick (the device did not ask for one), or no ack yet: wait here
                    if not poller.poll(1000):
                        raise TimeoutError("no used-buffer interrupt within 1 s")
                    t_ack = mono_ns()
                os.eventfd_read(call_fd)
                counts[v] += 1
                ts, woke = _decision_stamp(stamps, slot_offset(vm_index, v, slot_vcpus), counts[v], 1.0)
                if i >= warmup:
                    not_armed += not armed
                    not_kicked += not kicked
                    t0 = clock.t_kick if kicked else t_pub
                    k2d.append(ts - t0)
                    k2a.append(t_ack - t0)
                    if kicked:
                        n2d.append(ts - clock.t_notify)
                        if woke >= t0:  # the wake-up this kick caused (not a timer's just before it)
                            k2w.append(woke - t0)
                            w2d.append(ts - woke)
                            at.append(t0)
    finally:
        q.set_interrupt_suppression(True)
    return LatencySamples(k2d, k2a, not_armed, not_kicked, n2d, k2w, w2d, at)


class BusyVcpu:
    """A vCPU that goes on running guest code after its kick, as a real one does.

    The Linux driver's kick is an MMIO write whose exit returns at once: the vCPU
    thread never blocks for the device.  Here the guest spins for
    ``busy_before_us`` before each request (guest code it was running), kicks, and
    spins reading the decision stamp until the decision shows.  On the back-end's
    CPU the lane runs only if its wake-up preempts this thread.
    """

    def __init__(self, g: Guest, stamps: mmap.mmap, vm_index: int, slot_vcpus: int, vcpus: int) -> None:
        self.g, self.stamps, self.vcpus = g, stamps, vcpus
        self.offs = [slot_offset(vm_index, v, slot_vcpus) for v in range(vcpus)]
        self.counts = [SLOT.unpack_from(stamps, o)[1] for o in self.offs]
        #: every request split at the lane's wake-up, as :class:`LatencySamples` has it (tail_trace.py)
        self.split_kick_at_ns: list[int] = []
        self.kick_to_lane_woke_ns: list[int] = []

    def run(self, n: int, gap_us: int, busy_before_us: int, limit_s: float = 0.5) -> list[int]:
        """``n`` requests, kick -> decision in ns each."""
        d, q = self.g.driver, self.g.driver.queue
        out: list[int] = []
        with KickClock(self.g) as clock:
            for _ in range(n):
                time.sleep(gap_us / 1e6)
                end = time.monotonic() + busy_before_us / 1e6
                while time.monotonic() < end:
                    pass
                v, util = _utils(d, self.vcpus)
                d.set_util(v, util)
                if not _wait_armed(q):
                    raise RuntimeError("the device does not ask for kicks (kick batching must be off here)")
                clock.reset()
                sent = d.flush()
                assert sent == 1 and clock.t_kick, (sent, clock.t_kick)
                self.counts[v] += 1
                ts, woke = _decision_stamp(self.stamps, self.offs[v], self.counts[v], limit_s)  # spinning: guest code
                out.append(ts - clock.t_kick)
                if woke >= clock.t_kick:
                    self.split_kick_at_ns.append(clock.t_kick)
                    self.kick_to_lane_woke_ns.append(woke - clock.t_kick)
        return out


async def latency_qemu(driver: CpufreqDriver, transport, stamps: mmap.mmap, vm_index: int,  # type: ignore[no-untyped-def]
                       slot_vcpus: int, vcpus: int, n: int, gap_us: int, warmup: int = 20) -> LatencySamples:
    """The same through QEMU: the kick is a qtest MMIO write, the ack QEMU's INTx report."""
    q = driver.queue
    q.set_interrupt_suppression(False)
    qt = transport.qt
    orig_irq = qt.on_irq
    irq_at: list[int] = []

    def on_irq(line: int, raised: bool) -> None:
        if raised and line in transport.intx_lines:
            irq_at.append(mono_ns())
        if orig_irq is not None:
            orig_irq(line, raised)

    irq_fut: list[asyncio.Future[None] | None] = [None]

    def on_irq_wake(line: int, raised: bool) -> None:
        on_irq(line, raised)
        f = irq_fut[0]
        if raised and line in transport.intx_lines and f is not None and not f.done():
            f.set_result(None)

    qt.on_irq = on_irq_wake
    t_kick = [0]
    orig_notify = transport.notify

    def notify(index: int) -> None:
        t_kick[0] = mono_ns()
        orig_notify(index)

    transport.notify = notify
    counts = [SLOT.unpack_from(stamps, slot_offset(vm_index, v, slot_vcpus))[1] for v in range(vcpus)]
    k2d: list[int] = []
    k2a: list[int] = []
    not_armed = not_kicked = 0
    try:
        await asyncio.sleep(0.05)
        for i in range(n + warmup):
            await asyncio.sleep(gap_us / 1e6)
            v, util = _utils(driver, vcpus)
            driver.set_util(v, util)
            armed = _wait_armed(q)
            irqs_before = transport.queue_interrupts
            del irq_at[:]
            irq_fut[0] = asyncio.get_running_loop().create_future()
            kicks = driver.stats.kicks
            t_kick[0] = 0
            driver.flush()
            t_pub = mono_ns()
            kicked = driver.stats.kicks != kicks
            try:
                await asyncio.wait_for(irq_fut[0], 2.0)
            except asyncio.TimeoutError:
                raise TimeoutError("no used-buffer interrupt from QEMU within 2 s") from None
            end = time.monotonic() + 2.0
            while transport.queue_interrupts == irqs_before:  # the ISR read after the IRQ (lowers INTx)
                if time.monotonic() > end:
                    raise TimeoutError("QEMU's ISR read did not complete within 2 s")
                await asyncio.sleep(0)
            counts[v] += 1
            ts, c, _ = SLOT.unpack_from(stamps, slot_offset(vm_index, v, slot_vcpus))
            if c < counts[v]:
                raise RuntimeError("interrupt before the decision stamp")
            if i >= warmup and irq_at:
                not_armed += not armed
                not_kicked += not kicked
                t0 = t_kick[0] if kicked else t_pub
                k2d.append(ts - t0)
                k2a.append(irq_at[0] - t0)
    finally:
        transport.notify = orig_notify
        qt.on_irq = orig_irq
        q.set_interrupt_suppression(True)
    return LatencySamples(k2d, k2a, not_armed, not_kicked)
