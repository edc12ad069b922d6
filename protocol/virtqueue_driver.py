"""The driver's half of a split virtqueue (spec section 2.7), for the guest model and the tests.

The back-end never uses this: it is how the guest side (``guest-driver-model/``)
and the tests put buffers on a ring the way a real virtio driver does, so the
device's half in :mod:`.virtqueue` is always exercised against an independent
writer of the same layout.
"""

from __future__ import annotations

from typing import Sequence

from .errors import GuestMemoryError, LocalProtocolError, RingError
from .memory import GuestMemory
from .virtqueue import (
    _DESC,
    _FLAGS,
    _IDX,
    _RING,
    _U16,
    _USED_ELEM,
    _USED_ELEM_SIZE,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    _check_views,
    _words,
    validate_queue_size,
    vring_need_event,
)

__all__ = ["DriverQueue"]


class DriverQueue:
    """The driver side of one split virtqueue (guest model, tests).

    The constructor initialises both rings the way a driver does when it
    allocates them (flags 0, indices and event indices at ``start_idx``); the
    device side must then be given ``set_base(start_idx)``.
    """

    __slots__ = (
        "size",
        "event_idx",
        "_mask",
        "_desc",
        "_avail",
        "_used",
        "_memory",
        "_used_event_off",
        "_avail_event_off",
        "_free",
        "_chains",
        "_avail_idx",
        "_published",
        "_kicked_at",
        "_last_used",
        "_suppressed",
        "_a16",
        "_u16",
    )

    def __init__(
        self,
        size: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        memory: GuestMemory,
        *,
        event_idx: bool = False,
        start_idx: int = 0,
    ) -> None:
        validate_queue_size(size)
        _check_views(size, desc, avail, used)
        if not 0 <= start_idx <= 0xFFFF:
            raise LocalProtocolError("bad-start-idx", f"start index {start_idx} does not fit 16 bits")
        self.size = size
        self.event_idx = event_idx
        self._mask = size - 1
        self._desc = desc
        self._avail = avail
        self._used = used
        self._memory = memory
        self._a16, self._u16 = _words(size, avail, used)
        self._used_event_off = _RING + 2 * size
        self._avail_event_off = _RING + _USED_ELEM_SIZE * size
        self._free = list(range(size - 1, -1, -1))  # a stack; hands out 0 first
        self._chains: dict[int, list[int]] = {}  # head -> ring descriptors to free
        self._avail_idx = self._published = self._kicked_at = self._last_used = start_idx
        self._suppressed = False
        for ring, off in ((avail, _FLAGS), (used, _FLAGS)):
            _U16.pack_into(ring, off, 0)
        for ring, off in ((avail, _IDX), (avail, self._used_event_off), (used, _IDX), (used, self._avail_event_off)):
            _U16.pack_into(ring, off, start_idx)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def avail_idx(self) -> int:
        """Free-running index of the next avail entry add() will write (published or not)."""
        return self._avail_idx

    @property
    def last_used_idx(self) -> int:
        """Free-running index of the next used entry reclaim() will read."""
        return self._last_used

    def add(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]] = (),
        *,
        indirect_gpa: int | None = None,
    ) -> int:
        """Make a buffer of (gpa, len) segments available (after publish()); returns its head."""
        segs = [(g, n, 0) for g, n in readable] + [(g, n, VIRTQ_DESC_F_WRITE) for g, n in writable]
        count = len(segs)
        if not count:
            raise LocalProtocolError("empty-buffer", "a buffer needs at least one segment")
        for g, n, _ in segs:
            if not (0 <= g <= 0xFFFFFFFFFFFFFFFF and 0 <= n <= 0xFFFFFFFF):
                raise LocalProtocolError("bad-segment", f"segment ({g:#x}, {n:#x})")
        last = count - 1
        if indirect_gpa is not None:
            if not self._free:
                raise LocalProtocolError("queue-full", "no free descriptor")
            try:
                table = self._memory.view(indirect_gpa, DESC_SIZE * count)
            except GuestMemoryError as exc:
                raise LocalProtocolError("bad-indirect-table", exc.detail) from exc
            for i, (g, n, f) in enumerate(segs):
                more = i < last
                _DESC.pack_into(table, DESC_SIZE * i, g, n, f | (VIRTQ_DESC_F_NEXT if more else 0), i + 1 if more else 0)
            head = self._free.pop()
            _DESC.pack_into(self._desc, DESC_SIZE * head, indirect_gpa, DESC_SIZE * count, VIRTQ_DESC_F_INDIRECT, 0)
            self._chains[head] = [head]
        else:
            if count > len(self._free):
                raise LocalProtocolError("queue-full", f"{count} descriptors needed, {len(self._free)} free")
            ids = [self._free.pop() for _ in segs]
            for i, (g, n, f) in enumerate(segs):
                more = i < last
                _DESC.pack_into(
                    self._desc, DESC_SIZE * ids[i], g, n, f | (VIRTQ_DESC_F_NEXT if more else 0), ids[i + 1] if more else 0
                )
            head = ids[0]
            self._chains[head] = ids
        self._a16[(_RING + 2 * (self._avail_idx & self._mask)) >> 1] = head
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Expose added buffers: store avail.idx (after the ring entries, in program order)."""
        self._a16[_IDX >> 1] = self._avail_idx
        self._published = self._avail_idx

    @property
    def avail_event(self) -> int:
        """The avail index whose publication the device wants a kick for (VIRTIO_RING_F_EVENT_IDX)."""
        return int(self._u16[self._avail_event_off >> 1])

    def kick_needed(self) -> bool:
        """After publish(): must the device be kicked for what was published since the last call?"""
        new = self._published
        old = self._kicked_at
        self._kicked_at = new
        if self.event_idx:
            avail_event = self._u16[self._avail_event_off >> 1]
            return vring_need_event(avail_event, new, old)
        if new == old:
            return False
        flags = self._u16[_FLAGS >> 1]
        return not flags & VRING_USED_F_NO_NOTIFY

    def reclaim(self) -> list[tuple[int, int]]:
        """(head, written) of every newly used buffer, in order; frees their descriptors."""
        used_idx = self._u16[_IDX >> 1]
        n = (used_idx - self._last_used) & 0xFFFF
        if n > len(self._chains):
            raise RingError("used-index-jump", f"used.idx {used_idx} is {n} ahead, {len(self._chains)} in flight")
        out: list[tuple[int, int]] = []
        for _ in range(n):
            head, written = _USED_ELEM.unpack_from(self._used, _RING + _USED_ELEM_SIZE * (self._last_used & self._mask))
            self._last_used = (self._last_used + 1) & 0xFFFF
            ids = self._chains.pop(head, None)
            if ids is None:
                raise RingError("bad-used-id", f"used id {head} is not in flight", head=head)
            self._free.extend(ids)
            out.append((head, written))
        if self.event_idx:
            self._write_used_event()
        return out

    def set_interrupt_suppression(self, on: bool) -> bool:
        """Ask the device not to interrupt (``on``) or to interrupt on the next used entry.

        Returns True if used entries are already waiting (reclaim rather than wait).
        """
        self._suppressed = on
        flags = self._a16[_FLAGS >> 1]
        flags = flags | VRING_AVAIL_F_NO_INTERRUPT if on else flags & ~VRING_AVAIL_F_NO_INTERRUPT
        self._a16[_FLAGS >> 1] = flags  # the device ignores it under EVENT_IDX; harmless
        if self.event_idx:
            self._write_used_event()
        used_idx: int = self._u16[_IDX >> 1]
        return used_idx != self._last_used

    def _write_used_event(self) -> None:
        # Enabled: interrupt when the entry at last_used appears.  Suppressed:
        # last_used - 1, the index farthest ahead of the device: it is crossed
        # only after 65535 more entries, and every reclaim moves it along (at
        # most ``size`` entries can be in flight between reclaims).  At worst
        # one spurious interrupt, if the device has not yet evaluated entries
        # the driver already reclaimed; 16-bit indices allow no "never".
        event = (self._last_used - 1) & 0xFFFF if self._suppressed else self._last_used
        self._a16[self._used_event_off >> 1] = event
