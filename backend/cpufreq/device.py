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

Shared frequency page (SPEC §8): with ``shared_page`` the device asks the
session for one shared memory region; once the front-end maps it, every host
sample that changes a domain's value is stored there under the domain's
sequence count, and frequency changes no longer cost the guest a config
change notification (the config space is still kept current, and topology
or flag changes still notify).  The page is written, never read.

Energy model (SPEC §9.4): when every host domain the VM uses comes with
power per OPP (``HostDomain.energy``: a device-tree host), the device also
offers ``F_ENERGY_MODEL`` and writes each guest domain's table into the
page, under the section's own sequence count; a remap rewrites it before
the configuration change is announced.

Offload: when the C data plane is loaded and the policy can give a C clamp
engine for the VM (``lane_binding``), a started request queue is served by
the kick lane instead (backend/dataplane/lane.py): the same drain, bookkeeping and
decision, made in a C thread.  The device then only logs the rejections the
lane reports and reads the per-vCPU state from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import struct
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from vhost_user_cpufreq.protocol import cpufreq as abi
from vhost_user_cpufreq.protocol import energy as em
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
from vhost_user_cpufreq.protocol.session_snapshot import DeviceSnapshot, PageSnapshot, SeqSnapshot, SnapshotError
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
from .hostfreq import FrequencySource, HostDomain, HostSnapshot, advertised
from .carry import clamps_of, host_of, moved_across, restore_clamps, restore_host
from .power import guest_energy

__all__ = ["CpufreqDevice", "VcpuState", "VIRTIO_F_VERSION_1"]

VIRTIO_F_VERSION_1 = 32
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
#: Work (buffers plus records) per turn before yielding to other VMs (fairness; see session).
DEFAULT_WORK_BUDGET = 512
_AVAIL_INDEX_JUMP = REASONS.index("avail-index-jump")


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
    #: Buffers rejected whole (no trusted seq) since the last accepted batch: each
    #: used one sequence number, so it fills a gap instead of counting as lost.
    undecoded: int = 0

    def reject_whole(self) -> None:
        """A buffer taken from the ring and rejected before its seq could be trusted."""
        self.undecoded = min(self.undecoded + 1, 0xFFFFFFFF)  # kick_lane.c saturates its u32 alike

    def accept(self, seq: int, resync: bool) -> bool:
        if self.last is None or resync:
            self.last = seq
            self.undecoded = 0
            return True
        d = abi.seq_delta(seq, self.last)
        if d <= 0:
            self.stale += 1
            return False
        # SPEC 6.2: of the d - 1 numbers skipped, those of rejected buffers arrived.
        self.lost += max(0, d - 1 - self.undecoded)
        self.undecoded = 0
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
        shared_page: bool = False,
        max_khz: int | None = None,
    ) -> None:
        self.vm = vm
        self.max_khz = max_khz  # the VM's vCPUs' top frequency, below the host's (hostfreq.advertised)
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
        #: the shared frequency page: asked for only when configured (it costs CONFIGURE_MEM_SLOTS)
        self.shmem_sizes: tuple[int, ...] = (abi.FREQ_PAGE_SIZE,) if shared_page else ()
        self.shmem_features = 1 << abi.F_FREQ_PAGE if shared_page else 0
        self._page: memoryview | None = None  # our mapping of the page, as 32-bit words
        self._page_base: memoryview | None = None
        self._page_seq: list[int] = []
        self._page_values: list[abi.PageDomain | None] = []
        self._page_in_use = False
        self._page_carried: PageSnapshot | None = None  # a predecessor's writer state, until the page is resumed
        self._restore_moved = (False, False)  # (config moved across a restore, frequencies alone)
        self._host: DeviceHost | None = None
        self._vcpus = [VcpuState() for _ in vcpu_host_domain]
        self._lane_slot: LaneSlot | None = None
        self.seq = SeqTracker()
        self.mirror_threshold = mirror_threshold
        self._host_domains: list[object] = []
        self.config = self._build_config(source.snapshot(), vcpu_host_domain, generation=1)
        #: the energy model the page carries (SPEC 9.4), None when the host gives no power figures
        self.energy_model = self._build_energy(source.snapshot())
        self._em_seq = 0
        if shared_page and self.energy_model is not None:
            self.shmem_features |= 1 << em.F_ENERGY_MODEL
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
        doms = tuple(self._advertise(by_key[k]) for k in keys)
        self._host_domains = keys
        return abi.DeviceConfig(generation, doms, tuple(guest_map), abi.CFG_F_NOMINAL if snap.nominal else 0)

    def _advertise(self, d: HostDomain) -> abi.Domain:
        top, capacity = advertised(d.max_khz, d.capacity, self.max_khz)
        return abi.Domain(min(d.cur_khz, top), min(d.min_khz, top), top, capacity)

    def _build_energy(self, snap: HostSnapshot) -> em.EnergyModel | None:
        """Each guest domain's table from its host domain's power per OPP; None unless every one has it."""
        by_key = {d.key: d for d in snap.domains}
        tables = [guest_energy(by_key[k].energy, d.max_khz) if k in by_key else None
                  for k, d in zip(self._host_domains, self.config.domains)]
        if any(t is None for t in tables):
            return None
        return em.EnergyModel(tuple(t for t in tables if t is not None))

    def remap(self, vcpu_host_domain: Sequence[int]) -> None:
        """New vCPU placement (hotplug, re-pinning): rebuild config and notify."""
        snap = self.source.snapshot()
        self.config = self._build_config(snap, vcpu_host_domain, self.config.generation + 1)
        if self.shmem_features & (1 << em.F_ENERGY_MODEL):
            # The feature stays offered: a topology without power figures writes an empty section.
            self.energy_model = self._build_energy(snap)
        self._page_topology()
        self.counters.inc("config_updates")
        if self._host is not None:
            self._host.config_changed()

    def _on_snapshot(self, snap: HostSnapshot) -> None:
        by_key = {d.key: d for d in snap.domains}
        # A domain that vanished (all its CPUs offline) keeps its last value
        # until the host side re-pins the VM and calls remap().
        # (never above what the guest was told is the top: a VM with slower vCPUs, hostfreq.advertised)
        cur = [min(by_key[k].cur_khz, d.max_khz) if k in by_key else d.cur_khz
               for k, d in zip(self._host_domains, self.config.domains)]
        flags = abi.CFG_F_NOMINAL if snap.nominal else 0
        old = self.config
        if self._page is not None:
            self._write_page(old.domains, cur)
        if self._page_in_use and flags == old.flags:
            # The guest reads frequencies from the page: config space follows without a notification.
            if cur != [d.cur_khz for d in old.domains]:
                self.config = old.with_frequencies(cur, flags)
                self.counters.inc("config_updates")
                self.counters.inc("config_notify_skipped", "freq-page")
            return
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

    # -- the shared frequency page (the session's ShmemDevice) ----------------------------
    @property
    def freq_path(self) -> str:
        """How the guest gets host frequencies now: "page" (shared memory) or "config" (config space)."""
        return "page" if self._page_in_use else "config"

    def shmem_attach(self, shmid: int, view: memoryview) -> None:
        doms = [abi.PageDomain.of(d) for d in self.config.domains]
        view[:] = abi.encode_page(doms)  # not visible to the guest before the map
        self._page_base, self._page = view, view.cast("I")
        self._page_seq = [0] * abi.MAX_DOMAINS
        self._page_values = [*doms, *[None] * (abi.MAX_DOMAINS - len(doms))]
        self._em_seq = 0
        if self.shmem_features & (1 << em.F_ENERGY_MODEL):
            view[em.EM_OFFSET:em.EM_OFFSET + em.EM_SIZE] = em.encode_energy_model(self.energy_model)

    def shmem_resume(self, shmid: int, view: memoryview) -> None:
        """The page a predecessor wrote (the guest reads it): counts go on from the carried ones, and
        every entry that may differ from now is rewritten (all of them when the values are unknown)."""
        carried, self._page_carried = self._page_carried, None
        if carried is None:
            raise SnapshotError("page-state-missing", "a shared page without its writer's state")
        self._page_base, self._page = view, view.cast("I")
        self._page_seq = list(carried.seq)
        self._page_values = [None if v is None else abi.PageDomain(*v) for v in carried.values]
        # The energy model's count goes on from the page's (past an update its writer died in),
        # so a guest reading across the switch cannot see an old count come back.
        self._em_seq = (self._page[em.EM_OFFSET // 4] + 1) & ~1 & 0xFFFFFFFF
        self._page_topology()

    def shmem_in_use(self, shmid: int, in_use: bool) -> None:
        self._page_in_use = in_use and bool(self._acked & self.shmem_features)
        self.log.info("host frequencies reach the guest through %s", "the shared page" if self._page_in_use
                      else "config space")

    def shmem_detach(self, shmid: int) -> None:
        if self._page is not None:
            self._store(abi.page_flag_stores(0))  # not LIVE: a front-end may keep showing the page
            self._page.release()
        if self._page_base is not None:
            self._page_base.release()
        self._page = self._page_base = None
        self._page_in_use = False

    def _store(self, stores: tuple[tuple[int, int], ...]) -> None:
        # One aligned 32-bit store each (memoryview item assignment of format "I"), in order;
        # x86-64 keeps them in order for the guest (SPEC §8.1).  Native order is little-endian here.
        words = self._page
        assert words is not None
        for off, value in stores:
            words[off >> 2] = value

    def _write_page(self, domains: Sequence[abi.Domain], cur: Sequence[int]) -> None:
        for i, (d, c) in enumerate(zip(domains, cur)):
            new = abi.PageDomain.of(abi.Domain(c, d.min_khz, d.max_khz, d.capacity))
            if new != self._page_values[i]:
                self._store(abi.page_update_stores(i, self._page_seq[i], new))
                self._page_seq[i] = (self._page_seq[i] + 2) & 0xFFFFFFFF
                self._page_values[i] = new
                self.counters.inc("freq_page_updates")

    def _page_topology(self) -> None:
        """After a remap: every domain's entry, then the domain count."""
        if self._page is None:
            return
        doms = self.config.domains
        self._write_page(doms, [d.cur_khz for d in doms])
        self._store(abi.page_count_stores(len(doms)))
        if self.shmem_features & (1 << em.F_ENERGY_MODEL):
            self._store(em.energy_model_stores(self._em_seq, self.energy_model))
            self._em_seq = (self._em_seq + 2) & 0xFFFFFFFF
            self.counters.inc("energy_model_updates")

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
                if status != _AVAIL_INDEX_JUMP:  # every other consumed an avail entry: a batch the driver sent
                    self.seq.reject_whole()
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

    # -- handover (backend/vhost/handover.py) -------------------------------------
    def snapshot(self) -> DeviceSnapshot:
        """What a successor process needs to go on; taken with the lane detached (the session froze)."""
        q = self.seq
        page = None
        if self._page is not None:
            page = PageSnapshot(tuple(self._page_seq), tuple(
                None if v is None else (v.cur_khz, v.freq_scale, v.perf) for v in self._page_values))
        return DeviceSnapshot(self._acked, self.config.encode(),
                              SeqSnapshot(q.last, q.min_offset_ns, q.lost, q.stale, q.last_age_ns),
                              tuple((v.util, v.perf_khz, v.updated) for v in self.vcpus), page,
                              clamps_of(self.policy, self.vm), host_of(self.policy, self.vm))

    def restore(self, d: DeviceSnapshot) -> None:
        """Go on from a predecessor's state.  The config keeps its generation if nothing in it moved,
        and takes the next one otherwise (the session notifies the front-end after a resume)."""
        if len(d.vcpus) != len(self._vcpus):
            raise SnapshotError("vcpu-count", f"snapshot has {len(d.vcpus)} vCPUs, this VM {len(self._vcpus)}")
        if d.acked_features & ~(self._offered | self.shmem_features):
            raise SnapshotError("features-not-offered", f"device features {d.acked_features:#x}")
        if len(d.config) != abi.CONFIG_SIZE:
            raise SnapshotError("bad-config", f"{len(d.config)} bytes")
        (generation,) = struct.unpack_from("<I", d.config)
        same = dataclasses.replace(self.config, generation=generation)
        self.config = same if same.encode() == d.config else dataclasses.replace(
            self.config, generation=(generation + 1) & 0xFFFFFFFF)
        # Frequencies alone reach a guest reading the page without a notification (as in _on_snapshot).
        self._restore_moved = moved_across(d.config, same)
        self._acked = d.acked_features
        s = d.seq
        self.seq = SeqTracker(s.last, s.min_offset_ns, s.lost, s.stale, s.last_age_ns)
        self._vcpus = [VcpuState(u, p, t) for u, p, t in d.vcpus]
        self._page_carried = d.page
        restore_clamps(self.policy, self.vm, d.clamps)
        restore_host(self.policy, self.vm, d.host)

    def owes_notification(self) -> bool:
        """After :meth:`restore` (and the page's resume): did the config move in a way the guest must be told?"""
        moved, freq_only = self._restore_moved
        return moved and not (freq_only and self._page_in_use)

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
