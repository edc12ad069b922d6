"""Front-end faults: disconnects anywhere, fds without messages and messages without fds,
bad memory tables, rings outside memory, messages in the wrong state.

Each fault, sent over a real socket by a front-end that sends exactly what the test says,
must close only that session (a second VM on the same service keeps being served), release
every fd and guest-memory mapping the session held (``/proc/self/fd``, ``/proc/self/maps``),
count the reason when the front-end broke a rule (a front-end that merely hangs up, even in
the middle of a message, is not counted), and leave the VM able to take a new front-end:
``start_guest`` works again on the same socket.  The base sequence is what QEMU 11.1 sends
(docs/qemu-facts.md, ``tests/fuzz/harness.py:qemu_sequence``).  The same faults against the real
service binary, and what a front-end can do to the memory and fds it shares, are in
tests/test_blast_radius.py.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.backend.service.vms import Service, VmSlot
from vhost_user_cpufreq.protocol import vhost_user as vu

from .fuzz.harness import (
    QEMU_PROTOCOL_FEATURES,
    STREAM_RAM_SIZE,
    STREAM_REGIONS,
    STREAM_RING,
    UVA_BASE,
    VIRTIO_FEATURES,
    FdFactory,
    Wire,
    fd_target,
    is_open,
    memfd_maps,
    message,
    open_fds,
    qemu_sequence,
    send_data,
    settle,
    wire,
)
from .helpers import Guest, make_service, require_c_dataplane, start_guest, until

F = vu.FrontendRequest
PF = vu.ProtocolFeature
VMAP = (0, 0, 1, 2)
RING_SIZE, RING_DESC, RING_AVAIL, RING_USED = STREAM_RING
#: Protocol features without REPLY_ACK: every refused request closes the session.
PF_NO_ACK = QEMU_PROTOCOL_FEATURES & ~PF.REPLY_ACK.mask
REGIONS = [vu.MemoryRegion(g, s, UVA_BASE + g, g) for g, s in STREAM_REGIONS]


@dataclass
class Bed:
    svc: Service
    policy: RecordingPolicy
    slot: VmSlot  # the VM under test
    other_slot: VmSlot  # another VM of the same service, with a guest running
    other: Guest
    path: str
    tmp: Path
    ram_fd: int
    _factory: FdFactory | None = None

    async def send(self, wires: list[Wire], *, cut: int | None = None, abrupt: bool = False) -> None:
        """Connect, send ``wires`` (one sendmsg each, fds made per kind), optionally only the
        first ``cut`` bytes, then hang up -- after the back-end read it all, unless ``abrupt``."""
        fac = FdFactory(self.tmp, self.ram_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
            sock.setblocking(False)
            sent = 0
            for w in wires:
                data = w.data if cut is None else w.data[: max(0, cut - sent)]
                if not data:
                    break
                fds = [fac.make(k) for k in w.fds]
                if not await send_data(sock, data, fds):
                    break
                sent += len(data)
                if not abrupt:
                    await settle(sock)
            if not abrupt:
                await settle(sock)
        finally:
            sock.close()
        self._factory = fac

    async def closed(self, n0: int, timeout: float = 3.0) -> str:
        await until(lambda: len(self.slot.history) > n0 and self.slot.connection is None, timeout, "session closed")
        if self._factory is not None:
            self._factory.close_all()
        return self.slot.history[n0]

    async def served(self, slot: VmSlot, guest: Guest) -> None:
        """A record from ``guest`` reaches the policy (kicked even if kick batching would wait)."""
        n = slot.counters.get("records")
        guest.driver.set_util(1, 400 + n % 2)
        guest.driver.flush()
        guest.transport.notify(0)
        await until(lambda: slot.counters.get("records") > n, 3.0, "a record")


@pytest.fixture
async def bed(tmp_path: Path) -> AsyncIterator[Bed]:
    # Log records keep the exceptions they were logged with, and those their frames: pytest's log
    # capture would keep guest memory alive after the session closed (see the test of that below).
    vlog = logging.getLogger("vhost_user_cpufreq")
    level = vlog.level
    vlog.setLevel(logging.ERROR)
    svc, _source, policy, slots = await make_service(tmp_path, ("vm", VMAP), ("other", (2, 2)))
    other = await start_guest(str(tmp_path / "other.sock"), util_threshold=1)
    ram = os.memfd_create("vuc-fault-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, STREAM_RAM_SIZE)
    b = Bed(svc, policy, slots["vm"], slots["other"], other, str(tmp_path / "vm.sock"), tmp_path, ram)
    await b.served(b.other_slot, other)  # its ring is running: every fd it sent is in place
    try:
        yield b
    finally:
        await other.close()
        await svc.close()
        os.close(ram)
        vlog.setLevel(level)


def _leaks(fds0: set[int], maps0: tuple[int, int]) -> tuple[dict[int, str], tuple[int, int]]:
    now = open_fds()
    if len(now) > len(fds0) or memfd_maps() != maps0:
        gc.collect()
        now = open_fds()
    leaked = {fd: fd_target(fd) for fd in now - fds0 if is_open(fd)} if len(now) > len(fds0) else {}
    return leaked, memfd_maps()


async def fault(bed: Bed, wires: list[Wire], *, reason: str | None, counted: bool = True,
                cut: int | None = None, abrupt: bool = False) -> str:
    """Send a faulty stream and check everything a fault must leave behind; returns the close reason."""
    slot = bed.slot
    fds0, maps0 = open_fds(), memfd_maps()
    n0, closed0 = len(slot.history), slot.counters.total("sessions_closed")
    await bed.send(wires, cut=cut, abrupt=abrupt)
    why = await bed.closed(n0)
    if reason is not None:
        assert why == reason, (why, slot.counters.snapshot())
    if counted:
        assert slot.counters.total("sessions_closed") == closed0 + 1, (why, slot.counters.snapshot())
        assert slot.counters.get("sessions_closed", why) >= 1, (why, slot.counters.snapshot())
    else:
        assert slot.counters.total("sessions_closed") == closed0, slot.counters.snapshot()
    leaked, maps = _leaks(fds0, maps0)
    assert leaked == {}, f"fds left open after the session closed: {leaked}"
    assert maps == maps0, f"guest memory still mapped: {maps0} -> {maps}"
    # Only that session: the other VM is served all along...
    await bed.served(bed.other_slot, bed.other)
    # ...and this VM takes a new front-end on the same socket.
    g = await start_guest(bed.path, util_threshold=1)
    try:
        await bed.served(slot, g)
    finally:
        n1 = len(slot.history)
        await g.close()
        await until(lambda: len(slot.history) > n1, 3.0, "the new session to end")
    return why


def _owner(pf: int = PF_NO_ACK) -> list[Wire]:
    return [wire(F.GET_FEATURES), wire(F.GET_PROTOCOL_FEATURES), wire(F.SET_PROTOCOL_FEATURES, vu.U64(pf)),
            wire(F.SET_OWNER)]


def _memory(slots: bool = True) -> list[Wire]:
    if slots:
        return [wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(r), ("ram",)) for r in REGIONS]
    return [wire(F.SET_MEM_TABLE, vu.MemoryTable(tuple(REGIONS)), ("ram",) * len(REGIONS))]


def _ring(addr: vu.VringAddr | None = None, kick: tuple[str, ...] = ("eventfd",)) -> list[Wire]:
    addr = addr or vu.VringAddr(0, 0, UVA_BASE + RING_DESC, UVA_BASE + RING_USED, UVA_BASE + RING_AVAIL, 0)
    return [wire(F.SET_VRING_NUM, vu.VringState(0, RING_SIZE)), wire(F.SET_VRING_BASE, vu.VringState(0, 0)),
            wire(F.SET_VRING_ADDR, addr), wire(F.SET_VRING_KICK, vu.U64(0), kick),
            wire(F.SET_VRING_CALL, vu.U64(0), ("eventfd",)), wire(F.SET_VRING_ENABLE, vu.VringState(0, 1))]


def _running(pf: int = PF_NO_ACK, slots: bool = True) -> list[Wire]:
    """A session with memory mapped and the ring running, every fd in place."""
    return (_owner(pf) + [wire(F.SET_BACKEND_REQ_FD, None, ("chan",))] if pf & PF.BACKEND_REQ.mask else _owner(pf)) + [
        wire(F.SET_VRING_ERR, vu.U64(0), ("eventfd",)), wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES)),
    ] + _memory(slots) + _ring()


# -- disconnects ---------------------------------------------------------------------------------------

def _boundaries() -> list[Any]:
    out: list[Any] = []
    for slots in (True, False):
        seq = qemu_sequence(mem_slots=slots)
        for k in range(len(seq) + 1):
            after = seq[k - 1].label if k else "nothing"
            out.append(pytest.param(slots, k, id=f"{'slots' if slots else 'table'}-{k:02d}-after-{after}"))
    return out


@pytest.mark.parametrize("slots, k", _boundaries())
async def test_disconnect_at_every_message_boundary(bed: Bed, slots: bool, k: int) -> None:
    seq = qemu_sequence(mem_slots=slots)
    why = await fault(bed, seq[:k], reason="front-end disconnected", counted=False)
    assert why == "front-end disconnected"
    assert bed.slot.counters.total("rejected") == 0, bed.slot.counters.snapshot()


def _middles() -> list[Any]:
    out: list[Any] = []
    for slots in (True, False):
        seq = qemu_sequence(mem_slots=slots)
        for k, w in enumerate(seq):
            out.append(pytest.param(slots, k, id=f"{'slots' if slots else 'table'}-{k:02d}-half-of-{w.label}"))
    return out


@pytest.mark.parametrize("slots, k", _middles())
async def test_disconnect_in_the_middle_of_a_message(bed: Bed, slots: bool, k: int) -> None:
    # Half a message, its fds riding with the first half (as QEMU sends them), then EOF.
    seq = qemu_sequence(mem_slots=slots)
    cut = sum(len(w.data) for w in seq[:k]) + len(seq[k].data) // 2
    await fault(bed, seq[: k + 1], reason="truncated-message", counted=False, cut=cut)


@pytest.mark.parametrize("kinds", [("eventfd",), ("ram", "ram", "ram"), ("memfd-small",), ("pipe-r",), ("pipe-w",),
                                   ("socket",), ("file",), ("devnull",), ("dir",), ("eventfd",) * 8],
                         ids=lambda k: "+".join(k))
@pytest.mark.parametrize("state", ["fresh", "running"])
async def test_fds_with_a_one_byte_partial_header_then_close(bed: Bed, kinds: tuple[str, ...], state: str) -> None:
    # sendmsg() cannot carry fds without data: one byte of a header is the least that can.
    prefix = _running() if state == "running" else []
    await fault(bed, prefix + [Wire(struct.pack("<I", F.SET_VRING_KICK)[:1], kinds, "1-byte")],
                reason="truncated-message", counted=False)


# -- fds and messages that do not match -----------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    pytest.param(wire(F.GET_FEATURES, None, ("eventfd",)), id="GET_FEATURES+fd"),
    pytest.param(wire(F.GET_QUEUE_NUM, None, ("ram", "pipe-r", "socket")), id="GET_QUEUE_NUM+3fds"),
    pytest.param(wire(F.SET_VRING_KICK, vu.U64(vu.VRING_NOFD_MASK), ("eventfd",)), id="KICK-nofd-bit+fd"),
    pytest.param(wire(F.SET_MEM_TABLE, vu.MemoryTable(tuple(REGIONS[:1])), ("ram", "ram")), id="MEM_TABLE-1region+2fds"),
    pytest.param(wire(F.SET_MEM_TABLE, vu.MemoryTable(tuple(REGIONS)), ("ram", "ram")), id="MEM_TABLE-3regions+2fds"),
    pytest.param(message(F.SET_MEM_TABLE, 1, vu.MemoryTable(tuple(REGIONS[:1])).encode()), id="MEM_TABLE-no-fd"),
    pytest.param(message(F.ADD_MEM_REG, 1, vu.SingleMemoryRegion(REGIONS[0]).encode()), id="ADD_MEM_REG-no-fd"),
    pytest.param(message(F.SET_VRING_KICK, 1, vu.U64(0).encode()), id="KICK-no-fd"),
    pytest.param(message(F.SET_VRING_CALL, 1, vu.U64(0).encode()), id="CALL-no-fd"),
    pytest.param(message(F.SET_VRING_ERR, 1, vu.U64(0).encode()), id="ERR-no-fd"),
    pytest.param(message(F.SET_BACKEND_REQ_FD, 1, b""), id="BACKEND_REQ_FD-no-fd"),
    pytest.param(message(F.SET_BACKEND_REQ_FD, 1, b"", ("chan", "chan")), id="BACKEND_REQ_FD-2fds"),
])
async def test_fds_and_messages_that_do_not_match(bed: Bed, bad: Wire) -> None:
    await fault(bed, _running() + [bad], reason="fd-count-mismatch")


# -- memory -------------------------------------------------------------------------------------------------

def _table(*regions: tuple[int, int, int, int], fds: tuple[str, ...] | None = None) -> Wire:
    rs = tuple(vu.MemoryRegion(*r) for r in regions)
    return wire(F.SET_MEM_TABLE, vu.MemoryTable(rs), fds or ("ram",) * len(rs))


_U = UVA_BASE
_BAD_TABLES = [
    ("overlapping-gpa", _table((0, 0x10000, _U, 0), (0x8000, 0x10000, _U + 0x100000, 0x8000)), "overlapping-regions"),
    ("overlapping-uva", _table((0, 0x10000, _U, 0), (0x100000, 0x10000, _U + 0x8000, 0x100000)), "overlapping-regions"),
    ("huge-2^40", _table((0, 1 << 40, _U, 0)), "unmappable-region"),
    ("too-huge", _table((0, (1 << 40) + 0x1000, _U, 0)), "bad-region-size"),
    ("empty", _table((0, 0, _U, 0)), "bad-region-size"),
    ("gpa-wraps", _table(((1 << 64) - 0x1000, 0x10000, _U, 0)), "region-wraps"),
    ("uva-wraps", _table((0, 0x10000, (1 << 64) - 0x1000, 0)), "region-wraps"),
    ("offset-2^63", _table((0, 0x10000, _U, 1 << 63)), "unmappable-region"),
    ("offset-past-end", _table((0, 0x10000, _U, STREAM_RAM_SIZE)), "unmappable-region"),
    ("third-bad", _table((0, 0x10000, _U, 0), (0x100000, 0x10000, _U + 0x100000, 0x100000),
                         (0x200000, 1 << 30, _U + 0x200000, 0)), "unmappable-region"),
    ("nine-regions", message(F.SET_MEM_TABLE, 1, struct.pack("<II", 9, 0) + bytes(32 * 9), ("ram",) * 9),
     "oversized-payload"),
] + [
    (f"fd-{kind}", _table((0, 0x10000, _U, 0), fds=(kind,)), "unmappable-region")
    for kind in ("pipe-r", "pipe-w", "socket", "devnull", "dir", "memfd-empty", "memfd-small")
]


@pytest.mark.parametrize("bad, reason", [pytest.param(b, r, id=i) for i, b, r in _BAD_TABLES])
@pytest.mark.parametrize("state", ["owner", "running"])
async def test_bad_memory_tables(bed: Bed, bad: Wire, reason: str, state: str) -> None:
    prefix = _running(slots=False) if state == "running" else _owner()
    await fault(bed, prefix + [bad], reason=reason)


@pytest.mark.parametrize("bad, reason", [
    pytest.param([wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(vu.MemoryRegion(0x1000, 0x1000, _U + 0x500000, 0)),
                       ("ram",))], "overlapping-regions", id="add-overlapping"),
    pytest.param([wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(vu.MemoryRegion(0x200000 + i * 0x1000, 0x1000,
                                                                             _U + 0x200000 + i * 0x1000, i * 0x1000)),
                       ("ram",)) for i in range(40)], "too-many-regions", id="add-40-regions"),
    pytest.param([wire(F.REM_MEM_REG, vu.SingleMemoryRegion(vu.MemoryRegion(0x300000, 0x1000, _U, 0)))],
                 "unknown-region", id="remove-unknown"),
    pytest.param([wire(F.REM_MEM_REG, vu.SingleMemoryRegion(REGIONS[2]))], "ring-address-out-of-range",
                 id="remove-the-ring's-region"),
    pytest.param([_table((0, 0xC0000, _U, 0))], "ring-address-out-of-range", id="table-without-the-ring"),
    pytest.param([wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(vu.MemoryRegion(0x200000, 0x10000, _U + 0x200000, 0)),
                       ("pipe-r",))], "unmappable-region", id="add-a-pipe"),
    pytest.param([wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(vu.MemoryRegion(0x200000, 1 << 40, _U + 0x200000, 0)),
                       ("ram",))], "unmappable-region", id="add-huge"),
])
async def test_bad_memory_changes_while_running(bed: Bed, bad: list[Wire], reason: str) -> None:
    await fault(bed, _running(slots=True) + bad, reason=reason)


@pytest.mark.parametrize("addr", [
    pytest.param(vu.VringAddr(0, 0, _U + 0x300000, _U + RING_USED, _U + RING_AVAIL, 0), id="desc-past-ram"),
    pytest.param(vu.VringAddr(0, 0, _U + RING_DESC, _U + RING_USED, _U + 0xC0000 - 100, 0), id="avail-straddles-a-region"),
    pytest.param(vu.VringAddr(0, 0, _U + RING_DESC, _U + 0xD0000, _U + RING_AVAIL, 0), id="used-in-a-hole"),
    pytest.param(vu.VringAddr(0, 0, _U + RING_DESC, _U + STREAM_RAM_SIZE - 100, _U + RING_AVAIL, 0), id="used-past-the-end"),
    pytest.param(vu.VringAddr(0, 0, (1 << 64) - 16, _U + RING_USED, _U + RING_AVAIL, 0), id="desc-at-2^64"),
    pytest.param(vu.VringAddr(0, 0, RING_DESC, RING_USED, RING_AVAIL, 0), id="guest-physical-not-front-end"),
])
async def test_ring_addresses_outside_memory(bed: Bed, addr: vu.VringAddr) -> None:
    prefix = _owner() + [wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES))] + _memory()
    await fault(bed, prefix + _ring(addr), reason="ring-address-out-of-range")


# -- the wrong message at the wrong time ----------------------------------------------------------------

_ADDR = vu.VringAddr(0, 0, _U + RING_DESC, _U + RING_USED, _U + RING_AVAIL, 0)
_WRONG = [
    ("mem-table-before-owner", [], _table((0, 0x10000, _U, 0)), "no-owner"),
    ("kick-before-owner", [], wire(F.SET_VRING_KICK, vu.U64(0), ("eventfd",)), "no-owner"),
    ("owner-twice", _owner(), wire(F.SET_OWNER), "owner-already-set"),
    ("kick-before-num-and-addr", _owner(), wire(F.SET_VRING_KICK, vu.U64(0), ("eventfd",)), "ring-not-configured"),
    ("addr-on-a-started-ring", "running", wire(F.SET_VRING_ADDR, _ADDR), "ring-started"),
    ("num-on-a-started-ring", "running", wire(F.SET_VRING_NUM, vu.VringState(0, 64)), "ring-started"),
    ("base-on-a-started-ring", "running", wire(F.SET_VRING_BASE, vu.VringState(0, 5)), "ring-started"),
    ("enable-without-protocol-features", _owner() + [wire(F.SET_FEATURES, vu.U64(1 << 32))],
     wire(F.SET_VRING_ENABLE, vu.VringState(0, 1)), "feature-not-negotiated"),
    ("add-mem-reg-without-mem-slots", _owner(PF_NO_ACK & ~PF.CONFIGURE_MEM_SLOTS.mask),
     wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(REGIONS[0]), ("ram",)), "feature-not-negotiated"),
    ("get-config-without-config", _owner(PF_NO_ACK & ~PF.CONFIG.mask),
     wire(F.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4))), "feature-not-negotiated"),
    ("backend-req-fd-without-backend-req", _owner(PF_NO_ACK & ~PF.BACKEND_REQ.mask),
     wire(F.SET_BACKEND_REQ_FD, None, ("chan",)), "feature-not-negotiated"),
    ("set-config", "running", wire(F.SET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4))), "read-only-config"),
    ("enable-2", "running", wire(F.SET_VRING_ENABLE, vu.VringState(0, 2)), "bad-enable-value"),
    ("status-0x100", "running", wire(F.SET_STATUS, vu.U64(0x100)), "bad-status"),
    ("ring-1", "running", wire(F.GET_VRING_BASE, vu.VringState(1, 0)), "bad-ring-index"),
    ("dirty-logging", _owner(), wire(F.SET_VRING_ADDR, vu.VringAddr(0, 1, _U, _U, _U, 0)), "unsupported-ring-flags"),
    ("reset-owner", "running", wire(F.RESET_OWNER), "unsupported-request"),
    ("log-base", "running", wire(F.SET_LOG_BASE, vu.Log(0x1000, 0), ("memfd-small",)), "unsupported-request"),
    ("a-reply", "running", message(F.GET_FEATURES, vu.REPLY_FLAGS, b""), "unexpected-reply-flag"),
    ("unknown-request", "running", message(99, 1, b"", ("eventfd",)), "unknown-request"),
    ("config-out-of-range", "running", wire(F.GET_CONFIG, vu.ConfigSpace(250, 7, 0, bytes(7))), "bad-config-range"),
]


@pytest.mark.parametrize("prefix, bad, reason", [pytest.param(p, b, r, id=i) for i, p, b, r in _WRONG])
async def test_messages_in_the_wrong_state(bed: Bed, prefix: object, bad: Wire, reason: str) -> None:
    steps = _running() if prefix == "running" else list(prefix)  # type: ignore[call-overload]
    await fault(bed, steps + [bad], reason=reason)
    assert bed.slot.counters.get("rejected", reason) + bed.slot.counters.get("sessions_closed", reason) >= 1


async def test_with_reply_ack_a_refused_request_is_answered_and_the_session_goes_on(bed: Bed) -> None:
    # The one exception to "a refused request closes the session" (spec: REPLY_ACK).
    steps = _running(QEMU_PROTOCOL_FEATURES) + [
        wire(F.SET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)), need_reply=True),
        wire(F.SET_VRING_ENABLE, vu.VringState(0, 2), need_reply=True),
        wire(F.GET_FEATURES),
    ]
    await fault(bed, steps, reason="front-end disconnected", counted=False)
    c = bed.slot.counters
    assert (c.get("rejected", "read-only-config"), c.get("rejected", "bad-enable-value")) == (1, 1)


# -- bugs found ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pf, bad, reason", [
    pytest.param(PF.REPLY_ACK.mask | PF.CONFIG.mask,
                 wire(F.GET_CONFIG, vu.ConfigSpace(250, 7, 0, bytes(7)), need_reply=True), "bad-config-range",
                 id="GET_CONFIG-out-of-range"),
    pytest.param(PF.REPLY_ACK.mask, wire(F.GET_VRING_BASE, vu.VringState(7, 0), need_reply=True), "bad-ring-index",
                 id="GET_VRING_BASE-ring-7"),
    pytest.param(PF.REPLY_ACK.mask, wire(F.GET_MAX_MEM_SLOTS, need_reply=True), "feature-not-negotiated",
                 id="GET_MAX_MEM_SLOTS-not-negotiated"),
])
async def test_a_refused_request_that_has_its_own_reply_is_not_acked(bed: Bed, pf: int, bad: Wire, reason: str) -> None:
    await fault(bed, _owner(pf) + [bad], reason=reason)


async def test_fds_queued_behind_a_refused_message_are_closed(bed: Bed) -> None:
    glued = b"".join(w.data for w in (wire(F.SET_OWNER), wire(F.SET_OWNER), wire(F.SET_VRING_CALL, vu.U64(0))))
    await _expect_no_leak(bed, [Wire(glued, ("eventfd",), "OWNER+OWNER+CALL")], abrupt=False)


async def test_fds_in_flight_when_the_front_end_dies_are_closed(bed: Bed) -> None:
    glued = wire(F.GET_FEATURES).data + wire(F.SET_VRING_CALL, vu.U64(0)).data
    await _expect_no_leak(bed, [Wire(glued, ("eventfd",), "GET_FEATURES+CALL")], abrupt=True)


async def test_a_back_end_channel_that_is_not_a_socket_is_refused_and_closed(bed: Bed) -> None:
    closed0 = bed.slot.counters.total("sessions_closed")
    await _expect_no_leak(bed, _owner() + [wire(F.SET_BACKEND_REQ_FD, None, ("pipe-r",))])
    assert bed.slot.counters.total("sessions_closed") == closed0 + 1


@pytest.mark.parametrize("kind", ["file", "dir", "devnull"])
async def test_a_kick_fd_that_cannot_be_polled_is_refused_with_a_counted_reason(bed: Bed, kind: str) -> None:
    await fault(bed, _owner() + [wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES))] + _memory() + _ring(kick=(kind,)),
                reason=None, counted=True)


async def _expect_no_leak(bed: Bed, wires: list[Wire], abrupt: bool = False) -> None:
    fds0, maps0 = open_fds(), memfd_maps()
    n0 = len(bed.slot.history)
    await bed.send(wires, abrupt=abrupt)
    await bed.closed(n0)
    leaked, _ = _leaks(fds0, maps0)
    for fd in leaked:
        os.close(fd)  # leaked by the bug: do not let it outlive the test
    assert leaked == {}, f"fds left open after the session closed: {leaked}"


class _LoopLag:
    """Measures how late the event loop runs a 5 ms ticker (a stalled loop stalls every VM)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, time.monotonic() - t - 0.005)

    async def stop(self) -> float:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return self.worst


def _unblock_later(delay: float, action: Callable[[], object]) -> threading.Thread:
    """A watchdog that undoes the stall after ``delay`` s, so that a failing test ends."""

    def run() -> None:
        time.sleep(delay)
        action()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


async def test_a_call_fd_that_would_block_does_not_stall_the_service(bed: Bed) -> None:
    g = await start_guest(bed.path, util_threshold=1)
    efd = os.eventfd(0)  # blocking, as a front-end may well create it
    os.eventfd_write(efd, 0xFFFFFFFFFFFFFFFE)  # counter at its maximum: the next write blocks
    try:
        await g.fe.request(F.SET_VRING_CALL, vu.U64(0), (efd,))
        g.driver.queue.set_interrupt_suppression(False)  # the driver wants used-buffer interrupts now
        lag = _LoopLag()
        await asyncio.sleep(0.02)
        watchdog = _unblock_later(1.0, lambda: os.eventfd_read(efd))
        g.driver.set_util(0, 123)
        g.driver.flush()
        g.transport.notify(0)
        await asyncio.sleep(0.2)
        worst = await lag.stop()
        watchdog.join()
        await bed.served(bed.other_slot, bed.other)
    finally:
        await g.close()
        os.close(efd)
    assert worst < 0.5, f"the event loop stalled for {worst:.2f} s on a call eventfd write"


async def test_a_back_end_channel_the_front_end_made_blocking_does_not_stall_the_service(tmp_path: Path) -> None:
    from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
    from vhost_user_cpufreq.backend.host.hosts import PIXEL6
    from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
    from vhost_user_cpufreq.backend.service.vms import Service, VmConfig
    from vhost_user_cpufreq.backend.vhost.transport import send_with_fds

    source = StaticSource(PIXEL6)
    svc = Service(source, RecordingPolicy())
    await svc.add_vm(VmConfig("vm", str(tmp_path / "vm.sock"), VMAP, notify_interval=0.0))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stop = threading.Event()
    try:
        s.connect(str(tmp_path / "vm.sock"))
        for w in _owner(PF_NO_ACK):
            s.sendall(w.data)
        send_with_fds(s, wire(F.SET_BACKEND_REQ_FD).data, [theirs.fileno()])
        await asyncio.sleep(0.05)
        # The file description is shared: undo the back-end's O_NONBLOCK, and make the buffer tiny.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        theirs.setblocking(True)
        lag = _LoopLag()
        await asyncio.sleep(0.02)
        # A watchdog reads the channel from 1 s on, so that a stalled loop gets going again.
        watchdog = _unblock_later(1.0, lambda: _drain_until(ours, stop))
        for i in range(100):
            source.set_frequencies([300000 + 1000 * (i % 50), 400000, 500000])
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        worst = await lag.stop()
        stop.set()
        watchdog.join()
    finally:
        stop.set()
        s.close()
        theirs.close()
        ours.close()
        await svc.close()
    assert worst < 0.5, f"the event loop stalled for {worst:.2f} s on a CONFIG_CHANGE_MSG send"


def _drain_until(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            sock.recv(65536)
        except (TimeoutError, OSError):
            pass


_SIGBUS_SERVICE = """
import asyncio, sys
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.policy.decision import RecordingPolicy
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig

async def main():
    svc = Service(StaticSource(PIXEL6), RecordingPolicy())
    await svc.add_vm(VmConfig("vm", sys.argv[1], (0, 1)))
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def _shrink_ram_under_a_ring(script: str, path: str, ready: bytes) -> tuple[Any, Guest]:
    """Start ``script`` serving a VM at ``path``; a guest sends a record, truncates its RAM and kicks."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, path, stdout=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parent.parent))
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == ready
        g = await start_guest(path, util_threshold=1)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    g.driver.set_util(0, 100)
    g.driver.flush()
    # The record is served (its buffer comes back) before the RAM goes, however slow the service
    # (a fixed 0.1 s was too short for one under AddressSanitizer on a busy machine).
    deadline = asyncio.get_running_loop().time() + 10
    while not g.driver.queue.reclaim():
        assert asyncio.get_running_loop().time() < deadline, "the record before the truncation was not served"
        await asyncio.sleep(0.005)
    os.ftruncate(g.transport.ram.fd, 0)  # from here on, nobody may touch that RAM (not us either)
    g.transport.notify(0)
    return proc, g


async def test_guest_ram_shrunk_by_the_front_end_does_not_kill_the_service(tmp_path: Path) -> None:
    """The event-loop path (this policy has no C engine): Python reads the ring, under guard.c's handler."""
    proc, g = await _shrink_ram_under_a_ring(_SIGBUS_SERVICE, str(tmp_path / "vm.sock"), b"ready")
    try:
        try:
            await asyncio.wait_for(proc.wait(), 1.0)
        except TimeoutError:
            pass
        alive = proc.returncode is None
        rc = proc.returncode
        await g.driver.remove()
        await g.fe.close()
        g.transport.ram.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert alive, f"the service died with {rc} (-7 is SIGBUS)"


_SIGBUS_SERVICE_LANE = """
import asyncio, json, sys
from vhost_user_cpufreq.backend.host.actuators import ThreadActuator
from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import VcpuPlacement, VmLimits
from vhost_user_cpufreq.backend.host.policy import HostPolicy
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig

async def main():
    policy = HostPolicy(ThreadActuator(Counters(), dry_run=True))
    dom = PIXEL6.domains[0]
    policy.bind("vm", [VcpuPlacement(v, v, dom.capacity, dom.capacity, dom.max_khz, 0) for v in (0, 1)], VmLimits())
    svc = Service(StaticSource(PIXEL6), policy)
    slot = await svc.add_vm(VmConfig("vm", sys.argv[1], (0, 0)))
    def closed(slot, conn):
        print(json.dumps({"closed": conn.closed.result(), "counters": {f"{e}:{r}": n for (e, r), n in
                                                                       slot.counters.snapshot().items()}}), flush=True)
    svc.close_hooks.append(closed)
    print("ready", "lane" if dataplane().lane else dataplane().detail, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_guest_ram_shrunk_under_a_ring_on_the_kick_lane_closes_only_that_session(tmp_path: Path) -> None:
    """The daemon's path: the lane's SIGBUS handler turns the fault into a closed session, counted."""
    require_c_dataplane()
    maps0 = memfd_maps()
    path = str(tmp_path / "vm.sock")
    proc, g = await _shrink_ram_under_a_ring(_SIGBUS_SERVICE_LANE, path, b"ready lane")
    try:
        assert proc.stdout is not None
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 5))
        assert report["closed"] == "guest-memory-gone"
        assert report["counters"]["sessions_closed:guest-memory-gone"] == 1
        assert report["counters"]["records:"] == 1  # the record sent before the RAM went
        await g.driver.remove()  # its views of the RAM go first, so closing the RAM unmaps it now
        await g.fe.close()
        g.transport.ram.close()
        assert proc.returncode is None
        # The VM is served again once its front-end comes back with memory that stays.
        g2 = await start_guest(path, util_threshold=1)
        try:
            g2.driver.set_util(1, 700)
            g2.driver.flush()
            deadline = asyncio.get_running_loop().time() + 5
            while not g2.driver.queue.reclaim():
                assert asyncio.get_running_loop().time() < deadline, "the new session was not served"
                await asyncio.sleep(0.01)
        finally:
            await g2.close()
        assert proc.returncode is None
        assert memfd_maps() == maps0  # both guests' RAM unmapped here: nothing left for a later test to see go
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class _KeepRecords(logging.Handler):
    """A handler that keeps its records, as a buffering or test handler does."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_guest_memory_is_released_even_if_the_error_that_closed_the_session_is_kept(bed: Bed) -> None:
    keep = _KeepRecords()
    vlog = logging.getLogger("vhost_user_cpufreq")
    vlog.addHandler(keep)
    vlog.setLevel(logging.WARNING)
    try:
        fds0, maps0 = open_fds(), memfd_maps()
        n0 = len(bed.slot.history)
        bad = vu.VringAddr(0, 0, _U + RING_DESC, _U + RING_USED, _U + 0xC0000 - 100, 0)
        await bed.send(_owner() + [wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES))] + _memory() + _ring(bad))
        assert await bed.closed(n0) == "ring-address-out-of-range"
        leaked, maps = _leaks(fds0, maps0)
        assert keep.records  # the error was logged, and is kept
        assert (leaked, maps) == ({}, maps0), f"after the session closed: fds {leaked}, memfd mappings {maps0} -> {maps}"
    finally:
        vlog.removeHandler(keep)
        keep.records.clear()
        vlog.setLevel(logging.ERROR)


@pytest.mark.parametrize("kind", ["pipe-r-eof", "socket-eof"])
async def test_a_kick_fd_at_eof_is_handled_inside_the_session(bed: Bed, kind: str) -> None:
    errors: list[object] = []
    loop = asyncio.get_running_loop()
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception") or ctx.get("message")))
    try:
        fds0, maps0 = open_fds(), memfd_maps()
        n0 = len(bed.slot.history)
        steps = _owner() + [wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES))] + _memory() + _ring(kick=(kind,))
        fac = FdFactory(bed.tmp, bed.ram_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(bed.path)
        sock.setblocking(False)
        for w in steps:
            await send_data(sock, w.data, [fac.make(k) for k in w.fds])
            await settle(sock)
        await asyncio.sleep(0.2)  # the ring is running with that kick fd
        await bed.served(bed.other_slot, bed.other)
        sock.close()
        bed._factory = fac
        await bed.closed(n0)
        leaked, maps = _leaks(fds0, maps0)
        assert (leaked, maps) == ({}, maps0)
    finally:
        loop.set_exception_handler(old)
    assert not errors, f"{len(errors)} exceptions escaped to the event loop, e.g. {errors[0]!r}"
