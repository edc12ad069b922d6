"""A vhost-user front-end in Python: QEMU's role, for tests, the demo and benchmarks.

Guest RAM is a memfd mapped here and shared with the back-end through
SET_MEM_TABLE (several regions, like QEMU's), rings live in that RAM, kicks
and calls are real eventfds, and the back-end channel is a socketpair whose
far end is passed with SET_BACKEND_REQ_FD.  The message sequence follows what
QEMU sends for ``vhost-user-test-device-pci`` (see docs/qemu-facts.md).

:class:`InProcessTransport` adapts it to the driver model's
:class:`~vhost_user_cpufreq.guest.transport.DriverTransport`, so the same
driver model runs here and over qtest against a real QEMU.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, Literal

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import LocalProtocolError
from vhost_user_cpufreq.protocol.memory import FlatMemory
from vhost_user_cpufreq.protocol.virtqueue import ring_sizes
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

from .driver import CpufreqDriver
from .scm import recv_with_fds, send_with_fds
from .transport import DriverTransport, GuestRam

__all__ = ["VhostUserFrontend", "InProcessTransport", "MemfdRam", "ModelledGuest", "connect_guest"]

F = vu.FrontendRequest
PF = vu.ProtocolFeature

#: Front-end virtual addresses we claim for guest RAM: any value works, the
#: back-end only uses them to translate ring addresses.
_UVA_BASE = 0x7F00_0000_0000


class MemfdRam(GuestRam):
    """Guest RAM: one memfd, presented to the back-end as ``regions`` slices."""

    def __init__(self, size: int = 16 << 20, *, regions: int = 2) -> None:
        if size % (regions * mmap.PAGESIZE):
            raise ValueError("size must split into page-aligned regions")
        self.size = size
        self.fd = os.memfd_create("vuc-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        self.memory = FlatMemory(memoryview(self._map), base=0)
        step = size // regions
        # (gpa, size, uva, mmap_offset); a hole between the front-end
        # addresses of regions catches translation that assumes contiguity.
        self.regions = [(i * step, step, _UVA_BASE + i * (step + (1 << 30)), i * step) for i in range(regions)]
        self._next = 0x1000  # bump allocator; page 0 left unused

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        # Keep every allocation inside one region, as a ring must be.
        step = self.regions[0][1]
        if gpa // step != (gpa + size - 1) // step:
            gpa = (gpa // step + 1) * step
        if gpa + size > self.size:
            raise MemoryError("guest RAM exhausted")
        self._next = gpa + size
        return gpa

    def uva(self, gpa: int) -> int:
        for g, size, u, _ in self.regions:
            if g <= gpa < g + size:
                return u + (gpa - g)
        raise ValueError(f"{gpa:#x} not in guest RAM")

    def close(self) -> None:
        self.memory = FlatMemory(bytearray(0))
        try:
            self._map.close()
        except BufferError:
            pass
        os.close(self.fd)


@dataclass
class _Ring:
    size: int
    desc: int
    avail: int
    used: int
    kick: int
    call: int


class VhostUserFrontend:
    """Speaks vhost-user to a back-end over a unix socket (asyncio)."""

    def __init__(self, ram: MemfdRam | None = None, *,
                 shmem: Literal["map", "refuse", "garbage", "no-channel", "off"] = "map") -> None:
        self.ram = ram or MemfdRam()
        # Shared memory regions: "map" like QEMU 11.1; "refuse" acks maps with 1; "garbage" answers
        # with junk; "no-channel" negotiates BACKEND_REQ but never sends the channel; "off": no SHMEM.
        self.shmem_mode = shmem
        self.shmem_sizes: tuple[int, ...] = ()
        self.shm: dict[int, mmap.mmap] = {}
        self.sock: socket.socket | None = None
        self._reader = vu.MessageReader("backend")
        self._channel: socket.socket | None = None
        self._channel_reader = vu.MessageReader("backend")
        self._lock = asyncio.Lock()
        self.features = 0
        self.protocol_features = 0
        self.rings: dict[int, _Ring] = {}
        self.config_change_msgs = 0
        self.on_config_change: Callable[[], None] | None = None
        self.backend_messages: list[vu.Message] = []

    # -- connection ---------------------------------------------------------------------
    async def connect(self, path: str, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, path), timeout)
        self.sock = sock

    async def request(
        self, req: F, payload: vu.Payload | None = None, fds: tuple[int, ...] = (), *, need_reply: bool = False
    ) -> vu.Message | None:
        """Send one request; wait for its reply when one is due."""
        assert self.sock is not None, "not connected"
        ack = need_reply and bool(self.protocol_features & PF.REPLY_ACK.mask)
        async with self._lock:
            send_with_fds(self.sock, vu.encode_message(req, payload, need_reply=ack), fds)
            if not (vu.expects_reply(req, self.protocol_features) or ack):
                return None
            return await self._read_reply(req)

    async def _read_reply(self, req: F) -> vu.Message:
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while True:
            msg = self._reader.next_message(expect_reply_to=req)
            if isinstance(msg, vu.Message):
                return msg
            data = await loop.sock_recv(self.sock, 4096)
            if not data:
                raise ConnectionError("back-end closed the connection")
            self._reader.receive_data(data)

    async def handshake(self) -> None:
        """What QEMU does when the device is created: features, owner, memory-slot limits."""
        r = await self.request(F.GET_FEATURES)
        assert r is not None
        self.offered_features = r.payload.value  # type: ignore[union-attr]
        r = await self.request(F.GET_PROTOCOL_FEATURES)
        assert r is not None
        wanted = (PF.MQ.mask | PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask
                  | PF.RESET_DEVICE.mask | PF.CONFIGURE_MEM_SLOTS.mask | PF.STATUS.mask)
        if self.shmem_mode != "off":
            wanted |= PF.SHMEM.mask
        self.protocol_features = r.payload.value & wanted  # type: ignore[union-attr]
        await self.request(F.SET_PROTOCOL_FEATURES, vu.U64(self.protocol_features))
        r = await self.request(F.GET_QUEUE_NUM)
        self.num_queues = r.payload.value if r else 1  # type: ignore[union-attr]
        if self.protocol_features & PF.CONFIGURE_MEM_SLOTS.mask:
            await self.request(F.GET_MAX_MEM_SLOTS)
        if self.protocol_features & PF.BACKEND_REQ.mask and self.shmem_mode != "no-channel":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            self._channel = ours
            await self.request(F.SET_BACKEND_REQ_FD, None, (theirs.fileno(),), need_reply=True)
            theirs.close()
            asyncio.get_running_loop().add_reader(ours.fileno(), self._channel_readable)
        await self.request(F.SET_OWNER)
        if self.protocol_features & PF.SHMEM.mask:
            r = await self.request(F.GET_SHMEM_CONFIG)
            assert r is not None and isinstance(r.payload, vu.ShmemConfig)
            self.shmem_sizes = r.payload.memory_sizes[:r.payload.nregions]

    def _map_shmem(self, msg: vu.Message) -> int:
        """A SHMEM_MAP from the back-end: map its fd as region ``shmid``; the ack's status."""
        m = msg.payload
        assert isinstance(m, vu.ShmemMap)
        try:
            if (self.shmem_mode == "refuse" or m.shmid >= len(self.shmem_sizes) or m.shmid in self.shm
                    or m.shm_offset != 0 or m.length != self.shmem_sizes[m.shmid]):
                return 1
            self.shm[m.shmid] = mmap.mmap(msg.fds[0], m.length, offset=m.fd_offset)
            return 0
        finally:
            for fd in msg.fds:
                os.close(fd)

    def _channel_readable(self) -> None:
        assert self._channel is not None
        try:
            data, fds = recv_with_fds(self._channel)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        self._channel_reader.receive_data(data, fds)
        if not data:
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
        while True:
            msg = self._channel_reader.next_message()
            if not isinstance(msg, vu.Message):
                break
            self.backend_messages.append(msg)
            if msg.request == vu.BackendRequest.CONFIG_CHANGE_MSG:
                self.config_change_msgs += 1
                if self.on_config_change is not None:
                    self.on_config_change()
            status = 0
            if msg.request == vu.BackendRequest.SHMEM_MAP:
                status = self._map_shmem(msg)
            if msg.need_reply and self.shmem_mode == "garbage" and msg.request == vu.BackendRequest.SHMEM_MAP:
                send_with_fds(self._channel, struct.pack("<III", 99, 1, 0))  # a request, not an ack
            elif msg.need_reply:
                send_with_fds(self._channel, vu.encode_reply(msg.request, vu.U64(status)))

    async def set_mem_table(self) -> None:
        regions = tuple(vu.MemoryRegion(g, s, u, o) for g, s, u, o in self.ram.regions)
        await self.request(F.SET_MEM_TABLE, vu.MemoryTable(regions), (self.ram.fd,) * len(regions), need_reply=True)

    async def start_ring(self, index: int, size: int, *, base: int = 0, features: int | None = None) -> _Ring:
        """Allocate a ring in guest RAM and start it, in QEMU's order (vhost_virtqueue_start)."""
        d, a, u = ring_sizes(size)
        ring = self.rings.get(index)
        if ring is None or ring.size != size:
            ring = _Ring(size, self.ram.alloc(d, 16), self.ram.alloc(a, 2), self.ram.alloc(u, 4),
                         os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                         os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.rings[index] = ring
        await self.request(F.SET_VRING_NUM, vu.VringState(index, size))
        await self.request(F.SET_VRING_BASE, vu.VringState(index, base))
        await self.request(F.SET_VRING_ADDR, vu.VringAddr(
            index, 0, self.ram.uva(ring.desc), self.ram.uva(ring.used), self.ram.uva(ring.avail), 0))
        await self.request(F.SET_VRING_KICK, vu.U64(index), (ring.kick,))
        await self.request(F.SET_VRING_CALL, vu.U64(index), (ring.call,))
        if self.features & (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES):
            await self.request(F.SET_VRING_ENABLE, vu.VringState(index, 1))
        return ring

    async def stop_ring(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and tells the next avail index."""
        r = await self.request(F.GET_VRING_BASE, vu.VringState(index, 0))
        assert r is not None
        return r.payload.num  # type: ignore[union-attr]

    async def set_features(self, features: int) -> None:
        self.features = features
        await self.request(F.SET_FEATURES, vu.U64(features))

    async def get_config(self, offset: int, size: int) -> bytes:
        r = await self.request(F.GET_CONFIG, vu.ConfigSpace(offset, size, 0, bytes(size)))
        assert r is not None
        return r.payload.payload  # type: ignore[union-attr]

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick, 1)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._channel is not None:
            try:
                loop.remove_reader(self._channel.fileno())
            except (ValueError, OSError):
                pass
            self._channel.close()
            self._channel = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for ring in self.rings.values():
            os.close(ring.kick)
            os.close(ring.call)
        self.rings.clear()
        for region in self.shm.values():
            region.close()
        self.shm.clear()


class InProcessTransport(DriverTransport):
    """The driver model's view of a device reached through :class:`VhostUserFrontend`."""

    ram: MemfdRam  # the front-end's own RAM: its owner closes it

    def __init__(self, frontend: VhostUserFrontend) -> None:
        self.fe = frontend
        self.ram = frontend.ram
        self.config_reads = 0
        self.notifications = 0
        self._config_cb: Callable[[], None] | None = None
        frontend.on_config_change = self._config_changed

    def _config_changed(self) -> None:
        if self._config_cb is not None:
            self._config_cb()

    def set_config_callback(self, cb: Callable[[], None] | None) -> None:
        self._config_cb = cb

    async def device_features(self) -> int:
        r = await self.fe.request(F.GET_FEATURES)
        assert r is not None
        return r.payload.value & ~(1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)  # type: ignore[union-attr]

    async def set_driver_features(self, features: int) -> None:
        await self.fe.set_features(features | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES)

    async def read_config(self, offset: int, size: int) -> bytes:
        self.config_reads += 1
        return await self.fe.get_config(offset, size)

    async def setup_queue(self, index: int, size: int, *, event_idx: bool) -> DriverQueue:
        if not self.fe.sock:
            raise LocalProtocolError("not-connected", "front-end is not connected")
        await self.fe.set_mem_table()
        ring = await self.fe.start_ring(index, size)
        d, a, u = ring_sizes(size)
        mem = self.ram.memory
        return DriverQueue(size, mem.view(ring.desc, d), mem.view(ring.avail, a), mem.view(ring.used, u), mem,
                           event_idx=event_idx)

    def notify(self, index: int) -> None:
        self.notifications += 1
        self.fe.kick(index)

    async def reset(self) -> None:
        await self.fe.request(F.RESET_DEVICE, need_reply=True)

    def shm_length(self, shmid: int) -> int | None:
        # The region exists once the back-end described it; it holds memory once mapped.
        return self.fe.shmem_sizes[shmid] if shmid < len(self.fe.shmem_sizes) else None

    async def shm_read32(self, shmid: int, offset: int) -> int:
        region = self.fe.shm.get(shmid)
        if region is None:
            return 0  # nothing mapped: reads as zeros, as QEMU's BAR does
        (value,) = struct.unpack_from("<I", region, offset)
        return int(value)


@dataclass
class ModelledGuest:
    """A guest driver model attached to a back-end through this front-end."""

    fe: VhostUserFrontend
    transport: InProcessTransport
    driver: CpufreqDriver

    async def close(self) -> None:
        await self.driver.remove()
        await self.fe.close()
        self.transport.ram.close()


async def connect_guest(sock: str, *, ram: MemfdRam | None = None, timeout: float = 5.0,
                        shmem: Literal["map", "refuse", "garbage", "no-channel", "off"] = "map",
                        **driver_kw: object) -> ModelledGuest:
    """Connect to the back-end at ``sock``, do QEMU's handshake, and probe the driver model."""
    fe = VhostUserFrontend(ram, shmem=shmem)
    await fe.connect(sock, timeout=timeout)
    await fe.handshake()
    t = InProcessTransport(fe)
    d = CpufreqDriver(t, **driver_kw)  # type: ignore[arg-type]
    await d.probe()
    return ModelledGuest(fe, t, d)
