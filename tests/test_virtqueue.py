"""Split virtqueue: formulas, every malformed-chain reason, and a model-based test of both halves."""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vhost_user_cpufreq.protocol.errors import LocalProtocolError, RingError
from vhost_user_cpufreq.protocol.memory import FlatMemory
from vhost_user_cpufreq.protocol.virtqueue import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    Chain,
    DeviceQueue,
    ring_sizes,
    validate_queue_size,
    vring_need_event,
)
from vhost_user_cpufreq.protocol.virtqueue_driver import DriverQueue

N, R, W, I = VIRTQ_DESC_F_NEXT, 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
U16 = struct.Struct("<H")
DESC = struct.Struct("<QIHH")


# -- fixtures --------------------------------------------------------------------


@dataclass
class Rig:
    """Both halves of one queue over one flat memory; data area starts at ``data``."""

    size: int
    mem: FlatMemory
    buf: bytearray
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    data: int
    dev: DeviceQueue
    drv: DriverQueue
    avail_idx: int = 0  # raw driver's shadow (for hand-made rings)

    # Raw access for hand-crafted (malformed) rings.
    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        DESC.pack_into(self.buf, self.desc_gpa + DESC_SIZE * i, addr, length, flags, nxt)

    def table(self, gpa: int, entries: list[tuple[int, int, int, int]]) -> None:
        for i, e in enumerate(entries):
            DESC.pack_into(self.buf, gpa + DESC_SIZE * i, *e)

    def offer(self, head: int) -> None:
        U16.pack_into(self.buf, self.avail_gpa + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self.buf, self.avail_gpa + 2, self.avail_idx)

    def u16(self, gpa: int) -> int:
        return int(U16.unpack_from(self.buf, gpa)[0])

    def used_elem(self, i: int) -> tuple[int, int]:
        id_, ln = struct.unpack_from("<II", self.buf, self.used_gpa + 4 + 8 * (i % self.size))
        return id_, ln


class RecordingMemory(FlatMemory):
    def __init__(self, buffer: bytearray) -> None:
        super().__init__(buffer)
        self.granted: list[tuple[int, int]] = []

    def view(self, gpa: int, length: int) -> memoryview:
        v = super().view(gpa, length)
        self.granted.append((gpa, length))
        return v


def make_rig(
    size: int = 8,
    *,
    event_idx: bool = False,
    indirect: bool = True,
    start: int = 0,
    max_chain_bytes: int = 1 << 20,
    mem_size: int = 1 << 20,
    memory_cls: type[FlatMemory] = FlatMemory,
) -> Rig:
    buf = bytearray(mem_size)
    mem = memory_cls(buf)
    d, a, u = ring_sizes(size)
    desc_gpa = 0
    avail_gpa = (d + 15) & ~15
    used_gpa = (avail_gpa + a + 15) & ~15
    data = (used_gpa + u + 4095) & ~4095
    views = (mem.view(desc_gpa, d), mem.view(avail_gpa, a), mem.view(used_gpa, u))
    drv = DriverQueue(size, *views, mem, event_idx=event_idx, start_idx=start)
    dev = DeviceQueue(size, *views, mem, event_idx=event_idx, indirect=indirect, max_chain_bytes=max_chain_bytes)
    dev.set_base(start)
    return Rig(size, mem, buf, desc_gpa, avail_gpa, used_gpa, data, dev, drv, avail_idx=start)


def assert_works(rig: Rig, head: int = 5) -> None:
    """A well-formed chain still goes through, and the used entry comes back."""
    payload = b"still-alive"
    rig.buf[rig.data + 0x8000 : rig.data + 0x8000 + len(payload)] = payload
    rig.desc(head, rig.data + 0x8000, len(payload))
    rig.offer(head)
    chain = rig.dev.pop()
    assert chain is not None and chain.head == head and chain.read_all() == payload
    idx = rig.dev.used_idx
    rig.dev.push(head, 0)
    rig.dev.publish()
    assert rig.used_elem(idx) == (head, 0)
    assert rig.u16(rig.used_gpa + 2) == (idx + 1) & 0xFFFF
    assert rig.dev.pop() is None


# -- pure functions -----------------------------------------------------------------


@pytest.mark.parametrize(
    "event, new, old, expected",
    [
        (0, 1, 0, True),
        (0, 0, 0, False),
        (1, 1, 0, False),
        (4, 5, 0, True),
        (5, 5, 0, False),
        (0xFFFF, 0, 0xFFFF, True),  # wrap-around: 0xffff -> 0 passes 0xffff
        (0xFFFE, 2, 0xFFFD, True),
        (2, 2, 0xFFFD, False),
        (1, 2, 0xFFFD, True),
        (0xFFFC, 2, 0xFFFD, False),
    ],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0x1FF))
def test_vring_need_event_matches_enumeration(event: int, old: int, moved: int) -> None:
    new = (old + moved) & 0xFFFF
    assert vring_need_event(event, new, old) == (event in {(old + k) & 0xFFFF for k in range(moved)})


def test_ring_sizes() -> None:
    assert ring_sizes(1) == (16, 8, 14)
    assert ring_sizes(256) == (4096, 518, 2054)
    assert ring_sizes(32768) == (16 * 32768, 6 + 2 * 32768, 6 + 8 * 32768)


@pytest.mark.parametrize("n", [0, -1, 3, 6, 1000, 65536, 1 << 20])
def test_bad_queue_size(n: int) -> None:
    with pytest.raises(RingError) as ei:
        validate_queue_size(n)
    assert ei.value.reason == "bad-queue-size"


def test_constructor_checks() -> None:
    mem = FlatMemory(bytearray(1 << 16))
    d, a, u = ring_sizes(8)
    with pytest.raises(RingError, match="ring-too-small"):
        DeviceQueue(8, mem.view(0, d), mem.view(0x1000, a - 1), mem.view(0x2000, u), mem)
    with pytest.raises(RingError, match="bad-queue-size"):
        DeviceQueue(12, mem.view(0, 400), mem.view(0x1000, 400), mem.view(0x2000, 400), mem)
    with pytest.raises(LocalProtocolError, match="read-only-ring"):
        DeviceQueue(8, mem.view(0, d), mem.view(0x1000, a), memoryview(bytes(u)), mem)


# -- happy paths ----------------------------------------------------------------------


def test_round_trip_direct_and_indirect() -> None:
    rig = make_rig()
    a, b = rig.data, rig.data + 0x100
    rig.buf[a : a + 5] = b"hello"
    rig.buf[b : b + 3] = b"abc"
    h1 = rig.drv.add([(a, 5), (b, 3)], [(rig.data + 0x200, 8)])
    h2 = rig.drv.add([(b, 3)], [(rig.data + 0x300, 4)], indirect_gpa=rig.data + 0x400)
    assert rig.drv.num_free == 8 - 4
    assert rig.dev.pop() is None  # not published yet
    rig.drv.publish()
    c1, c2 = rig.dev.pop(), rig.dev.pop()
    assert rig.dev.pop() is None
    assert isinstance(c1, Chain) and isinstance(c2, Chain)
    assert (c1.head, c1.read_all(), c1.readable_len, c1.writable_len) == (h1, b"helloabc", 8, 8)
    assert (c2.head, c2.read_all(), c2.readable_len, c2.writable_len) == (h2, b"abc", 3, 4)
    c2.writable[0][:] = b"WXYZ"
    rig.dev.push(h2, 4)
    rig.dev.push(h1, 0)
    assert rig.drv.reclaim() == []  # pushed, not published
    rig.dev.publish()
    assert rig.drv.reclaim() == [(h2, 4), (h1, 0)]
    assert bytes(rig.buf[rig.data + 0x300 : rig.data + 0x304]) == b"WXYZ"
    assert rig.drv.num_free == 8


def test_zero_length_descriptors_allowed_and_unchecked() -> None:
    rig = make_rig()
    rig.buf[rig.data : rig.data + 2] = b"ok"
    rig.desc(0, 1 << 60, 0, N, 1)  # zero length: address never translated
    rig.desc(1, rig.data, 2, N, 2)
    rig.desc(2, 1 << 60, 0, W)
    rig.offer(0)
    chain = rig.dev.pop()
    assert chain is not None and chain.read_all() == b"ok" and chain.writable == () and chain.writable_len == 0


def test_chain_of_exactly_size_descriptors() -> None:
    rig = make_rig(4)
    for i in range(4):
        rig.buf[rig.data + i] = 0x41 + i
        rig.desc(i, rig.data + i, 1, N if i < 3 else 0, i + 1)
    rig.offer(0)
    chain = rig.dev.pop()
    assert chain is not None and chain.read_all() == b"ABCD"


def test_loop_detection_bounds_work() -> None:
    """A loop is stopped after ``size`` descriptors (direct) or ``table_len/16`` (indirect)."""
    rig = make_rig(4, memory_cls=RecordingMemory)
    mem = rig.mem
    assert isinstance(mem, RecordingMemory)
    for i in range(4):
        rig.desc(i, rig.data, 1, N, (i + 1) % 4)
    rig.offer(0)
    mem.granted.clear()
    with pytest.raises(RingError, match="descriptor-loop"):
        rig.dev.pop()
    assert len(mem.granted) == 4
    rig.desc(1, rig.data + 0x1000, 48, I)
    rig.table(rig.data + 0x1000, [(rig.data, 1, N, 1), (rig.data, 1, N, 2), (rig.data, 1, N, 0)])
    rig.offer(1)
    mem.granted.clear()
    with pytest.raises(RingError, match="descriptor-loop"):
        rig.dev.pop()
    assert len(mem.granted) == 1 + 3


def test_wrap_around_deterministic() -> None:
    rig = make_rig(4, start=0xFFFD, event_idx=True)
    for n in range(20):
        payload = bytes([n]) * (n + 1)
        rig.buf[rig.data : rig.data + len(payload)] = payload
        head = rig.drv.add([(rig.data, len(payload))])
        rig.drv.publish()
        chain = rig.dev.pop()
        assert chain is not None and chain.head == head and chain.read_all() == payload
        rig.dev.push(head, n)
        rig.dev.publish()
        assert rig.drv.reclaim() == [(head, n)]
    assert rig.dev.last_avail_idx == rig.dev.used_idx == (0xFFFD + 20) & 0xFFFF == rig.drv.avail_idx


def test_push_misuse() -> None:
    rig = make_rig()
    with pytest.raises(LocalProtocolError, match="push-without-pop"):
        rig.dev.push(0, 0)
    with pytest.raises(LocalProtocolError, match="bad-push"):
        rig.dev.push(8, 0)
    with pytest.raises(LocalProtocolError, match="bad-push"):
        rig.dev.push(0, 1 << 32)


def test_driver_misuse() -> None:
    rig = make_rig(2)
    with pytest.raises(LocalProtocolError, match="empty-buffer"):
        rig.drv.add([])
    rig.drv.add([(rig.data, 1)])
    with pytest.raises(LocalProtocolError, match="queue-full"):
        rig.drv.add([(rig.data, 1), (rig.data, 1)])
    rig.drv.add([(rig.data, 1), (rig.data, 1)], indirect_gpa=rig.data + 0x100)
    with pytest.raises(LocalProtocolError, match="queue-full"):
        rig.drv.add([(rig.data, 1)], indirect_gpa=rig.data + 0x200)


# -- malformed chains ---------------------------------------------------------------------

Setup = Callable[[Rig], None]


def _next_out_of_range(r: Rig) -> None:
    r.desc(0, r.data, 4, N, 8)


def _loop(r: Rig) -> None:
    r.desc(0, r.data, 4, N, 1)
    r.desc(1, r.data, 4, N, 0)


def _self_loop(r: Rig) -> None:
    r.desc(0, r.data, 0, N, 0)


def _indirect_desc(r: Rig, length: int = 32, flags: int = I) -> None:
    r.desc(0, r.data + 0x1000, length, flags)
    r.table(r.data + 0x1000, [(r.data, 4, N, 1), (r.data, 4, 0, 0)])


def _indirect_with_next(r: Rig) -> None:
    _indirect_desc(r, flags=I | N)


def _nested_indirect(r: Rig) -> None:
    _indirect_desc(r)
    r.table(r.data + 0x1000, [(r.data, 4, N, 1), (r.data + 0x2000, 16, I, 0)])


def _indirect_loop(r: Rig) -> None:
    _indirect_desc(r)
    r.table(r.data + 0x1000, [(r.data, 4, N, 1), (r.data, 4, N, 0)])


def _indirect_next_out_of_range(r: Rig) -> None:
    _indirect_desc(r)
    r.table(r.data + 0x1000, [(r.data, 4, N, 2)])


def _readable_after_writable(r: Rig) -> None:
    r.desc(0, r.data, 4, W | N, 1)
    r.desc(1, r.data, 4, R)


def _readable_after_zero_len_writable(r: Rig) -> None:
    r.desc(0, r.data, 0, W | N, 1)
    r.desc(1, r.data, 4, R)


def _readable_after_writable_indirect(r: Rig) -> None:
    r.desc(0, r.data, 4, W | N, 1)
    r.desc(1, r.data + 0x1000, 16, I)
    r.table(r.data + 0x1000, [(r.data, 4, R, 0)])


def _too_long(r: Rig) -> None:
    r.desc(0, r.data, 3000, N, 1)
    r.desc(1, r.data, 3000, W)


def _too_long_single(r: Rig) -> None:
    r.desc(0, r.data, 0xFFFFFFFF, R)


def _too_long_indirect(r: Rig) -> None:
    _indirect_desc(r)
    r.table(r.data + 0x1000, [(r.data, 4000, N, 1), (r.data, 100, W, 0)])


def _addr_out_of_range(r: Rig) -> None:
    r.desc(0, r.data, 4, N, 1)
    r.desc(1, (1 << 20) - 2, 4, W)  # straddles the end of memory


def _addr_huge(r: Rig) -> None:
    r.desc(0, 0xFFFF_FFFF_FFFF_FFF0, 16, R)


def _indirect_table_out_of_range(r: Rig) -> None:
    r.desc(0, 1 << 40, 32, I)


def _indirect_entry_out_of_range(r: Rig) -> None:
    _indirect_desc(r)
    r.table(r.data + 0x1000, [(1 << 40, 4, 0, 0)])


MALFORMED: list[tuple[str, Setup, str, dict[str, object]]] = [
    ("next", _next_out_of_range, "next-out-of-range", {}),
    ("loop", _loop, "descriptor-loop", {}),
    ("self-loop", _self_loop, "descriptor-loop", {}),
    ("indirect-off", _indirect_desc, "indirect-not-negotiated", {"indirect": False}),
    ("indirect+next", _indirect_with_next, "indirect-with-next", {}),
    ("nested", _nested_indirect, "nested-indirect", {}),
    ("ind-len-0", lambda r: _indirect_desc(r, 0), "bad-indirect-length", {}),
    ("ind-len-17", lambda r: _indirect_desc(r, 17), "bad-indirect-length", {}),
    ("ind-len-24", lambda r: _indirect_desc(r, 24), "bad-indirect-length", {}),
    ("ind-len-huge", lambda r: _indirect_desc(r, 16 * 32769), "bad-indirect-length", {}),
    ("ind-loop", _indirect_loop, "descriptor-loop", {}),
    ("ind-next", _indirect_next_out_of_range, "next-out-of-range", {}),
    ("r-after-w", _readable_after_writable, "readable-after-writable", {}),
    ("r-after-w0", _readable_after_zero_len_writable, "readable-after-writable", {}),
    ("r-after-w-ind", _readable_after_writable_indirect, "readable-after-writable", {}),
    ("too-long", _too_long, "chain-too-long", {"max_chain_bytes": 4096}),
    ("too-long-1", _too_long_single, "chain-too-long", {"max_chain_bytes": 4096}),
    ("too-long-ind", _too_long_indirect, "chain-too-long", {"max_chain_bytes": 4096}),
    ("addr", _addr_out_of_range, "address-out-of-range", {}),
    ("addr-huge", _addr_huge, "address-out-of-range", {}),
    ("ind-table-addr", _indirect_table_out_of_range, "address-out-of-range", {}),
    ("ind-entry-addr", _indirect_entry_out_of_range, "address-out-of-range", {}),
]


@pytest.mark.parametrize("start", [0, 0xFFFF])
@pytest.mark.parametrize("setup, reason, kwargs", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_chain(setup: Setup, reason: str, kwargs: dict[str, object], start: int) -> None:
    rig = make_rig(start=start, **kwargs)  # type: ignore[arg-type]
    setup(rig)
    rig.offer(0)
    with pytest.raises(RingError) as ei:
        rig.dev.pop()
    assert (ei.value.reason, ei.value.head) == (reason, 0)
    assert rig.dev.last_avail_idx == (start + 1) & 0xFFFF  # the entry was consumed
    assert not rig.dev.broken and rig.dev.in_flight == 1
    rig.dev.push(0, 0)  # the caller can return the bad chain
    rig.dev.publish()
    assert rig.used_elem(start) == (0, 0)
    assert_works(rig)


def test_avail_index_jump_breaks_queue_until_set_base() -> None:
    rig = make_rig()
    U16.pack_into(rig.buf, rig.avail_gpa + 2, 9)  # 9 > size 8 entries ahead of 0
    for _ in range(2):
        with pytest.raises(RingError) as ei:
            rig.dev.pop()
        assert (ei.value.reason, ei.value.head) == ("avail-index-jump", None)
        assert rig.dev.broken
    U16.pack_into(rig.buf, rig.avail_gpa + 2, 8)  # putting it right is not enough
    with pytest.raises(RingError, match="avail-index-jump"):
        rig.dev.pop()
    rig.dev.set_base(8)
    rig.avail_idx = 8
    assert not rig.dev.broken and rig.dev.pop() is None
    assert_works(rig)


def test_avail_index_exactly_size_ahead_is_fine() -> None:
    rig = make_rig(4)
    for i in range(4):
        rig.desc(i, rig.data, 1)
        rig.offer(i)
    assert [c.head for c in iter(rig.dev.pop, None)] == [0, 1, 2, 3]


def test_bad_head() -> None:
    rig = make_rig()
    rig.offer(8)
    rig.offer(0xFFFF)
    for expected_last in (1, 2):
        with pytest.raises(RingError) as ei:
            rig.dev.pop()
        assert (ei.value.reason, ei.value.head) == ("bad-head", None)
        assert rig.dev.last_avail_idx == expected_last and not rig.dev.broken and rig.dev.in_flight == 0
    assert_works(rig)


def test_set_base_and_reset() -> None:
    rig = make_rig()
    with pytest.raises(RingError, match="bad-base"):
        rig.dev.set_base(0x10000)
    rig.dev.set_base(300)
    assert rig.dev.last_avail_idx == rig.dev.used_idx == 300
    rig.dev.reset()
    assert rig.dev.last_avail_idx == rig.dev.used_idx == 0 and not rig.dev.broken


# -- notifications -------------------------------------------------------------------------


def _add_publish(rig: Rig) -> int:
    head = rig.drv.add([(rig.data, 1)])
    rig.drv.publish()
    return head


def test_kick_suppression_without_event_idx() -> None:
    rig = make_rig()
    rig.dev.disable_notifications()
    assert rig.u16(rig.used_gpa) & VRING_USED_F_NO_NOTIFY
    _add_publish(rig)
    assert rig.drv.kick_needed() is False
    assert rig.dev.enable_notifications() is True  # the race: drain before sleeping
    assert rig.u16(rig.used_gpa) & VRING_USED_F_NO_NOTIFY == 0
    assert rig.dev.pop() is not None and rig.dev.pop() is None
    assert rig.dev.enable_notifications() is False
    assert rig.drv.kick_needed() is False  # nothing new since the last check
    _add_publish(rig)
    assert rig.drv.kick_needed() is True


def test_kick_suppression_with_event_idx() -> None:
    rig = make_rig(event_idx=True)
    assert rig.dev.enable_notifications() is False
    assert rig.u16(rig.used_gpa + 4 + 8 * 8) == 0  # avail_event = last_avail_idx
    _add_publish(rig)
    assert rig.drv.kick_needed() is True
    _add_publish(rig)
    assert rig.drv.kick_needed() is False  # device has not re-armed
    rig.dev.disable_notifications()  # a no-op under EVENT_IDX
    assert rig.u16(rig.used_gpa) == 0
    assert rig.dev.pop() is not None and rig.dev.pop() is not None and rig.dev.pop() is None
    # Batching: wake me when the third entry from now is published.
    assert rig.dev.set_avail_event(rig.dev.last_avail_idx + 2) is False
    _add_publish(rig)
    _add_publish(rig)
    assert rig.drv.kick_needed() is False
    _add_publish(rig)
    assert rig.drv.kick_needed() is True
    assert rig.dev.set_avail_event(rig.dev.last_avail_idx + 1) is True  # already there


def test_interrupt_suppression_without_event_idx() -> None:
    rig = make_rig()
    head = _add_publish(rig)
    rig.dev.pop()
    assert rig.drv.set_interrupt_suppression(True) is False
    assert rig.u16(rig.avail_gpa) & VRING_AVAIL_F_NO_INTERRUPT
    rig.dev.push(head, 0)
    rig.dev.publish()
    assert rig.dev.should_notify() is False
    assert rig.drv.set_interrupt_suppression(False) is True  # entries wait: reclaim
    assert rig.dev.should_notify() is False  # nothing new since the last decision
    assert rig.drv.reclaim() == [(head, 0)]
    head = _add_publish(rig)
    rig.dev.pop()
    rig.dev.push(head, 0)
    assert rig.dev.should_notify() is False  # pushed but not published
    rig.dev.publish()
    assert rig.dev.should_notify() is True


def test_interrupt_suppression_with_event_idx() -> None:
    rig = make_rig(event_idx=True, start=0xFFFE)
    assert rig.dev.should_notify() is True  # first decision after set_base: unknown, so yes

    def complete() -> None:
        head = _add_publish(rig)
        rig.dev.pop()
        rig.dev.push(head, 0)
        rig.dev.publish()

    complete()
    assert rig.dev.should_notify() is True  # used_event = start: the first entry
    complete()
    assert rig.dev.should_notify() is False  # driver has not reclaimed/re-armed
    rig.drv.reclaim()  # re-arms used_event at last_used
    complete()
    assert rig.dev.should_notify() is True
    rig.drv.set_interrupt_suppression(True)
    for _ in range(3 * 8):
        complete()
        assert rig.dev.should_notify() is False
        rig.drv.reclaim()


# -- model-based ---------------------------------------------------------------------------

SLOT = 128


@dataclass
class Expect:
    head: int
    data: bytes
    writable: list[tuple[int, int]]
    slots: list[int]
    ndesc: int
    chain: Chain | None = None
    written: bytes = b""
    used_len: int = 0


class QueueMachine(RuleBasedStateMachine):
    """Driver and device driven in random interleavings against a reference model."""

    @initialize(
        size=st.sampled_from([4, 1, 2, 8, 16]),
        event_idx=st.booleans(),
        indirect=st.booleans(),
        before_wrap=st.integers(1, 48),  # 16-bit indices wrap within the run
    )
    def setup(self, size: int, event_idx: bool, indirect: bool, before_wrap: int) -> None:
        start = 0x10000 - before_wrap
        self.rig = make_rig(size, event_idx=event_idx, indirect=indirect, start=start, mem_size=1 << 17)
        self.size, self.event_idx, self.indirect = size, event_idx, indirect
        self.free_slots = list(range(size * 6))
        self.added: deque[Expect] = deque()  # added, not published
        self.published: deque[Expect] = deque()  # published, not popped
        self.in_flight: list[Expect] = []  # popped, not pushed
        self.pushed: deque[Expect] = deque()  # pushed, not published by the device
        self.used: deque[Expect] = deque()  # published used, not reclaimed
        self.descs_in_use = 0
        # Reference model of notification state, as each side wrote it.
        self.avail_event = start  # device's wish (EVENT_IDX), initialised by the driver
        self.dev_wants_kicks = True  # used.flags NO_NOTIFY clear
        self.used_event = start  # driver's wish (EVENT_IDX)
        self.suppressed = False
        self.kicked_at = start
        self.signalled: int | None = None
        # Liveness: a sleeping side must be woken.
        self.dev_waits_for: int | None = None  # avail index whose publication must kick
        self.drv_waits = False  # driver sleeps with interrupts on

    def _slot(self) -> int:
        return self.rig.data + SLOT * self.free_slots.pop()

    @rule(data=st.data(), count=st.integers(1, 3), publish=st.booleans())
    def driver_add(self, data: st.DataObject, count: int, publish: bool) -> None:
        for _ in range(count):
            self._add_one(data)
        if publish:
            self.driver_publish_and_kick()

    def _add_one(self, data: st.DataObject) -> None:
        nr = data.draw(st.integers(0, 3), "readable")
        nw = data.draw(st.integers(0 if nr else 1, 2), "writable")
        use_indirect = self.indirect and data.draw(st.booleans(), "indirect")
        need = 1 if use_indirect else nr + nw
        if self.rig.drv.num_free < need:
            with pytest.raises(LocalProtocolError, match="queue-full"):
                self.rig.drv.add([(self.rig.data, 1)] * nr, [(self.rig.data, 1)] * nw,
                                 indirect_gpa=self.rig.data if use_indirect else None)
            return
        slots_before = list(self.free_slots)
        readable, writable, payload = [], [], b""
        for _ in range(nr):
            chunk = data.draw(st.binary(max_size=64), "chunk")
            gpa = self._slot()
            self.rig.buf[gpa : gpa + len(chunk)] = chunk
            readable.append((gpa, len(chunk)))
            payload += chunk
        for _ in range(nw):
            writable.append((self._slot(), data.draw(st.integers(0, 64), "wlen")))
        table = self._slot() if use_indirect else None
        head = self.rig.drv.add(readable, writable, indirect_gpa=table)
        assert 0 <= head < self.size
        used_slots = [s for s in slots_before if s not in self.free_slots]
        self.added.append(Expect(head, payload, writable, used_slots, need))
        self.descs_in_use += need

    @rule()
    def driver_publish_and_kick(self) -> None:
        drv = self.rig.drv
        drv.publish()
        self.published.extend(self.added)
        self.added.clear()
        new, old = drv.avail_idx, self.kicked_at
        moved = [(old + k) & 0xFFFF for k in range((new - old) & 0xFFFF)]
        if self.event_idx:
            expected = self.avail_event in moved
        else:
            expected = bool(moved) and self.dev_wants_kicks
        assert drv.kick_needed() is expected
        self.kicked_at = new
        if expected:
            self.dev_waits_for = None

    @rule(count=st.integers(1, 4))
    def device_pop(self, count: int) -> None:
        for _ in range(count):
            self._pop_one()

    def _pop_one(self) -> None:
        chain = self.rig.dev.pop()
        self.dev_waits_for = None  # the device is awake
        if not self.published:
            assert chain is None
            return
        exp = self.published.popleft()
        assert chain is not None
        assert chain.head == exp.head
        assert chain.read_all() == exp.data and chain.readable_len == len(exp.data)
        assert [len(v) for v in chain.writable] == [n for _, n in exp.writable if n]
        assert chain.writable_len == sum(n for _, n in exp.writable)
        exp.chain = chain
        self.in_flight.append(exp)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), count=st.integers(1, 4), publish=st.booleans())
    def device_push(self, data: st.DataObject, count: int, publish: bool) -> None:
        for _ in range(min(count, len(self.in_flight))):
            self._push_one(data)
        if publish:
            self.device_publish_and_notify()

    def _push_one(self, data: st.DataObject) -> None:
        exp = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1), "which"))
        assert exp.chain is not None
        out = data.draw(st.binary(min_size=exp.chain.writable_len, max_size=exp.chain.writable_len), "out")
        off = 0
        for view in exp.chain.writable:
            view[:] = out[off : off + len(view)]
            off += len(view)
        exp.written = out
        exp.used_len = data.draw(st.integers(0, exp.chain.writable_len), "used_len")
        self.rig.dev.push(exp.head, exp.used_len)
        self.pushed.append(exp)

    @rule()
    def device_publish_and_notify(self) -> None:
        dev = self.rig.dev
        dev.publish()
        self.used.extend(self.pushed)
        self.pushed.clear()
        new, old = dev.used_idx, self.signalled
        if old is None:
            expected = True if self.event_idx else not self.suppressed
        else:
            moved = [(old + k) & 0xFFFF for k in range((new - old) & 0xFFFF)]
            if self.event_idx:
                expected = self.used_event in moved
            else:
                expected = bool(moved) and not self.suppressed
        assert dev.should_notify() is expected
        self.signalled = new
        if expected:
            self.drv_waits = False

    @rule(data=st.data())
    def round_trip(self, data: st.DataObject) -> None:
        """A whole cycle at once, so that long runs reach deep states often."""
        self.driver_add(data, data.draw(st.integers(1, 3), "n_add"), True)
        self.device_pop(data.draw(st.integers(1, 4), "n_pop"))
        if self.in_flight:
            self.device_push(data, data.draw(st.integers(1, 4), "n_push"), True)
        if data.draw(st.booleans(), "reclaim"):
            self.driver_reclaim()

    @rule()
    def driver_reclaim(self) -> None:
        got = self.rig.drv.reclaim()
        assert got == [(e.head, e.used_len) for e in self.used]
        for e in self.used:
            off = 0
            for gpa, n in e.writable:
                assert bytes(self.rig.buf[gpa : gpa + n]) == e.written[off : off + n]
                off += n
            self.free_slots.extend(e.slots)
            self.descs_in_use -= e.ndesc
        self.used.clear()
        last = self.rig.drv.last_used_idx
        if self.event_idx:
            self.used_event = (last - 1) & 0xFFFF if self.suppressed else last
        self.drv_waits = not self.suppressed

    @rule(on=st.booleans())
    def driver_interrupt_suppression(self, on: bool) -> None:
        pending = self.rig.drv.set_interrupt_suppression(on)
        assert pending is bool(self.used)
        self.suppressed = on
        last = self.rig.drv.last_used_idx
        if self.event_idx:
            self.used_event = (last - 1) & 0xFFFF if on else last
        self.drv_waits = not on and not pending

    @rule()
    def device_enable_notifications(self) -> None:
        pending = self.rig.dev.enable_notifications()
        assert pending is bool(self.published)
        last = self.rig.dev.last_avail_idx
        if self.event_idx:
            self.avail_event = last
        else:
            self.dev_wants_kicks = True
        self.dev_waits_for = None if pending else last

    @rule()
    def device_disable_notifications(self) -> None:
        self.rig.dev.disable_notifications()
        if not self.event_idx:
            self.dev_wants_kicks = False
        self.dev_waits_for = None

    @precondition(lambda self: self.event_idx)
    @rule(data=st.data())
    def device_set_avail_event(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(0, self.size), "ahead")
        last = self.rig.dev.last_avail_idx
        ready = self.rig.dev.set_avail_event(last + k)
        assert ready is (len(self.published) > k)
        self.avail_event = (last + k) & 0xFFFF
        self.dev_waits_for = None if ready else self.avail_event

    @invariant()
    def indices_agree(self) -> None:
        if not hasattr(self, "rig"):
            return
        dev, drv = self.rig.dev, self.rig.drv
        assert drv.num_free + self.descs_in_use == self.size
        assert (drv.avail_idx - dev.last_avail_idx) & 0xFFFF == len(self.added) + len(self.published)
        assert (dev.used_idx - drv.last_used_idx) & 0xFFFF == len(self.pushed) + len(self.used)
        assert dev.in_flight == len(self.in_flight)
        assert self.rig.u16(self.rig.avail_gpa + 2) == (drv.avail_idx - len(self.added)) & 0xFFFF

    @invariant()
    def no_lost_wakeups(self) -> None:
        if not hasattr(self, "rig"):
            return
        if self.dev_waits_for is not None:
            # Published entries have not reached the one the device sleeps on.
            last = self.rig.dev.last_avail_idx
            assert len(self.published) <= (self.dev_waits_for - last) & 0xFFFF
        if self.drv_waits:
            # Every used entry the device published (and decided on) has interrupted.
            assert not self.used


QueueMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=80, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestQueueMachine = QueueMachine.TestCase


# -- garbage rings ---------------------------------------------------------------------------


def _desc_strategy(size: int) -> st.SearchStrategy[bytes]:
    addr = st.one_of(st.integers(0, 0x4000), st.integers(0x3F00, 0x4100), st.integers(0, (1 << 64) - 1))
    length = st.one_of(st.integers(0, 64), st.sampled_from([0, 16, 32, 48, 17, 0x4000]), st.integers(0, (1 << 32) - 1))
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF))
    one = st.builds(DESC.pack, addr, length, flags, nxt)
    return st.one_of(
        st.lists(one, min_size=size, max_size=size).map(b"".join),
        st.binary(min_size=16 * size, max_size=16 * size),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), size=st.sampled_from([1, 2, 4, 8, 16]), event_idx=st.booleans(), indirect=st.booleans())
def test_pop_on_garbage_stays_in_bounds(data: st.DataObject, size: int, event_idx: bool, indirect: bool) -> None:
    mem_size = 0x4000
    rig = make_rig(size, event_idx=event_idx, indirect=indirect, mem_size=mem_size,
                   max_chain_bytes=data.draw(st.sampled_from([64, 4096, 1 << 20]), "max"),
                   memory_cls=RecordingMemory)
    mem = rig.mem
    assert isinstance(mem, RecordingMemory)
    d, a, u = ring_sizes(size)
    rig.buf[rig.desc_gpa : rig.desc_gpa + d] = data.draw(_desc_strategy(size), "desc")
    rig.buf[rig.avail_gpa : rig.avail_gpa + a] = data.draw(st.binary(min_size=a, max_size=a), "avail")
    # Indirect tables and buffers land in a garbage-filled data area.
    garbage = data.draw(st.binary(min_size=256, max_size=256), "garbage")
    for off in range(rig.data, mem_size, 256):
        rig.buf[off : off + 256] = garbage
    base = data.draw(st.integers(0, 0xFFFF), "base")
    rig.dev.set_base(base)
    before = bytes(rig.buf)
    mem.granted.clear()

    steps = 0
    while steps <= size + 1:
        steps += 1
        try:
            chain = rig.dev.pop()
        except RingError as exc:
            if exc.head is None:
                if exc.reason == "avail-index-jump":
                    break
                continue
            assert 0 <= exc.head < size
            continue
        if chain is None:
            break
        assert 0 <= chain.head < size
        assert chain.readable_len + chain.writable_len <= rig.dev.max_chain_bytes
        assert sum(map(len, chain.readable)) == chain.readable_len
        assert sum(map(len, chain.writable)) == chain.writable_len
    else:
        pytest.fail("pop did not stop within size + 1 entries")
    assert bytes(rig.buf) == before  # pop never writes
    assert len(mem.granted) <= steps * (size + 32768)
    for gpa, length in mem.granted:
        assert 0 <= gpa and gpa + length <= mem_size
