"""Guest memory shared by the front-end: mmap'd regions and address translation.

vhost-user names two address spaces: rings are given as *front-end virtual
addresses* (QEMU's own pointers, ``userspace_addr``), buffers in descriptors as
*guest-physical addresses*.  A :class:`MemoryMap` holds the mapped regions and
translates both, always to a bounded ``memoryview``: a range that is not
entirely inside one region is a :class:`GuestMemoryError`, so nothing the
guest or the VMM writes can make us touch memory outside what was shared.

Each region's fd is mmap'd from file offset 0 through ``mmap_offset + size``
(mmap offsets must be page-aligned; ``mmap_offset`` need not be).  The mapping
keeps the memory alive; the region also keeps a duplicate of the fd (one per
region, closed with it), the only way to hand guest memory to a successor
process (handover).
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
from dataclasses import dataclass

from vhost_user_cpufreq.protocol.errors import GuestMemoryError

from ..dataplane.guard import Guard, Watched, guard

__all__ = ["MappedRegion", "MemoryMap", "MAX_REGIONS", "MAX_REGION_SIZE"]

#: Slots we advertise in GET_MAX_MEM_SLOTS (QEMU's own limit for vhost-user is 509 with
#: CONFIGURE_MEM_SLOTS; a cpufreq device never needs that many).
MAX_REGIONS = 32
#: No single region may be larger than this (a bound on address-space use, not memory use).
MAX_REGION_SIZE = 1 << 40


@dataclass(slots=True)
class MappedRegion:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    _map: mmap.mmap
    view: memoryview  # exactly ``size`` bytes: the region's guest memory
    _guard: Guard | None = None
    _watched: Watched | None = None  # the mapping's SIGBUS guard (None: unguarded)
    fd: int | None = None  # our own duplicate of the front-end's fd, for a handover

    def take_fd(self) -> int | None:
        """Give up the region's fd (handover); the region is then closed without it."""
        fd, self.fd = self.fd, None
        return fd

    def faults(self) -> int:
        """Accesses to this region that faulted (and were patched over with zero pages)."""
        return 0 if self._guard is None or self._watched is None else self._guard.faults(self._watched.gid)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            # A view derived from this region is still alive (a ring or a C pointer's
            # keeper not yet collected): the mapping, and its guard, stay until that
            # view goes.  Nothing C holds a pointer into is ever unmapped under it.
            return
        if self._watched is not None:
            self._watched.release()


def map_region(fd: int, guest_phys_addr: int, size: int, userspace_addr: int, mmap_offset: int) -> MappedRegion:
    """mmap one region; the caller keeps ownership of ``fd``."""
    if size <= 0 or size > MAX_REGION_SIZE:
        raise GuestMemoryError("bad-region-size", f"region size {size:#x}")
    if guest_phys_addr + size > 1 << 64 or userspace_addr + size > 1 << 64:
        raise GuestMemoryError("region-wraps", "region end overflows 64 bits")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError("unmappable-region", f"fstat: {exc.strerror}") from None
    length = mmap_offset + size
    # Regular files and memfds have a size to check against; a mapping past
    # EOF would SIGBUS on first touch instead of failing here.
    if st.st_size and length > st.st_size:
        raise GuestMemoryError("unmappable-region", f"region ends at {length:#x}, fd holds {st.st_size:#x}")
    _seal_against_shrinking(fd)
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError("unmappable-region", f"mmap: {exc}") from None
    g = guard()
    watched = None
    if g is not None:
        try:
            watched = g.watch(mm)
        except OSError:
            mm.close()
            raise GuestMemoryError("too-many-regions", "every guest-memory guard of the service is in use") from None
    view = memoryview(mm)[mmap_offset:length]
    try:
        keep = os.dup(fd)  # close-on-exec, as every fd Python makes
    except OSError as exc:
        if watched is not None:
            watched.release()
        view.release()
        mm.close()
        raise GuestMemoryError("unmappable-region", f"dup: {exc.strerror}") from None
    return MappedRegion(guest_phys_addr, size, userspace_addr, mmap_offset, mm, view, g, watched, keep)


def _seal_against_shrinking(fd: int) -> None:
    """Keep the front-end from truncating shared RAM under our mappings (SIGBUS).

    QEMU's memory-backend-memfd seals its memfds (seal=on by default).  A memfd
    that allows sealing but is not sealed gets F_SEAL_SHRINK here.  Files and
    memfds created without MFD_ALLOW_SEALING cannot be protected: a VMM that
    shrinks them can still crash the service (documented in SPEC/README).
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return  # not a memfd
    if not seals & fcntl.F_SEAL_SHRINK:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError:
            pass  # created without MFD_ALLOW_SEALING, or already F_SEAL_SEAL'd


class MemoryMap:
    """The set of mapped regions of one session; implements ``GuestMemory``."""

    def __init__(self) -> None:
        self._regions: list[MappedRegion] = []  # sorted by guest_phys_addr
        self._gpa_starts: list[int] = []
        #: Moves whenever the set of regions changes (users that cache spans() check it).
        self.generation = 0
        self._epoch_clean = 0  # the guard epoch at which none of our regions had faulted

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def add(self, region: MappedRegion) -> None:
        """Insert a region; raises (and leaves the map unchanged) on overlap."""
        for r in self._regions:
            if _overlaps(r.guest_phys_addr, r.size, region.guest_phys_addr, region.size):
                raise GuestMemoryError("overlapping-regions", f"guest-physical {region.guest_phys_addr:#x} overlaps")
            if _overlaps(r.userspace_addr, r.size, region.userspace_addr, region.size):
                raise GuestMemoryError("overlapping-regions", f"front-end address {region.userspace_addr:#x} overlaps")
        if len(self._regions) >= MAX_REGIONS:
            raise GuestMemoryError("too-many-regions", f"at most {MAX_REGIONS} regions")
        i = bisect.bisect(self._gpa_starts, region.guest_phys_addr)
        self._regions.insert(i, region)
        self._gpa_starts.insert(i, region.guest_phys_addr)
        self.generation += 1

    def remove(self, guest_phys_addr: int, size: int, userspace_addr: int) -> None:
        for i, r in enumerate(self._regions):
            if (r.guest_phys_addr, r.size, r.userspace_addr) == (guest_phys_addr, size, userspace_addr):
                del self._regions[i]
                del self._gpa_starts[i]
                self.generation += 1
                r.close()
                return
        raise GuestMemoryError("unknown-region", f"no region at guest-physical {guest_phys_addr:#x}")

    def clear(self) -> None:
        for r in self._regions:
            r.close()
        self._regions.clear()
        self._gpa_starts.clear()
        self.generation += 1

    def faulted(self) -> bool:
        """Has any region faulted (guest RAM shrunk or unbacked under us)?  Cheap when none has."""
        g = guard()
        if g is None:
            return False
        epoch = g.epoch()  # read before the scan: a fault during it moves the epoch again
        if epoch == self._epoch_clean:
            return False
        if any(r.faults() for r in self._regions):
            return True
        self._epoch_clean = epoch  # faults elsewhere: none of ours
        return False

    def spans(self) -> tuple[tuple[int, memoryview], ...]:
        """Every region as (guest-physical start, its memory)."""
        return tuple((r.guest_phys_addr, r.view) for r in self._regions)

    def view(self, gpa: int, length: int) -> memoryview:
        """Guest-physical ``[gpa, gpa+length)`` as a view; GuestMemoryError if unmapped."""
        i = bisect.bisect(self._gpa_starts, gpa) - 1
        if i >= 0 and length >= 0:
            r = self._regions[i]
            off = gpa - r.guest_phys_addr
            if off + length <= r.size:
                return r.view[off : off + length]
        raise GuestMemoryError("address-out-of-range", f"guest-physical [{gpa:#x}, +{length:#x}) is not mapped")

    def view_va(self, uva: int, length: int) -> memoryview:
        """Front-end virtual ``[uva, uva+length)`` as a view (ring addresses)."""
        if length >= 0:
            for r in self._regions:
                off = uva - r.userspace_addr
                if 0 <= off and off + length <= r.size:
                    return r.view[off : off + length]
        raise GuestMemoryError("address-out-of-range", f"front-end address [{uva:#x}, +{length:#x}) is not mapped")


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen
