"""The guest driver model over a real QEMU: virtio-pci through QEMU's ``-qtest``.

Theory of operation
-------------------
QEMU started with ``-qtest unix:PATH`` runs no guest code on its own; a test
program plays the guest CPU instead, over a line protocol on that socket:
``outl 0xcf8 0x80000800`` / ``inl 0xcfc`` reach PCI configuration space,
``readl ADDR`` / ``writew ADDR VAL`` reach device registers (MMIO), and every
command is answered by one ``OK [VALUE]`` (or ``FAIL``/``ERR``) line, in
order.  ``irq_intercept_in ioapic`` makes QEMU report the interrupt lines that
reach the I/O APIC as asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines,
interleaved with the replies.  :class:`~.qtest_client.QtestClient`
(``qtest_client.py``) speaks that protocol.

:class:`QtestTransport` is a virtio 1.x PCI *modern* driver for one device,
written from the virtio specification ("Virtio Over PCI Bus"):

* it finds the function with vendor 0x1af4 and device ``0x1040 + id`` on bus
  0, walks its capability list for the vendor-specific virtio capabilities
  (common config, notify with ``notify_off_multiplier``, ISR, device config),
  sizes and assigns the BARs those capabilities point into (64-bit BARs
  included) and enables memory decoding and bus mastering;
* it then runs the driver initialisation sequence: reset, ACKNOWLEDGE|DRIVER,
  features (both 32-bit halves), FEATURES_OK (checked), queue set-up, DRIVER_OK;
* ``notify(index)`` writes the queue index to that queue's notify address;
* ``read_config`` reads the device-specific config window 4 bytes at a time.
  For QEMU's ``vhost-user-test-device`` every one of those guest accesses is
  a full ``GET_CONFIG`` round trip to the back-end; ``config_reads`` counts
  them.

Guest RAM is not accessed through qtest at all: QEMU is started with its RAM
in a shared file (or memfd) that this process maps too (``shared_ram.py``),
so the driver model's rings and buffers are plain memory here, exactly as the
back-end sees them.

Interrupts.  The device has MSI-X, but MSI messages are memory writes qtest
cannot report; the driver leaves MSI-X disabled, so the device signals with
legacy INTx, which the chipset routes to an I/O APIC input, which qtest
reports (``interrupts="intx"``, the default).  On q35 PCI INTx arrives on
I/O APIC inputs 16-23 (PIRQA-H; ``intx_lines``), while 0-15 carry ISA
devices (the PIT toggles input 0 every 27 ms even in an idle VM).  On each
``IRQ raise`` of a PCI line the transport reads the ISR register (which
acknowledges it and lowers the line):
bit 0 is a used-buffer interrupt, bit 1 a configuration change, for which
the config callback fires.  ``interrupts="poll"`` is a fallback that reads the
ISR every ``poll_interval`` instead; that polling is a test-harness artefact
(a real guest gets an interrupt), and so is reading the ISR here at all for
a device with MSI-X.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from vhost_user_cpufreq.protocol.cpufreq import DEFAULT_DEVICE_ID
from vhost_user_cpufreq.protocol.errors import LocalProtocolError
from vhost_user_cpufreq.protocol.virtqueue import ring_sizes
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

from .qtest_client import QtestClient, QtestError
from .shared_ram import SharedRam
from .transport import DriverTransport

__all__ = [
    "PciFunction",
    "VirtioCap",
    "QtestTransport",
    "VIRTIO_PCI_VENDOR",
    "VIRTIO_PCI_MODERN_BASE",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FEATURES_OK",
    "STATUS_FAILED",
]

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040  # modern device id = 0x1040 + virtio device id

# Device status bits (virtio 1.x, 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_FAILED = 0x80

# PCI configuration space
_PCI_VENDOR = 0x00
_PCI_COMMAND = 0x04
_PCI_STATUS = 0x06
_PCI_HEADER_TYPE = 0x0E
_PCI_BAR0 = 0x10
_PCI_CAP_PTR = 0x34
_PCI_INTERRUPT_PIN = 0x3D
_CMD_MEMORY = 1 << 1
_CMD_MASTER = 1 << 2
_CMD_INTX_DISABLE = 1 << 10
_STATUS_CAP_LIST = 1 << 4
_CAP_VENDOR = 0x09
_CAP_MSIX = 0x11

# virtio_pci_cap.cfg_type
CAP_COMMON = 1
CAP_NOTIFY = 2
CAP_ISR = 3
CAP_DEVICE = 4
CAP_PCI_CFG = 5
CAP_SHARED_MEMORY = 8  # virtio 1.2 4.1.4.7: a shared memory region (64-bit offset and length)

# struct virtio_pci_common_cfg (virtio 1.x, 4.1.4.3)
_DEVICE_FEATURE_SELECT = 0x00
_DEVICE_FEATURE = 0x04
_DRIVER_FEATURE_SELECT = 0x08
_DRIVER_FEATURE = 0x0C
_CONFIG_MSIX_VECTOR = 0x10
_NUM_QUEUES = 0x12
_DEVICE_STATUS = 0x14
_CONFIG_GENERATION = 0x15
_QUEUE_SELECT = 0x16
_QUEUE_SIZE = 0x18
_QUEUE_MSIX_VECTOR = 0x1A
_QUEUE_ENABLE = 0x1C
_QUEUE_NOTIFY_OFF = 0x1E
_QUEUE_DESC = 0x20
_QUEUE_DRIVER = 0x28
_QUEUE_DEVICE = 0x30
_NO_VECTOR = 0xFFFF

ISR_QUEUE = 1 << 0
ISR_CONFIG = 1 << 1


# -- PCI ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int  # where the capability sits in PCI config space
    notify_off_multiplier: int = 0
    id: int = 0  # the region id (shmid) of a shared memory capability


@dataclass(slots=True)
class PciFunction:
    bus: int
    dev: int
    fn: int
    vendor: int
    device: int
    bars: dict[int, int] = field(default_factory=dict)  # BAR index -> assigned address
    bar_sizes: dict[int, int] = field(default_factory=dict)
    caps: list[VirtioCap] = field(default_factory=list)
    msix_cap: int | None = None
    interrupt_pin: int = 0

    @property
    def bdf(self) -> str:
        return f"{self.bus:02x}:{self.dev:02x}.{self.fn}"


class _PciConfig:
    """PCI configuration mechanism #1 (ports 0xcf8/0xcfc) through qtest."""

    def __init__(self, qt: QtestClient) -> None:
        self.qt = qt

    @staticmethod
    def _address(bus: int, dev: int, fn: int, reg: int) -> int:
        return 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)

    async def read(self, bus: int, dev: int, fn: int, reg: int, size: int = 4) -> int:
        qt = self.qt
        qt.send_nowait(f"outl 0xcf8 {self._address(bus, dev, fn, reg):#x}")
        port = 0xCFC + (reg & 3)
        return await {1: qt.inb, 2: qt.inw, 4: qt.inl}[size](port)

    async def write(self, bus: int, dev: int, fn: int, reg: int, value: int, size: int = 4) -> None:
        qt = self.qt
        qt.send_nowait(f"outl 0xcf8 {self._address(bus, dev, fn, reg):#x}")
        port = 0xCFC + (reg & 3)
        await {1: qt.outb, 2: qt.outw, 4: qt.outl}[size](port, value)


# -- the transport -------------------------------------------------------------------------------


class QtestTransport(DriverTransport):
    """A virtio-pci modern driver for one device of a QEMU driven through qtest.

    Use :meth:`open`; then hand it to :class:`~vhost_user_cpufreq.guest.driver.CpufreqDriver`.
    """

    ram: SharedRam  # the RAM QEMU maps: rings are zeroed through it before QEMU may look

    def __init__(
        self,
        qtest: QtestClient,
        ram: SharedRam,
        *,
        device_id: int = DEFAULT_DEVICE_ID,
        interrupts: Literal["intx", "poll"] = "intx",
        poll_interval: float = 0.02,
        mmio_base: int = 0xC000_0000,
        intx_lines: Iterable[int] = range(16, 24),
    ) -> None:
        self.qt = qtest
        self.ram = ram
        self.device_id = device_id
        self.interrupts = interrupts
        self.poll_interval = poll_interval
        self.mmio_base = mmio_base
        self.config_reads = 0
        self.notifications = 0
        #: interrupts seen (INTx raises, or poll rounds that found ISR bits)
        self.irqs = 0
        self.queue_interrupts = 0
        #: configuration changes seen in the ISR (bit 1)
        self.config_changes = 0
        #: every non-zero ISR value read, in order
        self.isr_log: list[int] = []
        self.pci: PciFunction | None = None
        self.offered_features = 0
        self.driver_features = 0
        self.num_queues = 0
        self._common = self._isr = self._device = self._notify = 0
        self._notify_mult = 0
        self._device_len = 0
        self._queue_notify: dict[int, int] = {}
        self._shm: dict[int, tuple[int, int]] = {}  # shmid -> (guest-physical address, length)
        #: 32-bit loads from shared memory regions (each a plain memory read for a real guest)
        self.shm_reads = 0
        self._config_cb: Callable[[], None] | None = None
        self._changed = asyncio.Event()  # replaced after each change; waiters hold the old one
        self._irq_event = asyncio.Event()
        self.intx_lines = frozenset(intx_lines)
        self._waiters = 0
        self._service: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, qtest: QtestClient, ram: SharedRam, **kw: object) -> "QtestTransport":
        """Find and set up the device, reset it and leave it at ACKNOWLEDGE|DRIVER."""
        t = cls(qtest, ram, **kw)  # type: ignore[arg-type]
        await t._discover()
        if t.interrupts == "intx":
            qtest.on_irq = t._on_irq
            await qtest.irq_intercept_in("ioapic")
        t._service = asyncio.get_running_loop().create_task(t._interrupt_service(), name="qtest-isr")
        await t._begin()
        return t

    async def close(self) -> None:
        self._closed = True
        if self.qt.on_irq == self._on_irq:
            self.qt.on_irq = None
        if self._service is not None:
            self._service.cancel()
            try:
                await self._service
            except (asyncio.CancelledError, QtestError):
                pass
            self._service = None

    # -- discovery ------------------------------------------------------------------------------
    async def _discover(self) -> None:
        cfg = _PciConfig(self.qt)
        want = VIRTIO_PCI_MODERN_BASE + self.device_id
        found: PciFunction | None = None
        seen = []
        for dev in range(32):
            for fn in range(8):
                ids = await cfg.read(0, dev, fn, _PCI_VENDOR)
                vendor, device = ids & 0xFFFF, ids >> 16
                if vendor == 0xFFFF:
                    if fn == 0:
                        break
                    continue
                seen.append(f"00:{dev:02x}.{fn} {vendor:04x}:{device:04x}")
                if vendor == VIRTIO_PCI_VENDOR and device == want and found is None:
                    found = PciFunction(0, dev, fn, vendor, device)
                if fn == 0 and not (await cfg.read(0, dev, 0, _PCI_HEADER_TYPE, 1)) & 0x80:
                    break  # single-function device
        if found is None:
            raise LocalProtocolError("no-device", f"no PCI function {VIRTIO_PCI_VENDOR:04x}:{want:04x} on bus 0 "
                                                  f"(found {', '.join(seen) or 'nothing'})")
        f = found
        b, d, fn = f.bus, f.dev, f.fn
        # Decoding off while the BARs are sized and moved.
        command = await cfg.read(b, d, fn, _PCI_COMMAND, 2)
        await cfg.write(b, d, fn, _PCI_COMMAND, command & ~(_CMD_MEMORY | _CMD_MASTER), 2)
        # Capabilities.
        if not (await cfg.read(b, d, fn, _PCI_STATUS, 2)) & _STATUS_CAP_LIST:
            raise LocalProtocolError("no-capabilities", f"{f.bdf} has no capability list")
        ptr = (await cfg.read(b, d, fn, _PCI_CAP_PTR, 1)) & 0xFC
        hops = 0
        while ptr and hops < 48:
            hops += 1
            head = await cfg.read(b, d, fn, ptr, 4)
            cap_id, nxt = head & 0xFF, (head >> 8) & 0xFC
            if cap_id == _CAP_VENDOR:
                cfg_type, cap_len = head >> 24, (head >> 16) & 0xFF
                word = await cfg.read(b, d, fn, ptr + 4, 4)
                bar, region_id = word & 0xFF, (word >> 8) & 0xFF
                offset = await cfg.read(b, d, fn, ptr + 8, 4)
                length = await cfg.read(b, d, fn, ptr + 12, 4)
                mult = await cfg.read(b, d, fn, ptr + 16, 4) if cfg_type == CAP_NOTIFY else 0
                if cfg_type == CAP_SHARED_MEMORY and cap_len >= 24:  # struct virtio_pci_cap64
                    offset |= (await cfg.read(b, d, fn, ptr + 16, 4)) << 32
                    length |= (await cfg.read(b, d, fn, ptr + 20, 4)) << 32
                f.caps.append(VirtioCap(cfg_type, bar, offset, length, ptr, mult, region_id))
            elif cap_id == _CAP_MSIX:
                f.msix_cap = ptr
            ptr = nxt
        f.interrupt_pin = await cfg.read(b, d, fn, _PCI_INTERRUPT_PIN, 1)
        # The first capability of each type whose BAR is a memory BAR (virtio 4.1.4: the
        # driver uses the first one it can); PCI_CFG is an access window, not needed here.
        chosen: dict[int, VirtioCap] = {}
        for cap in f.caps:
            if cap.cfg_type in (CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE) and cap.bar <= 5:
                chosen.setdefault(cap.cfg_type, cap)
        for t, name in ((CAP_COMMON, "common"), (CAP_NOTIFY, "notify"), (CAP_ISR, "ISR"), (CAP_DEVICE, "device")):
            if t not in chosen:
                raise LocalProtocolError("no-virtio-cap", f"{f.bdf} lacks the virtio {name} capability")
        # Size and assign every BAR (all of them, so nothing decodes at a stale address).
        addr = self.mmio_base
        i = 0
        while i < 6:
            reg = _PCI_BAR0 + 4 * i
            orig = await cfg.read(b, d, fn, reg)
            if orig & 1:  # I/O BAR: not used by virtio modern; leave it unassigned
                i += 1
                continue
            is64 = (orig >> 1) & 3 == 2
            await cfg.write(b, d, fn, reg, 0xFFFF_FFFF)
            lo = await cfg.read(b, d, fn, reg)
            hi = 0
            if is64:
                await cfg.write(b, d, fn, reg + 4, 0xFFFF_FFFF)
                hi = await cfg.read(b, d, fn, reg + 4)
            if (hi << 32 | lo) & ~0xF == 0:  # BAR not implemented
                await cfg.write(b, d, fn, reg, orig)
                i += 2 if is64 else 1
                continue
            # The writable address bits read back as ones; the size is the lowest one.
            mask = (hi << 32 | (lo & ~0xF)) if is64 else (lo & ~0xF) | 0xFFFF_FFFF_0000_0000
            size = (~mask & 0xFFFF_FFFF_FFFF_FFFF) + 1
            base = (addr + size - 1) & ~(size - 1)
            addr = base + size
            if addr > 0xFEC0_0000:
                raise LocalProtocolError("mmio-exhausted", f"BAR{i} of {size:#x} bytes does not fit below the IOAPIC")
            await cfg.write(b, d, fn, reg, (base & 0xFFFF_FFF0) | (orig & 0xF))
            if is64:
                await cfg.write(b, d, fn, reg + 4, base >> 32)
            f.bars[i] = base
            f.bar_sizes[i] = size
            i += 2 if is64 else 1
        await cfg.write(b, d, fn, _PCI_COMMAND, (command | _CMD_MEMORY | _CMD_MASTER) & ~_CMD_INTX_DISABLE, 2)

        def where(cap: VirtioCap, min_len: int) -> int:
            if cap.bar not in f.bars:
                raise LocalProtocolError("bad-virtio-cap", f"capability at {cap.cap_offset:#x} points to BAR{cap.bar}, "
                                                           "which is not a memory BAR")
            if cap.length < min_len or cap.offset + cap.length > f.bar_sizes[cap.bar]:
                raise LocalProtocolError("bad-virtio-cap", f"capability at {cap.cap_offset:#x} does not fit BAR{cap.bar}")
            return f.bars[cap.bar] + cap.offset

        self._common = where(chosen[CAP_COMMON], 0x38)
        self._isr = where(chosen[CAP_ISR], 1)
        self._device = where(chosen[CAP_DEVICE], 4)
        self._device_len = chosen[CAP_DEVICE].length
        self._notify = where(chosen[CAP_NOTIFY], 2)
        self._notify_mult = chosen[CAP_NOTIFY].notify_off_multiplier
        self._notify_len = chosen[CAP_NOTIFY].length
        for cap in f.caps:
            if cap.cfg_type == CAP_SHARED_MEMORY and cap.id not in self._shm and cap.length:
                self._shm[cap.id] = (where(cap, cap.length), cap.length)
        self.pci = f
        log.debug("virtio device %04x:%04x at %s: bars %s", f.vendor, f.device, f.bdf,
                  {k: hex(v) for k, v in f.bars.items()})

    # -- shared memory regions ----------------------------------------------------------------------
    def shm_length(self, shmid: int) -> int | None:
        region = self._shm.get(shmid)
        return None if region is None else region[1]

    async def shm_read32(self, shmid: int, offset: int) -> int:
        addr, length = self._shm[shmid]
        if offset % 4 or not 0 <= offset <= length - 4:
            raise LocalProtocolError("bad-shm-offset", f"region {shmid}: offset {offset:#x} of {length:#x}")
        self.shm_reads += 1
        return await self.qt.mmio_read(addr + offset, 4)

    # -- register access --------------------------------------------------------------------------
    async def _r(self, off: int, size: int) -> int:
        return await self.qt.mmio_read(self._common + off, size)

    async def _w(self, off: int, size: int, value: int) -> None:
        await self.qt.mmio_write(self._common + off, size, value)

    async def status(self) -> int:
        return await self._r(_DEVICE_STATUS, 1)

    async def set_status(self, status: int) -> None:
        await self._w(_DEVICE_STATUS, 1, status)

    async def config_generation(self) -> int:
        """The transport's ``config_generation`` (common config); QEMU bumps it on each config change."""
        return await self._r(_CONFIG_GENERATION, 1)

    async def read_isr(self) -> int:
        """Read (and so acknowledge) the ISR; dispatches what it finds.  Test-harness use only."""
        isr = await self.qt.mmio_read(self._isr, 1)
        self._dispatch_isr(isr)
        return isr

    # -- initialisation ---------------------------------------------------------------------------
    async def _begin(self) -> None:
        """Reset, then ACKNOWLEDGE|DRIVER: the state a probe starts from."""
        await self._reset_device()
        await self.set_status(STATUS_ACKNOWLEDGE)
        await self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        # MSI-X stays disabled: no vectors, so the device uses INTx (see module doc).
        await self._w(_CONFIG_MSIX_VECTOR, 2, _NO_VECTOR)
        self.num_queues = await self._r(_NUM_QUEUES, 2)

    async def _reset_device(self, timeout: float = 5.0) -> None:
        await self.set_status(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # virtio 4.1.4.3.2: the driver waits until the status reads back 0.
        while await self.status() != 0:
            if loop.time() > deadline:
                raise LocalProtocolError("reset-timeout", "device status did not return to 0")
            await asyncio.sleep(0.001)
        self._queue_notify.clear()
        self.driver_features = 0

    async def device_features(self) -> int:
        if (await self.status()) & (STATUS_ACKNOWLEDGE | STATUS_DRIVER) != STATUS_ACKNOWLEDGE | STATUS_DRIVER:
            await self._begin()
        features = 0
        for half in (0, 1):
            await self._w(_DEVICE_FEATURE_SELECT, 4, half)
            features |= await self._r(_DEVICE_FEATURE, 4) << (32 * half)
        self.offered_features = features
        return features

    async def set_driver_features(self, features: int) -> None:
        for half in (0, 1):
            await self._w(_DRIVER_FEATURE_SELECT, 4, half)
            await self._w(_DRIVER_FEATURE, 4, (features >> (32 * half)) & 0xFFFF_FFFF)
        status = await self.status()
        await self.set_status(status | STATUS_FEATURES_OK)
        if not (await self.status()) & STATUS_FEATURES_OK:
            await self.set_status(status | STATUS_FAILED)
            raise LocalProtocolError("features-refused", f"device did not accept features {features:#x}")
        self.driver_features = features

    async def setup_queue(self, index: int, size: int, *, event_idx: bool) -> DriverQueue:
        """Allocate the rings in guest RAM, program and enable queue ``index``, then DRIVER_OK."""
        if not 0 <= index < self.num_queues:
            raise LocalProtocolError("bad-queue-index", f"queue {index}; the device has {self.num_queues}")
        await self._w(_QUEUE_SELECT, 2, index)
        max_size = await self._r(_QUEUE_SIZE, 2)
        if max_size == 0:
            raise LocalProtocolError("queue-unavailable", f"queue {index} is not available")
        if size > max_size:
            raise LocalProtocolError("bad-queue-size", f"queue {index}: {size} > device maximum {max_size}")
        d, a, u = ring_sizes(size)
        ram = self.ram
        desc, avail, used = ram.alloc(d, 16), ram.alloc(a, 2), ram.alloc(u, 4)
        for gpa, n in ((desc, d), (avail, a), (used, u)):
            ram.zero(gpa, n)
        mem = ram.memory
        # The constructor initialises the rings; it must run before the device may look.
        queue = DriverQueue(size, mem.view(desc, d), mem.view(avail, a), mem.view(used, u), mem, event_idx=event_idx)
        await self._w(_QUEUE_SIZE, 2, size)
        await self._w(_QUEUE_MSIX_VECTOR, 2, _NO_VECTOR)
        for off, gpa in ((_QUEUE_DESC, desc), (_QUEUE_DRIVER, avail), (_QUEUE_DEVICE, used)):
            await self._w(off, 4, gpa & 0xFFFF_FFFF)
            await self._w(off + 4, 4, gpa >> 32)
        notify_off = await self._r(_QUEUE_NOTIFY_OFF, 2)
        notify_at = notify_off * self._notify_mult
        if notify_at + 2 > self._notify_len:
            raise LocalProtocolError("bad-notify-offset", f"queue {index} notify offset {notify_at:#x} outside the cap")
        await self._w(_QUEUE_ENABLE, 2, 1)
        self._queue_notify[index] = self._notify + notify_at
        await self.set_status((await self.status()) | STATUS_DRIVER_OK)
        return queue

    def notify(self, index: int) -> None:
        """Write the queue index to its notify address (a posted MMIO write)."""
        self.notifications += 1
        self.qt.mmio_write_nowait(self._queue_notify[index], 2, index)

    async def read_config(self, offset: int, size: int) -> bytes:
        """Read device config with 32-bit accesses (each one a GET_CONFIG in QEMU's device)."""
        if offset < 0 or size < 0 or offset + size > self._device_len:
            raise LocalProtocolError("bad-config-range", f"[{offset}, +{size}) outside {self._device_len} bytes")
        start = offset & ~3
        end = (offset + size + 3) & ~3
        words = []
        for off in range(start, end, 4):
            self.config_reads += 1
            words.append(struct.pack("<I", await self.qt.mmio_read(self._device + off, 4)))
        data = b"".join(words)
        return data[offset - start : offset - start + size]

    def set_config_callback(self, cb: Callable[[], None] | None) -> None:
        self._config_cb = cb

    async def reset(self) -> None:
        """Device reset (status 0): QEMU stops the vhost-user rings."""
        await self._reset_device()

    # -- interrupts -------------------------------------------------------------------------------
    def _on_irq(self, line: int, raised: bool) -> None:
        # Called from the qtest reader: no commands may be awaited here.
        if raised and line in self.intx_lines:
            self._irq_event.set()

    async def _interrupt_service(self) -> None:
        while not self._closed:
            if self.interrupts == "intx":
                await self._irq_event.wait()
                self._irq_event.clear()
                self.irqs += 1
                await self.read_isr()
            else:
                await asyncio.sleep(self.poll_interval)
                if self._config_cb is not None or self._waiters:
                    if await self.read_isr():
                        self.irqs += 1

    def _dispatch_isr(self, isr: int) -> None:
        if not isr:
            return
        self.isr_log.append(isr)
        if isr & ISR_QUEUE:
            self.queue_interrupts += 1
        if isr & ISR_CONFIG:
            self.config_changes += 1
            self._changed.set()
            self._changed = asyncio.Event()
            if self._config_cb is not None:
                self._config_cb()

    async def wait_config_change(self, timeout: float = 5.0, *, since: int | None = None) -> int:
        """Wait until ``config_changes`` exceeds ``since`` (default: its value now); returns it.

        With ``interrupts="intx"`` this waits for the interrupt; with "poll" the
        service task reads the ISR every ``poll_interval`` while someone waits
        (a test-harness artefact: a real guest is interrupted).
        """
        base = self.config_changes if since is None else since

        async def wait() -> None:
            while self.config_changes <= base:
                await self._changed.wait()

        self._waiters += 1
        try:
            await asyncio.wait_for(wait(), timeout)
        finally:
            self._waiters -= 1
        return self.config_changes
