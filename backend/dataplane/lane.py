"""The kick lane (``kick_lane.c``) from Python: the clamp engine in C, and request queues served off the loop.

Theory of operation: a started request queue whose VM has a C clamp engine
is *offloaded*.  Its kick eventfd leaves the asyncio loop and joins the epoll
set of one C thread per event loop (the lane), which drains the ring, keeps
the device's sequence and per-vCPU bookkeeping, decides with the engine, calls
``sched_setattr``, publishes the used ring and interrupts the driver, without
waking Python.  Python keeps everything else: the session, guest memory, the
engine's configuration and thread ids, logging and metrics.

Hand-over rules: :class:`LaneSlot` takes the queue's cursor, interrupt state
and sequence tracker on attach and gives them back on :meth:`LaneSlot.detach`,
which the session calls before it changes anything the slot points at (the
ring, guest memory, the kick fd).  Counters stay in C while attached and are
read live (:class:`~.counters.Counters` sources), then folded in on detach.
Rejections and clamp errors come back as events, logged by their owner within
its log budget.

:class:`CClampEngine` has the interface of :class:`~.policy.engine.ClampEngine` (the
reference; tests/test_kick_lane.py runs both on the same inputs), plus the
thread ids and actuation switch the lane needs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from vhost_user_cpufreq.protocol.requests import REASONS
from vhost_user_cpufreq.protocol.virtqueue import DeviceQueue

from ..counters import LATENCY_BUCKETS, Counters
from ..defaults import LANE_SLICE_US
from ..policy.engine import ClampChange, ClampState, EngineConfig, VcpuPlacement, VmLimits, effective_cap
from .cdrain import CDrainer, ffi, pointer_to

__all__ = ["CClampEngine", "KickLane", "LaneSched", "LaneSlot", "LaneBinding", "lane_for", "running_lanes",
           "EV_RING", "EV_BUFFER", "EV_RECORDS",
           "EV_STALE", "EV_CLAMP_FAILED", "EV_UCLAMP_REFUSED", "EV_MEMORY_FAULT", "EV_CALL_STALLED", "STAMP_BYTES"]

log = logging.getLogger("vhost_user_cpufreq.lane")

_CHANGE_REASONS = ("request", "deferred", "stale", "release")
EV_RING, EV_BUFFER, EV_RECORDS, EV_STALE, EV_CLAMP_FAILED, EV_UCLAMP_REFUSED, EV_MEMORY_FAULT, EV_CALL_STALLED = range(8)
_EVENTS_PER_READ = 64
#: the lane's decision stamp per vCPU (kick_lane.c account()): three native u64s
STAMP_BYTES = 24
_ERRNOS = 64  # kick_lane.c VUC_ERRNOS


class CClampEngine:
    """engine.ClampEngine's decisions, made in C so the lane can make them too."""

    def __init__(self, lib: Any, placements: Sequence[VcpuPlacement], limits: VmLimits = VmLimits(),
                 config: EngineConfig = EngineConfig()) -> None:
        self._lib = lib
        e = lib.vuc_engine_new()
        if e == ffi.NULL:
            raise MemoryError("vuc_engine_new")
        self.handle = ffi.gc(e, lib.vuc_engine_free)
        self.configure(placements, limits, config)

    def configure(self, placements: Sequence[VcpuPlacement], limits: VmLimits, config: EngineConfig) -> None:
        """Start afresh (as a new ClampEngine would), keeping the engine object the lane holds."""
        p = ffi.new("vuc_placement[]", max(1, len(placements)))
        for i, pl in enumerate(placements):
            p[i].vcpu, p[i].pcpu_cap, p[i].vcpu_cap, p[i].max_khz = (pl.vcpu, pl.pcpu_capacity, pl.vcpu_capacity,
                                                                      pl.max_khz)
            p[i].cap = effective_cap(pl, limits)
        if self._lib.vuc_engine_configure(self.handle, len(placements), p, limits.floor, limits.ceiling,
                                          config.hysteresis, config.min_interval, config.stale_after,
                                          config.headroom) != 0:
            raise MemoryError("vuc_engine_configure")
        self.limits = limits
        self.config = config
        self._placements = {pl.vcpu: pl for pl in placements}
        self._order = [pl.vcpu for pl in placements]
        self._out = ffi.new("vuc_change[]", max(1, len(placements)))
        self._applied = ffi.new("int32_t[]", max(1, len(placements)))

    @property
    def vcpus(self) -> Mapping[int, int | None]:
        self._lib.vuc_engine_applied(self.handle, self._applied)
        return {v: (None if self._applied[i] < 0 else self._applied[i]) for i, v in enumerate(self._order)}

    def placement(self, vcpu: int) -> VcpuPlacement:
        return self._placements[vcpu]

    def _changes(self, n: int) -> list[ClampChange]:
        o = self._out
        return [ClampChange(o[i].vcpu, o[i].value, _CHANGE_REASONS[o[i].reason]) for i in range(n)]

    def on_record(self, vcpu: int, util: int, perf_khz: int, now: float) -> list[ClampChange]:
        if vcpu not in self._placements:
            return []
        return self._changes(self._lib.vuc_engine_record(self.handle, vcpu, util, perf_khz, now, self._out))

    def tick(self, now: float) -> list[ClampChange]:
        return self._changes(self._lib.vuc_engine_tick(self.handle, now, self._out))

    def next_deadline(self) -> float | None:
        due = ffi.new("double *")
        return float(due[0]) if self._lib.vuc_engine_next_deadline(self.handle, due) else None

    def release_all(self) -> list[ClampChange]:
        return self._changes(self._lib.vuc_engine_release_all(self.handle, self._out))

    def state(self) -> tuple[ClampState, ...]:
        out = ffi.new("vuc_vcpu_state[]", max(1, len(self._order)))
        self._lib.vuc_engine_get_state(self.handle, out)
        return tuple(ClampState(s.vcpu, s.wanted, None if s.applied < 0 else s.applied,
                                None if s.changed_at == float("-inf") else s.changed_at,
                                s.record_at if s.has_record else None, bool(s.pending))
                     for s in (out[i] for i in range(len(self._order))))

    def restore_state(self, states: Iterable[ClampState]) -> None:
        states = list(states)
        arr = ffi.new("vuc_vcpu_state[]", max(1, len(states)))
        for i, c in enumerate(states):
            arr[i].vcpu, arr[i].wanted, arr[i].applied = c.vcpu, c.wanted, -1 if c.applied is None else c.applied
            arr[i].has_record, arr[i].pending = c.record_at is not None, int(c.pending)
            arr[i].changed_at = float("-inf") if c.changed_at is None else c.changed_at
            arr[i].record_at = 0.0 if c.record_at is None else c.record_at
        if self._lib.vuc_engine_set_state(self.handle, len(states), arr) != 0:
            raise ValueError(f"vCPUs {[c.vcpu for c in states]} are not all this VM's")

    # -- what only the lane needs ------------------------------------------------------------
    def set_threads(self, tids: Mapping[int, int]) -> None:
        """The threads the lane clamps, by vCPU (vCPUs not named get none)."""
        for v in self._order:
            self._lib.vuc_engine_set_thread(self.handle, v, tids.get(v, 0))

    def set_actuation(self, apply: bool) -> None:
        """True: the lane calls sched_setattr; False: it records the values only."""
        self._lib.vuc_engine_set_actuation(self.handle, int(apply))


@dataclass
class LaneBinding:
    """What a policy gives the lane for one VM: the engine, and where its clamp figures go."""

    engine: CClampEngine
    counters: Counters  # clamps_applied / clamps_recorded / clamp_failed
    on_clamp_event: Callable[[int, int, int], None]  # (kind, thread id, errno)
    #: a writable buffer of STAMP_BYTES per vCPU: (decided ns, records decided, lane woke ns), native u64
    stamps: Any = None


@dataclass(frozen=True, slots=True)
class LaneSched:
    """The lane thread, and what became of its request for a short scheduler slice."""

    tid: int
    requested_ns: int  # 0: none asked (the kernel's default slice)
    slice_ns: int  # read back from the kernel after the request; 0 where fair threads have no slice
    error: int  # errno of a refused request, else 0

    @property
    def applied(self) -> bool:
        return self.requested_ns > 0 and self.error == 0 and self.slice_ns == self.requested_ns

    def describe(self) -> str:
        if not self.requested_ns:
            return f"kick lane thread {self.tid}: the kernel's default slice (lane_slice_us = 0)"
        if self.error:
            return (f"kick lane thread {self.tid}: slice of {self.requested_ns // 1000} us refused: "
                    f"{os.strerror(self.error)}; a kick may wait out a busy thread's slice on the lane's CPU")
        if not self.applied:
            return (f"kick lane thread {self.tid}: this kernel keeps its own slice (it reads back "
                    f"{self.slice_ns} ns; a slice for fair threads needs Linux 6.12+); a kick may wait out "
                    f"a busy thread's slice on the lane's CPU")
        return (f"kick lane thread {self.tid}: EEVDF slice {self.slice_ns // 1000} us, so a kick preempts "
                f"a busy thread on the lane's CPU")


_last_outcome: tuple[int, int, int] | None = None


def _report(sched: LaneSched) -> None:
    """Log what became of the slice request; a lane restarted with the same outcome only at debug level
    (the lane stops with its last ring and starts with the next)."""
    global _last_outcome
    outcome = (sched.requested_ns, sched.slice_ns, sched.error)
    if outcome == _last_outcome:
        log.debug("%s", sched.describe())
        return
    _last_outcome = outcome
    (log.info if sched.applied or not sched.requested_ns else log.warning)("%s", sched.describe())


class KickLane:
    """The C thread of one event loop, and the eventfd it wakes the loop with when it has events."""

    def __init__(self, lib: Any, loop: asyncio.AbstractEventLoop, slice_us: int = LANE_SLICE_US) -> None:
        self._lib = lib
        self._loop = loop
        self._notice = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        lane = lib.vuc_lane_new(self._notice, max(0, slice_us) * 1000)
        if lane == ffi.NULL:
            err = ffi.errno
            os.close(self._notice)
            raise OSError(err, f"cannot start the kick lane: {os.strerror(err)}")
        self.handle = lane
        self.slots: set[LaneSlot] = set()
        tid, got, err = ffi.new("int32_t *"), ffi.new("uint64_t *"), ffi.new("int32_t *")
        lib.vuc_lane_sched(lane, tid, got, err)
        self.sched = LaneSched(tid[0], max(0, slice_us) * 1000, got[0], err[0])
        _report(self.sched)
        loop.add_reader(self._notice, self._on_notice)

    def _on_notice(self) -> None:
        try:
            os.eventfd_read(self._notice)
        except BlockingIOError:
            return
        for slot in list(self.slots):
            slot.take_events()

    def close(self) -> None:
        self._loop.remove_reader(self._notice)
        self._lib.vuc_lane_free(self.handle)
        self.handle = None
        os.close(self._notice)


_lanes: dict[asyncio.AbstractEventLoop, KickLane] = {}


def lane_for(lib: Any, loop: asyncio.AbstractEventLoop, slice_us: int = LANE_SLICE_US) -> KickLane:
    """The loop's lane, started on first use (and stopped when its last slot leaves).

    ``slice_us`` applies when the lane starts; every VM of a service asks for the same.
    """
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = KickLane(lib, loop, slice_us)
    return lane


def running_lanes() -> list[KickLane]:
    """The lanes serving queues now (one per event loop that has offloaded one)."""
    return list(_lanes.values())


def _release_lane(lane: KickLane) -> None:
    if not lane.slots and _lanes.get(lane._loop) is lane:
        del _lanes[lane._loop]
        lane.close()


class LaneSlot:
    """One request queue served by the lane, from attach to detach."""

    def __init__(self, lane: KickLane, queue: DeviceQueue, *, kick_fd: int, call_fd: int | None, budget: int,
                 num_vcpus: int, perf_request: bool, batch_delay: float, binding: LaneBinding,
                 seq: Any, vcpus: Sequence[Any], counters: Counters,
                 on_event: Callable[[int, int, int, int, int, int, int, int], None]) -> None:
        drainer = CDrainer.for_queue(lane._lib, queue, budget)
        if drainer is None:
            raise ValueError("the C drain cannot take this queue")
        drainer._map_regions()
        self._lane = lane
        self._lib = lane._lib
        self._queue = queue
        self._drainer = drainer  # owns the ring pointers and buffers the slot uses
        self._binding = binding
        self._seq = seq
        self._counters = counters
        self._on_event = on_event
        s = ffi.new("vuc_slot *")
        s.q = drainer._q
        s.entries, s.records, s.scratch, s.rejects = (drainer._entries, drainer._records, drainer._scratch,
                                                      drainer._rejects)
        s.engine = binding.engine.handle
        if binding.stamps is not None and memoryview(binding.stamps).nbytes < STAMP_BYTES * num_vcpus:
            raise ValueError(f"decision stamps need {STAMP_BYTES} bytes per vCPU")
        self._stamps = binding.stamps  # kept alive while the lane writes into it
        s.stamps = (ffi.cast("uint64_t *", pointer_to(memoryview(binding.stamps), writable=True))
                    if binding.stamps is not None else ffi.NULL)
        self._vs = ffi.new("vuc_vstate[]", max(1, num_vcpus))
        for i, st in enumerate(vcpus):
            self._vs[i].util, self._vs[i].perf_khz = st.util, st.perf_khz
            self._vs[i].updated = -1.0 if st.updated is None else st.updated
        s.vs = self._vs
        s.kick_fd, s.call_fd = kick_fd, -1 if call_fd is None else call_fd
        s.budget, s.num_vcpus, s.perf_request, s.event_idx = budget, num_vcpus, int(perf_request), int(queue.event_idx)
        s.max_ahead = max(1, queue.size // 2)
        s.batch_delay = batch_delay
        for i, b in enumerate(LATENCY_BUCKETS):
            s.bounds[i] = b
        s.cursor = queue.packed_cursor
        s.signalled = -1 if queue.signalled is None else queue.signalled
        s.seq_has, s.seq_last = (0, 0) if seq.last is None else (1, seq.last)
        s.seq_undecoded = seq.undecoded
        s.off_has, s.min_off = (0, 0) if seq.min_offset_ns is None else (1, seq.min_offset_ns)
        s.last_age, s.seq_lost, s.seq_stale = seq.last_age_ns, seq.lost, seq.stale
        s.id = -1
        self._s = s
        self._lost0, self._stale0 = seq.lost, seq.stale
        self._dropped_seen = 0
        self._events = ffi.new("vuc_event[]", _EVENTS_PER_READ)
        counters.add_source(self)
        binding.counters.add_source(self._clamp_counts)
        if self._lib.vuc_lane_attach(lane.handle, s) != 0:
            err = ffi.errno
            counters.fold_source(self)
            binding.counters.fold_source(self._clamp_counts)
            raise OSError(err, f"kick lane attach: {os.strerror(err)}")
        lane.slots.add(self)
        self.attached = True

    # -- what the session changes while attached ----------------------------------------------
    def set_call(self, fd: int | None) -> None:
        self._lib.vuc_lane_set_call(self._lane.handle, self._s, -1 if fd is None else fd)

    def detach(self) -> None:
        """Stop; the queue, sequence tracker and vCPU states get the lane's state back."""
        if not self.attached:
            return
        self.attached = False
        self._lib.vuc_lane_detach(self._lane.handle, self._s)
        s = self._s
        self._queue.hand_back(s.cursor, None if s.signalled < 0 else s.signalled)
        seq = self._seq
        seq.last = s.seq_last if s.seq_has else None
        seq.undecoded = s.seq_undecoded
        seq.min_offset_ns = s.min_off if s.off_has else None
        seq.last_age_ns, seq.lost, seq.stale = s.last_age, s.seq_lost, s.seq_stale
        self.take_events()
        self._counters.fold_source(self)
        self._binding.counters.fold_source(self._clamp_counts)
        self._lane.slots.discard(self)
        _release_lane(self._lane)

    def cursor(self) -> int:
        """The queue's packed cursor as the lane holds it now (read under the lane's lock, so
        between two turns); the queue's own copy is stale until :meth:`detach`."""
        snap = ffi.new("vuc_slot *")
        self._lib.vuc_lane_snapshot(self._lane.handle, self._s, snap)
        return int(snap.cursor)

    def vcpu_states(self) -> list[tuple[int, int, float | None]]:
        """(util, perf_khz, updated) per vCPU, as the lane last wrote them."""
        return [(v.util, v.perf_khz, None if v.updated < 0 else v.updated) for v in self._vs[0:self._s.num_vcpus]]

    # -- events and counters ------------------------------------------------------------------
    def take_events(self) -> None:
        while True:
            n = self._lib.vuc_lane_events(self._lane.handle, self._s, self._events, _EVENTS_PER_READ)
            for e in self._events[0:n]:
                if e.kind in (EV_CLAMP_FAILED, EV_UCLAMP_REFUSED):
                    self._binding.on_clamp_event(e.kind, e.head, e.err)
                else:
                    self._on_event(e.kind, e.reason, e.head, e.seq, e.mask, e.nbad, e.ntotal, e.err)
            if n < _EVENTS_PER_READ:
                break
        dropped = int(self._s.ev_dropped)
        if dropped > self._dropped_seen:
            self._on_event(-1, 0, 0, 0, 0, dropped - self._dropped_seen, 0, 0)
            self._dropped_seen = dropped

    def counts(self) -> dict[tuple[str, str], int]:
        """Counter values since attach (a Counters source)."""
        s = self._s
        out = {("kicks", ""): s.kicks, ("records", ""): s.accepted, ("batches", ""): s.batches,
               ("lost_batches", ""): s.seq_lost - self._lost0, ("rejected", "stale-batch"): s.seq_stale - self._stale0,
               ("interrupts_dropped", "call-fd-full"): s.interrupts_dropped,
               ("polls", ""): s.polls}
        rej = s.rejected
        for code in range(1, len(REASONS)):
            if rej[code]:
                out[("rejected", REASONS[code])] = rej[code]
        return {k: int(v) for k, v in out.items() if v}

    def histogram(self, name: str) -> tuple[list[int], float] | None:
        if name != "kick_to_decision_seconds":
            return None
        return [int(x) for x in self._s.k2d], float(self._s.k2d_sum)

    def _clamp_counts(self) -> dict[tuple[str, str], int]:
        s = self._s
        out = {("clamps_applied", ""): int(s.clamps_applied), ("clamps_recorded", ""): int(s.clamps_recorded)}
        if s.clamp_failed:
            for err in range(1, _ERRNOS):
                if s.clamp_errno[err]:
                    name = "error" if err == _ERRNOS - 1 else errno.errorcode.get(err, "error").lower()
                    out[("clamp_failed", name)] = out.get(("clamp_failed", name), 0) + int(s.clamp_errno[err])
        return {k: v for k, v in out.items() if v}
