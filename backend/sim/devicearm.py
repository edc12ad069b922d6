"""This device's arm: the real guest driver model and the real policy engine over an in-memory ring.

Theory of operation: :class:`RamTransport` is a
:class:`~vhost_user_cpufreq.guest.transport.DriverTransport` whose guest RAM
is a bytearray and whose device side is a ``protocol.virtqueue.DeviceQueue``
on the same ring.  The guest side is ``CpufreqDriver`` unchanged: its util
threshold, urgent/lazy kick rules (SPEC 6.4) and EVENT_IDX decide when the
device hears about a request.  The device waits for a kick with EVENT_IDX
armed as the back-end's ``KickBatcher`` (SPEC 6.3, the real class) says:
a kick at ``t`` is drained at ``t + latency`` (the benchmark's kick ->
decision p99); a busy ring is drained on the 4 ms poll grid without a kick.
The guest governor's hook calls ``set_util`` then ``flush`` (a kernel
driver sends from the cpufreq fast-switch path), and every guest tick calls
``flush`` again so held kicks meet their deadline.  Each record goes to
``ClampEngine.on_record`` and each :class:`ClampChange` becomes a host clamp
at that instant.  Deferred and stale decisions come from ``ClampEngine.tick``
at the engine's own ``next_deadline``.  Driver time is the simulator's clock.

Not modelled: the shared frequency page (it changes what the guest reads,
not what the host decides).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from vhost_user_cpufreq.guest.driver import VIRTIO_F_VERSION_1, CpufreqDriver
from vhost_user_cpufreq.guest.transport import DriverTransport, GuestRam
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.memory import FlatMemory
from vhost_user_cpufreq.protocol.virtqueue import VIRTIO_RING_F_EVENT_IDX, DeviceQueue, ring_sizes
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

from ..policy.engine import ClampEngine, VcpuPlacement
from ..policy.ratelimit import KickBatcher
from .arms import Arm, ArmSettings

__all__ = ["RamTransport", "DeviceArm"]


class _Ram(GuestRam):
    def __init__(self, size: int = 1 << 20) -> None:
        self.buf = bytearray(size)
        self.memory = FlatMemory(self.buf, base=0)
        self._next = 0x1000

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > len(self.buf):
            raise MemoryError("simulated guest RAM exhausted")
        self._next = gpa + size
        return gpa


class RamTransport(DriverTransport):
    """A device in the same process: config from a DeviceConfig, the ring shared through a bytearray."""

    def __init__(self, config: abi.DeviceConfig, on_kick: Callable[[], None]) -> None:
        self.ram = _Ram()
        self.config_reads = 0
        self.notifications = 0
        self._config = config.encode()
        self._on_kick = on_kick
        self.features = 0
        self.device_queue: DeviceQueue | None = None

    async def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << abi.F_PERF_REQUEST | 1 << VIRTIO_RING_F_EVENT_IDX

    async def set_driver_features(self, features: int) -> None:
        self.features = features

    async def read_config(self, offset: int, size: int) -> bytes:
        self.config_reads += 1
        return self._config[offset:offset + size]

    async def setup_queue(self, index: int, size: int, *, event_idx: bool) -> DriverQueue:
        d, a, u = ring_sizes(size)
        mem = self.ram.memory
        desc, avail, used = (mem.view(self.ram.alloc(n, 4096), n) for n in (d, a, u))
        self.device_queue = DeviceQueue(size, desc, avail, used, mem, event_idx=event_idx)
        self.device_queue.enable_notifications()
        return DriverQueue(size, desc, avail, used, mem, event_idx=event_idx)

    def notify(self, index: int) -> None:
        self.notifications += 1
        self._on_kick()

    def set_config_callback(self, cb: Callable[[], None] | None) -> None:
        pass  # the simulated host never changes the config

    async def reset(self) -> None:
        pass


class DeviceArm(Arm):
    name = "device"

    def __init__(self, places: list[VcpuPlacement], settings: ArmSettings,
                 config: abi.DeviceConfig) -> None:
        super().__init__(places, settings)
        self.now = 0.0
        self.engine = ClampEngine(places, settings.limits, settings.engine)
        self.transport = RamTransport(config, self._kicked)
        self.driver = CpufreqDriver(
            self.transport, clock_ns=lambda: int(self.now * 1e9), util_threshold=settings.util_threshold,
            urgent_delta=settings.urgent_delta, lazy_deadline_ns=int(settings.lazy_deadline_s * 1e9),
            freq_page=False)
        self._drains: list[float] = []
        self.batcher = KickBatcher()
        self.polls = 0
        self._loop = asyncio.new_event_loop()
        self.records = 0
        self.rejected = 0

    def start(self, now: float) -> None:
        self.now = now
        self._loop.run_until_complete(self.driver.probe())

    def finish(self) -> None:
        self._loop.run_until_complete(self.driver.remove())
        self._loop.close()

    def _kicked(self) -> None:
        self._drains.append(self.now + self.settings.device_latency_s)

    def on_guest(self, vcpu: int, util: int, perf_khz: int, now: float) -> None:
        self.now = now
        self.driver.set_util(vcpu, util, perf_khz)
        self.requests += self.driver.flush()

    def on_tick(self, vcpu: int, now: float) -> None:
        self.now = now
        self.requests += self.driver.flush()

    def advance(self, now: float, until: float) -> list[tuple[float, int, int]]:
        out = self._out
        self._out = []
        while True:
            due = [t for t in self._drains if t < until]
            deadline = self.engine.next_deadline()
            t_next = min(due + ([deadline] if deadline is not None and deadline < until else []), default=None)
            if t_next is None:
                break
            t_next = max(t_next, now)
            if due and min(due) <= t_next:
                self._drains.remove(min(due))
                out += self._drain(t_next)
            else:
                # A hair past the deadline: changed_at + min_interval may round below it.
                t_next += 1e-9
                out += [(t_next, c.vcpu, c.uclamp_min) for c in self.engine.tick(t_next)]
        return out

    def _drain(self, t: float) -> list[tuple[float, int, int]]:
        q = self.transport.device_queue
        assert q is not None
        out: list[tuple[float, int, int]] = []
        n = len(self.places)
        buffers = 0
        while True:
            chain = q.pop()
            while chain is not None:
                buffers += 1
                res = abi.decode_batch(chain.read_all(), num_vcpus=n, perf_request=True)
                self.rejected += len(res.rejected)
                for r in res.batch.records:
                    self.records += 1
                    out += [(t, c.vcpu, c.uclamp_min) for c in self.engine.on_record(r.vcpu, r.util, r.perf_khz, t)]
                q.push(chain.head, 0)
                chain = q.pop()
            q.publish()
            ahead = self.batcher.drained(t, buffers)
            buffers = 0
            if not q.set_avail_event(q.last_avail_idx + ahead - 1):
                break
        poll = self.batcher.next_poll(t)
        if poll is not None and poll <= t + 1e-9:
            poll += self.batcher.period  # t sat on the grid and rounding put it just below
        if poll is not None and poll not in self._drains:
            self.polls += 1
            self._drains.append(poll)
        return out

    def stats(self) -> dict[str, int]:
        s = self.driver.stats
        return {"requests": self.records, "kicks": s.kicks, "polls": self.polls, "batches": s.batches, "rejected": self.rejected}
