"""The memory-translation interface the virtqueue code reads guest memory through.

The virtqueue never sees mmap objects or file descriptors: it asks a
:class:`GuestMemory` for a view of ``length`` bytes at a guest-physical
address.  The backend implements it over mmap'd vhost-user regions, the tests
over a plain ``bytearray``.  Every implementation must raise
:class:`~vhost_user_cpufreq.protocol.errors.GuestMemoryError` when the range
is not entirely inside one mapped region: a range that straddles two regions
is rejected rather than stitched, as it is for rings in every vhost-user
back-end we know of.
"""

from __future__ import annotations

from typing import Protocol

from .errors import GuestMemoryError

__all__ = ["GuestMemory", "FlatMemory"]


class GuestMemory(Protocol):
    #: Changes whenever the regions do, so a user may cache what spans() returned.
    generation: int

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``; raises GuestMemoryError."""
        ...

    def spans(self) -> tuple[tuple[int, memoryview], ...]:
        """Every region as (guest-physical start, its memory), for code that translates itself."""
        ...


class FlatMemory:
    """Guest memory as one buffer starting at guest-physical ``base``.

    Used by tests and by the in-process guest model; also the reference for
    the bounds rule every implementation shares.
    """

    def __init__(self, buffer: bytearray | memoryview, base: int = 0) -> None:
        self._mem = memoryview(buffer).cast("B")
        self.base = base
        self.size = len(self._mem)
        self.generation = 0

    def spans(self) -> tuple[tuple[int, memoryview], ...]:
        return ((self.base, self._mem),)

    def view(self, gpa: int, length: int) -> memoryview:
        start = gpa - self.base
        if length < 0 or start < 0 or start + length > self.size:
            raise GuestMemoryError(
                "address-out-of-range",
                f"[{gpa:#x}, +{length:#x}) is outside guest memory "
                f"[{self.base:#x}, +{self.size:#x})",
            )
        return self._mem[start : start + length]
