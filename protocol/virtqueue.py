"""The virtio 1.x split virtqueue (spec section 2.7), sans-IO, over memoryviews.

Theory of operation
-------------------
A split virtqueue is three areas of shared memory.  The driver describes each
buffer as a chain of 16-byte descriptors in the *descriptor table*, writes the
chain's head index into the *available ring* and then moves ``avail.idx``.  The
device consumes entries from its private ``last_avail_idx`` up to ``avail.idx``
and returns each chain by writing ``{id, len}`` into the *used ring* and then
moving ``used.idx``.  Both indices are free-running 16-bit counters; the slot
is ``idx % size`` (the size is a power of two, so the counters wrap cleanly).

:class:`DeviceQueue` is the back-end's half.  The rings are written by a guest
we do not trust, so :meth:`DeviceQueue.pop` validates everything it reads and
hands out views only on memory that :class:`~.memory.GuestMemory` vouched for.
A bad chain raises :class:`~.errors.RingError` with ``head`` set, after its
avail entry has been consumed, so the caller can return it with
``push(head, 0)`` and carry on; an error with ``head=None`` concerns the ring
as a whole.  :class:`~.virtqueue_driver.DriverQueue` is the guest's half, for the guest
model and the tests.

Completions are batched: :meth:`DeviceQueue.push` writes a used element,
:meth:`DeviceQueue.publish` moves ``used.idx`` once for all of them, and
:meth:`DeviceQueue.should_notify` says whether the driver wants an interrupt.

Notification suppression: without ``VIRTIO_RING_F_EVENT_IDX`` each side
raises a flag in the ring it writes (``VRING_USED_F_NO_NOTIFY``,
``VRING_AVAIL_F_NO_INTERRUPT``).  With it, each side writes the index it wants
to hear about (``used_event`` trails the avail ring, ``avail_event`` the used
ring), and the other side notifies when moving its own index past that value:
see :func:`vring_need_event`.

Memory ordering: the spec puts a barrier between writing ring entries and
the index that exposes them, and between publishing an index and reading the
peer's event index.  Python cannot fence; the code keeps those accesses in
program order (each is one ``pack_into``/``unpack_from``), which x86's memory
model honours for store/store and load/load.  The store/load case (publish,
then read the event index) is not guaranteed by hardware; its failure mode is
a late notification.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Sequence

from .errors import GuestMemoryError, LocalProtocolError, RingError
from .memory import GuestMemory

__all__ = [
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_RING_F_EVENT_IDX",
    "MAX_QUEUE_SIZE",
    "DESC_SIZE",
    "MAX_INDIRECT_DESCS",
    "validate_queue_size",
    "ring_sizes",
    "vring_need_event",
    "Chain",
    "DeviceQueue",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

#: Feature bit numbers (not masks).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
#: Upper bound on one indirect table.  The spec sets none, but zero-length
#: descriptors escape ``max_chain_bytes``, so this bounds the work per chain.
MAX_INDIRECT_DESCS = MAX_QUEUE_SIZE

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len

# Offsets inside the avail and used rings: flags, idx, then the entries.
_FLAGS = 0
_IDX = 2
_RING = 4
_USED_ELEM_SIZE = 8


def validate_queue_size(n: int) -> None:
    """Raise RingError('bad-queue-size') unless ``n`` is a power of 2 in 1..32768."""
    if not (1 <= n <= MAX_QUEUE_SIZE and n & (n - 1) == 0):
        raise RingError("bad-queue-size", f"queue size {n} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring incl. used_event, used ring incl. avail_event)."""
    validate_queue_size(size)
    return DESC_SIZE * size, _RING + 2 * size + 2, _RING + _USED_ELEM_SIZE * size + 2


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if moving an index from ``old_idx`` to ``new_idx`` passed ``event_idx``.

    That is, ``event_idx`` is one of old, old+1, ..., new-1 (mod 2**16): the
    peer asked to be told when the entry at ``event_idx`` was made visible.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def _words(size: int, avail: memoryview, used: memoryview) -> tuple[memoryview, memoryview]:
    """The avail and used rings as arrays of 16-bit words.

    The indices and flags the other side reads while we write them are stored
    and loaded through these: one 16-bit access each, where ``struct`` would
    move them a byte at a time and a guest vCPU could see half of an index.
    Rings are at least 2-byte aligned (virtio 1.x 2.7), so the accesses are
    single, aligned loads and stores.
    """
    if sys.byteorder != "little":
        raise LocalProtocolError("big-endian-host", "ring words are accessed in host order, virtio's is little")
    _, a_len, u_len = ring_sizes(size)
    return avail[:a_len].cast("H"), used[:u_len].cast("H")


def _check_views(size: int, desc: memoryview, avail: memoryview, used: memoryview) -> None:
    for name, view, need in zip(("desc", "avail", "used"), (desc, avail, used), ring_sizes(size)):
        if view.nbytes < need:
            raise RingError("ring-too-small", f"{name} area is {view.nbytes} bytes, a {size}-entry queue needs {need}")


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: memoryviews compare by content, not identity
class Chain:
    """One validated descriptor chain: the device reads ``readable``, fills ``writable``."""

    head: int
    readable: tuple[memoryview, ...]
    writable: tuple[memoryview, ...]
    readable_len: int
    writable_len: int
    descriptors: int = 1  # how many descriptors were walked (the cost of reading it)

    def read_all(self) -> bytes:
        """The readable segments concatenated."""
        return b"".join(self.readable)


class DeviceQueue:
    """The device side of one split virtqueue.

    ``desc``, ``avail`` and ``used`` are the already translated ring areas;
    buffer addresses in descriptors are guest-physical and go through
    ``memory``.  ``event_idx`` and ``indirect`` reflect the negotiated
    features.  ``max_chain_bytes`` caps the total length of one chain.
    """

    __slots__ = (
        "size",
        "event_idx",
        "indirect",
        "max_chain_bytes",
        "_mask",
        "_desc",
        "_avail",
        "_used",
        "_memory",
        "_used_event_off",
        "_avail_event_off",
        "_last_avail",
        "_avail_shadow",
        "_used_idx",
        "_published",
        "_signalled",
        "_inflight",
        "_broken",
        "_a16",
        "_u16",
        "max_indirect",
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
        indirect: bool = True,
        max_chain_bytes: int = 1 << 20,
        max_indirect: int = MAX_INDIRECT_DESCS,
    ) -> None:
        validate_queue_size(size)
        _check_views(size, desc, avail, used)
        if used.readonly:
            raise LocalProtocolError("read-only-ring", "the device writes the used ring")
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain_bytes = max_chain_bytes
        self.max_indirect = max_indirect
        self._mask = size - 1
        self._desc = desc
        self._avail = avail
        self._used = used
        self._a16, self._u16 = _words(size, avail, used)
        self._memory = memory
        self._used_event_off = _RING + 2 * size
        self._avail_event_off = _RING + _USED_ELEM_SIZE * size
        self.set_base(0)

    # -- state ---------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        """Free-running index of the next avail entry to consume."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """Free-running index of the next used entry to write (published or not)."""
        return self._used_idx

    @property
    def broken(self) -> bool:
        """The avail index jumped (or the ring was abandoned); pop() refuses until set_base() or reset()."""
        return self._broken

    def abandon(self) -> None:
        """Stop consuming for good, as a jumped index does: the ring's memory cannot be trusted."""
        self._broken = True

    @property
    def in_flight(self) -> int:
        """Chains popped (or rejected with a head) and not yet pushed."""
        return self._inflight

    def set_base(self, idx: int) -> None:
        """SET_VRING_BASE: resume consuming at ``idx``; the used index restarts there too."""
        if not 0 <= idx <= 0xFFFF:
            raise RingError("bad-base", f"ring base {idx} does not fit 16 bits")
        self._last_avail = idx
        self._avail_shadow = idx
        self._used_idx = idx
        self._published = idx
        # Unknown: the driver may await entries published before a restart,
        # so the first should_notify() errs towards interrupting.
        self._signalled: int | None = None
        self._inflight = 0
        self._broken = False

    def reset(self) -> None:
        """Back to the state after construction."""
        self.set_base(0)

    # -- for a second implementation of the consuming side (backend/dataplane/ring_drain.c) ----

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    def areas(self) -> tuple[memoryview, memoryview, memoryview]:
        """The descriptor table, avail ring and used ring this queue works on."""
        return self._desc, self._avail, self._used

    @property
    def packed_cursor(self) -> int:
        """The consuming position as one integer, for a second implementation to take over.

        ``last_avail | avail index last read << 16 | used index << 32 | broken << 48``.
        The number in flight is not part of it: a drain returns what it pops.
        """
        return self._last_avail | self._avail_shadow << 16 | self._used_idx << 32 | self._broken << 48

    @packed_cursor.setter
    def packed_cursor(self, c: int) -> None:
        self._last_avail = c & 0xFFFF
        self._avail_shadow = c >> 16 & 0xFFFF
        self._used_idx = c >> 32 & 0xFFFF
        self._broken = bool(c >> 48 & 1)

    @property
    def signalled(self) -> int | None:
        """The used index the driver was last asked about (None: unknown, err towards interrupting)."""
        return self._signalled

    def hand_back(self, cursor: int, signalled: int | None) -> None:
        """Take the ring back from a second implementation that consumed, published and signalled."""
        self.packed_cursor = cursor
        self._published = self._used_idx
        self._signalled = signalled

    # -- consuming -------------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available chain, or None if the driver has made none available."""
        if self._broken:
            raise RingError("avail-index-jump", "ring is broken until reset", head=None)
        last = self._last_avail
        if last == self._avail_shadow:
            # Only re-read avail.idx when the entries seen last time are used up.
            avail_idx = self._a16[_IDX >> 1]
            pending = (avail_idx - last) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.size:
                self._broken = True
                raise RingError(
                    "avail-index-jump",
                    f"avail.idx {avail_idx} is {pending} entries ahead of {last}, queue size {self.size}",
                    head=None,
                )
            self._avail_shadow = avail_idx
        # The entry is read after avail.idx (program order stands in for the read barrier).
        head = self._a16[(_RING >> 1) + (last & self._mask)]
        self._last_avail = (last + 1) & 0xFFFF  # consumed whatever happens next
        if head >= self.size:
            # Not a descriptor index, so it cannot be returned as used either.
            raise RingError("bad-head", f"avail entry {last} names descriptor {head}, size {self.size}", head=None)
        self._inflight += 1
        try:
            return self._walk(head)
        except GuestMemoryError as exc:
            raise RingError("address-out-of-range", exc.detail, head=head) from exc

    def _walk(self, head: int) -> Chain:
        """Walk the chain at ``head``: the ring's table, then at most one indirect table.

        One loop serves both tables (as in backend/dataplane/ring_drain.c): an indirect
        descriptor switches ``table`` to the indirect one, which restarts the
        index and the loop bound, and the walk goes on there.
        """
        view = self._memory.view
        limit = self.max_chain_bytes
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        seen_writable = False  # not ``wlen > 0``: zero-length descriptors count too
        table, n, idx = self._desc, self.size, head
        indirect = False  # walking an indirect table
        walked = 0  # descriptors walked in the ring's table, once in an indirect one
        count = 0  # descriptors walked in the current table
        while True:
            if count == n:
                what = "indirect chain" if indirect else "chain"
                raise RingError("descriptor-loop", f"{what} has more than {n} descriptors", head=head)
            count += 1
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * idx)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise RingError("nested-indirect", f"indirect table entry {idx} is indirect", head=head)
                # Cannot have NEXT, so it ends the direct part; the spec says to ignore its WRITE flag.
                if not self.indirect:
                    raise RingError("indirect-not-negotiated", f"descriptor {idx} is indirect", head=head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise RingError("indirect-with-next", f"indirect descriptor {idx} also has NEXT", head=head)
                if length == 0 or length % DESC_SIZE or length > DESC_SIZE * MAX_INDIRECT_DESCS:
                    raise RingError("bad-indirect-length", f"indirect table of {length} bytes", head=head)
                if length > DESC_SIZE * self.max_indirect:
                    # Zero-length entries escape max_chain_bytes: bound the walk itself.
                    raise RingError("chain-too-long", f"indirect table of {length // DESC_SIZE} descriptors, "
                                    f"this device takes {self.max_indirect}", head=head)
                table, n, idx = view(addr, length), length // DESC_SIZE, 0
                indirect, walked, count = True, count, 0
                continue
            if rlen + wlen + length > limit:
                raise RingError("chain-too-long", f"chain exceeds {limit} bytes", head=head)
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
                if length:
                    writable.append(view(addr, length))
                wlen += length
            else:
                if seen_writable:
                    where = "indirect entry" if indirect else "descriptor"
                    raise RingError("readable-after-writable", f"{where} {idx} is readable", head=head)
                if length:
                    readable.append(view(addr, length))
                rlen += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= n:
                where = f"indirect entry {idx} chains to {nxt}, table" if indirect else \
                    f"descriptor {idx} chains to {nxt}, size"
                raise RingError("next-out-of-range", f"{where} {n}", head=head)
            idx = nxt
        return Chain(head, tuple(readable), tuple(writable), rlen, wlen, walked + count)

    # -- completing ------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes filled in; visible after publish()."""
        if not (0 <= head < self.size and 0 <= written <= 0xFFFFFFFF):
            raise LocalProtocolError("bad-push", f"push({head}, {written}) on a {self.size}-entry queue")
        if self._inflight == 0:
            raise LocalProtocolError("push-without-pop", "more chains pushed than popped")
        self._inflight -= 1
        _USED_ELEM.pack_into(self._used, _RING + _USED_ELEM_SIZE * (self._used_idx & self._mask), head, written)
        self._used_idx = (self._used_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """Make pushed elements visible: store used.idx (after the elements, in program order)."""
        if self._published != self._used_idx:
            self._u16[_IDX >> 1] = self._used_idx
            self._published = self._used_idx

    def push_and_publish(self, head: int, written: int) -> None:
        self.push(head, written)
        self.publish()

    def should_notify(self) -> bool:
        """After publish(): does the driver want an interrupt for what was published since last asked?"""
        new = self._published
        old = self._signalled
        self._signalled = new
        if self.event_idx:
            if old is None:
                return True
            used_event = self._a16[self._used_event_off >> 1]
            return vring_need_event(used_event, new, old)
        if old == new:
            return False
        return not self._a16[_FLAGS >> 1] & VRING_AVAIL_F_NO_INTERRUPT

    # -- kick suppression --------------------------------------------------------

    def enable_notifications(self) -> bool:
        """Ask for a kick on the next avail entry.

        Returns True if entries are already available: the driver may have
        added them before it could see the request, so the caller must pop
        again rather than wait.
        """
        if self.event_idx:
            return self.set_avail_event(self._last_avail)
        self._u16[_FLAGS >> 1] &= ~VRING_USED_F_NO_NOTIFY
        avail_idx: int = self._a16[_IDX >> 1]
        return avail_idx != self._last_avail

    def disable_notifications(self) -> None:
        """Ask for no kicks (without EVENT_IDX; with it, a stale avail_event asks for none)."""
        if not self.event_idx:
            self._u16[_FLAGS >> 1] |= VRING_USED_F_NO_NOTIFY

    def set_avail_event(self, idx: int) -> bool:
        """EVENT_IDX: ask for a kick once the avail entry at ``idx`` is published.

        Returns True if it already is (the caller must pop rather than wait).
        """
        idx &= 0xFFFF
        self._u16[self._avail_event_off >> 1] = idx
        avail_idx: int = self._a16[_IDX >> 1]
        last = self._last_avail
        return (avail_idx - last) & 0xFFFF > (idx - last) & 0xFFFF
