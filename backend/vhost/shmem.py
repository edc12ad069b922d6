"""The shell's half of vhost-user shared memory regions (the rules are protocol/shmem.py).

Theory of operation: on ``MapShmem`` the session asks this object to make
the region's memory (a memfd, sealed against resizing, mapped here), lets
the device fill it, and sends ``SHMEM_MAP`` with the fd and NEED_REPLY on the
back-end channel; the channel's acks arrive on the event loop.  A zero ack
puts the region in use (the device is told); a non-zero ack, a malformed or
unexpected reply, or a channel that cannot take the message leaves the device
on configuration space, counted by reason.  ``ShmemDropped`` and the end of
the session take the region away from the device; the device then clears the
page's LIVE flag in its own mapping, which a front-end that still maps the
page (QEMU after a disconnect) keeps showing.

The page is never read here: the guest can write it (QEMU maps it writable
whatever the map flags say).  (One exception, after a crash: :func:`page_counts`.)

Across a handover or a crash (vhost/handover.py) :meth:`SharedRegions.describe`
writes the regions down with their memfds, and :meth:`SharedRegions.restore`
maps the same memfds in the new process: the front-end's mapping is of the
same file, so nothing is sent again and the guest sees the same page go on
being written.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import socket
from dataclasses import dataclass
from typing import Callable, Protocol

from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol.errors import ProtocolError
from vhost_user_cpufreq.protocol.shmem import AckReader
from vhost_user_cpufreq.protocol.shmem_snapshot import ShmemPageRef, ShmemSnapshot
from vhost_user_cpufreq.protocol.snapshot_codec import SnapshotError

from ..counters import Counters

__all__ = ["SharedRegions", "ShmemDevice", "SharedPage", "page_counts"]

#: Map flags we send: read (the guest only reads; QEMU 11.1.3 maps it writable anyway).
MAP_READ = 1
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ShmemDevice(Protocol):
    """What a device with shared memory regions implements (besides VirtioDevice)."""

    def shmem_attach(self, shmid: int, view: memoryview) -> None:
        """Region ``shmid`` has memory: fill it (it is not visible to the guest yet)."""
        ...

    def shmem_in_use(self, shmid: int, in_use: bool) -> None:
        """The front-end mapped the region (True), or the region left the guest's view (False)."""
        ...

    def shmem_detach(self, shmid: int) -> None:
        """The region's memory goes away: mark it stale, stop writing it."""
        ...

    def shmem_resume(self, shmid: int, view: memoryview) -> None:
        """Region ``shmid``'s memory as a predecessor left it (the guest may see it): go on writing it.

        :raise SnapshotError: the device's state for the region was not carried.
        """
        ...


@dataclass(slots=True)
class SharedPage:
    """One region's memory: a sealed memfd and our mapping of it."""

    fd: int
    map: mmap.mmap

    @classmethod
    def create(cls, name: str, size: int) -> "SharedPage":
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # Nobody may shrink it under a mapping (SIGBUS) or grow it; write seals would
            # make QEMU refuse it (it maps shared and writable).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, mmap.mmap(fd, size))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, size: int) -> "SharedPage":
        """A predecessor's page: checked to be a memfd of ``size`` bytes that cannot shrink, then mapped."""
        st = os.fstat(fd)
        if st.st_size != size:
            raise SnapshotError("shmem-mismatch", f"the region's memfd has {st.st_size} bytes, {size} expected")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0  # not a memfd
        if seals & _SEALS != _SEALS:
            raise SnapshotError("shmem-not-sealed", "the region's fd is not our sealed memfd (it could shrink "
                                "under the mapping)")
        return cls(fd, mmap.mmap(fd, size))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedRegions:
    """A session's regions: their memory, the maps sent, the acks read."""

    def __init__(self, device: object, *, name: str, counters: Counters,
                 log: logging.LoggerAdapter[logging.Logger], add_reader: Callable[[int, Callable[[], None]], None],
                 remove_reader: Callable[[int], object]) -> None:
        self.device: ShmemDevice | None = device if hasattr(device, "shmem_attach") else None  # type: ignore[assignment]
        self.name = name
        self.counters = counters
        self.log = log
        self._add_reader = add_reader
        self._remove_reader = remove_reader
        self.pages: dict[int, SharedPage] = {}
        self.in_use: set[int] = set()
        self.acks = AckReader()
        self._pending: list[int] = []  # shmids whose map awaits its ack, in order
        self._channel: socket.socket | None = None
        self.broken: str | None = None  # why the channel is no longer used for regions
        #: called after an ack changed what is in use (the fd store's record follows it)
        self.changed: Callable[[], None] | None = None

    # -- effects ------------------------------------------------------------------------
    def map(self, channel: socket.socket | None, shmid: int, size: int) -> None:
        if self.device is None:
            raise AssertionError("MapShmem for a device without shared memory regions")
        if channel is None or self.broken is not None:
            self._fallback("no-backend-channel" if channel is None else self.broken or "")
            return
        self._watch(channel)
        page = self.pages.get(shmid)
        if page is None:
            page = self.pages[shmid] = SharedPage.create(f"vhost-user-cpufreq:{self.name}:{shmid}", size)
            self.device.shmem_attach(shmid, memoryview(page.map))
        msg = vu.encode_message(vu.BackendRequest.SHMEM_MAP, vu.ShmemMap(shmid, 0, 0, size, MAP_READ),
                                need_reply=True)
        try:
            # MSG_DONTWAIT: O_NONBLOCK lives in the file description the front-end shares.
            channel.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [page.fd]))],
                           socket.MSG_DONTWAIT)
        except OSError as exc:
            self._fallback(f"send-{type(exc).__name__}")
            return
        self.acks.expect(vu.BackendRequest.SHMEM_MAP)
        self._pending.append(shmid)
        self.counters.inc("shmem_maps_sent")

    def dropped(self) -> None:
        """The front-end dropped every mapping (its device stopped): they are out of the guest's view."""
        for shmid in sorted(self.in_use):
            assert self.device is not None
            self.device.shmem_in_use(shmid, False)
        self.in_use.clear()
        self.counters.inc("shmem_dropped")

    def close(self) -> None:
        """The session ends: the device stops writing; our mappings and fds go."""
        self._unwatch()
        for shmid, page in sorted(self.pages.items()):
            assert self.device is not None
            if shmid in self.in_use:
                self.device.shmem_in_use(shmid, False)
            self.device.shmem_detach(shmid)
            page.close()
        self.pages.clear()
        self.in_use.clear()

    # -- across processes ---------------------------------------------------------------
    def describe(self, ref: Callable[[int], int], *, channel: bool, mapped: bool) -> ShmemSnapshot:
        """The regions as a snapshot section (with the rules' ``channel`` and ``mapped``); ``ref`` gives
        each memfd's index in the fd list."""
        pages = tuple(ShmemPageRef(shmid, len(page.map), ref(page.fd), shmid in self.in_use)
                      for shmid, page in sorted(self.pages.items()))
        pending = tuple(self._pending) if self.broken is None else ()
        return ShmemSnapshot(channel, mapped, pages, pending, bytes(self.acks.pending_bytes()), self.broken)

    def restore(self, snap: ShmemSnapshot, fds: list[int], channel: socket.socket | None,
                owned: set[int]) -> None:
        """Take the regions of a predecessor's session; each memfd taken joins ``owned``.

        :raise SnapshotError: a memfd is not what the snapshot says, or the device cannot resume it.
        """
        if snap.pages and self.device is None:
            raise SnapshotError("shmem-mismatch", "regions for a device without shared memory")
        for p in snap.pages:
            fd = fds[p.fd]
            page = SharedPage.adopt(fd, p.size)
            owned.add(fd)
            self.pages[p.shmid] = page
            assert self.device is not None
            view = memoryview(page.map)
            try:
                self.device.shmem_resume(p.shmid, view)
            except BaseException:
                view.release()  # the device did not keep it: the map must be closable
                raise
            if p.in_use:
                self.in_use.add(p.shmid)
                self.device.shmem_in_use(p.shmid, True)
        self.broken = snap.broken
        if snap.pending or snap.ack_buf:
            if channel is None:
                raise SnapshotError("inconsistent-shmem", "acks awaited without a back-end channel")
            for _ in snap.pending:
                self.acks.expect(vu.BackendRequest.SHMEM_MAP)
            self._pending = list(snap.pending)
            self.acks.restore_bytes(snap.ack_buf)
        if channel is not None and self.pages and self.broken is None:
            self._watch(channel)

    def channel_replaced(self) -> None:
        """The session closes the channel for another (only while nothing is mapped: the rules)."""
        self._unwatch()
        self._pending.clear()
        self.acks = AckReader()

    # -- the back-end channel's acks ---------------------------------------------------
    def _watch(self, channel: socket.socket) -> None:
        if self._channel is not channel:
            self._unwatch()
            self._channel = channel
            self._add_reader(channel.fileno(), self._readable)

    def _unwatch(self) -> None:
        if self._channel is not None:
            try:
                self._remove_reader(self._channel.fileno())
            except (ValueError, OSError):
                pass  # already closed by the session
            self._channel = None

    def _readable(self) -> None:
        ch = self._channel
        if ch is None:
            return
        try:
            data = ch.recv(256, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._broken(f"recv-{type(exc).__name__}", str(exc))
            return
        if not data:
            # The front-end let the channel go (it does so as it disconnects): nothing more to hear.
            self.log.debug("the front-end closed the back-end channel")
            self.broken = "backend-channel-closed"
            self._unwatch()
            return
        try:
            acks = self.acks.feed(data)
        except ProtocolError as exc:
            self.counters.inc("rejected", exc.reason)
            self._broken(exc.reason, str(exc))
            return
        for _, status in acks:
            shmid = self._pending.pop(0)
            if status != 0:
                self._fallback("map-refused")
                self.log.warning("the front-end refused to map shared memory region %d (status %d)", shmid, status)
                continue
            if shmid in self.pages and self.device is not None:
                self.in_use.add(shmid)
                self.device.shmem_in_use(shmid, True)
                self.counters.inc("shmem_mapped")
                self.log.info("shared memory region %d mapped by the front-end", shmid)
        if acks and self.changed is not None:
            self.changed()

    def _broken(self, reason: str, detail: str) -> None:
        self.log.warning("back-end channel no longer used for shared memory: %s", detail)
        self.broken = reason
        self._unwatch()
        self._pending.clear()
        self._fallback(reason)

    def _fallback(self, reason: str) -> None:
        self.counters.inc("shmem_fallback", reason)


def page_counts(fd: int, offsets: list[int]) -> list[int]:
    """The 32-bit words at ``offsets`` of a page's memfd (each domain's sequence count).

    Read only after a crash, when the counts recorded are behind: a guest that wrote them gets its
    own page's updates numbered from its garbage, which is no more than it can do to it anyway.
    """
    return [int.from_bytes(os.pread(fd, 4, off).ljust(4, b"\0"), "little") for off in offsets]
