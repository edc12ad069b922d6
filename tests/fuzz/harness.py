"""Generators, mutators and a driver for fuzzing the back-end.

Two kinds of case run against a real :class:`Service` over real unix sockets,
in this process, next to a well-behaved *witness* VM served by the same
service:

* **stream cases** (a hostile front-end, :class:`StreamCase`): the message
  sequence QEMU sends (docs/qemu-facts.md, :func:`qemu_sequence`) mutated by
  :class:`Op` s -- messages dropped, duplicated, reordered; headers, sizes,
  flags and payload fields set to boundary values; fds added, removed or
  replaced by fds of the wrong kind (regular files, pipes, sockets,
  /dev/null, directories, memfds too small or empty); random messages and
  bytes inserted; messages glued into one sendmsg or split over two; the
  connection cut in the middle of the stream.
* **guest cases** (a hostile guest, :class:`GuestCase`): after a
  well-behaved handshake the request ring is restarted at a random size and
  base (indices wrap) and filled with crafted descriptor chains
  (:class:`Buf`: out-of-range addresses, loops, huge lengths, bad or nested
  indirect tables, bad heads) carrying crafted batches (:class:`BatchSpec`:
  bad sizes, counts, flags, vCPUs, utils, duplicated or stale sequence
  numbers), with avail index jumps, or torn by a thread flipping bytes of
  the rings and buffers while the back-end processes them.

Properties checked after every case (:meth:`FuzzBed.run_stream`,
:meth:`FuzzBed.run_guest`): no exception reaches the event loop; the witness
VM still gets its records through; no fd and no guest-memory mapping leaks
(``/proc/self/fd``, ``/proc/self/maps``); every closed session has a reason
and a ``sessions_closed:<reason>`` counter (a front-end that just hangs up,
even mid-message, is not an error and is not counted); every buffer made
available is accounted for by exactly one counter (an accepted batch or a
``rejected:<reason>``) and returned through the used ring; for untorn cases
the records reaching the policy are exactly those a model of the device
predicts; nothing invalid ever reaches the policy; the guest's session keeps
serving; each case finishes within a time bound.

Failures whose signature matches a bug already reported (:data:`KNOWN_BUGS`)
are tallied as *known* instead of failing the run (the orphaned fds such a
bug leaks are closed so that the next case starts clean);
``tests/test_faults.py`` pins each of them with a strict xfail.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import gc
import logging
import os
import random
import socket
import struct
import sys
import tempfile
import termios
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_user_cpufreq.backend.dataplane.cdrain import dataplane
from vhost_user_cpufreq.backend.counters import Counters
from vhost_user_cpufreq.backend.policy.engine import VcpuPlacement
from vhost_user_cpufreq.backend.cpufreq.hostfreq import StaticSource
from vhost_user_cpufreq.backend.host.hosts import PIXEL6
from vhost_user_cpufreq.backend.dataplane.lane import CClampEngine, LaneBinding
from vhost_user_cpufreq.backend.policy.decision import Decision, schedutil_khz
from vhost_user_cpufreq.backend.service.vms import Service, VmConfig, VmSlot
from vhost_user_cpufreq.backend.vhost.transport import Connection
from vhost_user_cpufreq.guest.driver import CpufreqDriver
from vhost_user_cpufreq.guest.frontend import (
    InProcessTransport,
    MemfdRam,
    VhostUserFrontend,
)
from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import vhost_user as vu
from vhost_user_cpufreq.protocol import virtqueue as vq
from vhost_user_cpufreq.protocol.cpufreq import Domain, Record
from vhost_user_cpufreq.protocol.errors import RecordError

__all__ = [
    "FD_KINDS",
    "KNOWN_BUGS",
    "Abrupt",
    "BatchSpec",
    "Buf",
    "CaseResult",
    "Cut",
    "Drop",
    "Dup",
    "Extend",
    "FdFactory",
    "FlipByte",
    "FuzzBed",
    "Glue",
    "GuestCase",
    "Insert",
    "Move",
    "Op",
    "Pace",
    "Poke",
    "Round",
    "SetFds",
    "SetHeader",
    "Split",
    "StreamCase",
    "Swap",
    "Truncate",
    "Wire",
    "WrongFdKind",
    "apply_ops",
    "drain",
    "fd_target",
    "guest_case_strategy",
    "is_open",
    "memfd_maps",
    "message",
    "open_fds",
    "qemu_sequence",
    "random_guest_case",
    "random_message",
    "random_stream_case",
    "send_data",
    "settle",
    "stream_case_strategy",
    "unread",
    "vm_size",
    "wire",
]

F = vu.FrontendRequest
PF = vu.ProtocolFeature
MASK64 = (1 << 64) - 1

# -- the QEMU-like session -----------------------------------------------------------------

UVA_BASE = 0x7F00_0000_0000
#: Guest RAM of stream cases: QEMU's three regions (gpa 0, 0xe0000, 0x100000;
#: mmap_offset == gpa; front-end addresses contiguous), scaled down to 2 MiB.
STREAM_RAM_SIZE = 2 << 20
STREAM_REGIONS = ((0x0, 0xC0000), (0xE0000, 0x10000), (0x100000, 0x100000))
STREAM_RING = (256, 0x100000, 0x101000, 0x102000)  # size, desc, avail, used (guest-physical)
#: VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX | INDIRECT_DESC | PERF_REQUEST (QEMU's SET_FEATURES 0x170000001)
VIRTIO_FEATURES = 1 << 32 | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES | 1 << 29 | 1 << 28 | 1 << abi.F_PERF_REQUEST
#: MQ, REPLY_ACK, BACKEND_REQ, CONFIG, RESET_DEVICE, CONFIGURE_MEM_SLOTS, STATUS: what QEMU 11.1 acks.
QEMU_PROTOCOL_FEATURES = 0x1A229

#: Boundary values for header and payload fields.
INTERESTING = (
    0, 1, 2, 3, 7, 8, 0xFF, 0x100, 0x101, 0xFFF, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
    0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 40, (1 << 40) + 1, 1 << 63, MASK64, MASK64 - 0xFFF,
    UVA_BASE, UVA_BASE + 0x100000, STREAM_RAM_SIZE, STREAM_RAM_SIZE - 8, 0xC0000, 0xE0000, 0x100000,
)
INTERESTING_U32 = tuple(v for v in INTERESTING if v <= 0xFFFFFFFF) + (4096, 4097, 12, 13, 40, 104, 268)


@dataclass(frozen=True)
class Wire:
    """One sendmsg(): bytes, and the kinds of fds sent with them (made at send time)."""

    data: bytes
    fds: tuple[str, ...] = ()
    label: str = ""

    def __repr__(self) -> str:
        return f"Wire({self.label or self.data[:16].hex()!s}, {len(self.data)}B, fds={list(self.fds)})"


def wire(req: vu.FrontendRequest, payload: vu.Payload | None = None, fds: Sequence[str] = (), *,
         need_reply: bool = False) -> Wire:
    return Wire(vu.encode_message(req, payload, need_reply=need_reply), tuple(fds), req.name)


def qemu_sequence(*, mem_slots: bool = True, config_read: bool = True, stop: bool = True,
                  shmem: bool = False) -> list[Wire]:
    """What QEMU 11.1 sends for the device: realize, DRIVER_OK, a config read, a driver reset.

    ``mem_slots``: CONFIGURE_MEM_SLOTS negotiated, memory comes as three
    ADD_MEM_REG; otherwise as one SET_MEM_TABLE with three fds.  ``shmem``: the
    shared frequency page's sequence (SHMEM instead of memory slots,
    GET_SHMEM_CONFIG at realize, the page's feature acked; docs/qemu-facts.md e).
    """
    regions = [vu.MemoryRegion(g, s, UVA_BASE + g, g) for g, s in STREAM_REGIONS]
    mem_slots = mem_slots and not shmem
    pf = QEMU_PROTOCOL_FEATURES if mem_slots else QEMU_PROTOCOL_FEATURES & ~PF.CONFIGURE_MEM_SLOTS.mask
    if shmem:
        pf |= PF.SHMEM.mask
    size, desc, avail, used = STREAM_RING
    seq = [wire(F.GET_FEATURES), wire(F.GET_PROTOCOL_FEATURES), wire(F.SET_PROTOCOL_FEATURES, vu.U64(pf)),
           wire(F.GET_QUEUE_NUM)]
    if mem_slots:
        seq.append(wire(F.GET_MAX_MEM_SLOTS))
    seq += [
        wire(F.SET_BACKEND_REQ_FD, None, ("chan",), need_reply=True),
        wire(F.SET_OWNER),
        wire(F.GET_FEATURES),
        wire(F.SET_VRING_CALL, vu.U64(0), ("eventfd",), need_reply=True),
        wire(F.SET_VRING_ERR, vu.U64(0), ("eventfd",), need_reply=True),
        *([wire(F.GET_SHMEM_CONFIG)] if shmem else []),
        # -- the guest driver writes DRIVER_OK
        wire(F.SET_FEATURES, vu.U64(VIRTIO_FEATURES | (1 << abi.F_FREQ_PAGE if shmem else 0))),
        wire(F.GET_STATUS),
        wire(F.SET_STATUS, vu.U64(8), need_reply=True),
    ]
    if mem_slots:
        seq += [wire(F.ADD_MEM_REG, vu.SingleMemoryRegion(r), ("ram",), need_reply=True) for r in regions]
    else:
        seq.append(wire(F.SET_MEM_TABLE, vu.MemoryTable(tuple(regions)), ("ram",) * len(regions), need_reply=True))
    seq += [
        wire(F.SET_VRING_NUM, vu.VringState(0, size)),
        wire(F.SET_VRING_BASE, vu.VringState(0, 0)),
        wire(F.SET_VRING_ADDR, vu.VringAddr(0, 0, UVA_BASE + desc, UVA_BASE + used, UVA_BASE + avail, used)),
        wire(F.SET_VRING_KICK, vu.U64(0), ("eventfd",), need_reply=True),
        wire(F.SET_VRING_CALL, vu.U64(0), ("eventfd",), need_reply=True),
        wire(F.SET_VRING_ENABLE, vu.VringState(0, 1), need_reply=True),
        wire(F.SET_VRING_CALL, vu.U64(0), ("eventfd",), need_reply=True),
    ]
    if config_read:
        seq.append(wire(F.GET_CONFIG, vu.ConfigSpace(0, abi.CONFIG_SIZE, 0, bytes(abi.CONFIG_SIZE))))
    if stop:
        seq += [wire(F.SET_VRING_ENABLE, vu.VringState(0, 0), need_reply=True),
                wire(F.GET_VRING_BASE, vu.VringState(0, 0))]
    return seq


# -- file descriptors ------------------------------------------------------------------------

#: "ram": guest RAM (a 2 MiB memfd); "eventfd": an eventfd already signalled once (QEMU's
#: spurious kick); "chan": a connected socket (the back-end channel).  The rest are wrong
#: kinds: a memfd of one page, an empty memfd, a 64 KiB regular file, each end of a pipe,
#: a socket, /dev/null, a directory, and a pipe and a socket whose other end is closed.
FD_KINDS_RIGHT = ("ram", "eventfd", "chan")
FD_KINDS_WRONG = ("memfd-small", "memfd-empty", "file", "pipe-r", "pipe-w", "socket", "devnull", "dir",
                  "pipe-r-eof", "socket-eof")
FD_KINDS = FD_KINDS_RIGHT + FD_KINDS_WRONG


class FdFactory:
    """Makes the fds a case sends; everything it made is closed by :meth:`close_all`."""

    def __init__(self, workdir: Path, ram_fd: int) -> None:
        self.workdir = workdir
        self.ram_fd = ram_fd
        self._ours: list[int] = []  # our copies and the far ends of pipes and sockets

    def make(self, kind: str) -> int:
        fd = self._make(kind)
        self._ours.append(fd)
        return fd

    def _make(self, kind: str) -> int:
        if kind == "ram":
            return os.dup(self.ram_fd)
        if kind == "eventfd":
            fd = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            return fd
        if kind in ("chan", "socket"):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self._ours.append(a.detach())
            return b.detach()
        if kind == "socket-eof":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            a.close()
            return b.detach()
        if kind == "pipe-r-eof":
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            os.close(w)
            return r
        if kind == "memfd-small":
            fd = os.memfd_create("vuc-fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
            return fd
        if kind == "memfd-empty":
            return os.memfd_create("vuc-fuzz-empty", os.MFD_CLOEXEC)
        if kind == "file":
            path = self.workdir / "plain-file"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, 64 << 10)
            return fd
        if kind in ("pipe-r", "pipe-w"):
            r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            if kind == "pipe-r":
                self._ours.append(w)
                return r
            self._ours.append(r)
            return w
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if kind == "dir":
            return os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        raise ValueError(f"unknown fd kind {kind!r}")

    def close_all(self) -> None:
        for fd in self._ours:
            try:
                os.close(fd)
            except OSError:
                pass
        self._ours.clear()


def open_fds() -> set[int]:
    """Open fd numbers (the listing's own directory fd included: compare counts, or use is_open)."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
        return True
    except OSError:
        return False


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def memfd_maps() -> tuple[int, int]:
    """(number, total bytes) of mappings of memfds in this process (/proc/self/maps)."""
    n = total = 0
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            if b"/memfd:" in line:
                lo, hi = line.split(None, 1)[0].split(b"-")
                n += 1
                total += int(hi, 16) - int(lo, 16)
    return n, total


def vm_size() -> int:
    """Pages of address space in use (/proc/self/statm): a cheap first look for mapping leaks."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split(None, 1)[0])


# -- random messages ---------------------------------------------------------------------------

_UNKNOWN_IDS = (0, 45, 46, 99, 0xFFFF, 0xFFFFFFFF)
_FLAGS = (1, 1, 1, 1, 9, 9, 5, 0, 2, 3, 0x11, 0x101, 0xFFFFFFFF)


def random_payload(rng: random.Random, size: int) -> bytes:
    buf = bytearray(rng.getrandbits(8 * size).to_bytes(size, "little")) if size else bytearray()
    for off in range(0, size - 7, 8):
        if rng.random() < 0.5:
            struct.pack_into("<Q", buf, off, rng.choice(INTERESTING) & MASK64)
    return bytes(buf)


def message(request: int, flags: int, payload: bytes, fds: Sequence[str] = ()) -> Wire:
    """A message with whatever header fields, payload and fds (no checks)."""
    try:
        label = F(request).name
    except ValueError:
        label = f"request#{request}"
    return Wire(struct.pack("<III", request & 0xFFFFFFFF, flags & 0xFFFFFFFF, len(payload)) + payload,
                tuple(fds), f"{label}/{flags:#x}")


def random_message(rng: random.Random) -> Wire:
    if rng.random() < 0.9:
        req = rng.choice(list(F))
        spec = vu.spec_for(req).request
        lo, hi = spec.min_size, spec.max_size
        size = rng.choice((lo, hi, rng.randint(lo, min(hi, lo + 64)))) if rng.random() < 0.9 else rng.randint(0, 300)
        rule_fds = {vu.FdRule.NONE: 0, vu.FdRule.ONE: 1, vu.FdRule.OPTIONAL: rng.randint(0, 1),
                    vu.FdRule.PER_REGION: rng.randint(0, 3), vu.FdRule.UNLESS_NOFD: 1}[spec.fds]
        nfd = rule_fds if rng.random() < 0.7 else rng.randint(0, 3)
        rid = int(req)
    else:
        rid = rng.choice(_UNKNOWN_IDS + (rng.getrandbits(32),))
        size, nfd = rng.randint(0, 64), rng.randint(0, 2)
    flags = rng.choice(_FLAGS)
    fds = tuple(rng.choice(FD_KINDS) for _ in range(nfd))
    return message(rid, flags, random_payload(rng, size), fds)


# -- mutations ----------------------------------------------------------------------------------
#
# Indices are taken modulo the stream's current length when an op is applied,
# so any list of ops applies to any stream (and hypothesis can shrink freely).


class Op:
    def apply(self, s: list[Wire]) -> None:
        raise NotImplementedError


def _ix(i: int, s: list[Wire]) -> int | None:
    return i % len(s) if s else None


@dataclass(frozen=True)
class Drop(Op):
    i: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None:
            del s[k]


@dataclass(frozen=True)
class Dup(Op):
    i: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None:
            s.insert(k, s[k])


@dataclass(frozen=True)
class Swap(Op):
    i: int
    j: int

    def apply(self, s: list[Wire]) -> None:
        a, b = _ix(self.i, s), _ix(self.j, s)
        if a is not None and b is not None:
            s[a], s[b] = s[b], s[a]


@dataclass(frozen=True)
class Move(Op):
    i: int
    j: int

    def apply(self, s: list[Wire]) -> None:
        a = _ix(self.i, s)
        if a is not None:
            w = s.pop(a)
            s.insert(self.j % (len(s) + 1), w)


@dataclass(frozen=True)
class SetHeader(Op):
    """Set header field 0 (request), 1 (flags) or 2 (size) of message i."""

    i: int
    field: int
    value: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None and len(s[k].data) >= 12:
            d = bytearray(s[k].data)
            struct.pack_into("<I", d, 4 * (self.field % 3), self.value & 0xFFFFFFFF)
            s[k] = Wire(bytes(d), s[k].fds, s[k].label + f"~h{self.field % 3}={self.value & 0xFFFFFFFF:#x}")


@dataclass(frozen=True)
class Poke(Op):
    """Write ``value`` as a ``width``-byte field at a payload offset of message i (a field at a boundary value)."""

    i: int
    offset: int
    width: int
    value: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is None:
            return
        width = self.width if self.width in (1, 2, 4, 8) else 8
        d = bytearray(s[k].data)
        room = len(d) - 12 - width
        if room < 0:
            return
        off = 12 + (self.offset % (room + 1)) // width * width
        struct.pack_into({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[width], d, off, self.value & ((1 << 8 * width) - 1))
        s[k] = Wire(bytes(d), s[k].fds, s[k].label + f"~p{off - 12}={self.value:#x}")


@dataclass(frozen=True)
class FlipByte(Op):
    i: int
    offset: int
    xor: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None and s[k].data:
            d = bytearray(s[k].data)
            off = self.offset % len(d)
            d[off] ^= (self.xor & 0xFF) or 1
            s[k] = Wire(bytes(d), s[k].fds, s[k].label + f"~x{off}")


@dataclass(frozen=True)
class Truncate(Op):
    i: int
    keep: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None and len(s[k].data) > 1:
            keep = self.keep % len(s[k].data)
            s[k] = Wire(s[k].data[:keep], s[k].fds, s[k].label + f"~t{keep}")


@dataclass(frozen=True)
class Extend(Op):
    """Append bytes to message i, with the header size adjusted (fix_size) or not."""

    i: int
    extra: bytes
    fix_size: bool

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is None:
            return
        d = bytearray(s[k].data + self.extra)
        if self.fix_size and len(d) >= 12:
            struct.pack_into("<I", d, 8, (len(d) - 12) & 0xFFFFFFFF)
        s[k] = Wire(bytes(d), s[k].fds, s[k].label + f"~e{len(self.extra)}")


@dataclass(frozen=True)
class SetFds(Op):
    """Replace the fds of message i: extra, missing, or of the wrong kind."""

    i: int
    fds: tuple[str, ...]

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None:
            s[k] = Wire(s[k].data, tuple(self.fds), s[k].label + f"~fds{list(self.fds)}")


@dataclass(frozen=True)
class WrongFdKind(Op):
    """Give the i-th message that carries fds fds of another kind (as many as it had)."""

    i: int
    kind: str

    def apply(self, s: list[Wire]) -> None:
        with_fds = [k for k, w in enumerate(s) if w.fds]
        if with_fds:
            k = with_fds[self.i % len(with_fds)]
            s[k] = Wire(s[k].data, (self.kind,) * len(s[k].fds), s[k].label + f"~fd={self.kind}")


@dataclass(frozen=True)
class Insert(Op):
    i: int
    w: Wire

    def apply(self, s: list[Wire]) -> None:
        s.insert(self.i % (len(s) + 1), self.w)


@dataclass(frozen=True)
class Glue(Op):
    """Send messages i and i+1 with one sendmsg() (their fds together)."""

    i: int

    def apply(self, s: list[Wire]) -> None:
        if len(s) >= 2:
            k = self.i % (len(s) - 1)
            a, b = s[k], s[k + 1]
            s[k : k + 2] = [Wire(a.data + b.data, a.fds + b.fds, f"{a.label}+{b.label}")]


@dataclass(frozen=True)
class Split(Op):
    """Send message i with two sendmsg() calls (its fds with the first)."""

    i: int
    at: int

    def apply(self, s: list[Wire]) -> None:
        k = _ix(self.i, s)
        if k is not None and len(s[k].data) >= 2:
            w = s[k]
            at = 1 + self.at % (len(w.data) - 1)
            s[k : k + 1] = [Wire(w.data[:at], w.fds, w.label + f"[:{at}]"), Wire(w.data[at:], (), w.label + f"[{at}:]")]


@dataclass(frozen=True)
class Cut(Op):
    """Hang up after ``keep`` bytes of the stream (modulo its length + 1)."""

    keep: int

    def apply(self, s: list[Wire]) -> None:  # applied by apply_ops
        pass


@dataclass(frozen=True)
class Pace(Op):
    """Yield to the event loop after every ``every`` sends (0: send everything first)."""

    every: int

    def apply(self, s: list[Wire]) -> None:
        pass


@dataclass(frozen=True)
class Abrupt(Op):
    """Hang up right after the last send, without waiting for the back-end to read it all."""

    def apply(self, s: list[Wire]) -> None:
        pass


@dataclass(frozen=True)
class StreamCase:
    """A hostile front-end: the QEMU sequence with ``ops`` applied."""

    mem_slots: bool = True
    ops: tuple[Op, ...] = ()
    shmem: bool = False  # the shared-page sequence, against a bed made with shmem=True


@dataclass
class Stream:
    wires: list[Wire]
    cut: int | None = None
    pace: int = 0
    abrupt: bool = False


def apply_ops(case: StreamCase) -> Stream:
    s = qemu_sequence(mem_slots=case.mem_slots, shmem=case.shmem)
    st = Stream(s)
    for op in case.ops:
        if isinstance(op, Cut):
            st.cut = op.keep
        elif isinstance(op, Pace):
            st.pace = op.every
        elif isinstance(op, Abrupt):
            st.abrupt = True
        else:
            op.apply(s)
    if st.cut is not None:
        st.cut %= sum(len(w.data) for w in s) + 1
    return st


_OP_WEIGHTS = {
    "drop": 8, "dup": 6, "swap": 5, "move": 5, "header": 8, "poke": 12, "flip": 6, "truncate": 3,
    "extend": 3, "fds": 6, "fdkind": 8, "insert": 8, "glue": 6, "split": 5, "cut": 4, "pace": 4, "abrupt": 3,
}


def random_op(rng: random.Random) -> Op:
    kind = rng.choices(list(_OP_WEIGHTS), weights=list(_OP_WEIGHTS.values()))[0]
    i = rng.randrange(1 << 10)
    if kind == "drop":
        return Drop(i)
    if kind == "dup":
        return Dup(i)
    if kind == "swap":
        return Swap(i, rng.randrange(1 << 10))
    if kind == "move":
        return Move(i, rng.randrange(1 << 10))
    if kind == "header":
        field_ = rng.choice((0, 1, 1, 2, 2))
        return SetHeader(i, field_, rng.choice(INTERESTING_U32) if rng.random() < 0.7 else rng.getrandbits(32))
    if kind == "poke":
        width = rng.choice((1, 2, 4, 8, 8, 8))
        return Poke(i, rng.randrange(300), width, rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(64))
    if kind == "flip":
        return FlipByte(i, rng.randrange(400), rng.randrange(1, 256))
    if kind == "truncate":
        return Truncate(i, rng.randrange(400))
    if kind == "extend":
        return Extend(i, rng.randbytes(rng.randint(1, 48)), rng.random() < 0.5)
    if kind == "fds":
        n = rng.choice((0, 0, 1, 1, 2, 3, 4))
        return SetFds(i, tuple(rng.choice(FD_KINDS_WRONG if rng.random() < 0.7 else FD_KINDS) for _ in range(n)))
    if kind == "fdkind":
        return WrongFdKind(i, rng.choice(FD_KINDS_WRONG))
    if kind == "insert":
        w = random_message(rng) if rng.random() < 0.8 else Wire(rng.randbytes(rng.randint(1, 40)), (), "bytes")
        return Insert(i, w)
    if kind == "glue":
        return Glue(i)
    if kind == "split":
        return Split(i, rng.randrange(400))
    if kind == "cut":
        return Cut(rng.randrange(1 << 14))
    if kind == "pace":
        return Pace(rng.choice((0, 1, 1, 2, 5)))
    return Abrupt()


def random_stream_case(rng: random.Random) -> StreamCase:
    n = min(1 + int(rng.expovariate(0.6)), 12)
    return StreamCase(rng.random() < 0.7, tuple(random_op(rng) for _ in range(n)))


def stream_case_strategy():  # type: ignore[no-untyped-def]
    """Hypothesis strategy for :class:`StreamCase` (shrinks to few, simple ops)."""
    from hypothesis import strategies as st

    idx = st.integers(0, 63)
    kinds = st.sampled_from(FD_KINDS)
    msg = st.builds(
        message,
        st.one_of(st.sampled_from([int(r) for r in F]), st.sampled_from(_UNKNOWN_IDS), st.integers(0, 2**32 - 1)),
        st.sampled_from(_FLAGS),
        st.binary(max_size=300),
        st.lists(kinds, max_size=3),
    )
    op = st.one_of(
        st.builds(Drop, idx), st.builds(Dup, idx), st.builds(Swap, idx, idx), st.builds(Move, idx, idx),
        st.builds(SetHeader, idx, st.integers(0, 2), st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, 2**32 - 1))),
        st.builds(Poke, idx, st.integers(0, 300), st.sampled_from((1, 2, 4, 8)),
                  st.one_of(st.sampled_from(INTERESTING), st.integers(0, MASK64))),
        st.builds(FlipByte, idx, st.integers(0, 400), st.integers(1, 255)),
        st.builds(Truncate, idx, st.integers(0, 400)),
        st.builds(Extend, idx, st.binary(min_size=1, max_size=48), st.booleans()),
        st.builds(SetFds, idx, st.lists(kinds, max_size=4).map(tuple)),
        st.builds(WrongFdKind, idx, st.sampled_from(FD_KINDS_WRONG)),
        st.builds(Insert, idx, st.one_of(msg, st.builds(Wire, st.binary(min_size=1, max_size=40)))),
        st.builds(Glue, idx), st.builds(Split, idx, st.integers(0, 400)),
        st.builds(Cut, st.integers(0, 1 << 14)), st.builds(Pace, st.integers(0, 3)), st.just(Abrupt()),
    )
    return st.builds(StreamCase, st.booleans(), st.lists(op, min_size=1, max_size=6).map(tuple))


# -- guest memory attacks --------------------------------------------------------------------------

GUEST_VMAP = (0, 0, 1, 2)  # 4 vCPUs
GUEST_RAM_SIZE = 4 << 20  # two 2 MiB regions, with a hole between their front-end addresses
RING_DESC, RING_AVAIL, RING_USED = 0x1000, 0x5000, 0x6000  # room for a 1024-entry ring
ARENAS = ((0x10000, 0x1F0000), (0x200000, 0x3F0000))  # buffers and indirect tables, one per region
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
NEXT, WRITE, INDIRECT = vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE, vq.VIRTQ_DESC_F_INDIRECT
#: Per-record rejections: the batch itself still counts.
RECORD_REASONS = frozenset({"bad-vcpu", "bad-util", "perf-not-negotiated"})


@dataclass(frozen=True)
class BatchSpec:
    """A request batch, maybe wrong.

    ``seq_rel`` is relative to the batch's place in the case: 0 follows the
    buffer before it (the first follows the device's last accepted seq), -1
    repeats the one before, -k is stale, +k skips k.
    """

    seq_rel: int = 0
    records: tuple[tuple[int, int, int], ...] = ((0, 512, 0),)  # (vcpu, util, perf_khz)
    flags: int = 0
    count_delta: int = 0  # num_records field = len(records) + count_delta
    size_delta: int = 0  # bytes added (> 0) or cut (< 0) at the end
    raw: bytes | None = None  # random bytes instead of a batch

    def encode(self, base_seq: int) -> bytes:
        if self.raw is not None:
            return self.raw
        n = len(self.records)
        out = struct.pack("<IHHQ", (base_seq + self.seq_rel) & 0xFFFFFFFF, (n + self.count_delta) & 0xFFFF,
                          self.flags & 0xFFFF, time.monotonic_ns())
        out += b"".join(struct.pack("<HHI", v & 0xFFFF, u & 0xFFFF, p & 0xFFFFFFFF) for v, u, p in self.records)
        if self.size_delta > 0:
            out += bytes(range(self.size_delta % 256)) * (self.size_delta // 256) + bytes(self.size_delta % 256)
            out = out[: abi.BATCH_HEADER_SIZE + n * abi.RECORD_SIZE + self.size_delta]
        elif self.size_delta < 0:
            out = out[: max(0, len(out) + self.size_delta)]
        return out


#: Chain shapes the device must accept (indirect ones only with INDIRECT_DESC negotiated).
SHAPES_VALID = ("direct", "indirect", "mixed", "ind-zero")
#: Chain shapes the device must reject.
SHAPES_BAD = ("oob", "huge-len", "loop", "next-oob", "rw", "ind-bad-len", "ind-nested", "ind-next", "ind-loop",
              "ind-next-oob", "ind-oob", "bad-head")
#: "repeat": another avail entry naming the previous entry's head (two entries, one chain).
SHAPES = SHAPES_VALID + SHAPES_BAD + ("repeat",)


@dataclass(frozen=True)
class Buf:
    """One avail entry: a descriptor chain of ``shape`` carrying ``batch``."""

    shape: str = "direct"
    batch: BatchSpec = BatchSpec()
    nseg: int = 1  # readable segments the batch is split over
    nwrite: int = 0  # 8-byte writable segments after them
    zeros: int = 0  # zero-length descriptors before the batch
    param: int = 0  # shape-specific (which bad address, loop length, table entries...)


@dataclass(frozen=True)
class Round:
    bufs: tuple[Buf, ...]
    jump: int = 0  # > 0: publish avail.idx this many entries beyond the queue size (an index jump)


@dataclass(frozen=True)
class GuestCase:
    size: int = 64
    base: int = 0
    event_idx: bool = True
    indirect: bool = True
    perf: bool = True
    rounds: tuple[Round, ...] = ()
    torn: bool = False  # a thread flips ring and buffer bytes while the back-end works


def chain_valid(buf: Buf, case: GuestCase) -> bool:
    if buf.shape == "direct":
        return True
    if buf.shape in ("indirect", "mixed", "ind-zero"):
        return case.indirect
    return False


def random_batch(rng: random.Random, nvcpus: int = len(GUEST_VMAP)) -> BatchSpec:
    def rec(bad: str = "") -> tuple[int, int, int]:
        v, u, p = rng.randrange(nvcpus), rng.randint(0, abi.UTIL_SCALE), 0
        if rng.random() < 0.2:
            p = rng.choice((300000, 1803000, 2802000, 0xFFFFFFFF))
        if bad == "vcpu":
            v = rng.choice((nvcpus, nvcpus + 1, 255, 0xFFFF))
        elif bad == "util":
            u = rng.choice((abi.UTIL_SCALE + 1, 2048, 0xFFFF))
        return v, u, p

    kind = rng.choices(
        ("valid", "max", "dup", "stale", "jump", "resync", "bad-vcpu", "bad-util", "bad-size", "bad-count",
         "bad-flags", "short", "random", "empty"),
        weights=(30, 4, 6, 5, 5, 5, 6, 6, 6, 5, 4, 4, 4, 2))[0]
    records = tuple(rec() for _ in range(rng.randint(1, 4)))
    if kind == "valid":
        return BatchSpec(0, records)
    if kind == "max":
        return BatchSpec(0, tuple(rec() for _ in range(abi.MAX_RECORDS_PER_BATCH)))
    if kind == "dup":
        return BatchSpec(-1, records)
    if kind == "stale":
        return BatchSpec(-rng.choice((2, 3, 100, 0x7FFFFFFF)), records)
    if kind == "jump":
        return BatchSpec(rng.choice((1, 2, 1000, 0x7FFFFFFE, 0x80000000)), records)
    if kind == "resync":
        return BatchSpec(rng.getrandbits(32), records, flags=abi.BATCH_F_RESYNC)
    if kind == "bad-vcpu":
        return BatchSpec(0, records + (rec("vcpu"),))
    if kind == "bad-util":
        return BatchSpec(0, (rec("util"),) + records)
    if kind == "bad-size":
        return BatchSpec(0, records, size_delta=rng.choice((-1, 1, -7, 8, 9, 100)))
    if kind == "bad-count":
        return BatchSpec(0, records, count_delta=rng.choice((-len(records), 1, 0xFFFF - len(records), 257)))
    if kind == "bad-flags":
        return BatchSpec(0, records, flags=rng.choice((2, 0x8000, 0xFFFF)))
    if kind == "short":
        return BatchSpec(raw=rng.randbytes(rng.randint(1, abi.BATCH_HEADER_SIZE - 1)))
    if kind == "random":
        return BatchSpec(raw=rng.randbytes(rng.randint(16, 120)))
    return BatchSpec(raw=b"")


def random_buf(rng: random.Random) -> Buf:
    r = rng.random()
    shape = rng.choice(SHAPES_VALID) if r < 0.6 else "repeat" if r < 0.65 else rng.choice(SHAPES_BAD)
    param = rng.randrange(1 << 16)
    if shape == "ind-zero":
        param = rng.choice((1, 16, 255, 1000, 2000))
    return Buf(shape, random_batch(rng), nseg=rng.choice((1, 1, 1, 2, 3, 7)), nwrite=rng.choice((0, 0, 0, 1, 2)),
               zeros=rng.choice((0, 0, 0, 1, 3)), param=param)


def random_guest_case(rng: random.Random) -> GuestCase:
    size = rng.choice((1, 2, 4, 8, 16, 64, 64, 128, 256, 1024))
    base = rng.choice((0, rng.randrange(1 << 16), 0xFFFF - rng.randrange(min(size, 8) + 1), 0xFFFF))
    rounds = []
    for _ in range(rng.randint(1, 4)):
        n = min(size, rng.choice((1, 2, 4, 8, 16, 64)))
        rounds.append(Round(tuple(random_buf(rng) for _ in range(n)), jump=rng.choice((0,) * 12 + (1, 7, 0x8000))))
    return GuestCase(size, base, rng.random() < 0.7, rng.random() < 0.8, rng.random() < 0.7, tuple(rounds),
                     torn=rng.random() < 0.15)


def guest_case_strategy():  # type: ignore[no-untyped-def]
    """Hypothesis strategy for :class:`GuestCase` (untorn)."""
    from hypothesis import strategies as st

    rec = st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from((0, 300000, 0xFFFFFFFF)))
    good = st.tuples(st.integers(0, len(GUEST_VMAP) - 1), st.integers(0, abi.UTIL_SCALE), st.just(0))
    batch = st.one_of(
        st.builds(BatchSpec, st.integers(-3, 3), st.lists(good, min_size=1, max_size=4).map(tuple)),
        st.builds(BatchSpec, st.one_of(st.integers(-3, 3), st.integers(-(2**31), 2**31)),
                  st.lists(rec, min_size=0, max_size=6).map(tuple), st.sampled_from((0, 1, 2, 0xFFFF)),
                  st.integers(-2, 2), st.integers(-9, 9)),
        st.builds(BatchSpec, raw=st.binary(max_size=64)),
    )
    buf = st.builds(Buf, st.sampled_from(SHAPES), batch, st.integers(1, 4), st.integers(0, 2), st.integers(0, 3),
                    st.integers(0, 1 << 16))
    size = st.sampled_from((1, 2, 4, 16, 64, 256))
    return size.flatmap(lambda n: st.builds(
        GuestCase, st.just(n), st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
        st.booleans(), st.booleans(), st.booleans(),
        st.lists(st.builds(Round, st.lists(buf, min_size=1, max_size=min(n, 8)).map(tuple),
                           st.sampled_from((0, 0, 0, 1))), min_size=1, max_size=3).map(tuple),
    ))


# -- policy that checks what reaches it ---------------------------------------------------------------


class CheckingPolicy:
    """Records what reaches the policy (bounded) and flags any record the device should have refused."""

    def __init__(self, vcpus: dict[str, int]) -> None:
        self.vcpus = vcpus
        self.records: dict[str, list[Record]] = {vm: [] for vm in vcpus}
        self.count: Counter[str] = Counter()
        self.violations: list[str] = []
        self.resets: Counter[str] = Counter()
        self.perf_allowed: dict[str, bool] = {vm: True for vm in vcpus}
        self.arrived = asyncio.Event()

    def on_record(self, vm: str, record: Record, domain: Domain, now: float) -> Decision:
        if not (0 <= record.vcpu < self.vcpus[vm] and 0 <= record.util <= abi.UTIL_SCALE):
            self.violations.append(f"{vm}: invalid record reached the policy: {record}")
        if record.perf_khz and not self.perf_allowed[vm]:
            self.violations.append(f"{vm}: perf_khz without PERF_REQUEST reached the policy: {record}")
        recs = self.records[vm]
        recs.append(record)
        if len(recs) > 100_000:
            del recs[:50_000]
        self.count[vm] += 1
        self.arrived.set()
        return Decision(vm, record.vcpu, record.util, schedutil_khz(record.util, domain), now)

    def on_vm_reset(self, vm: str) -> None:
        self.resets[vm] += 1


class LaneCheckingPolicy(CheckingPolicy):
    """A CheckingPolicy that hands the request queues of ``lane_vms`` to the C kick lane.

    Each such VM gets a C clamp engine with no threads and actuation off: the
    lane drains, keeps the sequence and per-vCPU state and decides, but clamps
    nothing.  Its records never reach :meth:`on_record`; :meth:`FuzzBed.run_guest`
    checks the lane's counters and per-vCPU state against the model instead.
    """

    def __init__(self, vcpus: dict[str, int], lib: Any, lane_vms: Sequence[str]) -> None:
        super().__init__(vcpus)
        self._lib = lib
        self.lane_vms = frozenset(lane_vms)
        self.engines: dict[str, Any] = {}
        self.clamp_counters = Counters()
        self.bindings = Counter[str]()  # lane bindings handed out, by VM: a queue put on the lane each

    def lane_binding(self, vm: str, on_change: Any) -> LaneBinding | None:
        if vm not in self.lane_vms:
            return None
        self.bindings[vm] += 1
        eng = self.engines.get(vm)
        if eng is None:  # one engine per VM for the bed's life, as HostPolicy keeps one across rebinding
            placements = [VcpuPlacement(v, v, 1024, 1024, 2_802_000) for v in range(self.vcpus[vm])]
            eng = self.engines[vm] = CClampEngine(self._lib, placements)
            eng.set_actuation(False)
        return LaneBinding(eng, self.clamp_counters, self._clamp_event)

    def _clamp_event(self, kind: int, tid: int, err: int) -> None:
        # The engines have no threads: a clamp attempt at all is a bug.
        self.violations.append(f"the lane reported a clamp event (kind {kind}, thread {tid}, errno {err}) "
                               "for an engine with no threads")


class ReaderSpy:
    """Wraps a Connection's MessageReader and tracks which received fds it has not handed on.

    Uses only the reader's public API; an fd still pending when the session
    ends was dropped by the transport without being closed.
    """

    def __init__(self, inner: vu.MessageReader) -> None:
        self.inner = inner
        self.pending: set[int] = set()

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self.inner.receive_data(data, fds)
        self.pending.update(fds)

    def next_message(self, expect_reply_to: Any = None) -> Any:
        try:
            msg = self.inner.next_message(expect_reply_to)
        except vu.MessageError as err:
            self.pending.difference_update(vu.error_fds(err))
            raise
        if isinstance(msg, vu.Message):
            self.pending.difference_update(msg.fds)
        return msg

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


#: Bugs found and reported; a failure matching one is tallied as known (see tests/test_faults.py).
KNOWN_BUGS = {
    "KB1": "backend/vhost/transport.py Connection.close(): fds the MessageReader still holds (sent with a later "
           "message of the same recvmsg chunk, or with a partial message) are dropped without being closed "
           "when the session is closed by an error in an earlier message",
    "KB2": "backend/vhost/session.py Session._on_set_backend_req_fd(): socket.socket(fileno=fd) raises "
           "OSError(ENOTSOCK) for a non-socket fd after _take_fd() took it: the fd leaks",
    "KB3": "backend/vhost/transport.py Connection._readable(): an OSError raised while handling a message "
           "(ENOTSOCK from SET_BACKEND_REQ_FD, EPERM from epoll for a kick fd that is a regular file, "
           "/dev/null or a directory) closes the session as 'send failed: ...' with no "
           "sessions_closed/rejected counter",
    "KB4": "backend/cpufreq/device.py CpufreqDevice.handle_queue(): on a RingError with head=None "
           "(bad-head, avail-index-jump) it returns before host.signal_used(): chains it already pushed in "
           "that call are never published (used.idx unchanged, no interrupt) and the guest does not get them back",
    "KB5": "backend/vhost/session.py Session.signal_used() / _send_config_change(): blocking writes on fds the "
           "front-end gave (a call eventfd at its maximum count, never made non-blocking; a back-end channel "
           "socket whose O_NONBLOCK the front-end clears on its shared file description) stall the event "
           "loop, and every VM of the service with it",
    "KB6": "backend/vhost/memory.py map_region(): the front-end can shrink a mapped memfd (ftruncate) afterwards; "
           "the back-end's next access to guest memory raises SIGBUS and kills the whole service",
    "KB7": "backend/cpufreq/device.py handle_queue() budgets buffers, not work: a buffer of 256 records or "
           "a chain of 32767 zero-length indirect descriptors costs a loop turn of 0.2-2 s; and "
           "Session._on_kick processes a ring that is already scheduled (two budgets per loop iteration)",
    "KB8": "protocol/virtqueue.py DeviceQueue stores used.idx, avail_event and used.flags with "
           "struct.pack_into('<H'), one byte at a time: a guest vCPU reading concurrently sees torn indices",
    "KB9": "backend/vhost/session.py Session.handle(): a refused request that has a reply of its own (GET_CONFIG, "
           "GET_VRING_BASE, GET_MAX_MEM_SLOTS...) sent with NEED_REPLY is 'acked' with u64 1: for non-u64 "
           "replies encode_reply raises LocalProtocolError and the session is closed as 'bad-payload-type' "
           "(our own API misuse); for u64 replies the front-end reads 1 as the answer (1 memory slot)",
    "KB10": "backend/vhost/session.py Session._on_kick(): os.eventfd_read on a kick fd at EOF (a pipe whose writer "
            "closed, a socket whose peer closed) raises OSError(0) (short read), not BlockingIOError: it "
            "escapes the reader callback into the event loop, and the reader, still registered, fires again "
            "at once: tens of thousands of 'Exception in callback' a second until the session ends",
}

#: A front-end that hangs up, even in the middle of a message or before reading its
#: replies, is not counted as an error.
CLEAN_REASONS = ("front-end disconnected", "truncated-message", "send failed: [Errno 32] Broken pipe",
                 "send failed: [Errno 104] Connection reset by peer",
                 "receive failed: [Errno 104] Connection reset by peer")


@dataclass
class CaseResult:
    kind: str
    case: Any
    seed: int | None = None
    failures: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)
    close_reason: str | None = None
    elapsed: float = 0.0
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.failures

    def describe(self) -> str:
        head = f"{self.kind} case" + (f" seed={self.seed}" if self.seed is not None else "")
        return f"{head}: {'; '.join(self.failures)}\n  case: {self.case!r}"


# -- the bed -----------------------------------------------------------------------------------------------


class FuzzBed:
    """A Service with a fuzzed VM, a guest-attack VM and a witness VM, plus the checks.

    Use from one event loop: ``bed = await FuzzBed.create(workdir)``, then
    :meth:`run_stream` / :meth:`run_guest` any number of times, then
    :meth:`close`.  ``stats`` tallies everything for the summary.
    """

    STREAM_BOUND = 3.0  # seconds per stream case
    GUEST_BOUND = 10.0  # seconds per guest case
    BUFFER_BOUND = 0.05  # seconds per buffer made available (beyond half a second per round)

    def __init__(self, workdir: Path, lane: bool = False, shmem: bool = False) -> None:
        self.workdir = workdir
        #: the fuzzed VM offers the shared frequency page (SHMEM) instead of memory slots
        self.shmem = shmem
        vcpus = {"fuzz": len(GUEST_VMAP), "guest": len(GUEST_VMAP), "witness": 2}
        #: the fuzzed and guest VMs' request queues on the C kick lane (the witness stays on the loop)
        self.lane = lane
        self.policy: CheckingPolicy
        if lane:
            dp = dataplane()
            if dp.lib is None or not dp.lane:
                raise RuntimeError(f"a fuzz bed on the kick lane needs the C data plane with its lane: {dp.detail}")
            self.policy = LaneCheckingPolicy(vcpus, dp.lib, ("fuzz", "guest"))
        else:
            self.policy = CheckingPolicy(vcpus)
        self.svc = Service(StaticSource(PIXEL6), self.policy)
        self.slots: dict[str, VmSlot] = {}
        self.loop_errors: list[str] = []
        self.loop_error_count = 0
        self.cases = Counter[str]()
        self.close_reasons = Counter[str]()
        self.rejected = Counter[str]()
        self.known = Counter[str]()
        self.failures: list[CaseResult] = []
        self._spy: ReaderSpy | None = None
        self._closed = asyncio.Event()
        self._wtoggle = 0
        self._log_level: int | None = None
        self._ram_fd = -1
        self._map_checks = 0
        self._maps_cache: tuple[int, tuple[int, int]] = (-1, (0, 0))

    @classmethod
    async def create(cls, workdir: Path | None = None, *, lane: bool = False, shmem: bool = False) -> FuzzBed:
        """``lane``: serve the fuzzed and guest VMs' request queues on the C kick lane
        (RuntimeError without the C data plane)."""
        # Leak checks compare mappings and fds before and after each case: garbage
        # an earlier test left in reference cycles must not be freed in the middle.
        gc.collect()
        bed = cls(Path(workdir or tempfile.mkdtemp(prefix="vuc-fuzz-")), lane, shmem)
        await bed._start()
        return bed

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._old_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._on_loop_error)
        vlog = logging.getLogger("vhost_user_cpufreq")
        self._log_level = vlog.level
        vlog.setLevel(logging.CRITICAL)  # every rejection logs a warning: far too many here
        for name, vmap in (("fuzz", GUEST_VMAP), ("guest", GUEST_VMAP), ("witness", (2, 2))):
            self.slots[name] = await self.svc.add_vm(VmConfig(name, str(self.workdir / f"{name}.sock"), vmap,
                                                              shared_page=self.shmem and name == "fuzz"))
        self.svc.session_hooks.append(self._on_session)
        self.svc.close_hooks.append(lambda slot, conn: self._closed.set())
        self._ram_fd = os.memfd_create("vuc-fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self._ram_fd, STREAM_RAM_SIZE)
        # The witness: a well-behaved guest on the same service.
        fe = VhostUserFrontend()
        await fe.connect(str(self.workdir / "witness.sock"))
        await fe.handshake()
        t = InProcessTransport(fe)
        self._witness_t = t
        self.witness = CpufreqDriver(t, util_threshold=1)
        await self.witness.probe()
        self._witness_fe = fe
        await self._connect_guest()
        self._baseline = self._rejected_now()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_error_count += 1
        if len(self.loop_errors) < 10_000:  # KB10 raises tens of thousands a second
            exc = context.get("exception")
            self.loop_errors.append(f"{context.get('message')}: {exc!r}" if exc else str(context.get("message")))

    def _on_session(self, slot: VmSlot, conn: Connection) -> None:
        if slot.config.name == "fuzz":
            self._spy = ReaderSpy(conn.reader)
            conn.reader = self._spy  # type: ignore[assignment]

    def _rejected_now(self) -> Counter[str]:
        out = Counter[str]()
        for name in ("fuzz", "guest"):
            for (ev, reason), n in self.slots[name].counters.snapshot().items():
                if ev == "rejected":
                    out[reason] += n
        return out

    async def close(self) -> None:
        await self.witness.remove()
        await self._witness_fe.close()
        self._witness_fe.ram.close()
        await self._close_guest()
        await self.svc.close()
        os.close(self._ram_fd)
        vlog = logging.getLogger("vhost_user_cpufreq")
        if self._log_level is not None:
            vlog.setLevel(self._log_level)
        asyncio.get_running_loop().set_exception_handler(self._old_handler)

    # -- summary ---------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        now = self._rejected_now()
        return {
            "cases": dict(self.cases),
            "sessions_closed": dict(self.close_reasons.most_common()),
            "rejected": dict((now - self._baseline).most_common()),
            "known_bugs": dict(self.known),
            "failures": len(self.failures),
            "lane_bindings": dict(getattr(self.policy, "bindings", {})),
        }

    def _record(self, res: CaseResult) -> CaseResult:
        self.cases[res.kind] += 1
        if res.kind == "guest" and getattr(res.case, "torn", False):
            self.cases["guest (torn)"] += 1
        for k in sorted(set(res.known)):
            self.known[k] += 1
        if res.close_reason is not None:
            self.close_reasons[_short_reason(res.close_reason)] += 1
        if res.failures:
            self.failures.append(res)
        return res

    # -- shared checks -------------------------------------------------------------------------------------
    async def check_witness(self, timeout: float = 2.0) -> bool:
        """The well-behaved VM still gets a record through."""
        n0 = self.policy.count["witness"]
        self._wtoggle ^= 1
        self.witness.set_util(0, 300 + self._wtoggle)
        self.witness.flush()
        self._witness_t.notify(0)  # kick even if kick batching asked not to: liveness, not latency
        deadline = time.monotonic() + timeout
        while self.policy.count["witness"] == n0:
            if time.monotonic() > deadline:
                return False
            self.policy.arrived.clear()
            try:
                await asyncio.wait_for(self.policy.arrived.wait(), 0.05)
            except TimeoutError:
                pass
        self.policy.records["witness"].clear()
        return True

    def _fd_and_map_check(self, res: CaseResult, fds0: set[int], maps0: tuple[int, int], vm0: int,
                          pending: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        def leaked() -> dict[int, str]:
            # By count: the back-end may legitimately swap one fd for another (a new kick fd).
            now = open_fds()
            return {fd: fd_target(fd) for fd in now - fds0 if is_open(fd)} if len(now) > len(fds0) else {}

        def known(fd: int) -> str | None:
            if fd in pending:
                return "KB1"
            if res.close_reason and "[Errno 88]" in res.close_reason:
                return "KB2"
            return None

        extra = leaked()
        if any(known(fd) is None for fd in extra):
            gc.collect()  # only when something is unexplained: a full collection is slow
            extra = leaked()
        for fd, what in extra.items():
            kb = known(fd)
            if kb is None:
                res.failures.append(f"fd leak: {fd} -> {what}")
                continue
            res.known.append(kb)
            try:
                os.close(fd)  # orphaned by the known bug: nobody else will close it
            except OSError:
                pass
        # /proc/self/maps costs half a millisecond: read it when the address space changed
        # size, and on every 8th case anyway.
        self._map_checks += 1
        if vm_size() == vm0 and self._map_checks % 8:
            return
        maps = memfd_maps()
        if maps != maps0:
            gc.collect()
            maps = memfd_maps()
        if maps != maps0:
            res.failures.append(f"mapping leak: memfd mappings {maps0} -> {maps}")

    def _maps_at(self, vm: int) -> tuple[int, int]:
        """memfd mappings now; re-read only when the address space changed size since last time."""
        if vm != self._maps_cache[0]:
            self._maps_cache = (vm, memfd_maps())
        return self._maps_cache[1]

    def _loop_error_check(self, res: CaseResult, n0: int) -> None:
        errors = self.loop_errors[n0:]
        del self.loop_errors[n0:]
        unknown = [e for e in errors if not ("_on_kick" in e and "OSError(0," in e)]
        if len(unknown) < len(errors):
            res.known.append("KB10")
        res.failures += [f"exception escaped to the event loop: {e}" for e in unknown[:5]]
        if len(unknown) > 5:
            res.failures.append(f"... {len(unknown) - 5} more exceptions escaped")

    # -- stream cases ----------------------------------------------------------------------------------------
    async def run_stream(self, case: StreamCase, *, seed: int | None = None) -> CaseResult:
        slot = self.slots["fuzz"]
        res = CaseResult("stream", case, seed)
        stream = apply_ops(case)
        await self._wait_fuzz_idle()
        fds0, vm0 = open_fds(), vm_size()
        maps0 = self._maps_at(vm0)
        hist0, closed0 = len(slot.history), slot.counters.total("sessions_closed")
        rej0 = _rejections(slot)
        err0 = len(self.loop_errors)
        t0 = time.monotonic()
        self._spy = None
        fac = FdFactory(self.workdir, self._ram_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.workdir / "fuzz.sock"))
            sock.setblocking(False)
            sent = 0
            for k, w in enumerate(stream.wires):
                data = w.data
                if stream.cut is not None:
                    if sent >= stream.cut:
                        break
                    data = data[: stream.cut - sent]
                if not data:
                    continue  # fds cannot travel without data
                fds = [fac.make(kind) for kind in w.fds]
                alive = await send_data(sock, data, fds)
                sent += len(data)
                if not alive or not drain(sock):
                    break
                if stream.pace and k % stream.pace == 0:
                    await asyncio.sleep(0)
            if not stream.abrupt:
                await settle(sock)
        finally:
            sock.close()
        closed = await self._wait_history(slot, hist0, self.STREAM_BOUND)
        pending: set[int] = set(self._spy.pending) if self._spy is not None else set()
        fac.close_all()
        if not closed:
            res.failures.append("session not closed within the time bound")
            if slot.connection is not None:
                slot.connection.close("fuzz: forced")
        else:
            res.close_reason = slot.history[hist0]
            counted = slot.counters.total("sessions_closed") - closed0
            if res.close_reason == "bad-payload-type":
                res.known.append("KB9")  # counted, but as the back-end's own fault
            if res.close_reason not in CLEAN_REASONS and counted != 1:
                if res.close_reason.startswith(("send failed", "receive failed")):
                    res.known.append("KB3")
                else:
                    res.failures.append(f"session closed without a counted reason: {res.close_reason!r}")
        res.rejected = _rejections(slot) - rej0
        self._fd_and_map_check(res, fds0, maps0, vm0, pending)
        self._loop_error_check(res, err0)
        if not await self.check_witness():
            res.failures.append("the witness VM was not served")
        res.elapsed = time.monotonic() - t0
        if res.elapsed > self.STREAM_BOUND + 2.5:
            res.failures.append(f"case took {res.elapsed:.2f} s")
        return self._record(res)

    async def _wait_fuzz_idle(self) -> None:
        slot = self.slots["fuzz"]
        deadline = time.monotonic() + 2
        while slot.connection is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        if slot.connection is not None:
            slot.connection.close("fuzz: left over")

    async def _wait_history(self, slot: VmSlot, n0: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(slot.history) <= n0:
            if time.monotonic() > deadline:
                return False
            self._closed.clear()
            try:
                await asyncio.wait_for(self._closed.wait(), 0.05)
            except TimeoutError:
                pass
        return True

    # -- guest cases ----------------------------------------------------------------------------------------
    async def _connect_guest(self) -> None:
        fe = VhostUserFrontend(MemfdRam(GUEST_RAM_SIZE, regions=2))
        await fe.connect(str(self.workdir / "guest.sock"))
        await fe.handshake()
        await fe.set_mem_table()
        self.gfe = fe
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ring_on = False
        self._gslot_served = self.slots["guest"].sessions_served

    async def _close_guest(self) -> None:
        await self.gfe.close()
        self.gfe.ram.close()
        os.close(self.kick)
        os.close(self.call)

    def _gsession(self):  # type: ignore[no-untyped-def]
        conn = self.slots["guest"].connection
        return None if conn is None else conn.session

    async def _restart_ring(self, size: int, base: int, event_idx: bool, indirect: bool, perf: bool) -> None:
        fe, mem = self.gfe, self.gfe.ram.memory
        if self._ring_on:
            await fe.request(F.GET_VRING_BASE, vu.VringState(0, 0))
        feats = 1 << 32 | 1 << vu.VHOST_USER_F_PROTOCOL_FEATURES
        feats |= (1 << vq.VIRTIO_RING_F_EVENT_IDX if event_idx else 0) | (1 << vq.VIRTIO_RING_F_INDIRECT_DESC if indirect else 0)
        feats |= 1 << abi.F_PERF_REQUEST if perf else 0
        await fe.request(F.SET_FEATURES, vu.U64(feats))
        self.policy.perf_allowed["guest"] = perf
        _, a, u = vq.ring_sizes(size)
        mem.view(RING_DESC, 16 * 1024)[:] = bytes(16 * 1024)
        mem.view(RING_AVAIL, a)[:] = bytes(a)
        mem.view(RING_USED, u)[:] = bytes(u)
        for off, area in ((2, RING_AVAIL), (4 + 2 * size, RING_AVAIL), (2, RING_USED), (4 + 8 * size, RING_USED)):
            _U16.pack_into(mem.view(area, off + 2), off, base)
        ram = fe.ram
        await fe.request(F.SET_VRING_NUM, vu.VringState(0, size))
        await fe.request(F.SET_VRING_BASE, vu.VringState(0, base))
        await fe.request(F.SET_VRING_ADDR, vu.VringAddr(0, 0, ram.uva(RING_DESC), ram.uva(RING_USED), ram.uva(RING_AVAIL), 0))
        await fe.request(F.SET_VRING_KICK, vu.U64(0), (self.kick,))
        await fe.request(F.SET_VRING_CALL, vu.U64(0), (self.call,))
        await fe.request(F.SET_VRING_ENABLE, vu.VringState(0, 1), need_reply=True)
        self._ring_on = True

    async def run_guest(self, case: GuestCase, *, seed: int | None = None) -> CaseResult:
        res = CaseResult("guest", case, seed)
        slot = self.slots["guest"]
        t0 = time.monotonic()
        err0 = len(self.loop_errors)
        hist0 = len(slot.history)
        rej0 = _rejections(slot)
        mem = self.gfe.ram.memory
        try:
            await self._restart_ring(case.size, case.base, case.event_idx, case.indirect, case.perf)
        except (ConnectionError, OSError, AssertionError) as exc:
            res.failures.append(f"guest session unusable before the case: {exc!r}")
            return self._record(res)
        fds0, vm0 = open_fds(), vm_size()  # with the ring's kick and call fds in the back-end
        maps0 = self._maps_at(vm0)
        session = self._gsession()
        q = session.rings[0].queue if session is not None else None
        if q is None:
            res.failures.append("the ring did not start")
            return self._record(res)
        ring = _RingView(q, slot.device)
        if ring.on_lane():
            self.cases["guest (kick lane)"] += 1
        self.policy.records["guest"].clear()
        last = slot.device.seq.last
        base_seq = ((last if last is not None else 0) + 1) & 0xFFFFFFFF
        model_last = last
        writer = _RingWriter(mem, case)
        avail_idx = case.base
        used_seen = case.base
        broken = False
        kb4 = False
        for rnd in case.rounds:
            if broken:
                break
            c0 = slot.counters.snapshot()
            last0 = ring.last_avail_idx
            plan = writer.write_round(rnd, base_seq, avail_idx)
            n = len(plan)
            if rnd.jump:
                avail_idx_pub = (avail_idx + case.size + rnd.jump) & 0xFFFF
            else:
                avail_idx_pub = (avail_idx + n) & 0xFFFF
            t_round = time.monotonic()
            flipper = _Flipper(mem, case.size, writer.touched) if case.torn else None
            if flipper:
                flipper.start()
            _U16.pack_into(mem.view(RING_AVAIL, 4), 2, avail_idx_pub)
            os.eventfd_write(self.kick, 1)
            if flipper:
                for _ in range(30):
                    await asyncio.sleep(0)
                    os.eventfd_write(self.kick, 1)
                flipper.stop()
                _U16.pack_into(mem.view(RING_AVAIL, 4), 2, avail_idx_pub)
                os.eventfd_write(self.kick, 1)
            if not rnd.jump:
                avail_idx = avail_idx_pub
            done = await _quiesce(ring, avail_idx_pub, self.GUEST_BOUND)
            if not done:
                res.failures.append(f"ring not drained within {self.GUEST_BOUND} s "
                                    f"(last_avail {ring.last_avail_idx}, avail {avail_idx_pub})")
                break
            took = time.monotonic() - t_round
            if not case.torn and took > 0.5 + self.BUFFER_BOUND * n:
                res.failures.append(f"{n} buffers took {took:.3f} s (bound {self.BUFFER_BOUND * 1e3:.0f} ms each)")
            delta = _delta(c0, slot.counters.snapshot())
            consumed = (ring.last_avail_idx - last0) & 0xFFFF
            rejections = {r: k for (ev, r), k in delta.items() if ev == "rejected"}
            explained = delta.get(("batches", ""), 0) + sum(
                k for r, k in rejections.items() if r not in RECORD_REASONS and r != "avail-index-jump")
            if explained != consumed:
                res.failures.append(f"{consumed} avail entries consumed, counters explain {explained}: {delta}")
            used_now = ring.used_idx
            returned = (used_now - used_seen) & 0xFFFF
            if returned != consumed - rejections.get("bad-head", 0):
                res.failures.append(f"{consumed} consumed ({rejections.get('bad-head', 0)} bad heads) "
                                    f"but {returned} returned as used")
            if case.torn:
                # Only the accounting holds when the guest scribbles over its rings.
                broken = ring.broken
                used_seen = used_now
                continue
            if rnd.jump and not (ring.broken and rejections.get("avail-index-jump")):
                res.failures.append("avail index jump not detected")
            published = _U16.unpack_from(mem.view(RING_USED, 4), 2)[0]
            if published != used_now:
                # KB4 leaves used.idx behind until a later call publishes again.
                if kb4 or rejections.get("bad-head") or rejections.get("avail-index-jump"):
                    res.known.append("KB4")
                    kb4 = True
                else:
                    res.failures.append(f"used.idx in guest memory is {published}, the device returned {used_now}")
            else:
                kb4 = False
            if not rnd.jump and consumed != n:
                res.failures.append(f"{n} buffers made available, {consumed} consumed")
            # Exact model of what the device does with each chain, in ring order.
            want: list[Record] = []
            heads: list[int] = []
            for e in plan:
                if e.head is None:
                    continue
                heads.append(e.head)
                if not e.valid or rnd.jump:
                    continue
                try:
                    r = abi.decode_batch(e.payload, num_vcpus=len(GUEST_VMAP), perf_request=case.perf)
                except RecordError:
                    continue
                b = r.batch
                if model_last is None or b.flags & abi.BATCH_F_RESYNC or abi.seq_delta(b.seq, model_last) > 0:
                    model_last = b.seq
                    want += b.records
            if ring.on_lane():
                self._check_lane_records(res, slot, want, delta.get(("records", ""), 0))
            else:
                got = self.policy.records["guest"]
                if got != want:
                    res.failures.append(f"records reaching the policy differ from the model: got {got[:8]}... "
                                        f"({len(got)}), want {want[:8]}... ({len(want)})")
            if not rnd.jump:
                elems = [struct.unpack_from("<II", mem.view(RING_USED + 4 + 8 * ((used_seen + k) % case.size), 8))
                         for k in range(returned)]
                if elems != [(h, 0) for h in heads]:
                    res.failures.append(f"used ring {elems[:8]} does not return heads {heads[:8]} with length 0")
            self.policy.records["guest"].clear()
            used_seen = used_now
            broken = ring.broken
        if ring.on_lane():
            # What CheckingPolicy checks of each record, checked of what the lane kept.
            bad = [(v, st.util) for v, st in enumerate(slot.device.vcpus) if st.util > abi.UTIL_SCALE]
            if bad:
                res.failures.append(f"the lane kept an invalid util (vcpu, util): {bad}")
        if self.policy.violations:
            res.failures += self.policy.violations
            self.policy.violations.clear()
        res.rejected = _rejections(slot) - rej0
        # The guest cannot close its session, and the session keeps serving.
        if len(slot.history) != hist0 or slot.connection is None:
            res.failures.append(f"guest session closed: {slot.history[hist0:]}")
            res.close_reason = slot.history[hist0] if len(slot.history) > hist0 else None
            await self._close_guest()
            await self._connect_guest()
        elif not await self._guest_liveness():
            res.failures.append("the guest's session no longer serves a valid batch")
        self._loop_error_check(res, err0)
        self._fd_and_map_check(res, fds0, maps0, vm0)
        if not await self.check_witness():
            res.failures.append("the witness VM was not served")
        res.elapsed = time.monotonic() - t0
        if res.elapsed > self.GUEST_BOUND:
            res.failures.append(f"case took {res.elapsed:.2f} s")
        return self._record(res)

    async def _guest_liveness(self) -> bool:
        """Restart the ring and get one valid batch through."""
        slot = self.slots["guest"]
        await self._restart_ring(64, 0xFFFE, True, True, True)
        mem = self.gfe.ram.memory
        n0 = self._delivered()
        data = BatchSpec(0, ((3, 777, 0),), flags=abi.BATCH_F_RESYNC).encode(12345)
        gpa = ARENAS[0][0]
        mem.view(gpa, len(data))[:] = data
        _DESC.pack_into(mem.view(RING_DESC, 16), 0, gpa, len(data), 0, 0)
        _U16.pack_into(mem.view(RING_AVAIL + 4 + 2 * (0xFFFE % 64), 2), 0, 0)
        _U16.pack_into(mem.view(RING_AVAIL, 4), 2, 0xFFFF)
        os.eventfd_write(self.kick, 1)
        deadline = time.monotonic() + 2
        while self._delivered() == n0:
            if time.monotonic() > deadline or slot.connection is None:
                return False
            await asyncio.sleep(0.0005)
        self.policy.records["guest"].clear()
        return True

    def _delivered(self) -> int:
        """Records of the guest VM delivered so far: to the policy, or to the lane's engine."""
        slot = self.slots["guest"]
        if slot.device._lane_slot is not None:  # noqa: SLF001 (the harness looks inside)
            return slot.counters.get("records")
        return self.policy.count["guest"]

    def _check_lane_records(self, res: CaseResult, slot: VmSlot, want: list[Record], accepted: int) -> None:
        """On the lane no record reaches Python: the lane's count of accepted records and its
        per-vCPU state (the newest record of each vCPU) must be the model's."""
        if accepted != len(want):
            res.failures.append(f"the lane accepted {accepted} records, the model wants {len(want)}: {want[:8]}")
        newest = {r.vcpu: (r.util, r.perf_khz) for r in want}
        states = slot.device.vcpus
        got = {v: (states[v].util, states[v].perf_khz) for v in newest}
        if got != newest:
            res.failures.append(f"the lane's per-vCPU state {got} is not the newest records' {newest}")


# -- guest-side helpers --------------------------------------------------------------------------------


@dataclass
class _Entry:
    head: int | None  # None: a bad head (not a descriptor index)
    valid: bool
    payload: bytes


class _RingWriter:
    """Writes rounds of crafted chains into the guest's rings and arenas."""

    def __init__(self, mem: Any, case: GuestCase) -> None:
        self.mem = mem
        self.case = case
        self.size = case.size
        self.next_desc = 0
        self.seq_cursor = 0
        self.arena = [lo for lo, _ in ARENAS]
        self.turn = 0
        self.touched: list[tuple[int, int]] = []  # (gpa, len) written this case, for the flipper

    def alloc(self, n: int, align: int = 16, arena: int | None = None) -> int | None:
        a = self.turn % 2 if arena is None else arena
        self.turn += 1
        gpa = (self.arena[a] + align - 1) & ~(align - 1)
        if gpa + n > ARENAS[a][1]:
            return None
        self.arena[a] = gpa + n
        return gpa

    def put(self, data: bytes, arena: int | None = None) -> int | None:
        gpa = self.alloc(max(len(data), 1), 8, arena)
        if gpa is not None and data:
            self.mem.view(gpa, len(data))[:] = data
            self.touched.append((gpa, len(data)))
        return gpa

    def desc(self, idx: int, addr: int, length: int, flags: int, nxt: int) -> None:
        _DESC.pack_into(self.mem.view(RING_DESC + 16 * idx, 16), 0, addr & MASK64, length & 0xFFFFFFFF,
                        flags & 0xFFFF, nxt & 0xFFFF)

    def table(self, entries: list[tuple[int, int, int, int]], arena: int = 0) -> int | None:
        gpa = self.alloc(16 * max(len(entries), 1), 16, arena)
        if gpa is None:
            return None
        buf = bytearray(16 * len(entries))
        for i, (a, n, f, x) in enumerate(entries):
            _DESC.pack_into(buf, 16 * i, a & MASK64, n & 0xFFFFFFFF, f & 0xFFFF, x & 0xFFFF)
        self.mem.view(gpa, len(buf))[:] = buf
        self.touched.append((gpa, len(buf)))
        return gpa

    def segments(self, buf: Buf, payload: bytes) -> list[tuple[int, int, int]] | None:
        """(gpa, len, flags) of zero-length descriptors, the batch's parts and the writable segments."""
        out: list[tuple[int, int, int]] = [(ARENAS[0][0], 0, 0)] * buf.zeros
        k = max(1, min(buf.nseg, max(len(payload), 1)))
        cuts = [len(payload) * i // k for i in range(k + 1)]
        for i in range(k):
            part = payload[cuts[i] : cuts[i + 1]]
            gpa = self.put(part)
            if gpa is None:
                return None
            out.append((gpa, len(part), 0))
        for _ in range(buf.nwrite):
            gpa = self.alloc(8)
            if gpa is None:
                return None
            out.append((gpa, 8, WRITE))
        return out

    def take(self, n: int, budget: list[int]) -> list[int] | None:
        if n > budget[0]:
            return None
        budget[0] -= n
        ids = [(self.next_desc + i) % self.size for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return ids

    def chain(self, ids: list[int], segs: list[tuple[int, int, int]], last_flags: int = 0, last_next: int = 0) -> None:
        for i, (idx, (a, n, f)) in enumerate(zip(ids, segs)):
            more = i < len(ids) - 1
            self.desc(idx, a, n, f | (NEXT if more else last_flags), ids[i + 1] if more else last_next)

    def write_round(self, rnd: Round, base_seq: int, avail_idx: int) -> list[_Entry]:
        budget = [self.size]
        plan: list[_Entry] = []
        for buf in rnd.bufs:
            if len(plan) == self.size:
                break
            if buf.shape == "repeat":
                e = _Entry(plan[-1].head, plan[-1].valid, plan[-1].payload) if plan and plan[-1].head is not None else None
            else:
                e = self.write_buf(buf, base_seq + self.seq_cursor, budget)
                self.seq_cursor += 1  # a valid batch (seq_rel 0) follows the one before it
            if e is None:
                continue
            slot = (avail_idx + len(plan)) % self.size
            head = e.head if e.head is not None else self.size + buf.param % (0x10000 - self.size)
            _U16.pack_into(self.mem.view(RING_AVAIL + 4 + 2 * slot, 2), 0, head)
            plan.append(e)
        return plan

    def write_buf(self, buf: Buf, base_seq: int, budget: list[int]) -> _Entry | None:
        payload = buf.batch.encode(base_seq)
        valid = chain_valid(buf, self.case)
        s, p = buf.shape, buf.param
        if s == "bad-head":
            return _Entry(None, False, payload)
        segs = self.segments(buf, payload)
        if segs is None:
            return None
        if s == "direct":
            ids = self.take(len(segs), budget)
            if ids is None:
                return None
            self.chain(ids, segs)
            return _Entry(ids[0], valid, payload)
        if s in ("indirect", "ind-zero"):
            if s == "ind-zero":
                segs = [(ARENAS[0][0], 0, 0)] * p + segs
            entries = [(a, n, f | (NEXT if i < len(segs) - 1 else 0), i + 1) for i, (a, n, f) in enumerate(segs)]
            tbl = self.table(entries)
            ids = self.take(1, budget)
            if tbl is None or ids is None:
                return None
            self.desc(ids[0], tbl, 16 * len(entries), INDIRECT, 0)
            return _Entry(ids[0], valid, payload)
        if s == "mixed":
            zeros = buf.zeros
            direct, rest = segs[: zeros + 1], segs[zeros + 1 :] or [(ARENAS[0][0], 0, 0)]
            entries = [(a, n, f | (NEXT if i < len(rest) - 1 else 0), i + 1) for i, (a, n, f) in enumerate(rest)]
            tbl = self.table(entries)
            ids = self.take(len(direct) + 1, budget)
            if tbl is None or ids is None:
                return None
            self.chain(ids[:-1], direct, NEXT, ids[-1])
            self.desc(ids[-1], tbl, 16 * len(entries), INDIRECT, 0)
            return _Entry(ids[0], valid, payload)
        # -- chains the device must reject
        first = segs[buf.zeros] if len(segs) > buf.zeros else segs[0]
        if s == "oob":
            bad = (GUEST_RAM_SIZE + 0x1000, ARENAS[0][1] + 0x10000 - 8, MASK64 - 7, 0xFFFF_FFFF_FFFF_F000)[p % 4]
            length = max(first[1], 16)
            seg2 = list(segs)
            seg2[segs.index(first)] = (bad, length, 0)
            ids = self.take(len(seg2), budget)
            if ids is None:
                return None
            self.chain(ids, seg2)
            return _Entry(ids[0], False, payload)
        if s == "huge-len":
            ids = self.take(1, budget)
            if ids is None:
                return None
            self.desc(ids[0], first[0], ((1 << 20) + 1, 0xFFFFFFFF, GUEST_RAM_SIZE)[p % 3], 0, 0)
            return _Entry(ids[0], False, payload)
        if s == "loop":
            k = 1 + p % 3
            ids = self.take(min(k, self.size), budget)
            if ids is None:
                return None
            for i, idx in enumerate(ids):
                self.desc(idx, first[0], 8, NEXT, ids[(i + 1) % len(ids)])
            return _Entry(ids[0], False, payload)
        if s == "next-oob":
            ids = self.take(1, budget)
            if ids is None:
                return None
            self.desc(ids[0], first[0], first[1], NEXT, self.size + p % 1000)
            return _Entry(ids[0], False, payload)
        if s == "rw":
            w = self.alloc(8)
            ids = self.take(2, budget)
            if ids is None or w is None:
                return None
            self.chain(ids, [(w, 8, WRITE), first])
            return _Entry(ids[0], False, payload)
        # indirect variants
        ids = self.take(1, budget)
        if ids is None:
            return None
        ok_entries = [(first[0], first[1], 0, 0)]
        if s == "ind-bad-len":
            tbl = self.table(ok_entries * 2)
            length = (0, 8, 17, 16 * (vq.MAX_INDIRECT_DESCS + 1), 0xFFFFFFF0)[p % 5]
            self.desc(ids[0], tbl or 0, length, INDIRECT, 0)
        elif s == "ind-nested":
            inner = self.table(ok_entries)
            tbl = self.table([(first[0], first[1], NEXT, 1), (inner or 0, 16, INDIRECT, 0)][p % 2 :])
            self.desc(ids[0], tbl or 0, 16 * (2 - p % 2), INDIRECT, 0)
        elif s == "ind-next":
            tbl = self.table(ok_entries)
            self.desc(ids[0], tbl or 0, 16, INDIRECT | NEXT, ids[0])
        elif s == "ind-loop":
            k = 1 + p % 4
            tbl = self.table([(first[0], 8, NEXT, (i + 1) % k) for i in range(k)])
            self.desc(ids[0], tbl or 0, 16 * k, INDIRECT, 0)
        elif s == "ind-next-oob":
            tbl = self.table([(first[0], first[1], NEXT, 1 + p % 100)])
            self.desc(ids[0], tbl or 0, 16, INDIRECT, 0)
        elif s == "ind-oob":
            self.desc(ids[0], (GUEST_RAM_SIZE + 0x1000, ARENAS[0][1] + 0x10000 - 8)[p % 2], 32, INDIRECT, 0)
        else:
            raise ValueError(f"unknown shape {s!r}")
        return _Entry(ids[0], False, payload)


class _Flipper(threading.Thread):
    """Flips random bytes of the rings and of what the case wrote, while the back-end reads them."""

    def __init__(self, mem: Any, size: int, touched: list[tuple[int, int]]) -> None:
        super().__init__(daemon=True)
        d, a, u = vq.ring_sizes(size)
        self.areas = [(RING_DESC, d), (RING_AVAIL, a), (RING_USED, u), *touched[-64:]]
        self.mem = mem
        self.rng = random.Random(size * 7919 + len(touched))
        self._stop_flag = threading.Event()

    def run(self) -> None:
        views = [self.mem.view(g, n) for g, n in self.areas if n > 0]
        rng = self.rng
        while not self._stop_flag.is_set():
            for _ in range(64):
                v = rng.choice(views)
                v[rng.randrange(len(v))] ^= 1 << rng.randrange(8)
            time.sleep(0)

    def start(self) -> None:
        # Switch threads often, so flips land between the back-end's reads.
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        super().start()

    def stop(self) -> None:
        self._stop_flag.set()
        self.join()
        sys.setswitchinterval(self._interval)


# -- small helpers ---------------------------------------------------------------------------------------


def _short_reason(reason: str) -> str:
    return reason if len(reason) <= 60 else reason[:57] + "..."


def _rejections(slot: VmSlot) -> Counter[str]:
    return Counter({r: n for (ev, r), n in slot.counters.snapshot().items() if ev == "rejected"})


def _delta(a: dict[tuple[str, str], int], b: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {k: v - a.get(k, 0) for k, v in b.items() if v != a.get(k, 0)}


class _RingView:
    """The consuming position of the guest's request queue, wherever the queue is served.

    On the event loop the DeviceQueue holds it; while the kick lane serves the
    queue, the queue's copy is stale until the lane hands it back, so the
    position is read from the lane (under its lock: between two of its turns).
    """

    def __init__(self, q: vq.DeviceQueue, device: Any) -> None:
        self._q = q
        self._device = device

    def on_lane(self) -> bool:
        ls = self._device._lane_slot  # noqa: SLF001 (the harness looks inside, as test_kick_lane does)
        return ls is not None and ls.attached

    def _cursor(self) -> int:
        return self._device._lane_slot.cursor() if self.on_lane() else self._q.packed_cursor  # noqa: SLF001

    @property
    def last_avail_idx(self) -> int:
        return self._cursor() & 0xFFFF

    @property
    def used_idx(self) -> int:
        return self._cursor() >> 32 & 0xFFFF

    @property
    def broken(self) -> bool:
        return bool(self._cursor() >> 48 & 1)


async def _quiesce(q: "vq.DeviceQueue | _RingView", target: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    spins = 0
    while not (q.broken or q.last_avail_idx == target):
        if time.monotonic() > deadline:
            return False
        spins += 1
        await asyncio.sleep(0 if spins < 200 else 0.0005)
    # One more turn: the used ring is published at the end of the same handle_queue call.
    await asyncio.sleep(0)
    return True


async def send_data(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    """Send ``data`` with ``fds`` on its first byte; False if the back-end hung up."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    deadline = time.monotonic() + 2
    while True:
        try:
            n = sock.sendmsg([data], anc)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.0005)
        except OSError:
            return False
    while n < len(data):
        try:
            n += sock.send(data[n:])
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.0005)
        except OSError:
            return False
    return True


async def settle(sock: socket.socket, timeout: float = 1.0) -> None:
    """Like a front-end that waits for its replies: return once the back-end read everything sent."""
    deadline = time.monotonic() + timeout
    while unread(sock) and drain(sock) and time.monotonic() < deadline:
        await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)
    drain(sock)


def unread(sock: socket.socket) -> int:
    """Bytes we sent that the back-end has not read yet (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def drain(sock: socket.socket) -> bool:
    """Read and drop the back-end's replies; False once it has hung up."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except BlockingIOError:
            return True
        except OSError:
            return False
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % 4])
                for fd in arr:
                    os.close(fd)
        if not data:
            return False
