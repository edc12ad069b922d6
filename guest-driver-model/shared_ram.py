"""Guest RAM shared with QEMU, for the driver model over qtest.

Guest RAM is not accessed through qtest at all: QEMU is started with its RAM
in a shared file (or memfd) that this process maps too (:class:`SharedRam`),
so the driver model's rings and buffers are plain memory here, exactly as the
back-end sees them.
"""

from __future__ import annotations

import mmap
import os

from vhost_user_cpufreq.protocol.memory import FlatMemory

from .transport import GuestRam

__all__ = ["SharedRam"]


class SharedRam(GuestRam):
    """Guest RAM mapped from the same file or memfd QEMU's memory backend uses.

    The machine's RAM backend must be that object (``-machine
    memory-backend=ID``) and all of it must sit below the 32-bit PCI hole
    (at most 2 GiB on q35), so that the file offset of a byte is its
    guest-physical address.  Allocations start at ``start`` (1 MiB by default:
    the first megabyte holds the legacy VGA and BIOS windows).
    """

    def __init__(self, fd: int, size: int, *, start: int = 0x100000) -> None:
        if os.fstat(fd).st_size < size:
            raise ValueError(f"guest RAM file holds {os.fstat(fd).st_size:#x} bytes, expected {size:#x}")
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view = memoryview(self._map)
        self.memory = FlatMemory(self._view, base=0)
        self._start = start
        self._next = start

    @classmethod
    def open_file(cls, path: str, size: int, **kw: int) -> "SharedRam":
        """The file of ``-object memory-backend-file,mem-path=PATH,share=on``."""
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), size, **kw)

    @classmethod
    def open_memfd_of(cls, pid: int, size: int, **kw: int) -> "SharedRam":
        """The memfd of ``-object memory-backend-memfd,share=on`` in process ``pid`` (needs ptrace rights)."""
        fd_dir = f"/proc/{pid}/fd"
        for name in sorted(os.listdir(fd_dir), key=int):
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if not target.startswith("/memfd:"):
                continue
            fd = os.open(f"{fd_dir}/{name}", os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(fd).st_size == size:
                return cls(fd, size, **kw)
            os.close(fd)
        raise FileNotFoundError(f"no {size:#x}-byte memfd among the fds of process {pid}")

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > self.size:
            raise MemoryError("guest RAM exhausted")
        self._next = gpa + size
        return gpa

    def zero(self, gpa: int, size: int) -> None:
        self.memory.view(gpa, size)[:] = bytes(size)

    def close(self) -> None:
        """Unmap and close; views handed out earlier must be gone by then."""
        if self.fd < 0:
            return
        self.memory = FlatMemory(bytearray(0))
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A ring view is still referenced (a DriverQueue not yet
            # collected); the mapping goes away with the last view.
            pass
        os.close(self.fd)
        self.fd = -1
