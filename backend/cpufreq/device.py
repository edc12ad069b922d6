"""The cpufreq virtio device (protocol/SPEC.md) on top of the generic session.

Theory of operation: one device object per VM, alive across front-end
connections.  It keeps the VM's vCPU-to-host-domain map and builds the
config space from the host frequency source; when the source reports new
frequencies for a domain this VM uses, the config generation moves and the
session is asked to notify the front-end (it coalesces).  On a kick it drains
the request queue within a work budget (protocol/requests.py; in C when the
back-end could build it), which decodes each batch and returns every buffer,
valid or not, with used length 0.  Then it tracks sequence numbers (loss,
duplicates, staleness) and batch age, counts every rejection by reason (and
logs them within a budget, so a hostile guest cannot flood the journal), and
hands the drain's valid records to the policy in one call.

Offload: when the C data plane is loaded and the policy can give a C clamp
engine for the VM (``lane_binding``), a started request queue is served by
the kick lane instead (backend/dataplane/lane.py): the same drain, bookkeeping and
decision, made in a C thread.  The device then only logs the rejections the
lane reports and reads the per-vCPU state from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol.cpufreq import Record
from vhost_user_cpufreq.protocol.errors import SessionStateError
from vhost_user_cpufreq.protocol.requests import (
    DESCRIPTORS_PER_UNIT,
    EXPLAIN,
    NO_HEAD,
    PYTHON_MAX_INDIRECT,
    REASONS,
    Drained,
)
from vhost_user_cpufreq.protocol.requests import drain as drain_requests
from vhost_user_cpufreq.protocol.virtqueue import (
    MAX_INDIRECT_DESCS,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    DeviceQueue,
)

from ..counters import Counters
from ..dataplane.cdrain import DataPlane, dataplane
from ..dataplane.lane import EV_BUFFER, EV_CALL_STALLED, EV_MEMORY_FAULT, EV_RECORDS, EV_RING, EV_STALE, LaneSlot, lane_for
from ..defaults import LANE_SLICE_US
from ..policy.decision import Policy
from ..policy.ratelimit import LogBudget
from ..vhost.device import DeviceHost
from .hostfreq import FrequencySource, HostSnapshot

__all__ = ["CpufreqDevice", "VcpuState", "VIRTIO_F_VERSION_1"]

VIRTIO_F_VERSION_1 = 32
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
#: Work (buffers plus records) per turn before yielding to other VMs (fairness; see session).
DEFAULT_WORK_BUDGET = 512


@dataclass(slots=True)
class VcpuState:
    util: int = 0
    perf_khz: int = 0
    updated: float | None = None


@dataclass(slots=True)
class SeqTracker:
    """Sequence and age bookkeeping for one driver instance (SPEC 6.2)."""

    last: int | None = None
    min_offset_ns: int | None = None
    lost: int = 0
    stale: int = 0
    last_age_ns: int = 0

    def accept(self, seq: int, resync: bool) -> bool:
        if self.last is None or resync:
            self.last = seq
            return True
        d = abi.seq_delta(seq, self.last)
        if d <= 0:
            self.stale += 1
            return False
        self.lost += d - 1
        self.last = seq
        return True

    def age(self, host_ns: int, guest_ns: int) -> int:
        """The batch's age beyond the smallest host-minus-guest offset seen.

        The guest's timestamp is any u64: the offset saturates at the int64 minimum
        and the age at the int64 maximum, as in kick_lane.c, so both paths agree and
        the figures fit the lane's int64 fields when a queue moves onto it.
        """
        off = max(host_ns - guest_ns, _I64_MIN)
        if self.min_offset_ns is None or off < self.min_offset_ns:
            self.min_offset_ns = off
        self.last_age_ns = min(off - self.min_offset_ns, _I64_MAX)
        return self.last_age_ns


class CpufreqDevice:
    num_queues = abi.NUM_QUEUES
    max_queue_size = 1024
    config_size = abi.CONFIG_SIZE
    # Bounds what one buffer can make us copy (its readable part); a batch is at most
    # 16 + 8 * 256 bytes, the rest is room for writable segments the device ignores.
    max_chain_bytes = 1 << 16
    max_indirect = MAX_INDIRECT_DESCS  # replaced per device by what its work budget pays for (__init__)

    def __init__(
        self,
        vm: str,
        vcpu_host_domain: Sequence[int],
        source: FrequencySource,
        policy: Policy,
        *,
        counters: Counters | None = None,
        perf_request: bool = True,
        work_budget: int = DEFAULT_WORK_BUDGET,
        mirror_threshold: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.LoggerAdapter[logging.Logger] | logging.Logger | None = None,
        data_plane: DataPlane | None = None,
        lane_slice_us: int = LANE_SLICE_US,
    ) -> None:
        self.vm = vm
        self.source = source
        self.policy = policy
        self.counters = counters or Counters()
        self.work_budget = work_budget
        self.lane_slice_us = lane_slice_us  # the kick lane's slice, if this device starts the lane
        self._clock = clock
        self.log = log or logging.LoggerAdapter(logging.getLogger(__name__), {"vm": vm})
        self._offered = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | (1 << abi.F_PERF_REQUEST if perf_request else 0)
        )
        self._acked = 0
        self._host: DeviceHost | None = None
        self._vcpus = [VcpuState() for _ in vcpu_host_domain]
        self._lane_slot: LaneSlot | None = None
        self.seq = SeqTracker()
        self.mirror_threshold = mirror_threshold
        self._host_domains: list[object] = []
        self.config = self._build_config(source.snapshot(), vcpu_host_domain, generation=1)
        self._unsubscribe = source.subscribe(self._on_snapshot)
        self._log_budget = LogBudget()
        self._dataplane = data_plane or dataplane()
        # A table is walked before any of it is priced, so one longer than a whole turn pays for
        # (8 x 512 = 4,096 entries) is refused unwalked: chain-too-long.  Still 4x the largest queue,
        # and the virtio spec bounds a driver's chain by its queue size; the Python drain takes that
        # bound (1,024, about 0.2 ms of Python) so that one buffer's walk stays a short turn.
        self.max_indirect = min(MAX_INDIRECT_DESCS, DESCRIPTORS_PER_UNIT * work_budget,
                                PYTHON_MAX_INDIRECT if self._dataplane.kind == "python" else MAX_INDIRECT_DESCS)
        self._drain_queue: DeviceQueue | None = None
        self._drain: Callable[..., Drained] = drain_requests  # replaced on the first drain
        batch = getattr(policy, "on_records", None)
        self._deliver: Callable[[list[tuple[int, int, int]], float], None] = (
            (lambda recs, now: batch(vm, recs, self.config, now)) if batch is not None else self._deliver_each
        )

    @property
    def vcpus(self) -> list[VcpuState]:
        """Each vCPU's last request (read from the lane while it serves the queue)."""
        if self._lane_slot is not None:
            return [VcpuState(u, p, t) for u, p, t in self._lane_slot.vcpu_states()]
        return self._vcpus

    # -- config space ------------------------------------------------------------
    def _build_config(self, snap: HostSnapshot, vcpu_host_domain: Sequence[int], generation: int) -> abi.DeviceConfig:
        # Guest domains are the host domains this VM uses, in order of first
        # use, remembered by their CPUs so a rebuilt snapshot still finds them.
        keys: list[object] = []
        guest_map: list[int] = []
        for hd in vcpu_host_domain:
            key = snap.domains[hd].key
            if key not in keys:
                keys.append(key)
            guest_map.append(keys.index(key))
        if len(keys) > abi.MAX_DOMAINS:
            raise ValueError(f"VM {self.vm} spans {len(keys)} host domains; at most {abi.MAX_DOMAINS}")
        by_key = {d.key: d for d in snap.domains}
        doms = tuple(abi.Domain(d.cur_khz, d.min_khz, d.max_khz, d.capacity) for d in (by_key[k] for k in keys))
        self._host_domains = keys
        return abi.DeviceConfig(generation, doms, tuple(guest_map), abi.CFG_F_NOMINAL if snap.nominal else 0)

    def remap(self, vcpu_host_domain: Sequence[int]) -> None:
        """New vCPU placement (hotplug, re-pinning): rebuild config and notify."""
        self.config = self._build_config(self.source.snapshot(), vcpu_host_domain, self.config.generation + 1)
        self.counters.inc("config_updates")
        if self._host is not None:
            self._host.config_changed()

    def _on_snapshot(self, snap: HostSnapshot) -> None:
        by_key = {d.key: d for d in snap.domains}
        # A domain that vanished (all its CPUs offline) keeps its last value
        # until the host side re-pins the VM and calls remap().
        cur = [by_key[k].cur_khz if k in by_key else d.cur_khz for k, d in zip(self._host_domains, self.config.domains)]
        flags = abi.CFG_F_NOMINAL if snap.nominal else 0
        old = self.config
        moved = any(
            abs(c - d.cur_khz) > self.mirror_threshold * max(d.max_khz, 1) for c, d in zip(cur, old.domains)
        ) or (cur != [d.cur_khz for d in old.domains] and self.mirror_threshold == 0)
        if not moved and flags == old.flags:
            self.counters.inc("mirror_below_threshold")
            return
        self.config = old.with_frequencies(cur, flags)
        self.counters.inc("config_updates")
        if self._host is not None:
            self._host.config_changed()

    def close(self) -> None:
        self._unsubscribe()

    # -- VirtioDevice ------------------------------------------------------------
    def features(self) -> int:
        return self._offered

    def set_features(self, features: int) -> None:
        self._acked = features

    @property
    def perf_request(self) -> bool:
        return bool(self._acked & (1 << abi.F_PERF_REQUEST))

    def attach(self, host: DeviceHost | None) -> None:
        self._host = host

    def get_config(self, offset: int, size: int) -> bytes:
        self.counters.inc("config_reads")
        return self.config.encode()[offset : offset + size]

    def set_config(self, offset: int, data: bytes) -> None:
        raise SessionStateError("read-only-config", "the cpufreq config space is read-only")

    def queue_ready(self, index: int, queue: DeviceQueue | None) -> None:
        if queue is None:
            self._forget_drain()
            # The ring stopped: QEMU's only sign of a driver reset (it sends
            # no status 0), and also of a paused VM.  Either way no boost
            # should outlive it; sequence tracking stays for a resume.
            self._release()

    def _forget_drain(self) -> None:
        # The C drainer holds pointers into guest memory: let the mappings go with the queue.
        self._drain_queue = None
        self._drain = drain_requests

    def _release(self) -> None:
        if any(st.updated is not None for st in self._vcpus):
            self._vcpus = [VcpuState() for _ in self._vcpus]
            self.policy.on_vm_reset(self.vm)

    def reset(self) -> None:
        self._forget_drain()
        self.seq = SeqTracker()
        self._acked = 0
        self._release()

    def handle_queue(self, index: int, queue: DeviceQueue) -> bool:
        """Drain within the work budget; True if more may be waiting.

        The drain (C when available, else the Python reference: both in
        protocol/requests.py's terms) returns every buffer to the used ring;
        here each entry is accounted, sequence-checked and its records handed
        to the policy in one call.
        """
        if self._drain_queue is not queue:
            self._drain_queue = queue
            self._drain = self._dataplane.drainer(queue, self.work_budget)
        d = self._drain(queue, self.work_budget, num_vcpus=len(self._vcpus), perf_request=self.perf_request)
        if d.entries:
            self._account(d)
            if self._host is not None and d.returned:
                self._host.signal_used(index)  # publish even when the ring broke midway
        return d.more

    def _account(self, d: Drained) -> None:
        now = self._clock()
        host_ns = time.monotonic_ns()
        counters = self.counters
        records = d.records
        accepted: list[tuple[int, int, int]] = []
        pos = batches = lost = 0
        rejects_by_entry: dict[int, list[int]] = {}
        for i, code in d.rejects:
            rejects_by_entry.setdefault(i, []).append(code)
        for i, (head, status, nvalid, seq, flags, ntotal, ts) in enumerate(d.entries):
            if status:
                counters.inc("rejected", REASONS[status])
                self._log_rejected(head, status)
                continue
            mine = records[pos : pos + nvalid]
            pos += nvalid
            bad = rejects_by_entry.get(i)
            if bad:
                for code in bad:
                    counters.inc("rejected", REASONS[code])
                self._log_dropped(sorted(set(bad)), len(bad), ntotal, seq)
            lost_before = self.seq.lost
            if not self.seq.accept(seq, bool(flags & abi.BATCH_F_RESYNC)):
                counters.inc("rejected", "stale-batch")
                self._log_stale(seq, self.seq.last)
                continue
            lost += self.seq.lost - lost_before
            self.seq.age(host_ns, ts)
            batches += 1
            accepted.extend(mine)
        if accepted:
            self._deliver(accepted, now)  # first: the host acts sooner; bookkeeping can wait
            counters.inc("records", n=len(accepted))
            vcpus = self._vcpus
            for v, u, p in accepted:
                st = vcpus[v]
                st.util = u
                st.perf_khz = p
                st.updated = now
        if lost:
            counters.inc("lost_batches", n=lost)
        if batches:
            counters.inc("batches", n=batches)

    # -- the kick lane ----------------------------------------------------------
    def offload(self, index: int, queue: DeviceQueue, kick_fd: int, call_fd: int | None,
                batch_delay: float) -> "_LaneOffload | None":
        """Serve the request queue from the C kick lane, if the data plane and the policy can."""
        if self._dataplane.lib is None or not self._dataplane.lane:
            return None
        get = getattr(self.policy, "lane_binding", None)
        binding = get(self.vm, lambda: self._policy_changed(index)) if get is not None else None
        if binding is None:
            return None
        try:
            lane = lane_for(self._dataplane.lib, asyncio.get_running_loop(), self.lane_slice_us)
            slot = LaneSlot(lane, queue, kick_fd=kick_fd, call_fd=call_fd, budget=self.work_budget,
                            num_vcpus=len(self._vcpus), perf_request=self.perf_request, batch_delay=batch_delay,
                            binding=binding, seq=self.seq, vcpus=self._vcpus, counters=self.counters,
                            on_event=self._on_lane_event)
        except (OSError, ValueError) as exc:
            self.log.warning("request queue stays on the event loop: %s", exc)
            return None
        self._lane_slot = slot
        self.log.debug("request queue served by the kick lane")
        return _LaneOffload(self, slot)

    def _policy_changed(self, index: int) -> None:
        if self._host is not None:
            self._host.refresh_offload(index)  # onto the lane, off it, or onto it with the new binding

    def _lane_detached(self, slot: LaneSlot) -> None:
        self._vcpus = [VcpuState(u, p, t) for u, p, t in slot.vcpu_states()]
        if self._lane_slot is slot:
            self._lane_slot = None

    def _on_lane_event(self, kind: int, reason: int, head: int, seq: int, mask: int, nbad: int, ntotal: int,
                       err: int) -> None:
        """Log what the lane rejected (it counted it already), within the log budget."""
        if kind < 0:  # the lane's event queue overflowed: those are counted, not logged
            self._log_budget.suppressed += nbad
            return
        if kind == EV_MEMORY_FAULT:
            if self._host is not None:
                self._host.fail("guest-memory-gone", "guest RAM was shrunk or left unbacked under the request "
                                "queue (SIGBUS); the ring is left alone")
            return
        if kind == EV_CALL_STALLED:
            if self._host is not None:
                self._host.fail("call-fd-stalled", "the call eventfd was made blocking and kept full")
            return
        if kind in (EV_RING, EV_BUFFER):  # a ring error's head is NO_HEAD, as in a drain's entries
            self._log_rejected(head, reason)
        elif kind == EV_RECORDS:
            self._log_dropped([c for c in range(len(REASONS)) if mask >> c & 1], nbad, ntotal, seq)
        elif kind == EV_STALE:
            self._log_stale(seq, err & 0xFFFFFFFF)

    # -- rejection log lines (both paths), within the log budget -----------------
    def _log_rejected(self, head: int, code: int) -> None:
        if self._may_log():
            reason = REASONS[code]
            where = "the ring" if head == NO_HEAD else f"buffer {head}"
            self.log.warning("rejected %s: %s (%s)", where, reason, EXPLAIN[reason])

    def _log_dropped(self, codes: Sequence[int], nbad: int, ntotal: int, seq: int) -> None:
        """``codes``: the distinct reasons, in code order."""
        if self._may_log():
            self.log.warning("dropped %d of %d record(s) of batch seq=%d: %s", nbad, ntotal, seq,
                             "; ".join(f"{REASONS[c]} ({EXPLAIN[REASONS[c]]})" for c in codes))

    def _log_stale(self, seq: int, last: int | None) -> None:
        if self._may_log():
            self.log.info("dropped stale or duplicate batch seq=%d (last %s)", seq, last)

    def _may_log(self) -> bool:
        ok = self._log_budget.allow(self._clock())
        if self._log_budget.suppressed_then:
            self.log.warning("%d more rejection(s) were counted but not logged", self._log_budget.suppressed_then)
        return ok

    def _deliver_each(self, records: list[tuple[int, int, int]], now: float) -> None:
        """For a policy without on_records: one on_record call per record."""
        cfg = self.config
        for r in records:
            self.policy.on_record(self.vm, Record(*r), cfg.domain_of(r[0]), now)


class _LaneOffload:
    """The session's handle on a request queue the lane serves."""

    def __init__(self, device: CpufreqDevice, slot: LaneSlot) -> None:
        self._device = device
        self._slot = slot

    def set_call(self, fd: int | None) -> None:
        self._slot.set_call(fd)

    def detach(self) -> None:
        self._slot.detach()
        self._device._lane_detached(self._slot)
